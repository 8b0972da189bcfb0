/* cache_redis.c — the Redis tier: lookups (GET + PTTL, pipelined) that a request waits
 * on for at most redis_timeout; fire-and-forget SET ... PX after the response has gone to
 * the app (entries in redis_value.c's format); the per-key locks that coalesce fetches
 * across processes (SET NX PX, compare-and-delete); bounds on everything queued towards
 * Redis; one retry of a lookup or a lock a cluster redirects (MOVED, ASK); and the names of
 * the keys (printable, see "Redis keys"). Which server a key's commands go to, and the
 * connections, are redis_nodes.c's. Redis does the expiry. */
#include "cache_redis.h"
#include "clock.h"
#include "sha256.h"
#include "http.h"
#include "loop.h"
#include "stats.h"
#include <errno.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include "redis_nodes.h"
#include "redis_value.h"
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define REDIS_MAX_PENDING_BYTES (8u << 20)     /* SET payloads queued on a server, not yet answered */
#define REDIS_REDIRECTS_MAX     1              /* retries of a lookup or a lock a cluster redirects */

/* ---- connection ---- */

struct redis_ticket {
    void *waiter;                   /* NULL once the request stopped waiting */
    redis_lookup_done_fn done;
    redis_lock_done_fn lock_done;   /* a lock attempt's, instead of done */
    char *key;
    size_t key_len;
    int upstream;
    int64_t deadline_ms, started_us;
    unsigned char *value;           /* the GET reply, kept until the PTTL reply */
    size_t value_len;
    bool got_value, failed, get_only;
    struct redis_node *redirect;    /* where a cluster sent the command (MOVED, ASK) */
    bool redirect_ask;
    int redirects;
    struct redis_ticket *prev, *next;   /* the waiting list, in deadline order */
    struct redis_ticket *next_parked;   /* not sent yet: the server's name is on its way */
};

static struct {
    struct loop_timer timer;        /* the next lookup deadline, or the connections' (redis_nodes.c) */
    int64_t timer_due_ms;           /* when it fires (monotonic), or -1: not armed */
    int64_t last_timeout_ms, last_answer_ms;   /* a lookup's deadline passed; a lookup was answered */
    const struct shim_config *cfg;
    struct redis_ticket *waiting_head, *waiting_tail;
    struct redis_ticket *parked;    /* lookups waiting for the server's name (see park) */
    unsigned n_parked;
} R;

#define PARKED_MAX 256

static int64_t exit_wait_ms;        /* redis_timeout, for the exit handler */

/* Locks this process may hold without knowing it: a lock whose answer was lost with its
 * connection (Redis may still have taken it, e.g. when a frozen server thaws), or one
 * whose release could not be sent. Released (compare-and-delete) once connected again,
 * so that no request anywhere waits coalesce_timeout on a lock nobody will let go. */
#define RELEASES_MAX 64
struct owed_release { char *key; size_t key_len; char token[64]; };
static struct owed_release releases[RELEASES_MAX];
static size_t n_releases;

/* Entries an unsafe request invalidated while no connection could take the DEL (RFC 9111
 * 4.4): deleted once connected again, before the next lookup can find them. Beyond the
 * cap they are counted (deletes_dropped) and expire by their TTL. */
#define DELETES_MAX 256
struct owed_delete { char *key; size_t key_len; };
static struct owed_delete deletes[DELETES_MAX];
static size_t n_deletes;

static void release_later(const char *key, size_t key_len, const char *token)
{
    if (n_releases == RELEASES_MAX || strlen(token) >= sizeof releases[0].token)
        return;                        /* then it expires by itself within redis_lock_ttl */
    char *k = malloc(key_len);
    if (!k)
        return;
    memcpy(k, key, key_len);
    releases[n_releases].key = k;
    releases[n_releases].key_len = key_len;
    snprintf(releases[n_releases].token, sizeof releases[0].token, "%s", token);
    n_releases++;
}


/* Writes this process still owes Redis: storable transfers not yet finished plus SETs not
 * yet answered. Read by the exit handler on an app thread, hence atomic. */
static atomic_int writes_owed;

