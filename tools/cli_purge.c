/* cli_purge.c — owns `httpshim purge`: cache entries dropped in every live process (their
 * stats sockets' POST /purge) and in Redis (SCAN over both key formats, matched by
 * upstream and glob, deleted in batches). */
#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <pwd.h>
#include <limits.h>
#include <math.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "../shim/rules.h"
#include "../shim/exited.h"
#include "../shim/redis_value.h"
#include <fnmatch.h>
#include <hiredis/hiredis.h>
#include <jansson.h>

#include "cli.h"

/* ---- purge ---- */

static void url_encode(const char *in, char *out, size_t n)
{
    size_t k = 0;
    for (; *in && k + 4 < n; in++) {
        unsigned char c = (unsigned char)*in;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || strchr("-_.~/*", c))
            out[k++] = (char)c;
        else
            k += (size_t)snprintf(out + k, n - k, "%%%02X", c);
    }
    out[k] = 0;
}

/* Whether a cache key ("GET http://host:port/path?query\n...") is for this upstream
 * (empty: any) and its path matches the glob — the same test the stats socket applies. */
static bool key_matches(const char *key, size_t len, const char *upstream, const char *glob)
{
    const char *end = key + len;
    const char *p = memmem(key, len, "://", 3);
    if (!p)
        return false;
    p += 3;
    const char *slash = memchr(p, '/', (size_t)(end - p));
    if (!slash)
        return false;
    if (*upstream && ((size_t)(slash - p) != strlen(upstream) || strncasecmp(p, upstream, (size_t)(slash - p))))
        return false;
    char path[4096];
    size_t n = 0;
    while (slash + n < end && slash[n] != '?' && slash[n] != '\n' && n < sizeof path - 1)
        n++;
    memcpy(path, slash, n);
    path[n] = 0;
    return fnmatch(glob, path, 0) == 0;
}

/* s as a SCAN MATCH pattern that matches only itself (a prefix or an IPv6 literal may
 * hold * ? [ ] \), appended at out[*n]; false when it does not fit. */
static bool match_literal(const char *s, char *out, size_t cap, size_t *n)
{
    for (; *s; s++) {
        if (strchr("*?[]\\", *s) && *n + 1 < cap)
            out[(*n)++] = '\\';
        if (*n + 1 >= cap)
            return false;
        out[(*n)++] = *s;
    }
    out[*n] = 0;
    return true;
}

struct purge_pass {
    redisContext *rc;
    const char *upstream, *glob;  /* as the user gave them; upstream "" for any */
    size_t prefix_len;
    bool by_value;                /* new-format keys: read the key each value carries */
    bool key_by_key;              /* a cluster: each key its own slot ({hash}), one UNLINK each */
    long long unlinked;
    bool failed;
};

/* Whether a new-format key is to go: with GLOB `*` every key the scan found (its
 * pattern named the upstream), else those whose value's head (`head`, a GETRANGE reply)
 * carries an internal key that matches. A lock (":lock") holds a token, not a value: it
 * goes only with `*`, and otherwise expires within redis_lock_ttl. */
static bool new_key_goes(const struct purge_pass *p, const redisReply *head)
{
    if (!strcmp(p->glob, "*"))
        return true;
    const char *internal;
    size_t internal_len;
    return head && head->type == REDIS_REPLY_STRING
           && redis_value_key((const unsigned char *)head->str, (size_t)head->len, &internal, &internal_len)
           && key_matches(internal, internal_len, p->upstream, p->glob);
}

/* Old-format keys, "<prefix>GET http://..." and "<prefix>lock:GET http://...", written
 * before keys were hashed: matched on their own text until they expire. */
static bool old_key_goes(const struct purge_pass *p, const redisReply *key)
{
    return (size_t)key->len >= p->prefix_len
           && key_matches(key->str + p->prefix_len, (size_t)key->len - p->prefix_len, p->upstream, p->glob);
}

/* One batch of SCAN's keys: decides (with the values' heads, pipelined, for a glob
 * purge of new-format keys) and UNLINKs those that go, in one command. */
/* The next reply of a pipeline; NULL (the pass failed, its connection not used again)
 * when none could be read. */
