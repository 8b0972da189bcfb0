/* redis_sentinel.c — owns finding the Redis tier's master behind Sentinel: asks the
 * sentinels (SENTINEL get-master-addr-by-name), one after another when one fails, with a
 * bounded backoff; keeps a subscription to +switch-master on one of them to hear of a
 * failover at once; and asks again whenever the tier doubts the master it was given.
 * Whether the master is really one (ROLE) is checked by cache_redis.c on each connection
 * it makes. The address and the failovers seen are in shim_redis for the stats. Engine
 * thread only. */
#include "redis_sentinel.h"
#include "clock.h"
#include "log.h"
#include "loop.h"
#include "redis_link.h"
#include "stats.h"
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 2000
#define QUERY_TIMEOUT_MS 1000          /* a sentinel that does not answer: the next one */

struct asker {                         /* one connection to a sentinel: a query, or the subscription */
    struct redis_link link;
    redisAsyncContext *ac;             /* the one callbacks answer for */
    size_t next;                       /* the sentinel to try next */
    int backoff_ms;
    int64_t next_attempt_ms, deadline_ms;
    bool answered;
};

static struct {
    const struct shim_config *cfg;
    sentinel_changed_fn changed;
    struct asker query, sub;
    struct loop_timer timer;
    bool want_query;
    bool known;
    bool verified;                     /* the master named answered ROLE as master */
    uintptr_t sub_generation;
    char host[256];
    int port;
} S;

static void on_timer(struct loop_timer *t);

static void arm_timer(void)
{
    int64_t next = -1;
    if (S.want_query && !S.query.ac)
        next = S.query.next_attempt_ms;
    if (S.query.ac && (next < 0 || S.query.deadline_ms < next))
        next = S.query.deadline_ms;
    if (!S.sub.ac && (next < 0 || S.sub.next_attempt_ms < next))
        next = S.sub.next_attempt_ms;
    if (next < 0) {
        loop_timer_cancel(&S.timer);
        return;
    }
    int64_t d = next - clock_mono_ms();
    loop_timer_arm(&S.timer, d < 1 ? 1 : d, on_timer);
}

static void failed(struct asker *a)
{
    atomic_fetch_add(&shim_redis.sentinel_errors, 1);
    a->next = (a->next + 1) % S.cfg->n_redis_seeds;
    a->backoff_ms = a->backoff_ms ? (a->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : a->backoff_ms * 2)
                                  : BACKOFF_MIN_MS;
    a->next_attempt_ms = clock_mono_ms() + a->backoff_ms;
}

static void publish(void)
{
    char addr[sizeof shim_redis.master];
    snprintf(addr, sizeof addr, strchr(S.host, ':') ? "[%s]:%d" : "%s:%d", S.host, S.port);
    memcpy(shim_redis.master, addr, sizeof addr);
}

/* The sentinels name host:port; a change of a master already known is a failover. */
/* A failover is counted when the sentinels announce one (+switch-master), or name another
 * master once the one they named had answered ROLE as master: a first-named address that
 * never answered, then another sentinel's, is no failover. */
static void master_is(const char *host, size_t host_len, int port, bool announced)
{
    if (host_len == 0 || host_len >= sizeof S.host || port <= 0 || port > 65535)
        return;
    if (S.known && strlen(S.host) == host_len && !memcmp(S.host, host, host_len) && S.port == port)
        return;
    if (S.known && (announced || S.verified))
        atomic_fetch_add(&shim_redis.failovers, 1);
    S.verified = false;
    memcpy(S.host, host, host_len);
    S.host[host_len] = 0;
    S.port = port;
    S.known = true;
    publish();
    shim_log("redis: the sentinels name %s as master %s", shim_redis.master, S.cfg->redis_master_name);
    S.changed();
}

/* ---- the query ---- */

/* Sentinels with a password of their own (requirepass in sentinel.conf): AUTH first, in
 * the same pipeline. A refusal shows as the next command's NOAUTH error: that sentinel
 * failed, the next one is asked. Nothing is sent to sentinels that were given no password. */
static void log_in(redisAsyncContext *ac)
{
    if (S.cfg->redis_sentinel_password[0])
        redisAsyncCommand(ac, NULL, NULL, "AUTH %s", S.cfg->redis_sentinel_password);
}

static void on_master_addr(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)privdata;
    const redisReply *r = reply;
    if (ac != S.query.ac)
        return;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 && r->element[0]->type == REDIS_REPLY_STRING
        && r->element[1]->type == REDIS_REPLY_STRING) {
        S.query.answered = true;
        S.query.backoff_ms = 0;
        master_is(r->element[0]->str, (size_t)r->element[0]->len, atoi(r->element[1]->str), false);
    }
    redisAsyncDisconnect(ac);          /* (after this callback) one question per connection */
}

static void query_connected(const redisAsyncContext *ac, int status)
{
    if (ac != S.query.ac || status == REDIS_OK)
        return;
    S.query.ac = NULL;                 /* hiredis frees it after this callback */
    failed(&S.query);
    S.want_query = true;
    arm_timer();
}

static void query_disconnected(const redisAsyncContext *ac, int status)
{
    (void)status;
    if (ac != S.query.ac)
        return;
    S.query.ac = NULL;
    if (!S.query.answered) {           /* no master from this one (unknown name, -IDONTKNOW...) */
        failed(&S.query);
        S.want_query = true;
    }
    arm_timer();
}