void redis_write_owed(int delta)
{
    if (R.cfg)
        atomic_fetch_add(&writes_owed, delta);
}

/*
 * Registered once, at the first redis_init. A short-lived process (curl, a cron job)
 * often exits right after reading its response, before the engine has written the
 * entry to Redis — and sharing it with the next process is the point of the tier. So
 * exit() waits, at most redis_timeout, until this process owes Redis no write. It
 * returns at once when nothing is owed or Redis is not connected (e.g. in a forked
 * child whose engine has not started).
 */
static void flush_at_exit(void)
{
    if (!atomic_load(&shim_redis.connected) || atomic_load(&writes_owed) <= 0)
        return;
    int64_t deadline = clock_mono_ms() + exit_wait_ms;
    struct timespec pause = { 0, 200 * 1000 };
    while (atomic_load(&writes_owed) > 0 && atomic_load(&shim_redis.connected) && clock_mono_ms() < deadline)
        nanosleep(&pause, NULL);
}

static void on_timer(struct loop_timer *timer);

static void arm_timer(void)
{
    int64_t next = nodes_due(), now = clock_mono_ms();
    if (R.waiting_head && (next < 0 || R.waiting_head->deadline_ms < next))
        next = R.waiting_head->deadline_ms;
    if (next < 0) {
        loop_timer_cancel(&R.timer);
        R.timer_due_ms = -1;
        return;
    }
    int64_t due = next > now ? next : now + 1;   /* at least 1 ms: a due check never spins */
    /* armed to fire no later already: left alone. Armed again at every wake, it would be
     * pushed a millisecond on by every read of a Redis that trickles its bytes, and a
     * passed deadline would never fire */
    if (R.timer_due_ms >= 0 && R.timer_due_ms <= due)
        return;
    R.timer_due_ms = loop_timer_arm(&R.timer, due - now, on_timer) == 0 ? due : -1;
}

/* A server can take the tier's commands (again): the locks this process may still hold
 * are let go. */
static void on_usable(void)
{
    /* taken out of the lists first: one that still cannot go is put back in them (into the
     * slots being walked, before, which freed the copy just queued) */
    size_t d = n_deletes;
    struct owed_delete owed_deletes[DELETES_MAX];
    memcpy(owed_deletes, deletes, d * sizeof *deletes);
    n_deletes = 0;
    for (size_t i = 0; i < d; i++) {
        redis_delete(owed_deletes[i].key, owed_deletes[i].key_len);
        free(owed_deletes[i].key);
    }
    size_t n = n_releases;
    struct owed_release owed_releases[RELEASES_MAX];
    memcpy(owed_releases, releases, n * sizeof *releases);
    n_releases = 0;
    for (size_t i = 0; i < n; i++) {
        redis_unlock(owed_releases[i].key, owed_releases[i].key_len, owed_releases[i].token);
        free(owed_releases[i].key);
    }
}

int redis_init(const struct shim_config *cfg)
{
    if (cfg->cache != CACHE_REDIS)
        return 0;
    R.cfg = cfg;
    R.timer_due_ms = -1;
    exit_wait_ms = cfg->redis_timeout_ms;
    static bool exit_flush_registered;    /* once per process image: forks inherit it */
    if (!exit_flush_registered)
        exit_flush_registered = atexit(flush_at_exit) == 0;
    nodes_init(cfg, on_usable, arm_timer);
    arm_timer();
    return 0;
}

void redis_forget(void)
{
    /* forked child: the fds went with the other engine fds; the context stays allocated */
    memset(&R, 0, sizeof R);
    R.timer_due_ms = -1;
    nodes_forget();
    n_releases = 0;                    /* the parent's locks: its own to release */
    n_deletes = 0;                     /* (and its deletes: its own to send) */
    atomic_store(&writes_owed, 0);
    atomic_store(&shim_redis.connected, 0);
}