static redisReply *next_reply(struct purge_pass *p)
{
    void *reply = NULL;
    if (redisGetReply(p->rc, &reply) != REDIS_OK || !reply) {
        p->failed = true;
        return NULL;
    }
    return reply;
}

static void purge_batch(struct purge_pass *p, const redisReply *keys)
{
    size_t n = keys->elements;
    if (!n)
        return;
    bool read_heads = p->by_value && strcmp(p->glob, "*");
    redisReply **heads = calloc(n, sizeof *heads);
    const char **argv = calloc(n + 1, sizeof *argv);
    size_t *argl = calloc(n + 1, sizeof *argl);
    if (!heads || !argv || !argl) {
        p->failed = true;
        goto out;
    }
    if (read_heads) {
        /* only the head of each value: the key it carries, never the body */
        for (size_t i = 0; i < n; i++)
            if (redisAppendCommand(p->rc, "GETRANGE %b 0 %d", keys->element[i]->str, (size_t)keys->element[i]->len,
                                   (int)REDIS_VALUE_KEY_SPAN - 1) != REDIS_OK) {
                p->failed = true;      /* the connection is not used again */
                goto out;
            }
        for (size_t i = 0; i < n; i++)
            if (!(heads[i] = next_reply(p)))
                goto out;
    }
    size_t argc = 0;
    argv[argc] = "UNLINK";
    argl[argc++] = 6;
    for (size_t i = 0; i < n; i++) {
        const redisReply *k = keys->element[i];
        if (k->type != REDIS_REPLY_STRING)
            continue;
        if (p->by_value ? new_key_goes(p, heads[i]) : old_key_goes(p, k)) {
            argv[argc] = k->str;
            argl[argc++] = (size_t)k->len;
        }
    }
    /* one UNLINK for the batch, or on a cluster one per key, pipelined: its keys are in
     * as many slots, and a command naming several is refused (CROSSSLOT) */
    size_t commands = p->key_by_key ? argc - 1 : argc > 1;
    for (size_t i = 0; i < commands; i++) {
        const char *one[2] = { argv[0], argv[i + 1] };
        size_t one_len[2] = { argl[0], argl[i + 1] };
        if ((p->key_by_key ? redisAppendCommandArgv(p->rc, 2, one, one_len)
                           : redisAppendCommandArgv(p->rc, (int)argc, argv, argl)) != REDIS_OK) {
            p->failed = true;
            goto out;
        }
    }
    for (size_t i = 0; i < commands; i++) {
        redisReply *u = next_reply(p);
        if (!u)
            goto out;
        if (u->type == REDIS_REPLY_INTEGER)
            p->unlinked += u->integer;
        else
            p->failed = true;
        freeReplyObject(u);
    }
out:
    for (size_t i = 0; heads && i < n; i++)
        if (heads[i])
            freeReplyObject(heads[i]);
    free(heads);
    free(argv);
    free(argl);
}

/* A SCAN walk (never KEYS) over pattern, batch by batch. */
static void purge_scan(struct purge_pass *p, const char *pattern)
{
    char cursor[32] = "0";
    for (int round = 0; round < 1000000 && !p->failed; round++) {
        redisReply *r = redisCommand(p->rc, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2 || r->element[0]->type != REDIS_REPLY_STRING
            || r->element[1]->type != REDIS_REPLY_ARRAY) {
            if (r)
                freeReplyObject(r);
            p->failed = true;
            break;
        }
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        purge_batch(p, r->element[1]);
        freeReplyObject(r);
        if (!strcmp(cursor, "0"))
            break;
    }
}

/* SCAN + UNLINK over the prefix; -1 when Redis cannot be reached. Keys are
 * <prefix>v3:<host>:<port>:<route>:<hash>[:lock] (shim/cache_redis.c): with --upstream
 * the scan asks only for that upstream's; a GLOB other than `*` is matched against the
 * internal key each value carries. Keys of the old, unhashed format are matched on their
 * own text, so that they can still be purged during their TTL. */
