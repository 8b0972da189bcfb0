/* cli_stats.c — owns `httpshim stats`: a snapshot of every live process (and the final
 * counters of those that exited, and the inert ones), summed; the table an operator reads
 * at a glance (Redis, upstreams, the pool, tunnels, TLS, processes, inert), --json,
 * --prometheus, --rules, and --watch with rates, redrawn in place on a terminal. */
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

/* ---- stats ---- */

/* The q-quantile of two histograms together (hits and misses), in seconds, interpolated
 * linearly within the bucket that holds it: -1 when empty, INFINITY beyond the last bound. */
static double quantile(const json_t *a, const json_t *b, double q)
{
    const json_t *ba = json_object_get(a, "buckets"), *bb = json_object_get(b, "buckets");
    double count = num(a, "count") + (a == b ? 0 : num(b, "count"));
    if (!ba || !bb || count <= 0)
        return -1;
    double below = 0, lower_bound = 0, target = q * count;
    for (size_t i = 0; i < json_array_size(ba) && i < json_array_size(bb); i++) {
        const json_t *pa = json_array_get(ba, i), *pb = json_array_get(bb, i);
        if (json_array_size(pa) < 2 || json_array_size(pb) < 2)
            return -1;
        double bound = json_number_value(json_array_get(pa, 0));
        double cum = json_number_value(json_array_get(pa, 1)) + (a == b ? 0 : json_number_value(json_array_get(pb, 1)));
        if (cum >= target && cum > below)
            return lower_bound + (bound - lower_bound) * (target - below) / (cum - below);
        below = cum;
        lower_bound = bound;
    }
    return INFINITY;
}

/* Every duration in milliseconds, with the digits that matter. */
static void fmt_ms(char *out, size_t n, double seconds)
{
    double ms = seconds * 1e3;
    if (seconds < 0)
        snprintf(out, n, "-");
    else if (seconds == INFINITY)
        snprintf(out, n, ">10000ms");
    else
        snprintf(out, n, ms >= 100 ? "%.0fms" : ms >= 10 ? "%.1fms" : ms >= 1 ? "%.2fms" : "%.3fms", ms);
}

static void fmt_pct(char *out, size_t n, double part, double whole)
{
    snprintf(out, n, whole > 0 ? "%.1f" : "-", whole > 0 ? 100 * part / whole : 0);
}

static void fmt_age(char *out, size_t n, double s)
{
    if (s < 120)
        snprintf(out, n, "%.0fs", s);
    else if (s < 7200)
        snprintf(out, n, "%.0fm", s / 60);
    else if (s < 172800)
        snprintf(out, n, "%.1fh", s / 3600);
    else
        snprintf(out, n, "%.1fd", s / 86400);
}

/* What one look at the sockets found: each process's document (live ones answered now,
 * exited ones left a record), their sum, and when. */
struct snapshot {
    json_t **docs;
    double *exited_age;                /* per doc: seconds since it exited, -1 when live */
    int n, live, exited;
    json_t *inert;                     /* records of processes that run without the shim, and why */
    json_t *total;
    double at;                         /* CLOCK_MONOTONIC seconds */
    int unanswered;                    /* live processes left out: no answer by the deadline */
    char unanswered_pids[512];
    int failed;                        /* ... and those that answered with an error */
    char failed_pids[512];
};

/* The live processes that did not answer (stopped with SIGSTOP, or too busy) are named on
 * stderr, after the table: left out without a word, a stopped worker looked like one
 * that was never there. */
static void say_unanswered(int count, const char *pids)
{
    if (count)
        fprintf(stderr, "httpshim stats: %d process%s did not answer within %d s (stopped, or busy), left out:%s\n",
                count, count == 1 ? "" : "es", ASK_DEADLINE_MS / 1000, pids);
}

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A record an exited process left: its JSON, NULL when unreadable. */
static json_t *read_record(const char *path)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return NULL;
    char *text = malloc(RESPONSE_MAX);
    size_t len = text ? fread(text, 1, RESPONSE_MAX, f) : 0;
    fclose(f);
    json_t *j = text && len < RESPONSE_MAX ? parse_answer(text, len) : NULL;
    free(text);
    return j;
}

static void add_doc(struct snapshot *s, json_t *j, double exited_age)
{
    if (exited_age >= 0) {             /* an exited process holds nothing now: its gauges are 0 */
        static const char *const gauges[] = { "pool_idle", "pool_busy", "pool_waiting", "memory_entries",
                                               "memory_bytes" };
        json_t *ups = json_object_get(j, "upstreams");
        for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it))
            for (size_t g = 0; g < sizeof gauges / sizeof gauges[0]; g++)
                if (json_object_get(json_object_iter_value(it), gauges[g]))
                    json_object_set_new(json_object_iter_value(it), gauges[g], json_integer(0));
        if (json_object_get(json_object_get(j, "redis"), "connected"))
            json_object_set_new(json_object_get(j, "redis"), "connected", json_integer(0));
    }
    s->docs[s->n] = j;
    s->exited_age[s->n++] = exited_age;
    if (exited_age < 0)
        s->live++;
    else
        s->exited++;
    if (!s->total) {
        s->total = json_deep_copy(j);
    } else {
        json_t *r = sum_into(s->total, j, false);
        if (r != s->total) {
            json_decref(s->total);
            s->total = r;
        }
    }
}