/* ---- Redis keys ----
 *
 * Internal cache keys hold spaces and newlines ("GET http://api:80/ip/1.2.3.4\nhost: api"),
 * which `redis-cli --scan | xargs`, SCAN patterns and Redis GUIs cannot handle. In Redis a
 * key is therefore
 *     <redis_prefix>v3:<host>:<port>:<route>:<64 hex of SHA-256 of the internal key>
 * and its lock the same plus ":lock": printable ASCII without spaces, naming the upstream
 * (its host as rules.conf writes it, an IPv6 literal in brackets) and the route (the path
 * glob of the cache rule the key falls under) so that an operator can see and pattern-match
 * what is there, and the hash for the rest. A byte outside 0x21..0x7e in host or route
 * becomes '_': the hash keeps keys apart anyway. The value carries the internal key
 * (redis_value.c), so a lookup still knows exactly what it found. */

#define REDIS_KEY_MAX 1024
_Static_assert(sizeof ((struct shim_config *)0)->redis_prefix + sizeof REDIS_KEY_FORMAT_TAG
               + sizeof ((struct upstream_rule *)0)->host + 2 + sizeof ":65535:"
               + sizeof ((struct cache_rule *)0)->glob + 1 + 2 + 2 * SHA256_BYTES + sizeof ":lock" <= REDIS_KEY_MAX,
               "REDIS_KEY_MAX holds the longest key");

struct redis_key { char s[REDIS_KEY_MAX]; size_t n; };

static void key_put(struct redis_key *k, const char *s, size_t n)
{
    bool tags = R.cfg->redis_mode == REDIS_CLUSTER;   /* the only braces: the hash's (below) */
    for (size_t i = 0; i < n && k->n < sizeof k->s; i++) {
        unsigned char c = (unsigned char)s[i];
        k->s[k->n++] = c >= 0x21 && c <= 0x7e && !(tags && (c == '{' || c == '}')) ? (char)c : '_';
    }
}

static void key_puts(struct redis_key *k, const char *s) { key_put(k, s, strlen(s)); }

/* The cache rule an internal key was made under: the key names its upstream the way
 * cache_key() writes it ("METHOD http://HOST:PORT/path?query\n..."), and its method and
 * path pick the rule as they picked it for the request (cache_rule_for). NULL when none
 * does (e.g. a HEAD-only rule: keys of HEAD requests say GET). */
static const struct cache_rule *rule_of_key(struct http_slice method, struct http_slice authority,
                                            struct http_slice target)
{
    /* only method and target are read; cache_redis.c runs on the engine's thread alone */
    static struct http_request req;
    for (size_t i = 0; i < R.cfg->n_upstreams; i++) {
        const struct upstream_rule *u = &R.cfg->upstreams[i];
        size_t n = strlen(u->label);
        if (n == authority.n && !memcmp(u->label, authority.p, authority.n)) {
            req.method = method;
            req.target = target;
            return cache_rule_for(u, &req);
        }
    }
    return NULL;
}

static void redis_key_of(const char *key, size_t key_len, bool lock, struct redis_key *k)
{
    static const char scheme[] = " http://";
    k->n = 0;
    key_puts(k, R.cfg->redis_prefix);
    key_puts(k, REDIS_KEY_FORMAT_TAG);
    const char *end = key + key_len;
    const char *method_end = memchr(key, ' ', key_len);
    const char *authority = method_end && (size_t)(end - method_end) > sizeof scheme - 1
                            && !memcmp(method_end, scheme, sizeof scheme - 1) ? method_end + sizeof scheme - 1 : NULL;
    const char *path = authority ? memchr(authority, '/', (size_t)(end - authority)) : NULL;
    if (path) {
        const char *line_end = memchr(path, '\n', (size_t)(end - path));
        struct http_slice method = { key, (size_t)(method_end - key) };
        struct http_slice hostport = { authority, (size_t)(path - authority) };
        struct http_slice target = { path, (size_t)((line_end ? line_end : end) - path) };
        const struct cache_rule *r = rule_of_key(method, hostport, target);
        key_put(k, hostport.p, hostport.n);      /* "host:port", "[v6]:port": as the format has them */
        key_puts(k, ":");
        key_puts(k, r ? r->glob : "_");
    } else {
        key_puts(k, "_:_:_");                    /* never made by cache_key(); still one key per hash */
    }
    unsigned char digest[SHA256_BYTES];
    sha256(key, key_len, digest);
    char hex[2 * SHA256_BYTES + 1];
    for (size_t i = 0; i < SHA256_BYTES; i++)
        snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    /* in a cluster the hash is the key's hash tag: an entry and its lock share a slot */
    bool tags = R.cfg->redis_mode == REDIS_CLUSTER;
    key_puts(k, ":");
    if (tags && k->n < sizeof k->s)
        k->s[k->n++] = '{';
    key_puts(k, hex);
    if (tags && k->n < sizeof k->s)
        k->s[k->n++] = '}';
    if (lock)
        key_puts(k, ":lock");
}

