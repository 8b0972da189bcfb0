/* cache_redis.c — the Redis tier: one hiredis async connection per process, driven by
 * the engine's loop through a small adapter; lookups (GET + PTTL, pipelined) that a
 * request waits on for at most redis_timeout; fire-and-forget SET ... PX after the
 * response has gone to the app (entries in redis_value.c's format); the per-key locks
 * that coalesce fetches across processes (SET NX PX, compare-and-delete); reconnects with
 * backoff; bounds on everything queued towards Redis; and the names of the keys (printable,
 * see "Redis keys"). Redis does the expiry. */
#include "cache_redis.h"
#include "clock.h"
#include "sha256.h"
#include "http.h"
#include "loop.h"
#include "stats.h"
#include <errno.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include "redis_link.h"
#include "redis_sentinel.h"
#include "redis_value.h"
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define REDIS_MAX_INFLIGHT     1024            /* commands awaiting replies */
#define REDIS_MAX_PENDING_BYTES (8u << 20)     /* SET payloads queued, not yet answered */
#define REDIS_BACKOFF_MIN_MS   100
#define REDIS_BACKOFF_MAX_MS   2000

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
    struct redis_ticket *prev, *next;   /* the waiting list, in deadline order */
};

static struct {
    struct redis_link link;
    struct loop_timer timer;        /* the next lookup deadline, stall check or reconnect */
    const struct shim_config *cfg;
    redisAsyncContext *ac;          /* the connection callbacks answer for (NULL once dropped) */
    bool connected;
    int backoff_ms;
    int64_t next_attempt_ms;
    unsigned inflight;
    size_t pending_bytes;
    int64_t last_progress_ms;
    struct redis_ticket *waiting_head, *waiting_tail;
} R = { .link.fd = -1 };

static int64_t exit_wait_ms;        /* redis_timeout, for the exit handler */

/* Locks this process may hold without knowing it: a lock whose answer was lost with its
 * connection (Redis may still have taken it, e.g. when a frozen server thaws), or one
 * whose release could not be sent. Released (compare-and-delete) once connected again,
 * so that no request anywhere waits coalesce_timeout on a lock nobody will let go. */
#define RELEASES_MAX 64
static struct { char *key; size_t key_len; char token[64]; } releases[RELEASES_MAX];
static size_t n_releases;

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
    int64_t next = -1, now = clock_mono_ms();
    if (R.waiting_head)
        next = R.waiting_head->deadline_ms;
    if (!R.ac && (next < 0 || R.next_attempt_ms < next))
        next = R.next_attempt_ms;
    if (R.ac && R.inflight) {
        int64_t stall = R.last_progress_ms + (R.cfg->redis_timeout_ms * 4 > 1000 ? R.cfg->redis_timeout_ms * 4 : 1000);
        if (next < 0 || stall < next)
            next = stall;
    }
    if (next < 0) {
        loop_timer_cancel(&R.timer);
        return;
    }
    int64_t d = next - now;
    loop_timer_arm(&R.timer, d < 1 ? 1 : d, on_timer);   /* at least 1 ms: a due check never spins */
}

static void schedule_reconnect(void)
{
    R.backoff_ms = R.backoff_ms ? (R.backoff_ms * 2 > REDIS_BACKOFF_MAX_MS ? REDIS_BACKOFF_MAX_MS : R.backoff_ms * 2)
                                : REDIS_BACKOFF_MIN_MS;
    R.next_attempt_ms = clock_mono_ms() + R.backoff_ms;
}

/* The connection may carry the tier's commands from now on. */
static void usable(void)
{
    R.connected = true;
    R.backoff_ms = 0;
    atomic_store(&shim_redis.connected, 1);
    size_t n = n_releases;
    n_releases = 0;
    for (size_t i = 0; i < n; i++) {
        redis_unlock(releases[i].key, releases[i].key_len, releases[i].token);
        free(releases[i].key);
    }
}

