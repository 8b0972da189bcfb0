/* fuzz_rules.c — libFuzzer target for rules_load() (shim/rules.c), the rules.conf parser.
 *
 * The input is the content of a rules file. It is written to one memfd per process
 * (a /tmp file unlinked at once where memfd_create is missing) and loaded through
 * /proc/self/fd/N. rules_resolve_all (getaddrinfo) is never called.
 * Invariants (a violation aborts):
 *  - on success: every string field is NUL-terminated inside its array; n_upstreams <=
 *    RULES_MAX_UPSTREAMS, each upstream has a valid host (non-empty, [alnum.-_:]), port
 *    1..65535, no duplicate host:port, n_addrs 1 for an IP literal and 0 for a name, at most
 *    RULES_MAX_CACHE_RULES rules, which are a heap array exactly when there is one; each rule
 *    has a known method, a glob starting with '/' (or "*"), ttl > 0, 1..RULES_MAX_LIST
 *    statuses in 100..599, at most RULES_MAX_LIST non-empty ignore_query / key_headers
 *    entries without separators; the globals lie in their documented ranges; a literal
 *    upstream's own address and port match it (rules_match_addr), a named one is listed
 *    (rules_name_is_listed) and matches once an address is learned for it (rules_learn);
 *    rules_expand_socket_path fits or says -1. rules_free() releases everything.
 *  - on failure: err is NUL-terminated inside RULES_ERR_MAX and reads "PATH:..." (the file
 *    exists, so never empty), and rules_load has already freed the rule arrays (any leak
 *    is reported by LeakSanitizer). */
#include "../../shim/rules.h"
#include "fuzz.h"
#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <unistd.h>

static int input_fd = -1;
static char input_path[64];
static struct shim_config cfg;        /* ~70 KB: not on the stack */

static void open_input(void)
{
    if (input_fd >= 0)
        return;
    input_fd = memfd_create("fuzz_rules", MFD_CLOEXEC);
    if (input_fd < 0) {
        char tmpl[] = "/tmp/fuzz_rules.XXXXXX";
        input_fd = mkstemp(tmpl);
        if (input_fd < 0) {
            perror("fuzz_rules: memfd_create and mkstemp");
            abort();
        }
        unlink(tmpl);
    }
    snprintf(input_path, sizeof input_path, "/proc/self/fd/%d", input_fd);
}

static void write_input(const uint8_t *data, size_t size)
{
    if (ftruncate(input_fd, 0) != 0)
        abort();
    size_t done = 0;
    while (done < size) {             /* each pass writes at least one byte or aborts */
        ssize_t n = pwrite(input_fd, data + done, size - done, (off_t)done);
        if (n <= 0)
            abort();
        done += (size_t)n;
    }
}

static bool terminated(const char *s, size_t cap) { return memchr(s, 0, cap) != NULL; }

static bool in_list(const char *s, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(s, list[i]))
            return true;
    return false;
}

static void check_list(const char entries[][64], size_t n)
{
    FUZZ_CHECK(n <= RULES_MAX_LIST);
    for (size_t i = 0; i < n; i++) {
        FUZZ_CHECK(terminated(entries[i], 64));
        FUZZ_CHECK(entries[i][0] != 0);
        FUZZ_CHECK(!strpbrk(entries[i], ", \t\n"));
    }
}