/* ---- waiting requests ---- */

static void unlink_ticket(struct redis_ticket *t)
{
    if (t->prev)
        t->prev->next = t->next;
    else if (R.waiting_head == t)
        R.waiting_head = t->next;
    if (t->next)
        t->next->prev = t->prev;
    else if (R.waiting_tail == t)
        R.waiting_tail = t->prev;
    t->prev = t->next = NULL;
}

/* Ends the wait of the ticket's waiter (with an entry, or none), once. */
static void finish_wait(struct redis_ticket *t, struct cache_entry *e)
{
    void *waiter = t->waiter;
    if (!waiter) {
        cache_entry_release(e);
        return;
    }
    unlink_ticket(t);
    t->waiter = NULL;
    if (t->lock_done)
        t->lock_done(waiter, REDIS_LOCK_UNAVAILABLE);
    else
        t->done(waiter, e);
}

static void free_ticket(struct redis_ticket *t)
{
    free(t->key);
    free(t->value);
    free(t);
}

/* The reply to a SET, a DEL, an unlock or an ASKING: its bytes and its slot are free
 * again. A write a cluster redirects is dropped (the next miss writes the entry again). */
static void on_written(redisAsyncContext *ac, void *reply, void *privdata)
{
    size_t len = (size_t)(uintptr_t)privdata;       /* 0 for a DEL */
    const redisReply *r = reply;
    bool ask;
    nodes_replied(ac, len);
    if (r && r->type == REDIS_REPLY_ERROR)
        nodes_error(ac, r, &ask);
    if (len)
        atomic_fetch_sub(&writes_owed, 1);           /* answered or abandoned: no longer owed */
}

static void on_get(redisAsyncContext *ac, void *reply, void *privdata);
static void on_pttl(redisAsyncContext *ac, void *reply, void *privdata);

/* GET + PTTL of a lookup on node (after ASKING when a cluster said ASK); 1 when the GET
 * went and its PTTL could not. */
static int send_lookup(struct redis_node *node, struct redis_ticket *t, bool asking)
{
    struct redis_key rkey;
    redis_key_of(t->key, t->key_len, false, &rkey);
    if (asking && nodes_command(node, on_written, NULL, "ASKING") != 0)
        return -1;
    if (nodes_command(node, on_get, t, "GET %b", rkey.s, rkey.n) != 0)
        return -1;
    if (nodes_command(node, on_pttl, t, "PTTL %b", rkey.s, rkey.n) != 0) {
        t->get_only = true;            /* on_get frees it */
        return 1;
    }
    return 0;
}

/* A reply that redirects the command (MOVED, ASK): where to, kept on the ticket. */
static bool redirected(redisAsyncContext *ac, const redisReply *r, struct redis_ticket *t)
{
    bool ask;
    struct redis_node *to = nodes_error(ac, r, &ask);
    if (!to || t->redirects >= REDIS_REDIRECTS_MAX)
        return false;
    t->redirect = to;
    t->redirect_ask = ask;
    return true;
}

static void on_get(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct redis_ticket *t = privdata;
    redisReply *r = reply;
    nodes_replied(ac, 0);
    if (t->get_only) {
        free_ticket(t);
        return;
    }
    if (!r || r->type == REDIS_REPLY_ERROR) {
        t->failed = true;
        if (r)
            redirected(ac, r, t);
        return;
    }
    if (r->type == REDIS_REPLY_STRING) {
        t->got_value = true;           /* even empty: a value that must decode */
        if (r->len > 0 && (t->value = malloc((size_t)r->len))) {
            memcpy(t->value, r->str, (size_t)r->len);
            t->value_len = (size_t)r->len;
        }
        atomic_fetch_add(&shim_redis.bytes_read, (uint64_t)r->len);
    } else if (r->type != REDIS_REPLY_NIL) {
        t->got_value = true;           /* a list or a number where an entry should be */
    }
}

