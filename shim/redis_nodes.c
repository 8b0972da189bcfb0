/* redis_nodes.c — owns the Redis tier's server connections: which server a key's commands
 * go to and whether it may be asked now. One server (redis://), the master the sentinels
 * name (redis-sentinel://, checked with ROLE before use and dropped on READONLY or
 * MASTERDOWN), or a cluster's masters (redis-cluster://: the slot map from CLUSTER SLOTS,
 * a master named there with no host being on the host of the node asked, one connection
 * per master, MOVED followed and the map refreshed, ASK handed back to the caller for one
 * retry). Each connection: AUTH and SELECT as configured, commands in
 * flight counted and bounded, dropped when it stops answering, reconnected with backoff.
 * Engine thread only (the `connected` count in shim_redis is read by the exit handler). */
#include "redis_nodes.h"
#include "clock.h"
#include "log.h"
#include "redis_link.h"
#include "redis_sentinel.h"
#include "redis_slot.h"
#include "stats.h"
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NODES_MAX          32           /* servers known at once (a cluster's masters and seeds) */
_Static_assert(NODES_MAX <= sizeof shim_redis.nodes / sizeof shim_redis.nodes[0], "every node has its stats");
#define INFLIGHT_MAX       1024         /* commands awaiting replies, per server */
#define BACKOFF_MIN_MS     100
#define BACKOFF_MAX_MS     2000
#define MAP_REFRESH_MIN_MS 500          /* a cluster's slot map is asked for at most this often */

struct redis_node {
    struct redis_link link;
    struct redisAsyncContext *ac;       /* the connection callbacks answer for (NULL once dropped) */
    char host[256];
    int port;
    bool used;                          /* this slot of the table holds a server */
    bool usable;                        /* connected (and, behind Sentinel, ROLE said master) */
    bool selecting;                     /* its SELECT not answered yet: nothing goes before it */
    bool naming;                        /* its host name is being resolved: no connection yet */
    int backoff_ms;
    int64_t next_attempt_ms;
    unsigned inflight;
    size_t pending_bytes;
    int64_t last_progress_ms;
};

static struct {
    const struct shim_config *cfg;
    void (*usable)(void);
    void (*wake)(void);
    struct redis_node nodes[NODES_MAX];
    size_t n_nodes;
    /* cluster: the node serving each slot (index + 1; 0 unknown) */
    unsigned char slot_node[REDIS_SLOTS];
    bool map_known, map_asked;
    int64_t map_next_ms;
    size_t next_seed;
    int map_generation;
} N;

static void connect_node(struct redis_node *n);

static bool cluster(void) { return N.cfg->redis_mode == REDIS_CLUSTER; }
static bool sentinel(void) { return N.cfg->redis_mode == REDIS_SENTINEL; }

static int64_t stall_ms(void)
{
    return N.cfg->redis_timeout_ms * 4 > 1000 ? N.cfg->redis_timeout_ms * 4 : 1000;
}

/* shim_redis.connected: the servers usable now; shim_redis.master: who they are. */
static void publish(void)
{
    uint64_t usable = 0;
    char list[sizeof shim_redis.master];
    size_t len = 0;
    list[0] = 0;
    for (size_t i = 0; i < N.n_nodes; i++) {
        const struct redis_node *n = &N.nodes[i];
        struct redis_node_stats *st = &shim_redis.nodes[i];
        if (n->used)
            snprintf(st->address, sizeof st->address, strchr(n->host, ':') ? "[%s]:%d" : "%s:%d", n->host, n->port);
        atomic_store(&st->up, n->used && n->usable);
        if (!n->used)
            continue;
        usable += n->usable;
        if (cluster() && !n->usable)
            continue;                   /* a cluster's line lists the masters in use */
        int k = snprintf(list + len, sizeof list - len, "%s%s%s%s:%d", len ? "," : "", strchr(n->host, ':') ? "[" : "",
                         n->host, strchr(n->host, ':') ? "]" : "", n->port);
        if (k < 0 || (size_t)k >= sizeof list - len)
            break;
        len += (size_t)k;
    }
    if (N.cfg->redis_unix[0])
        snprintf(list, sizeof list, "%s", N.cfg->redis_unix);
    memcpy(shim_redis.master, list, sizeof list);
    atomic_store(&shim_redis.n_nodes, (int)N.n_nodes);
    atomic_store(&shim_redis.connected, usable);
}