static bool behind_sentinel(void) { return R.cfg->redis_mode == REDIS_SENTINEL; }

/* Not (or no longer) the master: a replica the sentinels have not caught up with, or a
 * master that lost its replicas (MASTERDOWN). The tier stops using it and asks again. */
static void not_the_master(redisAsyncContext *ac)
{
    atomic_fetch_add(&shim_redis.not_master, 1);
    if (ac == R.ac && R.connected) {
        R.connected = false;
        atomic_store(&shim_redis.connected, 0);
    }
    if (ac == R.ac)
        redisAsyncDisconnect(ac);      /* (after its callbacks) its disconnect schedules the next */
    sentinel_doubt();
}

/* An error reply to one of the tier's commands. */
static void reply_error(redisAsyncContext *ac, const redisReply *r)
{
    atomic_fetch_add(&shim_redis.errors, 1);
    if (behind_sentinel() && r->type == REDIS_REPLY_ERROR
        && (!strncmp(r->str, "READONLY", 8) || !strncmp(r->str, "MASTERDOWN", 10)))
        not_the_master(ac);
}

static void on_role(redisAsyncContext *ac, void *reply, void *privdata)
{
    (void)privdata;
    const redisReply *r = reply;
    if (ac != R.ac || !r)
        return;
    if (r->type == REDIS_REPLY_ARRAY && r->elements >= 1 && r->element[0]->type == REDIS_REPLY_STRING
        && !strcmp(r->element[0]->str, "master"))
        usable();
    else
        not_the_master(ac);
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    if (R.ac != ac)
        return;
    if (status != REDIS_OK) {
        atomic_fetch_add(&shim_redis.errors, 1);
        R.ac = NULL;               /* hiredis frees the context after this callback */
        R.connected = false;
        schedule_reconnect();
        if (behind_sentinel())
            sentinel_doubt();
        return;
    }
    if (!behind_sentinel())
        usable();                  /* (behind Sentinel: once ROLE says master) */
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    if (R.ac != ac)
        return;                    /* one we dropped ourselves */
    if (status != REDIS_OK)
        atomic_fetch_add(&shim_redis.errors, 1);
    R.ac = NULL;
    R.connected = false;
    R.inflight = 0;
    R.pending_bytes = 0;
    atomic_store(&shim_redis.connected, 0);
    schedule_reconnect();
    if (behind_sentinel() && status != REDIS_OK)
        sentinel_doubt();
}

static void after_io(struct redis_link *l)
{
    (void)l;
    arm_timer();
}

static void connect_now(void)
{
    R.link.after_io = after_io;
    char host[256];
    int port = R.cfg->redis_port;
    snprintf(host, sizeof host, "%s", R.cfg->redis_host);
    if (behind_sentinel() && !sentinel_master(host, sizeof host, &port)) {
        schedule_reconnect();          /* no master named yet: the tier fails open meanwhile */
        return;
    }
    if (redis_link_connect(&R.link, host, port, R.cfg->redis_unix, on_connect, on_disconnect) != 0) {
        atomic_fetch_add(&shim_redis.errors, 1);
        schedule_reconnect();
        return;
    }
    redisAsyncContext *ac = R.link.ac;
    R.ac = ac;
    R.inflight = 0;
    R.pending_bytes = 0;
    R.last_progress_ms = clock_mono_ms();
    if (R.cfg->redis_password[0])
        redisAsyncCommand(ac, NULL, NULL, "AUTH %s", R.cfg->redis_password);
    if (R.cfg->redis_db)
        redisAsyncCommand(ac, NULL, NULL, "SELECT %d", R.cfg->redis_db);
    if (behind_sentinel())
        redisAsyncCommand(ac, on_role, NULL, "ROLE");   /* the master the sentinels named, still? */
}

/* The sentinels name another master: the connection to the old one goes (its commands
 * in flight fail open), and the new one is tried at once. */
