/* cli_check.c — owns `httpshim check`: a rules file validated, and each upstream and
 * rule shown as the library will understand it (with warnings for what it cannot do). */
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
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include "../shim/rules.h"
#include "../shim/exited.h"
#include "../shim/redis_value.h"
#include <fnmatch.h>
#include <hiredis/hiredis.h>
#include <jansson.h>

#include "cli.h"

/* ---- check ---- */

/* What the library would find when it opens stats_socket, said as warnings (the rules are
 * valid; that process runs without stats). Nothing is created. */
static void check_stats_socket(const char *file, const struct shim_config *cfg)
{
    char path[512], dir[512];
    struct sockaddr_un sun;
    /* a 7-digit pid (Linux's largest) is the longest name a process gets */
    if (rules_expand_socket_path(cfg->stats_socket, 4194304, (unsigned)getuid(), path, sizeof path) != 0
        || strlen(path) >= sizeof sun.sun_path) {
        fprintf(stderr, "%s: warning: stats_socket %s: longer than a socket path can be (%zu bytes at most, with "
                        "the pid): processes run without stats\n", file, cfg->stats_socket, sizeof sun.sun_path - 1);
        return;
    }
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir)
        return;
    *slash = 0;
    struct stat st;
    if (lstat(dir, &st) == 0) {
        if (!exited_dir_trusted(&st, (unsigned)getuid()))
            fprintf(stderr, "%s: warning: stats_socket's directory %s is %s: processes of uid %u run without "
                            "stats\n", file, dir, S_ISDIR(st.st_mode) ? "one others can replace files in"
                                                                      : "not a directory", (unsigned)getuid());
        return;
    }
    char *up = strrchr(dir, '/');
    if (up && up != dir)
        *up = 0;
    else
        snprintf(dir, sizeof dir, "/");
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        fprintf(stderr, "%s: warning: stats_socket %s: %s does not exist, and only the last directory is made: "
                        "processes run without stats\n", file, cfg->stats_socket, dir);
}