/* An error of the tier's, on node n when it is known. */
static void count_error(const struct redis_node *n)
{
    atomic_fetch_add(&shim_redis.errors, 1);
    if (n)
        atomic_fetch_add(&shim_redis.nodes[n - N.nodes].errors, 1);
}

static struct redis_node *node_of(const redisAsyncContext *ac)
{
    if (!ac)
        return NULL;
    for (size_t i = 0; i < N.n_nodes; i++)
        if (N.nodes[i].used && N.nodes[i].ac == ac)
            return &N.nodes[i];
    return NULL;
}

/* The table's entry for host:port, made when new (NULL when the table is full). */
static struct redis_node *node_named(const char *host, size_t host_len, int port)
{
    struct redis_node *free_slot = NULL;
    for (size_t i = 0; i < N.n_nodes; i++) {
        struct redis_node *n = &N.nodes[i];
        if (n->used && n->port == port && strlen(n->host) == host_len && !memcmp(n->host, host, host_len))
            return n;
        if (!n->used && !free_slot)
            free_slot = n;
    }
    if (host_len == 0 || host_len >= sizeof free_slot->host || port <= 0 || port > 65535)
        return NULL;
    if (!free_slot) {
        if (N.n_nodes == NODES_MAX)
            return NULL;
        free_slot = &N.nodes[N.n_nodes++];
    }
    memset(free_slot, 0, sizeof *free_slot);
    free_slot->link.fd = -1;
    memcpy(free_slot->host, host, host_len);
    free_slot->host[host_len] = 0;
    free_slot->port = port;
    free_slot->used = true;
    return free_slot;
}

static void schedule_reconnect(struct redis_node *n)
{
    n->backoff_ms = n->backoff_ms ? (n->backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : n->backoff_ms * 2)
                                  : BACKOFF_MIN_MS;
    n->next_attempt_ms = clock_mono_ms() + n->backoff_ms;
}

static void became_usable(struct redis_node *n)
{
    n->usable = true;
    n->backoff_ms = 0;
    publish();
    N.usable();
}

/* The connection goes: callbacks of commands in flight get NULL replies. */
static void drop(struct redis_node *n)
{
    if (!n->ac)
        return;
    n->ac = NULL;
    n->usable = false;
    n->inflight = 0;
    n->pending_bytes = 0;
    redis_link_drop(&n->link);
    publish();
}

/* ---- the cluster's slot map ---- */

static void ask_map(void);

/* The node a slot map or a redirect names, on the host of the node that said it (`from`)
 * when the name has no host: Redis gives an empty host for a node that does not know its
 * own address (one that never met another: a one-node cluster), null in newer versions,
 * and the client is to use the address it reached that node at. */
static struct redis_node *node_said(const struct redis_node *from, const char *host, size_t host_len, int port)
{
    if (host && host_len)
        return node_named(host, host_len, port);
    return from ? node_named(from->host, strlen(from->host), port) : NULL;
}