/* For the table: a string's control characters (an escape sequence, a newline in a command
 * name another user chose) shown as '?', so that no one writes to the operator's terminal
 * or splits a row; --json keeps them, escaped. */
static bool printable_only;

static json_t *printable_string(const char *text)
{
    char *copy = strdup(text);
    for (char *c = copy; c && *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            *c = '?';
    json_t *r = copy ? json_string(copy) : NULL;   /* (invalid UTF-8 cannot come from parse_answer) */
    free(copy);
    return r;
}

static void make_printable(json_t *v, int depth)
{
    if (depth > 8)
        return;
    if (json_is_array(v)) {
        for (size_t i = 0; i < json_array_size(v); i++) {
            json_t *e = json_array_get(v, i);
            if (json_is_string(e))
                json_array_set_new(v, i, printable_string(json_string_value(e)));
            else
                make_printable(e, depth + 1);
        }
        return;
    }
    if (!json_is_object(v))
        return;
    json_t *fixed = json_object();
    for (void *it = json_object_iter(v); it && fixed; it = json_object_iter_next(v, it)) {
        json_t *e = json_object_iter_value(it);
        json_t *key = printable_string(json_object_iter_key(it));
        if (json_is_string(e))
            json_object_set_new(fixed, json_string_value(key), printable_string(json_string_value(e)));
        else {
            make_printable(e, depth + 1);
            json_object_set(fixed, json_string_value(key), e);
        }
        json_decref(key);
    }
    if (fixed) {
        json_object_clear(v);
        json_object_update(v, fixed);  /* (in the same order: the table's rows keep theirs) */
    }
    json_decref(fixed);
}

/* What a process or its record says reaches an operator who may be root reading another
 * user's (--user): strings only where the document has names (a command, a rule, an
 * address, why it is inert), every other leaf a number or a boolean, and the pid the one
 * its socket or file is named by. Anything else is left out, as a corrupt record is. */
static bool well_formed_value(const json_t *v, const char *key, int depth)
{
    static const char *const named[] = { "comm", "cmdline", "rule", "mode", "master", "address", "inert" };
    if (depth > 8)
        return false;
    if (json_is_object(v)) {
        for (void *it = json_object_iter((json_t *)v); it; it = json_object_iter_next((json_t *)v, it))
            if (!well_formed_value(json_object_iter_value(it), json_object_iter_key(it), depth + 1))
                return false;
        return true;
    }
    if (json_is_array(v)) {
        for (size_t i = 0; i < json_array_size(v); i++)
            if (!well_formed_value(json_array_get(v, i), key, depth + 1))
                return false;
        return true;
    }
    if (json_is_string(v)) {
        for (size_t i = 0; key && i < sizeof named / sizeof named[0]; i++)
            if (!strcmp(key, named[i]))
                return true;
        return false;
    }
    return json_is_number(v) || json_is_boolean(v);
}

static bool well_formed(json_t *doc, int pid)
{
    const json_t *said = json_object_get(doc, "pid");
    if (!json_is_object(doc) || !json_is_integer(said) || json_integer_value(said) != pid
        || !well_formed_value(doc, NULL, 0))
        return false;
    if (printable_only)
        make_printable(doc, 0);
    return true;
}

/* Whether the process that has pid now is the one that wrote the record: one that started
 * at another tick is a later process given the same pid. */
static bool pid_still_the_writer(int pid, const json_t *record)
{
    if (kill(pid, 0) != 0 && errno != EPERM)
        return false;
    const json_t *ticks = json_object_get(record, "start_ticks");
    if (!json_is_integer(ticks))      /* a record written before start_ticks was: alive is enough */
        return true;
    return (unsigned long long)json_integer_value(ticks) == exited_start_ticks(pid);
}

/* The inert records beside pattern's sockets, each with "live": whether its process is. */
static void add_inert(struct snapshot *s, const char *pattern, bool live_only)
{
    static struct exited_record records[EXITED_KEEP];
    int m = exited_list(pattern, view_uid, INERT_SUFFIX, records, EXITED_KEEP);
    for (int i = 0; i < m && s->inert; i++) {
        json_t *j = read_record(records[i].path);
        if (j && !well_formed(j, records[i].pid)) {
            json_decref(j);
            j = NULL;
        }
        bool live = j && pid_still_the_writer(records[i].pid, j);
        if (j && live_only && !live) {
            json_decref(j);
            j = NULL;
        }
        if (!j)
            continue;
        json_object_set_new(j, "live", json_boolean(live));
        json_array_append_new(s->inert, j);
    }
}

static void snapshot_take(struct snapshot *s, const char *pattern, bool live_only)
{
    static struct proc procs[MAX_PROCS];
    static struct exited_record records[EXITED_KEEP];
    memset(s, 0, sizeof *s);
    int n = find_processes(pattern, procs, MAX_PROCS);
    int m = live_only ? 0 : exited_list(pattern, view_uid, EXITED_SUFFIX, records, EXITED_KEEP);
    if (live_only)
        exited_list(pattern, view_uid, EXITED_SUFFIX, NULL, 0);   /* still pruned */
    s->inert = json_array();
    add_inert(s, pattern, live_only);
    if (strcmp(pattern, EXITED_DEFAULT_PATTERN))   /* where a process that read no rules leaves it */
        add_inert(s, EXITED_DEFAULT_PATTERN, live_only);
    s->docs = calloc((size_t)(n + m) + 1, sizeof *s->docs);
    s->exited_age = calloc((size_t)(n + m) + 1, sizeof *s->exited_age);
    struct answer *answers = calloc((size_t)n + 1, sizeof *answers);
    s->at = mono_s();
    if (!s->docs || !s->exited_age || !answers) {
        free(answers);
        return;
    }
    ask_all(procs, n, "GET", "/stats", answers);
    for (int i = 0; i < n; i++) {
        json_t *j = answers[i].body ? parse_answer(answers[i].body, answers[i].len) : NULL;
        free(answers[i].body);
        if (j && !well_formed(j, procs[i].pid)) {
            json_decref(j);
            j = NULL;
        }
        if (j)
            add_doc(s, j, -1);
        else if (answers[i].outcome == ASK_ANSWERED)
            answers[i].outcome = ASK_FAILED;
    }
    s->unanswered = pids_with(procs, answers, n, ASK_NO_ANSWER, s->unanswered_pids, sizeof s->unanswered_pids);
    s->failed = pids_with(procs, answers, n, 1u << ASK_FAILED, s->failed_pids, sizeof s->failed_pids);
    free(answers);
    time_t now = time(NULL);
    for (int i = 0; i < m; i++) {
        bool still_live = false;                 /* a pid reused, or its socket not gone yet */
        for (int k = 0; k < n && !still_live; k++)
            still_live = procs[k].pid == records[i].pid;
        json_t *j = still_live ? NULL : read_record(records[i].path);
        if (j && !well_formed(j, records[i].pid)) {
            json_decref(j);
            j = NULL;
        }
        if (j)
            add_doc(s, j, difftime(now, records[i].mtime));
    }
}

static void snapshot_free(struct snapshot *s)
{
    for (int i = 0; i < s->n; i++)
        json_decref(s->docs[i]);
    free(s->docs);
    free(s->exited_age);
    json_decref(s->total);
    json_decref(s->inert);
    memset(s, 0, sizeof *s);
}

/* The longest pool-queue wait of upstream label across the processes (a maximum, not a sum). */
static double longest_wait(const struct snapshot *s, const char *label)
{
    double m = 0;
    for (int i = 0; i < s->n; i++) {
        double v = num(json_object_get(json_object_get(s->docs[i], "upstreams"), label), "queue_wait_max_seconds");
        m = v > m ? v : m;
    }
    return m;
}

/* The counter `key` of upstream `label` per second between two snapshots. */
static double rate(const struct snapshot *now, const struct snapshot *before, const char *label, const char *key)
{
    double dt = now->at - before->at;
    const json_t *a = json_object_get(json_object_get(now->total, "upstreams"), label);
    const json_t *b = json_object_get(json_object_get(before->total, "upstreams"), label);
    double d = num(a, key) - num(b, key);
    return dt > 0 && d > 0 ? d / dt : 0;
}

static void print_inert(const struct snapshot *s);

/* Each server of the live processes' Redis tiers: up in how many of them, errors in all
 * (a cluster's masters, or a failed-over master beside the new one). */
static void print_redis_nodes(const struct snapshot *s)
{
    struct { const char *address; int up, seen; double errors; } nodes[64];
    int n = 0;
    for (int i = 0; i < s->n; i++) {
        if (s->exited_age[i] >= 0)
            continue;
        const json_t *list = json_object_get(json_object_get(s->docs[i], "redis"), "nodes");
        for (size_t k = 0; k < json_array_size(list); k++) {
            const json_t *node = json_array_get(list, k);
            const char *addr = json_string_value(json_object_get(node, "address"));
            if (!addr)
                continue;
            int j = 0;
            while (j < n && strcmp(nodes[j].address, addr))
                j++;
            if (j == n) {
                if (n == 64)
                    continue;
                nodes[n].address = addr;
                nodes[n].up = nodes[n].seen = 0;
                nodes[n].errors = 0;
                n++;
            }
            nodes[j].seen++;
            nodes[j].up += num(node, "up") > 0;
            nodes[j].errors += num(node, "errors");
        }
    }
    if (n < 2 && !(n == 1 && nodes[0].errors > 0))
        return;                        /* one server, no errors: the line above says it all */
    printf("       nodes");
    for (int j = 0; j < n; j++)
        printf("  %s %s errors %.0f", nodes[j].address, nodes[j].up == nodes[j].seen ? "up" : nodes[j].up ? "PARTLY" : "DOWN",
               nodes[j].errors);
    printf("\n");
}

static void print_table(const struct snapshot *s, const struct snapshot *before)
{
    json_t *total = s->total, *ups = json_object_get(total, "upstreams");
    printf("httpshim: %d live process%s, %d exited in the last %d min, %zu inert%s\n", s->live,
           s->live == 1 ? "" : "es", s->exited, EXITED_MAX_AGE_S / 60, json_array_size(s->inert),
           before ? "" : "  (--live: live ones only)");
    if (!total) {
        print_inert(s);
        return;
    }
    const json_t *redis = json_object_get(total, "redis");
    if (num(redis, "configured") > 0) {
        double connected = 0, live_redis = 0;
        for (int i = 0; i < s->n; i++)
            if (s->exited_age[i] < 0) {
                const json_t *r = json_object_get(s->docs[i], "redis");
                live_redis += num(r, "configured") > 0;
                connected += num(r, "connected") > 0;
            }
        char p50[32], p99[32];
        const json_t *lat = json_object_get(redis, "latency_seconds");
        fmt_ms(p50, sizeof p50, quantile(lat, lat, 0.5));
        fmt_ms(p99, sizeof p99, quantile(lat, lat, 0.99));
        printf("REDIS  %s (%.0f of %.0f live processes)  hits %.0f  misses %.0f  errors %.0f  timeouts %.0f  "
               "p50 %s  p99 %s\n", live_redis == 0 ? "no live process" : connected == live_redis ? "connected"
               : connected == 0 ? "DISCONNECTED" : "PARTLY CONNECTED", connected, live_redis, num(redis, "hits"),
               num(redis, "misses"), num(redis, "errors"), num(redis, "timeouts"), p50, p99);
        /* where the live processes' tier is: one address, or each one when they differ (a
         * failover some have not followed yet) */
        const char *mode = "", *masters[4];
        int n_masters = 0, more = 0;
        for (int i = 0; i < s->n; i++) {
            const json_t *r = json_object_get(s->docs[i], "redis");
            const char *m = json_string_value(json_object_get(r, "master"));
            if (s->exited_age[i] >= 0 || num(r, "configured") <= 0 || !m || !*m)
                continue;
            mode = json_string_value(json_object_get(r, "mode")) ? json_string_value(json_object_get(r, "mode")) : "";
            bool seen = false;
            for (int k = 0; k < n_masters; k++)
                seen |= !strcmp(masters[k], m);
            if (!seen && n_masters < 4)
                masters[n_masters++] = m;
            else if (!seen)
                more++;
        }
        if (n_masters) {
            printf("       mode %s  server%s", mode, n_masters > 1 ? "s" : "");
            for (int k = 0; k < n_masters; k++)
                printf(" %s", masters[k]);
            if (more)
                printf(" (+%d more)", more);
            if (!strcmp(mode, "sentinel"))
                printf("  failovers %.0f  sentinel errors %.0f  not master %.0f", num(redis, "failovers"),
                       num(redis, "sentinel_errors"), num(redis, "not_master"));
            if (!strcmp(mode, "cluster"))
                printf("  redirects %.0f", num(redis, "redirects"));
            printf("\n");
            print_redis_nodes(s);
        }
    } else {
        printf("REDIS  not configured\n");
    }
    printf("\n%-24s %9s %6s %8s %9s %6s %8s %8s %8s %8s %8s %7s %9s %9s", "UPSTREAM", "REQUESTS", "HIT%", "HITS",
           "COALESCED", "STALE", "UP.REQS", "CLIENT", "UPSTREAM", "SAVED", "TUNNELS", "ERRORS", "p50", "p99");
    if (before)
        printf(" %8s %8s %9s", "REQ/s", "HITS/s", "UP.REQ/s");
    printf("\n%-24s %9s %6s %8s %9s %6s %8s %8s %8s %8s %8s %7s %9s %9s\n", "", "", "", "", "", "", "", "CONNS",
           "CONNS", "CONNS", "", "", "", "");
    for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it)) {
        const char *label = json_object_iter_key(it);
        const json_t *u = json_object_iter_value(it), *err = json_object_get(u, "errors");
        double req = num(u, "requests"), client = num(u, "client_connections"), tunnels = num(u, "tunnels");
        /* a tunnel opens an upstream connection of its own for each client connection */
        double saved = client - num(u, "upstream_conns_opened") - tunnels;
        char hitpct[16], p50[32], p99[32];
        fmt_pct(hitpct, sizeof hitpct, num(u, "hits"), req);
        const json_t *hl = json_object_get(u, "hit_latency_seconds"), *ml = json_object_get(u, "miss_latency_seconds");
        fmt_ms(p50, sizeof p50, quantile(hl, ml, 0.5));
        fmt_ms(p99, sizeof p99, quantile(hl, ml, 0.99));
        printf("%-24s %9.0f %6s %8.0f %9.0f %6.0f %8.0f %8.0f %8.0f %8.0f %8.0f %7.0f %9s %9s", label, req, hitpct,
               num(u, "hits"), num(u, "coalesced"), num(u, "stale_while_revalidate") + num(u, "stale_if_error"),
               num(u, "upstream_requests"), client, num(u, "upstream_conns_opened"), saved > 0 ? saved : 0, tunnels,
               num(err, "upstream") + num(err, "app") + num(err, "tunnel"), p50, p99);
        if (before)
            printf(" %8.1f %8.1f %9.1f", rate(s, before, label, "requests"), rate(s, before, label, "hits"),
                   rate(s, before, label, "upstream_requests"));
        printf("\n");
    }
    /* the pool: connections now, the requests that waited in the queue for one, and the
     * app's connects that failed while it was cold */
    printf("\n%-24s %9s %9s %9s %9s %9s %10s %10s %9s %9s %9s %9s\n", "POOL", "IDLE", "BUSY", "WAITING", "WAITED",
           "TIMEOUTS", "WAIT p99", "LONGEST", "REFUSED", "CONN.ERR", "FD.DIRECT", "OWN.SOCK");
    for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it)) {
        const json_t *u = json_object_iter_value(it), *qw = json_object_get(u, "queue_wait_seconds");
        char p99[32], longest[32];
        fmt_ms(p99, sizeof p99, quantile(qw, qw, 0.99));
        fmt_ms(longest, sizeof longest, longest_wait(s, json_object_iter_key(it)));
        double other = num(u, "connect_timeout") + num(u, "connect_unreachable") + num(u, "connect_other");
        printf("%-24s %9.0f %9.0f %9.0f %9.0f %9.0f %10s %10s %9.0f %9.0f %9.0f %9.0f\n", json_object_iter_key(it),
               num(u, "pool_idle"), num(u, "pool_busy"), num(u, "pool_waiting"), num(u, "queue_waits"),
               num(u, "queue_timeouts"), p99, longest, num(u, "connect_refused"), other,
               num(u, "connect_direct_fd_limit"), num(u, "connect_direct_app_socket"));
    }
    /* what was not answered as HTTP, and why; and what failed */
    printf("\n%-24s %9s %9s %9s %9s %9s %9s %9s %9s\n", "TUNNELS", "ALL", "TLS", "NOT.HTTP", "TOO.LARGE", "OTHER",
           "ERR.UP", "ERR.APP", "ERR.TUN");
    for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it)) {
        const json_t *u = json_object_iter_value(it), *err = json_object_get(u, "errors");
        printf("%-24s %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f\n", json_object_iter_key(it), num(u, "tunnels"),
               num(u, "tunnels_tls"), num(u, "tunnels_not_http"), num(u, "tunnels_too_large"), num(u, "tunnels_other"),
               num(err, "upstream"), num(err, "app"), num(err, "tunnel"));
    }
    /* TLS the app encrypts itself: terminated here, or tunnelled (with every other tunnel) and why */
    printf("\n%-24s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s\n", "TLS", "INTERCEPT", "HS.FAIL", "TUNNELS", "NOT.CONF",
           "NO.MARK", "CL.CERT", "UNVERIF.", "UNREAD.", "UP.REFUSE", "NO.RELAY");
    for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it)) {
        const json_t *u = json_object_iter_value(it);
        printf("%-24s %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f\n", json_object_iter_key(it),
               num(u, "tls_intercepted"), num(u, "tls_handshake_failures"), num(u, "tunnels"),
               num(u, "tls_tunnel_not_configured"), num(u, "tls_tunnel_no_mark"), num(u, "tls_tunnel_client_cert"),
               num(u, "tls_tunnel_unverified"), num(u, "tls_tunnel_unreadable"), num(u, "tls_upstream_verify_failed"),
               num(u, "tls_not_relayable"));
    }
    /* protocol = redis upstreams: the commands carried, and the connections it took */
    bool any_redis = false;
    for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it))
        any_redis |= num(json_object_iter_value(it), "redis_commands") > 0
                     || num(json_object_iter_value(it), "redis_server_opened") > 0;
    if (any_redis) {
        printf("\n%-24s %9s %9s %9s %9s %9s %9s %9s %9s %9s %9s\n", "REDIS PROTOCOL", "COMMANDS", "BATCHES",
               "APP.CONNS", "SRV.OPEN", "SRV.OPENED", "SAVED", "LENT.NOW", "DIRECT", "LOCAL", "SRV.LOST");
        for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it)) {
            const json_t *u = json_object_iter_value(it);
            if (num(u, "redis_commands") == 0 && num(u, "redis_server_opened") == 0)
                continue;
            double saved = num(u, "client_connections") - num(u, "upstream_conns_opened") - num(u, "tunnels");
            printf("%-24s %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f\n", json_object_iter_key(it),
                   num(u, "redis_commands"), num(u, "redis_batches"), num(u, "client_connections"),
                   num(u, "redis_server_open"), num(u, "redis_server_opened"), saved > 0 ? saved : 0,
                   num(u, "redis_pinned_multi") + num(u, "redis_pinned_watch") + num(u, "redis_pinned_blocking"),
                   num(u, "redis_direct"), num(u, "redis_local_replies"), num(u, "redis_server_lost"));
        }
    }
    /* POLLING: the engine's time spent busy polling instead of sleeping (busy_poll), and
     * the share of its polls that caught an event */
    printf("\n%-8s %-16s %8s %-11s %9s %9s %7s %9s %9s %9s %7s\n", "PID", "COMMAND", "UPTIME", "STATE", "REQUESTS",
           "HITS", "HIT%", "CLIENT", "UPSTREAM", "POLLING", "PAID%");
    for (int i = 0; i < s->n; i++) {
        double req = 0, hits = 0, cc = 0, uc = 0;
        json_t *pu = json_object_get(s->docs[i], "upstreams");
        for (void *it = json_object_iter(pu); it; it = json_object_iter_next(pu, it)) {
            const json_t *u = json_object_iter_value(it);
            req += num(u, "requests");
            hits += num(u, "hits");
            cc += num(u, "client_connections");
            uc += num(u, "upstream_conns_opened");
        }
        char hitpct[16], up[32], state[32], age[32], comm[17], polling[32], paid[16];
        fmt_pct(hitpct, sizeof hitpct, hits, req);
        const json_t *eng = json_object_get(s->docs[i], "engine");
        snprintf(polling, sizeof polling, "%.3fs", num(eng, "poll_seconds"));
        fmt_pct(paid, sizeof paid, num(eng, "polls_paid"), num(eng, "polls"));
        fmt_age(up, sizeof up, num(s->docs[i], "uptime_seconds"));
        fmt_age(age, sizeof age, s->exited_age[i]);
        snprintf(state, sizeof state, s->exited_age[i] < 0 ? "live" : "exited %s", age);
        const char *c = json_string_value(json_object_get(s->docs[i], "comm"));
        snprintf(comm, sizeof comm, "%s", c && *c ? c : "?");
        printf("%-8.0f %-16s %8s %-11s %9.0f %9.0f %7s %9.0f %9.0f %9s %7s\n", num(s->docs[i], "pid"), comm, up, state,
               req, hits, hitpct, cc, uc, polling, paid);
    }
    print_inert(s);
}