int cmd_check(int argc, char **argv)
{
    if (argc > 1 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        printf("usage: httpshim check [--connect] [[-c] FILE]\n       httpshim check --defaults\n"
               "Validates a rules file (default $HTTPSHIM_CONF or %s) and prints\n"
               "each upstream with the addresses it resolves to and each rule as understood.\n"
               "Exit 0 when valid, 1 with FILE:LINE messages when not.\n"
               "--connect also reaches the Redis tier (through its sentinels) and says what it found;\n"
               "exit 1 when it cannot.\n"
               "--defaults lists every [global] key with its default.\n", DEFAULT_CONF);
        return 0;
    }
    if (argc > 1 && !strcmp(argv[1], "--defaults")) {
        if (argc > 2) {
            fprintf(stderr, "httpshim check: %s: an argument too many\nusage: httpshim check --defaults\n", argv[2]);
            return 2;
        }
        const char *def;
        for (size_t i = 0; i < rules_global_keys(); i++) {
            const char *name = rules_global_key(i, &def);
            printf("%-20s %s\n", name, def ? def : "none");
        }
        return 0;
    }
    bool connect = argc > 1 && !strcmp(argv[1], "--connect");
    if (connect) {
        argc--;
        argv++;
    }
    if (argc > 2 && !strcmp(argv[1], "-c")) {   /* as stats, purge and run take it */
        argc--;
        argv++;
    }
    /* an option it does not know, or more than one FILE: a usage error, not a file */
    if (argc > 2 || (argc > 1 && argv[1][0] == '-' && argv[1][1])) {
        bool option = argv[1][0] == '-' && argv[1][1];
        fprintf(stderr, "httpshim check: %s: %s\nusage: httpshim check [--connect] [FILE]\n"
                        "       httpshim check --defaults\n", option ? argv[1] : argv[2],
                option ? "unknown option" : "one FILE at most");
        return 2;
    }
    const char *path = argc > 1 ? argv[1] : conf_path(NULL);
    struct shim_config *cfg = calloc(1, sizeof *cfg);
    char err[RULES_ERR_MAX];
    if (!cfg)
        return 1;
    if (rules_load(path, cfg, err) != 0) {
        if (err[0])
            fprintf(stderr, "%s\n", err);
        else
            fprintf(stderr, "%s: %s\n", path, strerror(errno));
        free(cfg);
        return 1;
    }
    printf("%s: ok\n", path);
    check_stats_socket(path, cfg);
    printf("global: pool_max_per_host=%u pool_idle_max=%u pool_queue_timeout=%lldms pool_idle_timeout=%lldms "
           "upstream_timeout=%lldms cache=%s memory_max=%lld max_object=%lld stats_socket=%s busy_poll=%lldus\n",
           cfg->pool_max_per_host, cfg->pool_idle_max, (long long)cfg->pool_queue_timeout_ms,
           (long long)cfg->pool_idle_timeout_ms, (long long)cfg->upstream_timeout_ms,
           cfg->cache == CACHE_OFF ? "off" : cfg->cache == CACHE_REDIS ? "redis" : "memory", (long long)cfg->memory_max, (long long)cfg->max_object,
           cfg->stats_socket, (long long)cfg->busy_poll_us);
    printf("coalescing: coalesce=%s coalesce_timeout=%lldms uncacheable_ttl=%lldms redis_lock_ttl=%lldms\n",
           cfg->coalesce ? "on" : "off", (long long)cfg->coalesce_timeout_ms, (long long)cfg->uncacheable_ttl_ms,
           (long long)cfg->redis_lock_ttl_ms);
    /* an app that speaks TLS to the upstream itself is tunnelled unless intercepted */
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const struct upstream_rule *u = &cfg->upstreams[i];
        if (u->n_cache_rules && u->tls == TLS_TUNNEL && !u->origin_https && (u->port == 443 || u->port == 8443))
            fprintf(stderr, "%s:%d: warning: cache rules on %s:%u are never used if the app speaks TLS to it "
                            "itself: those connections are tunnelled (set tls = intercept)\n",
                    path, u->cache_rules[0].line, u->host, u->port);
    }
    rules_resolve_all(cfg, getaddrinfo);
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        char why[RULES_ERR_MAX];
        if (rules_shadowed(cfg, i, why, sizeof why))
            fprintf(stderr, "%s:%d: warning: %s\n", path, cfg->upstreams[i].line, why);
    }
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const struct upstream_rule *u = &cfg->upstreams[i];
        printf("upstream %s:%u (line %d) ->", u->host, u->port, u->line);
        if (!u->n_addrs)
            printf(" (does not resolve now; addresses the app resolves are learned at run time)");
        for (size_t k = 0; k < u->n_addrs; k++) {
            char ip[INET6_ADDRSTRLEN];
            inet_ntop(u->addrs[k].family, u->addrs[k].bytes, ip, sizeof ip);
            printf(" %s", ip);
        }
        printf("\n");
        if (u->protocol == PROTO_REDIS)
            printf("  protocol=redis pool_max_per_host=%u redis_pinned_max=%u\n", rules_pool_max(cfg, u),
                   u->redis_pinned_max);
        else if (u->pool_max)
            printf("  pool_max_per_host=%u\n", u->pool_max);
        if (u->origin_https)
            printf("  origin https://%s:%u%s%s\n", u->origin_host, u->origin_port, u->tls_ca_file[0] ? " tls_ca_file=" : "",
                   u->tls_ca_file);
        if (u->tls == TLS_INTERCEPT)
            printf("  tls intercept%s%s\n", u->tls_ca_file[0] ? " tls_ca_file=" : "", u->tls_ca_file);
        for (size_t k = 0; k < u->n_cache_rules; k++) {
            const struct cache_rule *r = &u->cache_rules[k];
            printf("  line %d: cache %s %s ttl=%lldms status=", r->line, r->method, r->glob, (long long)r->ttl_ms);
            for (size_t s = 0; s < r->n_status; s++)
                printf("%s%d", s ? "," : "", r->status[s]);
            if (r->n_ignore_query) {
                printf(" ignore_query=");
                for (size_t s = 0; s < r->n_ignore_query; s++)
                    printf("%s%s", s ? "," : "", r->ignore_query[s]);
            }
            if (r->n_key_headers) {
                printf(" key_headers=");
                for (size_t s = 0; s < r->n_key_headers; s++)
                    printf("%s%s", s ? "," : "", r->key_headers[s]);
            }
            printf(" respect_cache_control=%s", r->respect_cache_control ? "yes" : "no");
            if (r->no_coalesce)
                printf(" coalesce=off");
            if (r->stale_while_revalidate_ms)
                printf(" stale_while_revalidate=%lldms", (long long)r->stale_while_revalidate_ms);
            if (r->stale_if_error_ms)
                printf(" stale_if_error=%lldms", (long long)r->stale_if_error_ms);
            printf("\n");
        }
    }
    int rc = 0;
    if (cfg->cache == CACHE_REDIS) {
        if (cfg->redis_mode == REDIS_SENTINEL) {
            printf("redis: sentinel, master %s, db %d, sentinels", cfg->redis_master_name, cfg->redis_db);
            for (size_t i = 0; i < cfg->n_redis_seeds; i++)
                printf(" %s:%d", cfg->redis_seeds[i].host, cfg->redis_seeds[i].port);
            printf("\n");
        } else if (cfg->redis_mode == REDIS_CLUSTER) {
            printf("redis: cluster, seeds");
            for (size_t i = 0; i < cfg->n_redis_seeds; i++)
                printf(" %s:%d", cfg->redis_seeds[i].host, cfg->redis_seeds[i].port);
            printf("\n");
        } else if (cfg->redis_unix[0]) {
            printf("redis: single, %s, db %d\n", cfg->redis_unix, cfg->redis_db);
        } else {
            printf("redis: single, %s:%d, db %d\n", cfg->redis_host, cfg->redis_port, cfg->redis_db);
        }
        /* who the tier logs in as, never with what */
        printf("redis login: %s%s%s%s\n", cfg->redis_user[0] ? "user " : "", cfg->redis_user,
               cfg->redis_user[0] ? ", " : "",
               !cfg->redis_password[0]          ? "no password"
               : cfg->redis_password_from_file ? "password from redis_password_file"
                                                : "password from the URL");
        if (cfg->redis_mode == REDIS_SENTINEL)
            printf("redis sentinels login: %s\n", cfg->redis_sentinel_password[0]
                                                     ? "password from redis_sentinel_password_file"
                                                     : "none");
        if (connect) {
            struct redisContext *servers[32];
            int n = cli_redis_connect(cfg, stdout, servers, 32);
            for (int i = 0; i < n; i++)
                redisFree(servers[i]);
            rc = n > 0 ? 0 : 1;
        }
    } else if (connect) {
        printf("redis: not configured (nothing to connect to)\n");
    }
    rules_free(cfg);
    free(cfg);
    return rc;
}