static void on_slots(redisAsyncContext *ac, void *reply, void *privdata)
{
    const redisReply *r = reply;
    nodes_replied(ac, 0);
    if ((intptr_t)privdata != N.map_generation)
        return;
    N.map_asked = false;
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements == 0) {
        count_error(node_of(ac));
        N.next_seed++;
        N.wake();
        return;
    }
    const struct redis_node *asked = node_of(ac);
    unsigned char map[REDIS_SLOTS];
    memset(map, 0, sizeof map);
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *range = r->element[i];
        if (range->type != REDIS_REPLY_ARRAY || range->elements < 3 || range->element[0]->type != REDIS_REPLY_INTEGER
            || range->element[1]->type != REDIS_REPLY_INTEGER || range->element[2]->type != REDIS_REPLY_ARRAY
            || range->element[2]->elements < 2
            || (range->element[2]->element[0]->type != REDIS_REPLY_STRING
                && range->element[2]->element[0]->type != REDIS_REPLY_NIL)
            || range->element[2]->element[1]->type != REDIS_REPLY_INTEGER)
            continue;
        long long lo = range->element[0]->integer, hi = range->element[1]->integer;
        const redisReply *master = range->element[2];
        bool named = master->element[0]->type == REDIS_REPLY_STRING;
        struct redis_node *n = node_said(asked, named ? master->element[0]->str : NULL,
                                         named ? (size_t)master->element[0]->len : 0,
                                         (int)master->element[1]->integer);
        if (!n || lo < 0 || hi >= REDIS_SLOTS || lo > hi)
            continue;
        for (long long s = lo; s <= hi; s++)
            map[s] = (unsigned char)(n - N.nodes + 1);
    }
    memcpy(N.slot_node, map, sizeof map);
    N.map_known = true;
    for (size_t i = 0; i < N.n_nodes; i++) {   /* the masters are connected ahead of their first key */
        struct redis_node *n = &N.nodes[i];
        bool serves = false;
        for (size_t s = 0; s < REDIS_SLOTS && !serves; s++)
            serves = N.slot_node[s] == i + 1;
        if (n->used && serves && !n->ac && clock_mono_ms() >= n->next_attempt_ms)
            connect_node(n);
    }
    publish();
    N.wake();
}

/* CLUSTER SLOTS, asked of a connected node, else of a seed (connecting to it first). */
static void ask_map(void)
{
    int64_t now = clock_mono_ms();
    if (N.map_asked || now < N.map_next_ms)
        return;
    struct redis_node *via = NULL;
    for (size_t i = 0; i < N.n_nodes && !via; i++)
        if (N.nodes[i].used && N.nodes[i].usable && N.nodes[i].inflight < INFLIGHT_MAX)
            via = &N.nodes[i];
    if (!via) {
        const struct redis_addr *seed = &N.cfg->redis_seeds[N.next_seed % N.cfg->n_redis_seeds];
        via = node_named(seed->host, strlen(seed->host), seed->port);
        if (!via)
            return;
        if (!via->ac) {
            if (now < via->next_attempt_ms) {
                N.next_seed++;          /* that seed is backing off: the next one */
                return;
            }
            connect_node(via);
            if (!via->ac)
                return;
        }
    }
    N.map_asked = true;
    N.map_next_ms = now + MAP_REFRESH_MIN_MS;
    if (nodes_command(via, on_slots, (void *)(intptr_t)++N.map_generation, "CLUSTER SLOTS") != 0)
        N.map_asked = false;
}

/* ---- connections ---- */

static void on_role(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)privdata;
    const redisReply *r = reply;
    struct redis_node *n = node_of(ac);
    nodes_replied(ac, 0);
    if (!n || !r)
        return;
    if (r->type == REDIS_REPLY_ARRAY && r->elements >= 1 && r->element[0]->type == REDIS_REPLY_STRING
        && !strcmp(r->element[0]->str, "master")) {
        if (sentinel())
            sentinel_master_verified();
        became_usable(n);
        return;
    }
    atomic_fetch_add(&shim_redis.not_master, 1);
    redisAsyncDisconnect(ac);           /* (after its callbacks) its disconnect schedules the next */
    sentinel_doubt();
}

/* A refused login is the operator's to fix: said once per process, counted on the node
 * each time; the node's commands then fail and the tier fails open. */
static void on_login(redisAsyncContext *ac, void *reply, void *privdata)
{
    static bool said;
    const redisReply *r = reply;
    struct redis_node *n = node_of(ac);
    if (!n || !r || r->type != REDIS_REPLY_ERROR)
        return;
    count_error(n);
    if (!said) {
        said = true;
        shim_log("redis %s:%d refused the login (%.80s): the shared tier fails open until it is fixed", n->host,
                 n->port, r->str ? r->str : "");
    }
    (void)privdata;
}

/* A database the server does not have (past its `databases`): refused, its SELECT would
 * leave every command in database 0, someone else's keyspace. No write went behind it, and
 * the reads that did get no reply: the connection goes first (see nodes_for_key), said
 * once, the tier failing open. */
