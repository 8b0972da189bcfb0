/* cli_redis.c — owns reaching the Redis tier from the httpshim command (purge, check
 * --connect): the one server of a redis:// URL, the master the sentinels of a
 * redis-sentinel:// URL name (asked one after another, the answer checked with ROLE), or
 * every master of a redis-cluster:// URL's cluster (CLUSTER SLOTS asked of the seeds in
 * turn), with 2 s timeouts, logged in (AUTH, SELECT) as the library would. Blocking: a
 * command-line tool may wait. */
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../shim/rules.h"
#include "cli.h"

static const struct timeval TIMEOUT = { 2, 0 };

static redisContext *reach(const char *host, int port, const char *unix_path, FILE *report, const char *what)
{
    redisContext *rc = unix_path && unix_path[0] ? redisConnectUnixWithTimeout(unix_path, TIMEOUT)
                                                 : redisConnectWithTimeout(host, port, TIMEOUT);
    if (!rc || rc->err) {
        if (report)
            fprintf(report, "  %s %s:%d: %s\n", what, unix_path && unix_path[0] ? unix_path : host, port,
                    rc ? rc->errstr : "out of memory");
        if (rc)
            redisFree(rc);
        return NULL;
    }
    redisSetTimeout(rc, TIMEOUT);
    return rc;
}

/* What the sentinels name as master, asked from the sentinel `from` on: the index of the
 * first that answers, or -1. */
static int ask_sentinels(const struct shim_config *cfg, size_t from, char *host, size_t host_cap, int *port,
                         FILE *report)
{
    for (size_t i = from; i < cfg->n_redis_seeds; i++) {
        const struct redis_addr *n = &cfg->redis_seeds[i];
        redisContext *rc = reach(n->host, n->port, NULL, report, "sentinel");
        if (!rc)
            continue;
        redisReply *r = NULL;
        if (cfg->redis_sentinel_password[0] && (r = redisCommand(rc, "AUTH %s", cfg->redis_sentinel_password))
            && r->type != REDIS_REPLY_ERROR) {
            freeReplyObject(r);
            r = NULL;
        }
        if (!r)
            r = redisCommand(rc, "SENTINEL get-master-addr-by-name %s", cfg->redis_master_name);
        bool ok = r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 && r->element[0]->type == REDIS_REPLY_STRING
                  && r->element[1]->type == REDIS_REPLY_STRING && (size_t)r->element[0]->len < host_cap;
        if (ok) {
            memcpy(host, r->element[0]->str, (size_t)r->element[0]->len + 1);
            *port = atoi(r->element[1]->str);
        }
        if (report && ok)
            fprintf(report, "  sentinel %s:%d: master %s is %s:%d\n", n->host, n->port, cfg->redis_master_name, host,
                    *port);
        else if (report)
            fprintf(report, "  sentinel %s:%d: %s\n", n->host, n->port,
                    r && r->type == REDIS_REPLY_ERROR ? r->str : "does not know that master");
        if (r)
            freeReplyObject(r);
        redisFree(rc);
        if (ok)
            return (int)i;
    }
    return -1;
}

/* One server, logged in; NULL (said on stderr) when it cannot be. */
static redisContext *login(const struct shim_config *cfg, const char *host, int port, FILE *report)
{
    redisContext *rc = reach(host, port, cfg->redis_mode == REDIS_SINGLE ? cfg->redis_unix : NULL, report, "redis");
    if (!rc) {
        fprintf(stderr, "httpshim: redis: cannot reach %s:%d\n", cfg->redis_unix[0] ? cfg->redis_unix : host, port);
        return NULL;
    }
    redisReply *r;
    const char *failed = NULL;
    /* every step must be answered as Redis answers it: a listener that is not Redis (no
     * reply, a protocol error) is not "reached" */
    if (cfg->redis_password[0]) {
        r = cfg->redis_user[0] ? redisCommand(rc, "AUTH %s %s", cfg->redis_user, cfg->redis_password)
                               : redisCommand(rc, "AUTH %s", cfg->redis_password);
        failed = !r ? "no answer to AUTH (not Redis?)" : r->type == REDIS_REPLY_ERROR ? "AUTH refused" : NULL;
        if (r)
            freeReplyObject(r);
    }
    if (!failed && cfg->redis_db && cfg->redis_mode != REDIS_CLUSTER) {
        r = redisCommand(rc, "SELECT %d", cfg->redis_db);
        failed = !r ? "no answer to SELECT (not Redis?)" : r->type == REDIS_REPLY_ERROR ? "SELECT refused" : NULL;
        if (r)
            freeReplyObject(r);
    }
    if (!failed) {
        r = redisCommand(rc, "PING");
        if (!r || r->type != REDIS_REPLY_STATUS || strcmp(r->str, "PONG"))
            failed = !r ? "no answer to PING (not Redis?)" : "PING not answered PONG";
        if (r)
            freeReplyObject(r);
    }
    if (!failed && cfg->redis_mode == REDIS_SENTINEL) {
        r = redisCommand(rc, "ROLE");
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 1 || r->element[0]->type != REDIS_REPLY_STRING
            || strcmp(r->element[0]->str, "master"))
            failed = "not a master (ROLE)";
        if (r)
            freeReplyObject(r);
    }
    if (failed) {
        fprintf(stderr, "httpshim: redis %s:%d: %s\n", host, port, failed);
        redisFree(rc);
        return NULL;
    }
    if (report)
        fprintf(report, "  redis %s:%d: reached%s\n", cfg->redis_unix[0] && cfg->redis_mode == REDIS_SINGLE
                ? cfg->redis_unix : host, port, cfg->redis_mode == REDIS_SENTINEL ? ", ROLE master" : "");
    return rc;
}