static void master_changed(void)
{
    if (R.ac) {
        R.ac = NULL;
        R.connected = false;
        atomic_store(&shim_redis.connected, 0);
        redis_link_drop(&R.link);
        R.inflight = 0;
        R.pending_bytes = 0;
    }
    R.backoff_ms = 0;
    connect_now();
    arm_timer();
}

int redis_init(const struct shim_config *cfg)
{
    if (cfg->cache != CACHE_REDIS)
        return 0;
    R.cfg = cfg;
    exit_wait_ms = cfg->redis_timeout_ms;
    static bool exit_flush_registered;    /* once per process image: forks inherit it */
    if (!exit_flush_registered)
        exit_flush_registered = atexit(flush_at_exit) == 0;
    if (behind_sentinel()) {
        sentinel_init(cfg, master_changed);   /* connects once a master is named */
        schedule_reconnect();
    } else {
        snprintf(shim_redis.master, sizeof shim_redis.master, cfg->redis_unix[0] ? "%s" : "%s:%d",
                 cfg->redis_unix[0] ? cfg->redis_unix : cfg->redis_host, cfg->redis_port);
        connect_now();
    }
    arm_timer();
    return 0;
}

void redis_forget(void)
{
    /* forked child: the fds went with the other engine fds; the context stays allocated */
    memset(&R, 0, sizeof R);
    redis_link_forget(&R.link);
    sentinel_forget();
    n_releases = 0;                    /* the parent's locks: its own to release */
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
               + sizeof ((struct cache_rule *)0)->glob + 1 + 2 * SHA256_BYTES + sizeof ":lock" <= REDIS_KEY_MAX,
               "REDIS_KEY_MAX holds the longest key");

struct redis_key { char s[REDIS_KEY_MAX]; size_t n; };