/* Processes the shim did nothing in, and why (their rules could not be read). */
#define INERT_ROWS_MAX 8
static void print_inert(const struct snapshot *s)
{
    if (!json_array_size(s->inert))
        return;
    printf("\nINERT: the shim did nothing in these processes\n%-8s %-16s %-6s %s\n", "PID", "COMMAND", "STATE",
           "WHY");
    /* live ones first, then the newest gone: a screenful, so that --watch keeps the table
     * above it in view however many short-lived processes left a record */
    size_t shown = 0, n = json_array_size(s->inert);
    for (int live = 1; live >= 0; live--)
        for (size_t i = 0; i < n && shown < INERT_ROWS_MAX; i++) {
            const json_t *r = json_array_get(s->inert, i);
            if (json_is_true(json_object_get(r, "live")) != (live == 1))
                continue;
            const char *c = json_string_value(json_object_get(r, "comm"));
            const char *why = json_string_value(json_object_get(r, "inert"));
            printf("%-8.0f %-16.16s %-6s %s\n", num(r, "pid"), c && *c ? c : "?", live ? "live" : "gone",
                   why ? why : "?");
            shown++;
        }
    if (shown < n)
        printf("... and %zu more (httpshim stats --json lists them all)\n", n - shown);
}

/* Per cache rule: which one pays off, which never hits. */
static void print_rules(const struct snapshot *s)
{
    json_t *ups = json_object_get(s->total, "upstreams");
    printf("%-24s %-40s %9s %9s %7s\n", "UPSTREAM", "RULE", "REQUESTS", "HITS", "HIT%");
    for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it)) {
        const json_t *rules = json_object_get(json_object_iter_value(it), "rules");
        for (size_t i = 0; i < json_array_size(rules); i++) {
            const json_t *r = json_array_get(rules, i);
            const char *text = json_string_value(json_object_get(r, "rule"));
            char hitpct[16];
            fmt_pct(hitpct, sizeof hitpct, num(r, "hits"), num(r, "requests"));
            printf("%-24s %-40s %9.0f %9.0f %7s\n", json_object_iter_key(it), text ? text : "?", num(r, "requests"),
                   num(r, "hits"), hitpct);
        }
    }
}