static long long purge_redis(const struct shim_config *cfg, const char *upstream, const char *glob)
{
    /* the upstream as the rules spell it, which is how the library writes it in keys */
    char label[RULES_HOST_MAX + 16];
    snprintf(label, sizeof label, "%s", upstream);
    for (size_t i = 0; *upstream && i < cfg->n_upstreams; i++) {
        const struct upstream_rule *u = &cfg->upstreams[i];
        if (!strcasecmp(u->label, upstream))
            snprintf(label, sizeof label, "%s", u->label);
    }
    char new_pattern[2 * (sizeof cfg->redis_prefix + sizeof label) + 16], old_pattern[2 * sizeof cfg->redis_prefix + 16];
    size_t nn = 0, on = 0;
    if (!match_literal(cfg->redis_prefix, new_pattern, sizeof new_pattern, &nn)
        || !match_literal(REDIS_KEY_FORMAT_TAG, new_pattern, sizeof new_pattern, &nn)
        || (*upstream && (!match_literal(label, new_pattern, sizeof new_pattern, &nn)
                          || !match_literal(":", new_pattern, sizeof new_pattern, &nn)))
        || nn + 2 > sizeof new_pattern || !match_literal(cfg->redis_prefix, old_pattern, sizeof old_pattern, &on)
        || on + sizeof "* http://*" > sizeof old_pattern) {
        fprintf(stderr, "httpshim purge: --upstream is too long\n");
        return -1;
    }
    memcpy(new_pattern + nn, "*", 2);
    memcpy(old_pattern + on, "* http://*", sizeof "* http://*");   /* old keys: "METHOD http://..." */

    redisContext *servers[32];
    int n = cli_redis_connect(cfg, NULL, servers, 32);
    if (n < 0)
        return -1;
    long long unlinked = 0;
    bool failed = false;
    for (int i = 0; i < n; i++) {      /* (a cluster's masters: each holds its own slots' keys) */
        struct purge_pass p = { .rc = servers[i], .upstream = upstream, .glob = glob,
                                .prefix_len = strlen(cfg->redis_prefix), .by_value = true,
                                .key_by_key = cfg->redis_mode == REDIS_CLUSTER };
        purge_scan(&p, new_pattern);
        if (!p.failed) {
            p.by_value = false;
            purge_scan(&p, old_pattern);
        }
        if (p.failed)
            fprintf(stderr, "httpshim purge: redis: %s\n", servers[i]->err ? servers[i]->errstr : "unexpected reply");
        unlinked += p.unlinked;
        failed |= p.failed;
        redisFree(servers[i]);
    }
    return failed && !unlinked ? -1 : unlinked;
}