static struct redis_secret secret(void)
{
    return (struct redis_secret){ R.cfg->redis_secret, R.cfg->redis_secret_len };
}

static void on_pttl(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct redis_ticket *t = privdata;
    redisReply *r = reply;
    nodes_replied(ac, 0);
    if (t->redirect && t->waiter) {    /* the GET was redirected: both go again, there */
        struct redis_node *to = t->redirect;
        bool ask = t->redirect_ask;
        t->redirect = NULL;
        t->redirects++;
        t->failed = t->got_value = false;
        free(t->value);
        t->value = NULL;
        t->value_len = 0;
        int rc = send_lookup(to, t, ask);
        if (rc == 0)
            return;
        if (rc > 0) {                  /* the GET went, its PTTL did not: on_get frees it */
            finish_wait(t, NULL);
            return;
        }
    }
    struct cache_entry *e = NULL;
    if (!r || r->type != REDIS_REPLY_INTEGER || t->failed) {
        bool ask;
        if (r && r->type == REDIS_REPLY_ERROR && !t->failed)
            nodes_error(ac, r, &ask);
    } else if (t->got_value && r->integer > 0) {
        enum redis_value_verdict v = redis_value_decode(t->key, t->key_len, t->value, t->value_len, r->integer,
                                                        clock_wall_ms(), secret(), &e);
        if (v == REDIS_VALUE_CORRUPT || v == REDIS_VALUE_UNAUTHENTICATED) {
            atomic_fetch_add(v == REDIS_VALUE_CORRUPT ? &shim_redis.corrupt : &shim_redis.unauthenticated, 1);
            struct redis_key rkey;
            redis_key_of(t->key, t->key_len, false, &rkey);
            struct redis_node *node = nodes_for_key(rkey.s, rkey.n, 1, NODES_USABLE);
            if (node)
                nodes_command(node, on_written, NULL, "DEL %b", rkey.s, rkey.n);
        }
    }
    if (e) {
        e->upstream = t->upstream;
        if (!cache_entry_is_vary_marker(e))   /* (a marker is followed by the variant's lookup) */
            atomic_fetch_add(&shim_redis.hits, 1);
    } else if (t->waiter) {
        atomic_fetch_add(&shim_redis.misses, 1);
    }
    if (r && r->type == REDIS_REPLY_INTEGER && !t->failed) {
        stats_observe_redis(clock_mono_us() - t->started_us);
        R.last_answer_ms = clock_mono_ms();
    }
    finish_wait(t, e);
    free_ticket(t);
    arm_timer();
}

static void wait_in_line(struct redis_ticket *t)
{
    t->prev = R.waiting_tail;
    if (R.waiting_tail)
        R.waiting_tail->next = t;
    else
        R.waiting_head = t;
    R.waiting_tail = t;
    arm_timer();
}

struct redis_ticket *redis_lookup(const char *key, size_t key_len, int upstream, redis_lookup_done_fn done,
                                  void *waiter)
{
    if (!R.cfg)
        return NULL;
    /* while the connection is still being made, hiredis queues the commands: a process's
     * first lookups (a freshly forked worker's) still reach Redis within redis_timeout */
    struct redis_key rkey;
    redis_key_of(key, key_len, false, &rkey);
    struct redis_node *node = nodes_for_key(rkey.s, rkey.n, 3, NODES_EARLY_READ);
    /* a server named by a host name has no connection to queue on until the name resolves
     * (a process's first lookups, right after its engine started): they wait for it, within
     * their redis_timeout, rather than miss. Else a short-lived process (curl, cron) never
     * found what the one before had shared, and the entry it fetched was not written */
    bool park = !node && nodes_naming() && R.n_parked < PARKED_MAX;
    if (!node && !park)
        return NULL;
    struct redis_ticket *t = calloc(1, sizeof *t);
    if (!t || !(t->key = malloc(key_len))) {
        free(t);
        return NULL;
    }
    memcpy(t->key, key, key_len);
    t->key_len = key_len;
    t->waiter = waiter;
    t->done = done;
    t->upstream = upstream;
    t->started_us = clock_mono_us();
    t->deadline_ms = clock_mono_ms() + R.cfg->redis_timeout_ms;
    if (park) {
        t->next_parked = R.parked;
        R.parked = t;
        R.n_parked++;
        nodes_hurry(clock_mono_ms());
        wait_in_line(t);
        return t;
    }
    int rc = send_lookup(node, t, false);
    if (rc < 0) {
        free_ticket(t);
        return NULL;
    }
    if (rc > 0) {
        t->waiter = NULL;              /* on_get frees it */
        return NULL;
    }
    wait_in_line(t);
    return t;
}

