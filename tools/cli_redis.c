/* cli_redis.c — owns reaching the Redis tier from the httpshim command (purge, check
 * --connect): the one server of a redis:// URL, or the master the sentinels of a
 * redis-sentinel:// URL name (asked one after another, the answer checked with ROLE), with
 * 2 s timeouts, logged in (AUTH, SELECT) as the library would. Blocking: a command-line
 * tool may wait. */
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

/* What the sentinels name as master: the first that answers. */
static int ask_sentinels(const struct shim_config *cfg, char *host, size_t host_cap, int *port, FILE *report)
{
    for (size_t i = 0; i < cfg->n_sentinels; i++) {
        const struct redis_node *n = &cfg->sentinels[i];
        redisContext *rc = reach(n->host, n->port, NULL, report, "sentinel");
        if (!rc)
            continue;
        redisReply *r = redisCommand(rc, "SENTINEL get-master-addr-by-name %s", cfg->redis_master_name);
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
            return 0;
    }
    return -1;
}

redisContext *cli_redis_connect(const struct shim_config *cfg, FILE *report)
{
    char host[256];
    int port = cfg->redis_port;
    snprintf(host, sizeof host, "%s", cfg->redis_host);
    if (cfg->redis_mode == REDIS_SENTINEL && ask_sentinels(cfg, host, sizeof host, &port, report) != 0) {
        fprintf(stderr, "httpshim: redis: no sentinel named a master %s\n", cfg->redis_master_name);
        return NULL;
    }
    redisContext *rc = reach(host, port, cfg->redis_unix, report, "redis");
    if (!rc) {
        fprintf(stderr, "httpshim: redis: cannot reach %s:%d\n", cfg->redis_unix[0] ? cfg->redis_unix : host, port);
        return NULL;
    }
    redisReply *r;
    const char *failed = NULL;
    if (cfg->redis_password[0] && (r = redisCommand(rc, "AUTH %s", cfg->redis_password))) {
        if (r->type == REDIS_REPLY_ERROR)
            failed = "AUTH refused";
        freeReplyObject(r);
    }
    if (!failed && cfg->redis_db && (r = redisCommand(rc, "SELECT %d", cfg->redis_db))) {
        if (r->type == REDIS_REPLY_ERROR)
            failed = "SELECT refused";
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
        fprintf(report, "  redis %s:%d: reached%s\n", cfg->redis_unix[0] ? cfg->redis_unix : host, port,
                cfg->redis_mode == REDIS_SENTINEL ? ", ROLE master" : "");
    return rc;
}