int cmd_purge(int argc, char **argv)
{
    static const struct option opts[] = {
        { "upstream", required_argument, NULL, 'u' }, { "config", required_argument, NULL, 'c' },
        { "help", no_argument, NULL, 'h' }, { 0, 0, 0, 0 } };
    const char *upstream = "", *conf = NULL;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "u:c:h", opts, NULL)) != -1) {
        if (c == 'u')
            upstream = optarg;
        else if (c == 'c')
            conf = optarg;
        else if (c == 'h') {
            printf("usage: httpshim purge [-c FILE] [--upstream HOST:PORT] [GLOB]\n"
                   "Drops cache entries whose path matches GLOB (default: all) in every live\n"
                   "process, and in Redis (SCAN + UNLINK) when the rules use it, optionally only\n"
                   "for one upstream. Prints how many were dropped; the processes that did not\n"
                   "answer within 3 s (all are asked at once) are named on stderr.\n");
            return 0;
        } else {
            fprintf(stderr, "usage: httpshim purge [-c FILE] [--upstream HOST:PORT] [GLOB]\n");
            return 2;
        }
    }
    if (argc - optind > 1) {
        fprintf(stderr, "httpshim purge: one GLOB at most\nusage: httpshim purge [-c FILE] [--upstream HOST:PORT] [GLOB]\n");
        return 2;
    }
    const char *glob = optind < argc ? argv[optind] : "*";
    /* what can never match is said, not counted as "purged 0" */
    if (glob[0] != '/' && strcmp(glob, "*")) {
        fprintf(stderr, "httpshim purge: GLOB '%s' must start with '/': it is matched against paths (e.g. /v3/ip/*), "
                        "never whole URLs\n", glob);
        return 2;
    }
    const char *colon = strrchr(upstream, ':');
    if (upstream[0] && (!colon || colon == upstream || !colon[1] || strspn(colon + 1, "0123456789") != strlen(colon + 1)
                        || strlen(colon + 1) > 5 || atoi(colon + 1) < 1 || atoi(colon + 1) > 65535)) {
        fprintf(stderr, "httpshim purge: --upstream '%s' is not HOST:PORT (a port 1-65535)\nusage: httpshim purge [-c FILE] [--upstream HOST:PORT] [GLOB]\n", upstream);
        return 2;
    }
    if (strchr(glob, '?') && strchr(glob, '='))
        fprintf(stderr, "httpshim purge: a path is matched without its query ('?' in GLOB matches one character)\n");
    char pattern[256];
    if (load_pattern(conf_path(conf), pattern, sizeof pattern) != 0)
        return 1;
    static struct proc procs[MAX_PROCS];
    int n = find_processes(pattern, procs, MAX_PROCS);
    char eu[512], eg[1024], target[1700];
    url_encode(upstream, eu, sizeof eu);
    url_encode(glob, eg, sizeof eg);
    snprintf(target, sizeof target, "/purge?upstream=%s&glob=%s", eu, eg);
    double purged = 0;
    int answered = 0, failed = 0, others = 0;
    static struct answer answers[MAX_PROCS];
    ask_all(procs, n, "POST", target, answers);
    for (int i = 0; i < n; i++) {
        char *text = answers[i].body;
        json_t *j = text ? parse_answer(text, answers[i].len) : NULL;
        const json_t *error = json_object_get(j, "error");
        if (j && !error) {
            purged += num(j, "purged");
            answered++;
        } else if (j && json_string_value(error) && !strcmp(json_string_value(error), "no such upstream")) {
            others++;                  /* another service's process: nothing of that upstream's to purge */
        } else if (j) {
            const char *msg = json_string_value(error);
            fprintf(stderr, "httpshim purge: pid %d: %s\n", procs[i].pid, msg ? msg : "(null)");
            failed++;
        } else if (answers[i].outcome == ASK_ANSWERED) {
            answers[i].outcome = ASK_FAILED;   /* an answer that is not JSON: named below */
        }
        json_decref(j);
        free(text);
    }
    struct shim_config *cfg = calloc(1, sizeof *cfg);
    char err[RULES_ERR_MAX];
    long long in_redis = 0;
    bool redis = cfg && rules_load(conf_path(conf), cfg, err) == 0 && cfg->cache == CACHE_REDIS;
    if (redis && (in_redis = purge_redis(cfg, upstream, glob)) < 0)
        failed++;
    if (cfg)
        rules_free(cfg);
    free(cfg);
    /* a process that did not answer is not one that purged nothing: one that was sent the
     * request (stopped, its socket's backlog took it) purges when it runs again, and an
     * unreached one never got it; each is named, so that the count below is not read as
     * every process */
    char pids[512];
    int silent = pids_with(procs, answers, n, 1u << ASK_SILENT, pids, sizeof pids);
    if (silent)
        fprintf(stderr, "httpshim purge: %d process%s did not answer within %d s (stopped, or busy): the purge was "
                        "sent and waits in %s, done when %s again, not counted in the purged line:%s\n", silent,
                silent == 1 ? "" : "es", ASK_DEADLINE_MS / 1000, silent == 1 ? "its socket" : "their sockets",
                silent == 1 ? "it runs" : "they run", pids);
    int unreached = pids_with(procs, answers, n, 1u << ASK_UNREACHED, pids, sizeof pids);
    if (unreached)
        fprintf(stderr, "httpshim purge: %d process%s could not be reached (stopped with %s socket's backlog full, "
                        "or busy): nothing purged there:%s\n", unreached, unreached == 1 ? "" : "es",
                unreached == 1 ? "its" : "their", pids);
    int refused = pids_with(procs, answers, n, 1u << ASK_FAILED, pids, sizeof pids);
    say_failed("purge", refused, pids);
    failed += refused;
    if (others)
        fprintf(stderr, "httpshim purge: %d process%s whose rules do not list %s: nothing of theirs purged\n", others,
                others == 1 ? "" : "es", upstream);
    if (redis)
        printf("purged %.0f entries in %d processes and %lld keys in Redis\n", purged, answered,
               in_redis < 0 ? 0 : in_redis);
    else
        printf("purged %.0f entries in %d processes\n", purged, answered);
    return failed ? 1 : 0;
}