/* A cluster's masters, from the first seed that answers CLUSTER SLOTS. */
static int cluster_masters(const struct shim_config *cfg, FILE *report, redisContext **out, int max)
{
    for (size_t i = 0; i < cfg->n_redis_seeds; i++) {
        const struct redis_addr *seed = &cfg->redis_seeds[i];
        redisContext *rc = login(cfg, seed->host, seed->port, NULL);
        if (!rc)
            continue;
        redisReply *r = redisCommand(rc, "CLUSTER SLOTS");
        redisFree(rc);
        if (!r || r->type != REDIS_REPLY_ARRAY) {
            if (report)
                fprintf(report, "  node %s:%d: %s\n", seed->host, seed->port,
                        r && r->type == REDIS_REPLY_ERROR ? r->str : "no slot map");
            if (r)
                freeReplyObject(r);
            continue;
        }
        int n = 0, failed = 0;
        char seen[64][280];
        for (size_t k = 0; k < r->elements && n < max && n < 64; k++) {
            const redisReply *range = r->element[k];
            if (range->type != REDIS_REPLY_ARRAY || range->elements < 3 || range->element[2]->type != REDIS_REPLY_ARRAY
                || range->element[2]->elements < 2
                || (range->element[2]->element[0]->type != REDIS_REPLY_STRING
                    && range->element[2]->element[0]->type != REDIS_REPLY_NIL))
                continue;
            /* an empty host (a node that does not know its own address: a one-node cluster),
             * or null in newer Redis, means the address the map was asked at: the seed's */
            const char *host = range->element[2]->element[0]->type == REDIS_REPLY_STRING
                                       && range->element[2]->element[0]->str[0]
                                   ? range->element[2]->element[0]->str
                                   : seed->host;
            int port = (int)range->element[2]->element[1]->integer;
            char name[280];
            snprintf(name, sizeof name, "%s:%d", host, port);
            if (report)
                fprintf(report, "  node %s:%d: slots %lld-%lld on master %s\n", seed->host, seed->port,
                        range->element[0]->integer, range->element[1]->integer, name);
            bool dup = false;
            for (int j = 0; j < n + failed && j < 64; j++)
                dup |= !strcmp(seen[j], name);
            if (dup)
                continue;
            snprintf(seen[n + failed], sizeof seen[0], "%s", name);
            if ((out[n] = login(cfg, host, port, report)))
                n++;
            else
                failed++;
        }
        freeReplyObject(r);
        if (failed) {
            for (int j = 0; j < n; j++)
                redisFree(out[j]);
            return -1;
        }
        return n > 0 ? n : -1;
    }
    fprintf(stderr, "httpshim: redis: no cluster node answered CLUSTER SLOTS\n");
    return -1;
}

int cli_redis_connect(const struct shim_config *cfg, FILE *report, redisContext **out, int max)
{
    if (max < 1)
        return -1;
    if (cfg->redis_mode == REDIS_CLUSTER)
        return cluster_masters(cfg, report, out, max);
    char host[256];
    int port = cfg->redis_port;
    snprintf(host, sizeof host, "%s", cfg->redis_host);
    if (cfg->redis_mode != REDIS_SENTINEL)
        return (out[0] = login(cfg, host, port, report)) ? 1 : -1;
    /* a master named that cannot be reached (a stale sentinel's): the next sentinel's, as
     * the engine does */
    for (int at = ask_sentinels(cfg, 0, host, sizeof host, &port, report); at >= 0;
         at = ask_sentinels(cfg, (size_t)at + 1, host, sizeof host, &port, report))
        if ((out[0] = login(cfg, host, port, report)) != NULL)
            return 1;
    fprintf(stderr, "httpshim: redis: no sentinel named a master %s that could be reached\n", cfg->redis_master_name);
    return -1;
}