static void on_select(redisAsyncContext *ac, void *reply, void *privdata)
{
    static bool said;
    const redisReply *r = reply;
    struct redis_node *n = node_of(ac);
    (void)privdata;
    if (!n || !r)
        return;
    if (r->type != REDIS_REPLY_ERROR) {
        n->selecting = false;
        if (!sentinel())
            became_usable(n);          /* (a reply: connected, on_connect has run) */
        return;
    }
    count_error(n);
    if (!said) {
        said = true;
        shim_log("redis %s:%d refused SELECT %d (%.80s): the shared tier fails open until it is fixed", n->host,
                 n->port, N.cfg->redis_db, r->str ? r->str : "");
    }
    drop(n);
    schedule_reconnect(n);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    struct redis_node *n = node_of(ac);
    if (!n)
        return;
    if (status != REDIS_OK) {
        count_error(n);
        n->ac = NULL;                   /* hiredis frees the context after this callback */
        n->usable = false;
        schedule_reconnect(n);
        if (sentinel())
            sentinel_doubt();
        if (cluster())
            ask_map();                  /* its slots may have moved to a promoted replica */
        publish();
        N.wake();
        return;
    }
    if (!sentinel() && !n->selecting)
        became_usable(n);               /* (behind Sentinel: once ROLE says master; else once SELECT is taken) */
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    struct redis_node *n = node_of(ac);
    if (!n)
        return;                         /* one we dropped ourselves */
    if (status != REDIS_OK)
        count_error(n);
    n->ac = NULL;
    n->usable = false;
    n->inflight = 0;
    n->pending_bytes = 0;
    schedule_reconnect(n);
    if (sentinel() && status != REDIS_OK)
        sentinel_doubt();
    if (cluster())
        ask_map();
    publish();
    N.wake();
}

/* What a reply not yet whole may hold: a value past redis_max_object (the most the tier
 * stores) with room for its header. Beyond it the reply is no entry of the shim's (one
 * written by someone else under its key), and reading it whole would cost the engine the
 * time to take, copy and check it while every request waits: the connection goes. */
#define REPLY_SLACK (64 * 1024)

static void after_io(struct redis_link *l)
{
    struct redis_node *n = (struct redis_node *)(void *)((char *)l - offsetof(struct redis_node, link));
    const redisReader *reader = n->ac ? n->ac->c.reader : NULL;
    if (reader && reader->len - reader->pos > (size_t)N.cfg->redis_max_object + REPLY_SLACK) {
        count_error(n);
        drop(n);
        schedule_reconnect(n);
    }
    N.wake();
}

static void connect_node(struct redis_node *n)
{
    n->link.after_io = after_io;
    const char *unix_path = N.cfg->redis_mode == REDIS_SINGLE ? N.cfg->redis_unix : NULL;
    int rc = redis_link_connect(&n->link, n->host, n->port, unix_path, on_connect, on_disconnect);
    n->naming = rc == REDIS_LINK_RESOLVING;
    if (rc == REDIS_LINK_RESOLVING) {
        n->next_attempt_ms = clock_mono_ms() + REDIS_LINK_RESOLVE_RETRY_MS;   /* not a failure: its name is on its way */
        return;
    }
    if (rc != 0) {
        count_error(n);
        schedule_reconnect(n);
        return;
    }
    n->ac = n->link.ac;
    n->inflight = 0;
    n->pending_bytes = 0;
    n->last_progress_ms = clock_mono_ms();
    if (N.cfg->redis_password[0] && N.cfg->redis_user[0])
        redisAsyncCommand(n->ac, on_login, NULL, "AUTH %s %s", N.cfg->redis_user, N.cfg->redis_password);
    else if (N.cfg->redis_password[0])
        redisAsyncCommand(n->ac, on_login, NULL, "AUTH %s", N.cfg->redis_password);
    n->selecting = N.cfg->redis_db && !cluster();
    if (n->selecting)
        redisAsyncCommand(n->ac, on_select, NULL, "SELECT %d", N.cfg->redis_db);
    if (sentinel())
        nodes_command(n, on_role, NULL, "ROLE");   /* the master the sentinels named, still? */
}

/* The sentinels name another master: the connection to the old one goes (its commands in
 * flight fail open), and the new one is tried at once. */