bool redis_available(void)
{
    return R.cfg && atomic_load(&shim_redis.connected) > 0;
}

bool redis_answering(void)
{
    /* a lookup waited its redis_timeout out, and none was answered since: a frozen server
     * (SIGSTOP, CLIENT PAUSE, a failover) still looks connected until its connection is
     * dropped, and each command sent to it costs the request another redis_timeout */
    return redis_available() && !(R.last_timeout_ms > 0 && R.last_timeout_ms >= R.last_answer_ms);
}

static int send_lock(struct redis_node *node, struct redis_ticket *t, bool asking);

static void on_lock_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct redis_ticket *t = privdata;
    const redisReply *r = reply;
    nodes_replied(ac, 0);
    if (r && r->type == REDIS_REPLY_ERROR) {
        bool ask;
        if (!t->waiter)
            nodes_error(ac, r, &ask);
        else if (redirected(ac, r, t)) {   /* (counted there) */
            struct redis_node *to = t->redirect;
            t->redirect = NULL;
            t->redirects++;
            if (send_lock(to, t, t->redirect_ask) == 0)
                return;                /* asked again where the cluster said */
        }
    }
    if (t->waiter) {
        enum redis_lock_result how = REDIS_LOCK_UNAVAILABLE;
        if (r && r->type == REDIS_REPLY_STATUS && r->len == 2 && !memcmp(r->str, "OK", 2))
            how = REDIS_LOCK_TAKEN;
        else if (r && r->type == REDIS_REPLY_NIL)
            how = REDIS_LOCK_HELD_ELSEWHERE;
        else if (r && r->type == REDIS_REPLY_STATUS && r->len == 11 && !memcmp(r->str, "UNCACHEABLE", 11))
            how = REDIS_LOCK_UNCACHEABLE;
        else if (r && r->type == REDIS_REPLY_STATUS && r->len == 6 && !memcmp(r->str, "STORED", 6))
            how = REDIS_LOCK_STORED;
        void *waiter = t->waiter;
        unlink_ticket(t);
        t->waiter = NULL;
        t->lock_done(waiter, how);
    } else if (r && r->type == REDIS_REPLY_STATUS && r->len == 2 && !memcmp(r->str, "OK", 2)) {
        redis_unlock(t->key, t->key_len, (const char *)t->value);   /* taken after we gave up */
    }
    if (!r)                            /* the connection went: Redis may have taken it anyway */
        release_later(t->key, t->key_len, (const char *)t->value);
    free_ticket(t);
    arm_timer();
}