static void key_put(struct redis_key *k, const char *s, size_t n)
{
    for (size_t i = 0; i < n && k->n < sizeof k->s; i++) {
        unsigned char c = (unsigned char)s[i];
        k->s[k->n++] = c >= 0x21 && c <= 0x7e ? (char)c : '_';
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
    char hex[2 * SHA256_BYTES + 2] = ":";
    for (size_t i = 0; i < SHA256_BYTES; i++)
        snprintf(hex + 1 + 2 * i, 3, "%02x", digest[i]);
    key_puts(k, hex);
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

/* A reply arrived. Replies of a context we already dropped (hiredis hands them NULL
 * while freeing it) say nothing about the current connection. */
static void progress(const redisAsyncContext *ac)
{
    if (ac != R.ac)
        return;
    if (R.inflight)
        R.inflight--;
    R.last_progress_ms = clock_mono_ms();
}

/* The reply to a SET or DEL: its bytes and its slot are free again. */
static void on_written(redisAsyncContext *ac, void *reply, void *privdata)
{
    size_t len = (size_t)(uintptr_t)privdata;       /* 0 for a DEL */
    const redisReply *r = reply;
    if (r && r->type == REDIS_REPLY_ERROR)
        reply_error(ac, r);
    if (len)
        atomic_fetch_sub(&writes_owed, 1);           /* answered or abandoned: no longer owed */
    progress(ac);
    if (ac == R.ac)
        R.pending_bytes = R.pending_bytes > len ? R.pending_bytes - len : 0;
}

static void on_get(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct redis_ticket *t = privdata;
    redisReply *r = reply;
    progress(ac);
    if (t->get_only) {
        free_ticket(t);
        return;
    }
    if (!r || r->type == REDIS_REPLY_ERROR) {
        t->failed = true;
        if (r)
            reply_error(ac, r);
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
    progress(ac);
    struct cache_entry *e = NULL;
    if (!r || r->type != REDIS_REPLY_INTEGER || t->failed) {
        if (r && r->type == REDIS_REPLY_ERROR)
            reply_error(ac, r);
    } else if (t->got_value && r->integer > 0) {
        enum redis_value_verdict v = redis_value_decode(t->key, t->key_len, t->value, t->value_len, r->integer,
                                                        clock_wall_ms(), secret(), &e);
        if (v == REDIS_VALUE_CORRUPT || v == REDIS_VALUE_UNAUTHENTICATED) {
            atomic_fetch_add(v == REDIS_VALUE_CORRUPT ? &shim_redis.corrupt : &shim_redis.unauthenticated, 1);
            if (ac && R.connected && R.inflight < REDIS_MAX_INFLIGHT) {
                struct redis_key rkey;
                redis_key_of(t->key, t->key_len, false, &rkey);
                if (redisAsyncCommand(ac, on_written, NULL, "DEL %b", rkey.s, rkey.n) == REDIS_OK)
                    R.inflight++;
            }
        }
    }
    if (e) {
        e->upstream = t->upstream;
        if (!cache_entry_is_vary_marker(e))   /* (a marker is followed by the variant's lookup) */
            atomic_fetch_add(&shim_redis.hits, 1);
    } else if (t->waiter) {
        atomic_fetch_add(&shim_redis.misses, 1);
    }
    if (r && r->type == REDIS_REPLY_INTEGER && !t->failed)
        stats_observe_redis(clock_mono_us() - t->started_us);
    finish_wait(t, e);
    free_ticket(t);
    arm_timer();
}

/* Hands what was just queued (a SET, a lock's release) to the kernel at once rather than
 * on the loop's next turn: with upstream.c holding back a response's last bytes until its
 * exchange ends, the entry is on its way to Redis before the app has its answer, so even
 * an app that leaves by _exit() right after has shared it. */
static void write_now(void)
{
    if (R.ac && R.connected)
        redisAsyncHandleWrite(R.ac);
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
    /* while the connection is still being made, hiredis queues the commands: a process's
     * first lookups (a freshly forked worker's) still reach Redis within redis_timeout */
    if (!R.cfg || !R.ac || R.inflight + 2 > REDIS_MAX_INFLIGHT)
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
    if (!R.inflight)
        R.last_progress_ms = clock_mono_ms();
    struct redis_key rkey;
    redis_key_of(key, key_len, false, &rkey);
    if (redisAsyncCommand(R.ac, on_get, t, "GET %b", rkey.s, rkey.n) != REDIS_OK) {
        free_ticket(t);
        return NULL;
    }
    R.inflight++;
    if (redisAsyncCommand(R.ac, on_pttl, t, "PTTL %b", rkey.s, rkey.n) != REDIS_OK) {
        t->waiter = NULL;
        t->get_only = true;        /* on_get frees it */
        return NULL;
    }
    R.inflight++;
    wait_in_line(t);
    return t;
}

bool redis_available(void)
{
    return R.cfg && R.ac && R.connected && R.inflight + 2 <= REDIS_MAX_INFLIGHT;
}

static void on_lock_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct redis_ticket *t = privdata;
    const redisReply *r = reply;
    progress(ac);
    if (t->waiter) {
        enum redis_lock_result how = REDIS_LOCK_UNAVAILABLE;
        if (r && r->type == REDIS_REPLY_STATUS && r->len == 2 && !memcmp(r->str, "OK", 2))
            how = REDIS_LOCK_TAKEN;
        else if (r && r->type == REDIS_REPLY_NIL)
            how = REDIS_LOCK_HELD_ELSEWHERE;
        else if (r)
            reply_error(ac, r);
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

struct redis_ticket *redis_lock(const char *key, size_t key_len, const char *token, redis_lock_done_fn done,
                                void *waiter)
{
    if (!redis_available())
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
    if (!R.inflight)
        R.last_progress_ms = clock_mono_ms();
    struct redis_key lock_key;
    redis_key_of(key, key_len, true, &lock_key);
    if (redisAsyncCommand(R.ac, on_lock_reply, t, "SET %b %s NX PX %lld", lock_key.s, lock_key.n, token,
                          (long long)R.cfg->redis_lock_ttl_ms) != REDIS_OK) {
        free_ticket(t);
        return NULL;
    }
    R.inflight++;
    atomic_fetch_add(&shim_redis.locks, 1);
    wait_in_line(t);
    return t;
}

/* Deletes the lock only while it still holds our token: one that expired and was taken
 * by another process is theirs. */
void redis_unlock(const char *key, size_t key_len, const char *token)
{
    static const char compare_and_delete[] =
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";
    if (!R.cfg || !R.ac || !R.connected || R.inflight >= REDIS_MAX_INFLIGHT) {
        if (R.cfg)
            release_later(key, key_len, token);
        return;
    }
    if (!R.inflight)
        R.last_progress_ms = clock_mono_ms();
    struct redis_key lock_key;
    redis_key_of(key, key_len, true, &lock_key);
    if (redisAsyncCommand(R.ac, on_written, NULL, "EVAL %s 1 %b %s", compare_and_delete, lock_key.s, lock_key.n,
                          token) == REDIS_OK)
        R.inflight++;
    write_now();
    arm_timer();
}

void redis_cancel(struct redis_ticket *t)
{
    if (!t)
        return;
    unlink_ticket(t);
    t->waiter = NULL;
}

void redis_store(const struct cache_entry *e, int64_t ttl_ms)
{
    if (!R.cfg || !R.ac || (int64_t)e->body_len > R.cfg->redis_max_object
        || R.inflight >= REDIS_MAX_INFLIGHT)
        return;
    size_t len;
    unsigned char *v = redis_value_encode(e, e->key, e->key_len, secret(), &len);
    if (!v)
        return;
    if (R.pending_bytes + len <= REDIS_MAX_PENDING_BYTES) {
        if (!R.inflight)
            R.last_progress_ms = clock_mono_ms();
        struct redis_key rkey;
        redis_key_of(e->key, e->key_len, false, &rkey);
        if (redisAsyncCommand(R.ac, on_written, (void *)(uintptr_t)len, "SET %b %b PX %lld", rkey.s, rkey.n, v, len,
                              (long long)ttl_ms) == REDIS_OK) {
            R.inflight++;
            R.pending_bytes += len;
            atomic_fetch_add(&writes_owed, 1);
            atomic_fetch_add(&shim_redis.sets, 1);
            atomic_fetch_add(&shim_redis.bytes_written, len);
            write_now();
        }
    }
    free(v);
    arm_timer();
}

/* Lookup deadlines, a connection that stopped answering, the next reconnect. */
static void on_timer(struct loop_timer *timer)
{
    (void)timer;
    int64_t now = clock_mono_ms();
    while (R.waiting_head && R.waiting_head->deadline_ms <= now) {
        atomic_fetch_add(&shim_redis.timeouts, 1);
        finish_wait(R.waiting_head, NULL);     /* the reply, when it comes, frees the ticket */
    }
    int64_t stall = R.cfg->redis_timeout_ms * 4 > 1000 ? R.cfg->redis_timeout_ms * 4 : 1000;
    if (R.ac && R.inflight && now - R.last_progress_ms > stall) {
        atomic_fetch_add(&shim_redis.errors, 1);
        redisAsyncContext *ac = R.ac;          /* frozen or wedged: drop it, start over */
        R.ac = NULL;
        R.connected = false;
        atomic_store(&shim_redis.connected, 0);
        redisAsyncFree(ac);                    /* pending callbacks get NULL replies */
        R.inflight = 0;
        R.pending_bytes = 0;
        schedule_reconnect();
    }
    if (!R.ac && now >= R.next_attempt_ms) {
        atomic_fetch_add(&shim_redis.reconnects, 1);
        connect_now();
    }
    arm_timer();
}