/* Sums Prometheus samples with the same name and labels; comments kept once. */
static void print_prometheus_sum(char **texts, int n)
{
    struct sample { char *key; double value; bool comment; } *s = NULL;
    size_t ns = 0, cap = 0;
    for (int i = 0; i < n; i++) {
        if (!texts[i])
            continue;
        char *save = NULL;
        for (char *line = strtok_r(texts[i], "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
            bool comment = line[0] == '#';
            char *sp = comment ? NULL : strrchr(line, ' ');
            if (!comment && !sp)
                continue;
            if (sp)
                *sp = 0;
            size_t k = 0;
            while (k < ns && (s[k].comment != comment || strcmp(s[k].key, line)))
                k++;
            if (k == ns) {
                if (ns == cap) {
                    cap = cap ? cap * 2 : 256;
                    struct sample *g = realloc(s, cap * sizeof *s);
                    if (!g)
                        break;
                    s = g;
                }
                s[ns].key = strdup(line);
                s[ns].value = 0;
                s[ns].comment = comment;
                ns++;
            }
            if (sp)
                s[k].value += strtod(sp + 1, NULL);
        }
    }
    for (size_t k = 0; k < ns; k++) {
        if (s[k].comment)
            printf("%s\n", s[k].key);
        else if (s[k].value == (double)(long long)s[k].value)
            printf("%s %lld\n", s[k].key, (long long)s[k].value);
        else
            printf("%s %.6f\n", s[k].key, s[k].value);
        free(s[k].key);
    }
    free(s);
}

static void print_prometheus(const char *pattern)
{
    static struct proc procs[MAX_PROCS];
    int n = find_processes(pattern, procs, MAX_PROCS);
    char **texts = calloc((size_t)n + 1, sizeof *texts);
    struct answer *answers = calloc((size_t)n + 1, sizeof *answers);
    if (texts && answers) {
        ask_all(procs, n, "GET", "/metrics", answers);
        for (int i = 0; i < n; i++)
            texts[i] = answers[i].body;
        print_prometheus_sum(texts, n);
        fflush(stdout);
        char pids[512];
        int count = pids_with(procs, answers, n, ASK_NO_ANSWER, pids, sizeof pids);
        say_unanswered(count, pids);
        count = pids_with(procs, answers, n, 1u << ASK_FAILED, pids, sizeof pids);
        say_failed("stats", count, pids);
    }
    for (int i = 0; i < n && texts; i++)
        free(texts[i]);
    free(texts);
    free(answers);
}

static void print_snapshot_json(const struct snapshot *s)
{
    printf("{\"total\":");
    if (s->total) {
        json_t *ups = json_object_get(s->total, "upstreams");
        printf("{\"processes\":%d,\"exited\":%d,\"inert\":%zu,\"stats_refused\":%.0f,\"upstreams\":", s->live,
               s->exited, json_array_size(s->inert), num(s->total, "stats_refused"));
        if (ups)
            print_json(ups);
        else
            printf("{}");
        json_t *redis = json_object_get(s->total, "redis");
        if (redis) {
            printf(",\"redis\":");
            print_json(redis);
        }
        /* the engines' loops, summed (each process's busy_poll_us is in its own document) */
        const json_t *eng = json_object_get(s->total, "engine");
        printf(",\"engine\":{\"sleeps\":%.0f,\"polls\":%.0f,\"polls_paid\":%.0f,\"poll_seconds\":%.6f}",
               num(eng, "sleeps"), num(eng, "polls"), num(eng, "polls_paid"), num(eng, "poll_seconds"));
        printf("}");
    } else {
        printf("{\"processes\":0,\"exited\":0,\"inert\":%zu,\"upstreams\":{}}", json_array_size(s->inert));
    }
    printf(",\"processes\":[");
    for (int i = 0; i < s->n; i++) {
        printf("%s", i ? "," : "");
        print_json(s->docs[i]);
    }
    printf("],\"inert\":");
    print_json(s->inert);
    printf("}\n");
}

static volatile sig_atomic_t stop_watching;
static void on_stop(int sig) { (void)sig; stop_watching = 1; }

int cmd_stats(int argc, char **argv)
{
    static const struct option opts[] = {
        { "json", no_argument, NULL, 'j' }, { "prometheus", no_argument, NULL, 'p' },
        { "rules", no_argument, NULL, 'r' }, { "live", no_argument, NULL, 'l' },
        { "watch", required_argument, NULL, 'w' }, { "config", required_argument, NULL, 'c' },
        { "user", required_argument, NULL, 'u' }, { "help", no_argument, NULL, 'h' }, { 0, 0, 0, 0 } };
    int format = 't', c, formats = 0;
    double watch = 0;
    bool live_only = false;
    const char *conf = NULL;
    optind = 1;
    while ((c = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
        if (c == 'j' || c == 'p' || c == 'r') {
            format = c;
            formats++;
        }
        else if (c == 'l')
            live_only = true;
        else if (c == 'w') {
            char *end = NULL;
            watch = strtod(optarg, &end);
            if (!end || end == optarg || *end || !(watch > 0) || watch > 86400) {
                fprintf(stderr, "httpshim stats: --watch takes a number of seconds above 0: %s\n", optarg);
                return 2;
            }
        }
        else if (c == 'c')
            conf = optarg;
        else if (c == 'u') {
            if (parse_user(optarg, &view_uid) != 0) {
                fprintf(stderr, "httpshim stats: no such user: %s\n", optarg);
                return 2;
            }
        } else if (c == 'h') {
            printf("usage: httpshim stats [-c FILE] [--json|--prometheus|--rules] [--live] [--watch SECONDS]\n"
                   "                      [--user NAME|UID]\n"
                   "Reads every live process's stats socket (the stats_socket of FILE, default\n"
                   "$HTTPSHIM_CONF or %s) and the final counters that processes which exited\n"
                   "in the last %d minutes left beside theirs, sums them and prints a table: Redis,\n"
                   "per upstream (requests, hits, connections saved, tunnels, errors, latency), the\n"
                   "pool, tunnels by reason, TLS, then one row per process. --live: live processes\n"
                   "only. --rules: requests and hits per cache rule. --json: {\"total\": {...},\n"
                   "\"processes\": [{\"pid\": N, \"exited\": false, ...}]}. --prometheus: the summed\n"
                   "/metrics text of the live processes. --watch: again every SECONDS, with rates;\n"
                   "redrawn in place on a terminal. --user: another user's processes (root; e.g.\n"
                   "the workers a master runs as nobody). Processes that could not read their rules\n"
                   "are listed as INERT, with why (their records are beside the default socket path,\n"
                   "%s). Sockets of dead processes are removed. Every socket is asked at once;\n"
                   "the live processes that did not answer within 3 s are named on stderr.\n",
                   DEFAULT_CONF, EXITED_MAX_AGE_S / 60, EXITED_DEFAULT_PATTERN);
            return 0;
        } else {
            fprintf(stderr, "usage: httpshim stats [-c FILE] [--json|--prometheus|--rules] [--live] "
                            "[--watch SECONDS] [--user NAME|UID]\n");
            return 2;
        }
    }
    if (optind < argc || formats > 1) {
        fprintf(stderr, "httpshim stats: %s\nusage: httpshim stats [-c FILE] [--json|--prometheus|--rules] [--live] "
                        "[--watch SECONDS] [--user NAME|UID]\n",
                formats > 1 ? "one of --json, --prometheus, --rules" : "no arguments but options");
        return 2;
    }
    char pattern[256];
    if (load_pattern(conf_path(conf), pattern, sizeof pattern) != 0)
        return 1;
    bool tty = isatty(STDOUT_FILENO);
    struct snapshot before = { 0 };
    bool have_before = false;
    if (watch > 0) {
        signal(SIGINT, on_stop);
        signal(SIGTERM, on_stop);
    }
    printable_only = format != 'j';
    do {
        if (format == 'p') {
            print_prometheus(pattern);
        } else {
            struct snapshot now;
            snapshot_take(&now, pattern, live_only);
            if (watch > 0 && format == 't') {
                if (tty)
                    printf("\033[H\033[J");
                else
                    printf("--- %.0f\n", (double)time(NULL));
            }
            if (format == 'j')
                print_snapshot_json(&now);
            else if (!now.total && !json_array_size(now.inert))
                printf("no httpshim processes, live or recently exited (sockets: %s)\n", pattern);
            else if (format == 'r')
                print_rules(&now);
            else
                print_table(&now, have_before ? &before : NULL);
            fflush(stdout);
            say_unanswered(now.unanswered, now.unanswered_pids);
            say_failed("stats", now.failed, now.failed_pids);
            if (have_before)
                snapshot_free(&before);
            before = now;
            have_before = true;
        }
        fflush(stdout);
        for (double slept = 0; watch > 0 && slept < watch && !stop_watching; slept += 0.05)
            usleep(50000);
    } while (watch > 0 && !stop_watching);
    if (have_before)
        snapshot_free(&before);
    return 0;
}