static int send_lock(struct redis_node *node, struct redis_ticket *t, bool asking)
{
    struct redis_key lock_key, entry_key;
    redis_key_of(t->key, t->key_len, true, &lock_key);
    redis_key_of(t->key, t->key_len, false, &entry_key);   /* (the same slot: one hash tag) */
    if (asking && nodes_command(node, on_written, NULL, "ASKING") != 0)
        return -1;
    /* stored (the entry is there and fresh: its holder let go of the lock after this
     * process looked), taken (OK), held (nil), or left by a holder whose answer was not
     * storable. KEYS: the lock, the entry; ARGV: token, TTL, an entry's first bytes, now. */
    static const char take_or_say[] =
        "local h = redis.call('getrange', KEYS[2], 0, 23) "
        "if #h == 24 and string.sub(h, 1, 6) == ARGV[3] and struct.unpack('<i8', h, 17) > tonumber(ARGV[4]) "
        "then return redis.status_reply('STORED') end "
        "local ok = redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) if ok then return ok end "
        "if redis.call('get', KEYS[1]) == 'uncacheable' then return redis.status_reply('UNCACHEABLE') end "
        "return false";
    _Static_assert(REDIS_VALUE_EXPIRES_AT == 16 && REDIS_VALUE_PREFIX_LEN == 6, "the script reads these bytes");
    char prefix[REDIS_VALUE_PREFIX_LEN];
    redis_value_entry_prefix(secret(), prefix);
    return nodes_command(node, on_lock_reply, t, "EVAL %s 2 %b %b %s %lld %b %lld", take_or_say, lock_key.s,
                         lock_key.n, entry_key.s, entry_key.n, (const char *)t->value,
                         (long long)R.cfg->redis_lock_ttl_ms, prefix, sizeof prefix, (long long)clock_wall_ms());
}

struct redis_ticket *redis_lock(const char *key, size_t key_len, const char *token, redis_lock_done_fn done,
                                void *waiter)
{
    if (!R.cfg)
        return NULL;
    struct redis_key lock_key;
    redis_key_of(key, key_len, true, &lock_key);
    struct redis_node *node = nodes_for_key(lock_key.s, lock_key.n, 2, NODES_USABLE);
    if (!node)
        return NULL;
    struct redis_ticket *t = calloc(1, sizeof *t);
    size_t token_len = strlen(token) + 1;
    if (!t || !(t->key = malloc(key_len)) || !(t->value = malloc(token_len))) {
        if (t)
            free_ticket(t);
        return NULL;
    }
    memcpy(t->key, key, key_len);
    t->key_len = key_len;
    memcpy(t->value, token, token_len);     /* to let go of a lock taken after a timeout */
    t->waiter = waiter;
    t->lock_done = done;
    t->deadline_ms = clock_mono_ms() + R.cfg->redis_timeout_ms;
    if (send_lock(node, t, false) != 0) {
        free_ticket(t);
        return NULL;
    }
    atomic_fetch_add(&shim_redis.locks, 1);
    wait_in_line(t);
    return t;
}

/* Runs a compare-and-act script on the key's lock, only while it still holds our token (one
 * that expired and was taken by another process is theirs): px >= 0 is passed on. */
static void on_own_lock(const char *key, size_t key_len, const char *token, const char *script, int64_t px)
{
    if (!R.cfg)
        return;
    struct redis_key lock_key;
    redis_key_of(key, key_len, true, &lock_key);
    struct redis_node *node = nodes_for_key(lock_key.s, lock_key.n, 1, NODES_USABLE);
    if (!node) {
        release_later(key, key_len, token);
        return;
    }
    if (px >= 0)
        nodes_command(node, on_written, NULL, "EVAL %s 1 %b %s %lld", script, lock_key.s, lock_key.n, token,
                      (long long)px);
    else
        nodes_command(node, on_written, NULL, "EVAL %s 1 %b %s", script, lock_key.s, lock_key.n, token);
    nodes_write_now(node);
    arm_timer();
}

void redis_unlock(const char *key, size_t key_len, const char *token)
{
    on_own_lock(key, key_len, token,
                "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end", -1);
}

void redis_lock_mark_uncacheable(const char *key, size_t key_len, const char *token, int64_t ttl_ms)
{
    on_own_lock(key, key_len, token,
                "if redis.call('get', KEYS[1]) == ARGV[1] then "
                "return redis.call('set', KEYS[1], 'uncacheable', 'PX', ARGV[2]) else return 0 end", ttl_ms);
}

void redis_cancel(struct redis_ticket *t)
{
    if (!t)
        return;
    unlink_ticket(t);
    t->waiter = NULL;
}

/* Hands the SET to the kernel at once rather than on the loop's next turn: with
 * upstream.c holding back a response's last bytes until its exchange ends, the entry is
 * on its way to Redis before the app has its answer, so even an app that leaves by
 * _exit() right after has shared it. */