static void master_changed(void)
{
    char host[256];
    int port;
    if (!sentinel_master(host, sizeof host, &port))
        return;
    struct redis_node *n = &N.nodes[0];
    drop(n);
    if (n->port != port || strcmp(n->host, host))   /* its errors are the address's: from 0 again */
        atomic_store(&shim_redis.nodes[0].errors, 0);
    snprintf(n->host, sizeof n->host, "%s", host);
    n->port = port;
    n->used = true;
    n->backoff_ms = 0;
    n->next_attempt_ms = 0;
    connect_node(n);
    publish();
    N.wake();
}

void nodes_init(const struct shim_config *cfg, void (*usable)(void), void (*wake)(void))
{
    memset(&N, 0, sizeof N);
    N.cfg = cfg;
    N.usable = usable;
    N.wake = wake;
    for (size_t i = 0; i < NODES_MAX; i++)
        N.nodes[i].link.fd = -1;
    if (cluster()) {
        ask_map();
    } else if (sentinel()) {
        N.n_nodes = 1;                  /* nodes[0]: the master, once named */
        sentinel_init(cfg, master_changed);
    } else {
        struct redis_node *n = node_named(cfg->redis_unix[0] ? "unix" : cfg->redis_host,
                                          strlen(cfg->redis_unix[0] ? "unix" : cfg->redis_host), cfg->redis_port);
        if (n)
            connect_node(n);
    }
    publish();
}

void nodes_forget(void)
{
    for (size_t i = 0; i < NODES_MAX; i++)
        redis_link_forget(&N.nodes[i].link);
    memset(&N, 0, sizeof N);
    sentinel_forget();
    atomic_store(&shim_redis.connected, 0);
}

/* ---- what the tier asks ---- */

struct redis_node *nodes_for_key(const char *key, size_t n, unsigned commands, enum nodes_early early)
{
    if (!N.cfg)
        return NULL;
    struct redis_node *node = NULL;
    if (cluster()) {
        unsigned k = N.slot_node[redis_slot(key, n)];
        if (!k) {
            ask_map();
            return NULL;
        }
        node = &N.nodes[k - 1];
    } else {
        node = &N.nodes[0];
    }
    bool while_connecting = early != NODES_USABLE;
    if (!node->used || !node->ac || (node->selecting && early == NODES_EARLY_WRITE)
        || (!node->usable && !(while_connecting && !sentinel()))
        || node->inflight + commands > INFLIGHT_MAX)
        return NULL;
    return node;
}

int nodes_command(struct redis_node *node, redis_reply_fn *fn, void *privdata, const char *fmt, ...)
{
    if (!node->ac)
        return -1;
    if (!node->inflight)
        node->last_progress_ms = clock_mono_ms();
    va_list ap;
    va_start(ap, fmt);
    int rc = redisvAsyncCommand(node->ac, fn, privdata, fmt, ap);
    va_end(ap);
    if (rc != REDIS_OK)
        return -1;
    node->inflight++;
    return 0;
}

void nodes_write_now(struct redis_node *node)
{
    if (node && node->ac && node->usable)
        redisAsyncHandleWrite(node->ac);
}

size_t nodes_pending(const struct redis_node *node) { return node->pending_bytes; }

void nodes_add_pending(struct redis_node *node, size_t bytes) { node->pending_bytes += bytes; }

void nodes_replied(const redisAsyncContext *ac, size_t bytes)
{
    struct redis_node *n = node_of(ac);
    if (!n)
        return;
    if (n->inflight)
        n->inflight--;
    n->pending_bytes = n->pending_bytes > bytes ? n->pending_bytes - bytes : 0;
    n->last_progress_ms = clock_mono_ms();
}

/* "MOVED 3999 127.0.0.1:6381" / "ASK 3999 127.0.0.1:6381": the node named ("MOVED 3999
 * :6381", no host: on the host of `from`, the node that said it). */