/* Connects a to the sentinel it is to ask next, logged in (log_in): true; false when it
 * could not start (a is failed over to the next sentinel) or the sentinel's name is still
 * being resolved (the same one is tried again shortly, nothing failed). */
static bool dial(struct asker *a, void (*on_connect)(const redisAsyncContext *, int),
                 void (*on_disconnect)(const redisAsyncContext *, int))
{
    const struct redis_addr *n = &S.cfg->redis_seeds[a->next];
    int rc = redis_link_connect(&a->link, n->host, n->port, NULL, on_connect, on_disconnect);
    if (rc == REDIS_LINK_RESOLVING)
        a->next_attempt_ms = clock_mono_ms() + REDIS_LINK_RESOLVE_RETRY_MS;
    else if (rc != 0)
        failed(a);
    if (rc != 0)
        return false;
    a->ac = a->link.ac;
    log_in(a->ac);
    return true;
}

static void start_query(void)
{
    S.want_query = false;
    S.query.answered = false;
    if (!dial(&S.query, query_connected, query_disconnected)) {
        S.want_query = true;
        return;
    }
    S.query.deadline_ms = clock_mono_ms() + QUERY_TIMEOUT_MS;
    redisAsyncCommand(S.query.ac, on_master_addr, NULL, "SENTINEL get-master-addr-by-name %s",
                      S.cfg->redis_master_name);
}

/* ---- the subscription ---- */

static void on_switch(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)ac;                          /* (privdata says which subscription: a dropped one's is stale) */
    const redisReply *r = reply;
    if ((uintptr_t)privdata != S.sub_generation || !S.sub.ac || !r || r->type != REDIS_REPLY_ARRAY || r->elements != 3
        || r->element[0]->type != REDIS_REPLY_STRING)
        return;
    if (!strcmp(r->element[0]->str, "subscribe")) {
        S.sub.backoff_ms = 0;
        S.want_query = true;           /* what changed while no one listened */
        if (!S.query.ac)
            start_query();
        arm_timer();
        return;
    }
    if (strcmp(r->element[0]->str, "message") || r->element[2]->type != REDIS_REPLY_STRING)
        return;
    /* "<master name> <old ip> <old port> <new ip> <new port>" */
    char name[128], old_ip[64], new_ip[64];
    int old_port, new_port;
    if (sscanf(r->element[2]->str, "%127s %63s %d %63s %d", name, old_ip, &old_port, new_ip, &new_port) == 5
        && !strcmp(name, S.cfg->redis_master_name))
        master_is(new_ip, strlen(new_ip), new_port, true);
}

static void sub_connected(const redisAsyncContext *ac, int status)
{
    if (ac != S.sub.ac || status == REDIS_OK)
        return;
    S.sub.ac = NULL;
    failed(&S.sub);
    arm_timer();
}

static void sub_disconnected(const redisAsyncContext *ac, int status)
{
    (void)status;
    if (ac != S.sub.ac)
        return;
    S.sub.ac = NULL;
    failed(&S.sub);                    /* that sentinel went away: listen to the next one */
    arm_timer();
}

static void start_sub(void)
{
    if (!dial(&S.sub, sub_connected, sub_disconnected))
        return;
    redisAsyncCommand(S.sub.ac, on_switch, (void *)(uintptr_t)++S.sub_generation, "SUBSCRIBE +switch-master");
}

/* ---- timing ---- */

static void on_timer(struct loop_timer *t)
{
    (void)t;
    int64_t now = clock_mono_ms();
    if (S.query.ac && now >= S.query.deadline_ms) {
        redis_link_drop(&S.query.link);   /* silent: its disconnect callback moves on */
    }
    if (S.want_query && !S.query.ac && now >= S.query.next_attempt_ms)
        start_query();
    if (!S.sub.ac && now >= S.sub.next_attempt_ms)
        start_sub();
    arm_timer();
}

void sentinel_init(const struct shim_config *cfg, sentinel_changed_fn changed)
{
    memset(&S, 0, sizeof S);
    S.cfg = cfg;
    S.changed = changed;
    S.query.link.fd = S.sub.link.fd = -1;
    S.sub.next = cfg->n_redis_seeds > 1 ? 1 : 0;   /* the query starts at the first, the subscription the second */
    start_query();
    start_sub();
    arm_timer();
}

bool sentinel_master(char *host, size_t host_cap, int *port)
{
    if (!S.known || strlen(S.host) >= host_cap)
        return false;
    memcpy(host, S.host, strlen(S.host) + 1);
    *port = S.port;
    return true;
}

void sentinel_doubt(void)
{
    if (!S.cfg || S.query.ac)
        return;                        /* (a question is out already) */
    /* the master the last answer named cannot be reached or is no master: the next
     * sentinel is asked. Asked again, a sentinel that names a dead master or a replica (a
     * stale or partitioned one, listed first) held every process on it for ever */
    if (S.known && S.cfg->n_redis_seeds > 1)
        S.query.next = (S.query.next + 1) % S.cfg->n_redis_seeds;
    S.want_query = true;
    if (clock_mono_ms() >= S.query.next_attempt_ms)
        start_query();
    arm_timer();
}

void sentinel_forget(void)
{
    memset(&S, 0, sizeof S);
    redis_link_forget(&S.query.link);
    redis_link_forget(&S.sub.link);
}

void sentinel_master_verified(void) { S.verified = true; }