void redis_store(const struct cache_entry *e, int64_t ttl_ms)
{
    if (!R.cfg || (int64_t)e->body_len > R.cfg->redis_max_object)
        return;
    struct redis_key rkey;
    redis_key_of(e->key, e->key_len, false, &rkey);
    struct redis_node *node = nodes_for_key(rkey.s, rkey.n, 1, NODES_EARLY_WRITE);
    if (!node)
        return;
    size_t len;
    unsigned char *v = redis_value_encode(e, e->key, e->key_len, secret(), &len);
    if (!v)
        return;
    if (nodes_pending(node) + len <= REDIS_MAX_PENDING_BYTES
        && nodes_command(node, on_written, (void *)(uintptr_t)len, "SET %b %b PX %lld", rkey.s, rkey.n, v, len,
                         (long long)ttl_ms) == 0) {
        nodes_add_pending(node, len);
        atomic_fetch_add(&writes_owed, 1);
        atomic_fetch_add(&shim_redis.sets, 1);
        atomic_fetch_add(&shim_redis.bytes_written, len);
        nodes_write_now(node);
    }
    free(v);
    arm_timer();
}

static void on_deleted(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)privdata;
    const redisReply *r = reply;
    bool ask;
    nodes_replied(ac, 0);
    if (r && r->type == REDIS_REPLY_ERROR)
        nodes_error(ac, r, &ask);
    atomic_fetch_sub(&writes_owed, 1);
}

void redis_delete(const char *key, size_t key_len)
{
    if (!R.cfg)
        return;
    struct redis_key rkey;
    redis_key_of(key, key_len, false, &rkey);
    struct redis_node *node = nodes_for_key(rkey.s, rkey.n, 1, NODES_EARLY_WRITE);
    if (node && nodes_command(node, on_deleted, NULL, "DEL %b", rkey.s, rkey.n) == 0) {
        atomic_fetch_add(&writes_owed, 1);   /* a process that exits now waits for it */
        atomic_fetch_add(&shim_redis.deletes, 1);
        nodes_write_now(node);
        arm_timer();
        return;
    }
    char *k = n_deletes < DELETES_MAX ? malloc(key_len) : NULL;
    if (!k) {
        atomic_fetch_add(&shim_redis.deletes_dropped, 1);
        return;
    }
    memcpy(k, key, key_len);
    deletes[n_deletes].key = k;
    deletes[n_deletes].key_len = key_len;
    n_deletes++;
}

/* Lookups parked while the server's name resolved: sent once a connection is being made
 * (hiredis queues them meanwhile); one whose wait ended (deadline, cancelled) is freed. */
static void send_parked(int64_t now)
{
    struct redis_ticket **at = &R.parked;
    while (*at) {
        struct redis_ticket *t = *at;
        struct redis_key rkey;
        redis_key_of(t->key, t->key_len, false, &rkey);
        struct redis_node *node = t->waiter ? nodes_for_key(rkey.s, rkey.n, 3, NODES_EARLY_READ) : NULL;
        if (t->waiter && !node && nodes_naming()) {
            at = &t->next_parked;
            continue;
        }
        *at = t->next_parked;
        R.n_parked--;
        int rc = node ? send_lookup(node, t, false) : -1;
        if (rc > 0)
            finish_wait(t, NULL);      /* (the GET went, its PTTL did not: on_get frees it) */
        if (rc < 0) {
            finish_wait(t, NULL);
            free_ticket(t);
        }
    }
    if (R.parked)
        nodes_hurry(now);
}

/* Lookup deadlines; the connections' own (redis_nodes.c: stalls, reconnects). */
static void on_timer(struct loop_timer *timer)
{
    (void)timer;
    R.timer_due_ms = -1;
    int64_t now = clock_mono_ms();
    while (R.waiting_head && R.waiting_head->deadline_ms <= now) {
        atomic_fetch_add(&shim_redis.timeouts, 1);
        R.last_timeout_ms = now;
        finish_wait(R.waiting_head, NULL);     /* the reply, when it comes, frees the ticket */
    }
    nodes_tick(now);
    if (R.parked)
        send_parked(now);
    arm_timer();
}