static struct redis_node *redirected(const struct redis_node *from, const char *text, unsigned *slot)
{
    const char *sp = strchr(text, ' ');
    const char *addr = sp ? strchr(sp + 1, ' ') : NULL;
    const char *colon = addr ? strrchr(addr, ':') : NULL;
    if (!colon)
        return NULL;
    *slot = (unsigned)atoi(sp + 1);
    int port = atoi(colon + 1);
    if (*slot >= REDIS_SLOTS)
        return NULL;
    return node_said(from, addr + 1, (size_t)(colon - addr - 1), port);
}

struct redis_node *nodes_error(redisAsyncContext *ac, const redisReply *r, bool *ask)
{
    *ask = false;
    /* a cluster's MOVED or ASK is a redirect, counted as one, not an error: a planned
     * reshard is no alarm */
    bool redirect = cluster() && r->type == REDIS_REPLY_ERROR
                    && (!strncmp(r->str, "MOVED ", 6) || !strncmp(r->str, "ASK ", 4));
    if (!redirect)
        count_error(node_of(ac));
    if (r->type != REDIS_REPLY_ERROR)
        return NULL;
    if (sentinel() && (!strncmp(r->str, "READONLY", 8) || !strncmp(r->str, "MASTERDOWN", 10))) {
        struct redis_node *n = node_of(ac);
        atomic_fetch_add(&shim_redis.not_master, 1);
        if (n && n->usable) {
            n->usable = false;
            publish();
        }
        if (n)
            redisAsyncDisconnect(ac);   /* (after its callbacks) its disconnect schedules the next */
        sentinel_doubt();
        return NULL;
    }
    if (!cluster())
        return NULL;
    bool moved = !strncmp(r->str, "MOVED ", 6);
    if (!moved && strncmp(r->str, "ASK ", 4))
        return NULL;
    unsigned slot;
    struct redis_node *to = redirected(node_of(ac), r->str, &slot);
    atomic_fetch_add(&shim_redis.redirects, 1);
    if (!to)
        return NULL;
    if (moved) {
        N.slot_node[slot] = (unsigned char)(to - N.nodes + 1);
        ask_map();                      /* one slot moved: others did too, most likely */
    }
    if (!to->ac && clock_mono_ms() >= to->next_attempt_ms)
        connect_node(to);
    *ask = !moved;
    return to->ac ? to : NULL;
}

int64_t nodes_due(void)
{
    if (!N.cfg)
        return -1;
    int64_t next = -1;
    if (cluster() && !N.map_known && !N.map_asked)
        next = N.map_next_ms;
    for (size_t i = 0; i < N.n_nodes; i++) {
        const struct redis_node *n = &N.nodes[i];
        int64_t due = -1;
        if (!n->used)
            continue;
        if (!n->ac && (!cluster() || N.map_known))
            due = n->next_attempt_ms;
        else if (n->ac && n->inflight)
            due = n->last_progress_ms + stall_ms();
        if (due >= 0 && (next < 0 || due < next))
            next = due;
    }
    return next;
}

bool nodes_naming(void)
{
    const struct redis_node *n = &N.nodes[0];
    return N.cfg && !cluster() && !sentinel() && n->used && !n->ac && n->naming;
}

void nodes_hurry(int64_t now)
{
    struct redis_node *n = &N.nodes[0];
    if (nodes_naming() && n->next_attempt_ms > now + 2)
        n->next_attempt_ms = now + 2;
}

void nodes_tick(int64_t now)
{
    if (!N.cfg)
        return;
    for (size_t i = 0; i < N.n_nodes; i++) {
        struct redis_node *n = &N.nodes[i];
        if (!n->used)
            continue;
        if (n->ac && n->inflight && now - n->last_progress_ms > stall_ms()) {
            count_error(n);   /* frozen or wedged: drop it, start over */
            drop(n);
            schedule_reconnect(n);
            if (sentinel())
                sentinel_doubt();
            continue;
        }
        bool serves = !cluster();
        for (size_t s = 0; s < REDIS_SLOTS && !serves; s++)
            serves = N.slot_node[s] == i + 1;
        if (!n->ac && serves && now >= n->next_attempt_ms && (!sentinel() || n->port)) {
            atomic_fetch_add(&shim_redis.reconnects, 1);
            connect_node(n);
        }
    }
    if (cluster() && !N.map_known)
        ask_map();
}
