/* cache_memory.c — the memory tier: a uthash table keyed by cache key plus an LRU list,
 * under one mutex (app threads will read it on the fast path). Every byte of an entry
 * (key, headers, body, bookkeeping) counts against memory_max; inserting evicts from the
 * cold end until the total fits. Entries past their TTL are returned only while they are
 * kept for stale serving (keep_until_ms); past that they are dropped. A second table
 * groups the entries by target URI (every variant, credential and body of one URL), so
 * that an unsafe request's success removes them all without a walk of the tier. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#define HASH_NONFATAL_OOM 1
#include "cache.h"
#include "clock.h"
#include "stats.h"

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct cache_entry *table;
struct memcache_target {
    UT_hash_handle hh;
    struct cache_entry *first;
    size_t len;
    char uri[];
};
static struct memcache_target *targets;
static struct cache_entry *mru, *lru;
static int64_t max_bytes = 64LL << 20;
static struct memcache_counters counters;

void memcache_configure(int64_t cap)
{
    pthread_mutex_lock(&lock);
    max_bytes = cap;
    pthread_mutex_unlock(&lock);
}

static void lru_unlink(struct cache_entry *e)
{
    if (e->lru_prev)
        e->lru_prev->lru_next = e->lru_next;
    else
        mru = e->lru_next;
    if (e->lru_next)
        e->lru_next->lru_prev = e->lru_prev;
    else
        lru = e->lru_prev;
    e->lru_prev = e->lru_next = NULL;
}

static void lru_push_front(struct cache_entry *e)
{
    e->lru_prev = NULL;
    e->lru_next = mru;
    if (mru)
        mru->lru_prev = e;
    mru = e;
    if (!lru)
        lru = e;
}

static int oom;
#undef uthash_nonfatal_oom
#define uthash_nonfatal_oom(obj) (oom = 1)

static bool target_join(struct cache_entry *e)
{
    size_t len = cache_key_target_len(e->key, e->key_len);
    struct memcache_target *t;
    HASH_FIND(hh, targets, e->key, len, t);
    if (!t) {
        if (!(t = malloc(sizeof *t + len)))
            return false;
        memcpy(t->uri, e->key, len);
        t->len = len;
        t->first = NULL;
        oom = 0;
        HASH_ADD_KEYPTR(hh, targets, t->uri, len, t);
        if (oom) {
            free(t);
            return false;
        }
    }
    e->target = t;
    e->target_prev = NULL;
    e->target_next = t->first;
    if (t->first)
        t->first->target_prev = e;
    t->first = e;
    return true;
}

static void target_leave(struct cache_entry *e)
{
    struct memcache_target *t = e->target;
    if (e->target_prev)
        e->target_prev->target_next = e->target_next;
    else
        t->first = e->target_next;
    if (e->target_next)
        e->target_next->target_prev = e->target_prev;
    e->target = NULL;
    e->target_prev = e->target_next = NULL;
    if (!t->first) {
        HASH_DELETE(hh, targets, t);
        free(t);
    }
}

static void remove_locked(struct cache_entry *e)
{
    HASH_DELETE(hh, table, e);
    target_leave(e);
    lru_unlink(e);
    e->in_tier = false;
    counters.entries--;
    counters.bytes -= e->charge;
    STAT_DEC(e->upstream, memory_entries);
    STAT_ADD(e->upstream, memory_bytes, (uint64_t)0 - e->charge);
    cache_entry_release(e);
}

struct cache_entry *memcache_get(const char *key, size_t key_len)
{
    int64_t now = clock_wall_ms();
    struct cache_entry *e;
    pthread_mutex_lock(&lock);
    HASH_FIND(hh, table, key, key_len, e);
    if (e && now >= e->keep_until_ms) {
        STAT_INC(e->upstream, expired);
        remove_locked(e);
        counters.expired++;
        e = NULL;
    }
    if (e) {
        lru_unlink(e);
        lru_push_front(e);
        cache_entry_ref(e);
    }
    pthread_mutex_unlock(&lock);
    return e;
}

void memcache_put(struct cache_entry *e)
{
    pthread_mutex_lock(&lock);
    struct cache_entry *old;
    HASH_FIND(hh, table, e->key, e->key_len, old);
    if (old)
        remove_locked(old);
    if ((int64_t)e->charge > max_bytes) {
        pthread_mutex_unlock(&lock);
        cache_entry_release(e);
        return;
    }
    oom = 0;
    HASH_ADD_KEYPTR(hh, table, e->key, e->key_len, e);
    if (!oom && !target_join(e)) {
        HASH_DELETE(hh, table, e);
        oom = 1;
    }
    if (oom) {
        pthread_mutex_unlock(&lock);
        cache_entry_release(e);
        return;
    }
    e->in_tier = true;
    lru_push_front(e);
    counters.entries++;
    counters.bytes += e->charge;
    STAT_INC(e->upstream, memory_entries);
    STAT_ADD(e->upstream, memory_bytes, e->charge);
    while ((int64_t)counters.bytes > max_bytes && lru) {
        STAT_INC(lru->upstream, evictions);
        remove_locked(lru);
        counters.evictions++;
    }
    pthread_mutex_unlock(&lock);
}

static _Atomic uint64_t purges;

uint64_t memcache_purge_count(void) { return atomic_load(&purges); }

size_t memcache_purge(bool (*match)(const struct cache_entry *, void *), void *arg)
{
    size_t n = 0;
    atomic_fetch_add(&purges, 1);
    pthread_mutex_lock(&lock);
    struct cache_entry *e, *tmp;
    HASH_ITER(hh, table, e, tmp) {
        if (match(e, arg)) {
            remove_locked(e);
            n++;
        }
    }
    pthread_mutex_unlock(&lock);
    return n;
}

size_t memcache_invalidate(const char *target, size_t target_len,
                           void (*gone)(const struct cache_entry *, void *), void *arg)
{
    size_t n = 0;
    for (;;) {                         /* in batches, so the lock is never held for the callbacks */
        struct cache_entry *batch[64];
        size_t k = 0;
        pthread_mutex_lock(&lock);
        struct memcache_target *t;
        HASH_FIND(hh, targets, target, target_len, t);
        while (t && k < sizeof batch / sizeof *batch) {
            struct cache_entry *e = t->first;
            bool last = !e->target_next;
            cache_entry_ref(e);
            batch[k++] = e;
            remove_locked(e);          /* (the target goes with its last entry) */
            if (last)
                t = NULL;
        }
        pthread_mutex_unlock(&lock);
        for (size_t i = 0; i < k; i++) {
            if (gone)
                gone(batch[i], arg);
            cache_entry_release(batch[i]);
        }
        n += k;
        if (k < sizeof batch / sizeof *batch)
            return n;
    }
}

void memcache_counters(struct memcache_counters *out)
{
    pthread_mutex_lock(&lock);
    *out = counters;
    pthread_mutex_unlock(&lock);
}

void memcache_atfork_prepare(void) { pthread_mutex_lock(&lock); }
void memcache_atfork_release(void) { pthread_mutex_unlock(&lock); }
