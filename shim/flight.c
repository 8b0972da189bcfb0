/* flight.c — owns coalescing inside the process: at most one upstream fetch (a "flight")
 * per cache key, the requests waiting on it (at most FLIGHT_MAX_WAITERS, each for at most
 * coalesce_timeout, oldest first), and the hit-for-miss memory of keys whose response was
 * not storable, so that the next burst for such a key goes upstream at once instead of
 * queueing behind a fetch that will store nothing; and the Redis lock a flight holds, let
 * go of when it lands. Engine thread only. */
#include <stdlib.h>
#include <string.h>
#define HASH_NONFATAL_OOM 1
#include "flight.h"
#include "clock.h"
#include "cache_redis.h"
#include "stats.h"
#include <stdio.h>
#include <sys/random.h>
#include <unistd.h>

struct flight {
    UT_hash_handle hh;
    char *key;
    size_t key_len;
    unsigned n_waiters;
    struct flight_waiter *head, *tail;      /* join order: deadlines ascend */
    struct loop_timer timer;                /* the oldest waiter's deadline */
    struct loop_deferred landing;
    struct cache_entry *landed;             /* what the waiters are served, a reference */
    bool in_table;
    bool detached;                          /* out of the table: its target was invalidated */
    bool holds_lock;                        /* the Redis lock on the key is ours */
    bool failed;                            /* landed with nothing because the fetch failed */
    char token[64];                         /* what the lock is taken with */
};

static const struct shim_config *cfg;
static struct flight *table;

/* Hit-for-miss slots: a 64-bit hash of the key and until when. A collision only costs a
 * key its coalescing for a while, so no key is kept. */
#define HFM_SLOTS 4096
#define HFM_PROBE 4
static struct { uint64_t hash; int64_t until_us; } hfm[HFM_SLOTS];

/* Lock tokens: the pid, a random number drawn per process, and a counter, so no two
 * flights anywhere share one. */
static uint64_t token_salt, token_count;

static void new_salt(void)
{
    if (getrandom(&token_salt, sizeof token_salt, GRND_NONBLOCK) != (ssize_t)sizeof token_salt)
        token_salt ^= (uint64_t)clock_mono_us() * 0x9E3779B97F4A7C15ULL;
}

void flight_init(const struct shim_config *config)
{
    cfg = config;
    new_salt();
}

void flight_forget(void)
{
    table = NULL;                      /* the parent's; its memory stays unreachable */
    memset(hfm, 0, sizeof hfm);
    token_salt = 0;                    /* the child draws its own when its engine starts */
}

struct flight *flight_find(const char *key, size_t key_len)
{
    struct flight *f;
    HASH_FIND(hh, table, key, key_len, f);
    return f;
}

static int oom;
#undef uthash_nonfatal_oom
#define uthash_nonfatal_oom(obj) (oom = 1)

struct flight *flight_begin(const char *key, size_t key_len)
{
    struct flight *f = calloc(1, sizeof *f);
    if (!f || !(f->key = malloc(key_len))) {
        free(f);
        return NULL;
    }
    memcpy(f->key, key, key_len);
    f->key_len = key_len;
    oom = 0;
    HASH_ADD_KEYPTR(hh, table, f->key, f->key_len, f);
    if (oom) {
        free(f->key);
        free(f);
        return NULL;
    }
    f->in_table = true;
    return f;
}

static void unlink_waiter(struct flight_waiter *w)
{
    struct flight *f = w->flight;
    if (w->prev)
        w->prev->next = w->next;
    else
        f->head = w->next;
    if (w->next)
        w->next->prev = w->prev;
    else
        f->tail = w->prev;
    w->prev = w->next = NULL;
    w->flight = NULL;
    f->n_waiters--;
}

static void on_deadline(struct loop_timer *timer);

static void arm(struct flight *f)
{
    if (!f->head || !f->in_table) {
        loop_timer_cancel(&f->timer);
        return;
    }
    int64_t ms = (f->head->deadline_us - clock_mono_us() + 999) / 1000;
    loop_timer_arm(&f->timer, ms > 0 ? ms : 0, on_deadline);
}

bool flight_join(struct flight *f, struct flight_waiter *w)
{
    if (f->n_waiters >= FLIGHT_MAX_WAITERS || !f->in_table)
        return false;
    w->flight = f;
    w->deadline_us = clock_mono_us() + cfg->coalesce_timeout_ms * 1000;
    w->next = NULL;
    w->prev = f->tail;
    if (f->tail)
        f->tail->next = w;
    else
        f->head = w;
    f->tail = w;
    f->n_waiters++;
    if (f->head == w)
        arm(f);
    return true;
}