static void check_rule(const struct cache_rule *r)
{
    static const char *const methods[] = { "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "*" };
    FUZZ_CHECK(terminated(r->method, sizeof r->method));
    FUZZ_CHECK(in_list(r->method, methods, sizeof methods / sizeof methods[0]));
    FUZZ_CHECK(terminated(r->glob, sizeof r->glob));
    FUZZ_CHECK(r->glob[0] == '/' || !strcmp(r->glob, "*"));
    FUZZ_CHECK(r->ttl_ms > 0);
    FUZZ_CHECK(r->n_status >= 1 && r->n_status <= RULES_MAX_LIST);
    for (size_t i = 0; i < r->n_status; i++)
        FUZZ_CHECK(r->status[i] >= 100 && r->status[i] <= 599);
    check_list(r->ignore_query, r->n_ignore_query);
    check_list(r->key_headers, r->n_key_headers);
    FUZZ_CHECK(r->line > 0);
}

/* The upstream's own address must lead back to it, or to an earlier one with the same
 * address and port (two spellings of one IPv6 address are two upstreams). */
static void check_match(size_t i, const struct rules_addr *a)
{
    const struct upstream_rule *u = &cfg.upstreams[i];
    struct sockaddr_in6 s6;
    struct sockaddr_in s4;
    int found;
    if (a->family == AF_INET) {
        memset(&s4, 0, sizeof s4);
        s4.sin_family = AF_INET;
        s4.sin_port = htons(u->port);
        memcpy(&s4.sin_addr, a->bytes, 4);
        found = rules_match_addr(&cfg, (const struct sockaddr *)&s4, sizeof s4);
    } else {
        FUZZ_CHECK(a->family == AF_INET6);
        memset(&s6, 0, sizeof s6);
        s6.sin6_family = AF_INET6;
        s6.sin6_port = htons(u->port);
        memcpy(&s6.sin6_addr, a->bytes, 16);
        found = rules_match_addr(&cfg, (const struct sockaddr *)&s6, sizeof s6);
    }
    FUZZ_CHECK(found >= 0 && (size_t)found <= i);
    FUZZ_CHECK(cfg.upstreams[found].port == u->port);
}

static void check_loaded(void)
{
    FUZZ_CHECK(!strcmp(cfg.path, input_path));
    FUZZ_CHECK(cfg.pool_max_per_host >= 1 && cfg.pool_max_per_host <= RULES_POOL_MAX);
    FUZZ_CHECK(cfg.pool_idle_timeout_ms > 0 && cfg.upstream_timeout_ms > 0);
    FUZZ_CHECK(cfg.cache == CACHE_OFF || cfg.cache == CACHE_MEMORY || cfg.cache == CACHE_REDIS);
    FUZZ_CHECK(cfg.memory_max > 0 && cfg.max_object > 0);
    FUZZ_CHECK(cfg.redis_timeout_ms > 0 && cfg.redis_max_object > 0);
    FUZZ_CHECK(terminated(cfg.stats_socket, sizeof cfg.stats_socket));
    FUZZ_CHECK(cfg.stats_socket[0] == '/' && strstr(strrchr(cfg.stats_socket, '/'), "%p"));
    FUZZ_CHECK(terminated(cfg.redis_host, sizeof cfg.redis_host));
    FUZZ_CHECK(terminated(cfg.redis_unix, sizeof cfg.redis_unix));
    FUZZ_CHECK(terminated(cfg.redis_password, sizeof cfg.redis_password));
    FUZZ_CHECK(terminated(cfg.redis_prefix, sizeof cfg.redis_prefix));
    if (cfg.cache == CACHE_REDIS) {
        if (cfg.redis_mode == REDIS_SINGLE) {
            FUZZ_CHECK(cfg.redis_unix[0] == '/' || (cfg.redis_host[0] && cfg.redis_port >= 1 && cfg.redis_port <= 65535));
        } else {                       /* Sentinel or Cluster: the seeds, each a host and a port */
            FUZZ_CHECK(cfg.redis_mode == REDIS_SENTINEL || cfg.redis_mode == REDIS_CLUSTER);
            FUZZ_CHECK(cfg.n_redis_seeds >= 1 && cfg.n_redis_seeds <= RULES_MAX_REDIS_SEEDS);
            FUZZ_CHECK(cfg.redis_mode == REDIS_CLUSTER || cfg.redis_master_name[0]);
            for (size_t i = 0; i < cfg.n_redis_seeds; i++) {
                const struct redis_addr *a = &cfg.redis_seeds[i];
                FUZZ_CHECK(terminated(a->host, sizeof a->host) && a->host[0] && !strpbrk(a->host, " []/@|"));
                FUZZ_CHECK(a->port >= 1 && a->port <= 65535);
            }
        }
        FUZZ_CHECK(cfg.redis_db >= 0 && cfg.redis_db <= 1000000);
    }
    char sock[108];
    if (rules_expand_socket_path(cfg.stats_socket, 4194304, 4294967295u, sock, sizeof sock) == 0)
        FUZZ_CHECK(strlen(sock) < sizeof sock && sock[0] == '/');

    FUZZ_CHECK(cfg.n_upstreams <= RULES_MAX_UPSTREAMS);
    for (size_t i = 0; i < cfg.n_upstreams; i++) {
        struct upstream_rule *u = &cfg.upstreams[i];
        FUZZ_CHECK(terminated(u->host, sizeof u->host) && u->host[0]);
        for (const char *c = u->host; *c; c++)
            FUZZ_CHECK(isalnum((unsigned char)*c) || strchr(".-_:", *c));
        FUZZ_CHECK(u->port >= 1);
        FUZZ_CHECK(u->line > 0);
        for (size_t j = 0; j < i; j++)
            FUZZ_CHECK(strcasecmp(cfg.upstreams[j].host, u->host) || cfg.upstreams[j].port != u->port);
        FUZZ_CHECK(u->n_cache_rules <= RULES_MAX_CACHE_RULES);
        FUZZ_CHECK((u->n_cache_rules > 0) == (u->cache_rules != NULL));
        for (size_t k = 0; k < u->n_cache_rules; k++)
            check_rule(&u->cache_rules[k]);
        FUZZ_CHECK(u->n_addrs == (u->host_is_literal ? 1u : 0u));
        if (u->host_is_literal)
            check_match(i, &u->addrs[0]);
        else
            FUZZ_CHECK(rules_name_is_listed(&cfg, u->host));
    }
    /* learn one address for every distinct name: each upstream of that name must then
     * match it (one address per name keeps every table below RULES_MAX_ADDRS) */
    for (size_t i = 0; i < cfg.n_upstreams; i++) {
        struct upstream_rule *u = &cfg.upstreams[i];
        if (u->host_is_literal)
            continue;
        bool seen = false;
        for (size_t j = 0; j < i && !seen; j++)
            seen = !cfg.upstreams[j].host_is_literal && !strcasecmp(cfg.upstreams[j].host, u->host);
        if (seen)
            continue;
        struct rules_addr a = { .family = AF_INET, .bytes = { 10, 200, (uint8_t)(i >> 8), (uint8_t)i } };
        rules_learn(&cfg, u->host, AF_INET, a.bytes);
        for (size_t j = i; j < cfg.n_upstreams; j++)
            if (!cfg.upstreams[j].host_is_literal && !strcasecmp(cfg.upstreams[j].host, u->host)) {
                FUZZ_CHECK(cfg.upstreams[j].n_addrs == 1);
                check_match(j, &a);
            }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[RULES_ERR_MAX];
    open_input();
    write_input(data, size);
    memset(err, 'x', sizeof err);      /* so an unterminated message shows */
    int rc = rules_load(input_path, &cfg, err);
    FUZZ_CHECK(rc == 0 || rc == -1);
    if (rc == 0) {
        check_loaded();
        rules_free(&cfg);
        for (size_t i = 0; i < cfg.n_upstreams; i++)
            FUZZ_CHECK(cfg.upstreams[i].cache_rules == NULL);
        return 0;
    }
    FUZZ_CHECK(terminated(err, RULES_ERR_MAX));
    size_t plen = strlen(input_path);
    FUZZ_CHECK(err[0] != 0);
    FUZZ_CHECK(!strncmp(err, input_path, plen) && err[plen] == ':');
    for (size_t i = 0; i < cfg.n_upstreams; i++)
        FUZZ_CHECK(cfg.upstreams[i].cache_rules == NULL);
    return 0;
}