void flight_leave(struct flight_waiter *w)
{
    struct flight *f = w->flight;
    if (!f)
        return;
    bool was_head = f->head == w;
    unlink_waiter(w);
    if (was_head)
        arm(f);
}

bool flight_has_waiters(const struct flight *f) { return f && f->head; }

/* Waiters past coalesce_timeout fetch on their own (and do not store: the leader may
 * still, and two stores of one key would race). */
static void on_deadline(struct loop_timer *timer)
{
    struct flight *f = (struct flight *)(void *)((char *)timer - offsetof(struct flight, timer));
    int64_t now = clock_mono_us();
    for (unsigned n = 0; f->head && f->head->deadline_us <= now && n < FLIGHT_MAX_WAITERS; n++) {
        struct flight_waiter *w = f->head;
        unlink_waiter(w);
        w->done(w, FLIGHT_TIMED_OUT, NULL);
    }
    arm(f);
}

/* After the batch that landed the flight: outside every libcurl callback, so a released
 * waiter may start its own transfer. */
static void tell_waiters(struct loop_deferred *d)
{
    struct flight *f = (struct flight *)(void *)((char *)d - offsetof(struct flight, landing));
    for (unsigned n = 0; f->head && n <= FLIGHT_MAX_WAITERS; n++) {
        struct flight_waiter *w = f->head;
        unlink_waiter(w);
        if (f->landed) {
            cache_entry_ref(f->landed);
            w->done(w, FLIGHT_SERVED, f->landed);
        } else {
            w->done(w, f->failed ? FLIGHT_FAILED : FLIGHT_RELEASED, NULL);
        }
    }
    if (f->landed)
        cache_entry_release(f->landed);
    free(f->key);
    free(f);
}

const char *flight_lock_token(struct flight *f)
{
    if (!f->token[0])
        snprintf(f->token, sizeof f->token, "%d-%016llx-%llu", (int)getpid(), (unsigned long long)token_salt,
                 (unsigned long long)++token_count);
    return f->token;
}

void flight_lock_taken(struct flight *f) { f->holds_lock = true; }

const char *flight_key(const struct flight *f, size_t *len)
{
    *len = f->key_len;
    return f->key;
}

void flight_land(struct flight *f, struct cache_entry *e)
{
    if (!f || !f->in_table)
        return;
    if (f->holds_lock && flight_is_uncacheable(f->key, f->key_len))
        redis_lock_mark_uncacheable(f->key, f->key_len, f->token, cfg->uncacheable_ttl_ms);
    else if (f->holds_lock)            /* after the entry's SET, on the same connection */
        redis_unlock(f->key, f->key_len, f->token);
    if (!f->detached)
        HASH_DELETE(hh, table, f);
    f->in_table = false;
    loop_timer_cancel(&f->timer);
    if (e)
        cache_entry_ref(e);
    f->landed = e;
    loop_defer(&f->landing, tell_waiters);
}

void flight_fail(struct flight *f)
{
    if (f && f->in_table) {
        f->failed = true;
        flight_land(f, NULL);
    }
}

void flight_invalidate(const char *target, size_t target_len)
{
    for (struct flight *f = table, *next; f; f = next) {
        next = f->hh.next;
        if (cache_key_target_len(f->key, f->key_len) == target_len && !memcmp(f->key, target, target_len)) {
            HASH_DELETE(hh, table, f);
            f->detached = true;        /* its waiters are told when it lands, as before */
        }
    }
}

/* ---- hit-for-miss ---- */

static uint64_t key_hash(const char *key, size_t len)
{
    uint64_t h = 1469598103934665603ULL;       /* FNV-1a */
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)key[i]) * 1099511628211ULL;
    return h ? h : 1;
}

void flight_mark_uncacheable(const char *key, size_t key_len)
{
    uint64_t h = key_hash(key, key_len);
    int64_t now = clock_mono_us();
    size_t victim = h % HFM_SLOTS;
    for (size_t i = 0; i < HFM_PROBE; i++) {
        size_t s = (h + i) % HFM_SLOTS;
        if (hfm[s].hash == h || hfm[s].until_us <= now) {
            victim = s;
            break;
        }
        if (hfm[s].until_us < hfm[victim].until_us)
            victim = s;                /* all taken: the one that ends soonest goes */
    }
    hfm[victim].hash = h;
    hfm[victim].until_us = now + cfg->uncacheable_ttl_ms * 1000;
}

bool flight_is_uncacheable(const char *key, size_t key_len)
{
    uint64_t h = key_hash(key, key_len);
    int64_t now = clock_mono_us();
    for (size_t i = 0; i < HFM_PROBE; i++) {
        size_t s = (h + i) % HFM_SLOTS;
        if (hfm[s].hash == h)
            return hfm[s].until_us > now;
    }
    return false;
}
