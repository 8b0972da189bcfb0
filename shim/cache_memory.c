/* cache_memory.c — the memory tier: a uthash table keyed by cache key plus an LRU list,
 * under one mutex (app threads will read it on the fast path). Every byte of an entry
 * (key, headers, body, bookkeeping) counts against memory_max; inserting evicts from the
 * cold end until the total fits. Entries past their TTL are returned only while they are
 * kept for stale serving (keep_until_ms); past that they are dropped. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#define HASH_NONFATAL_OOM 1
#include "cache.h"
#include "clock.h"
#include "stats.h"

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct cache_entry *table;
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

static void remove_locked(struct cache_entry *e)
{
    HASH_DELETE(hh, table, e);
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

static int oom;
#undef uthash_nonfatal_oom
#define uthash_nonfatal_oom(obj) (oom = 1)

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

size_t memcache_purge(bool (*match)(const struct cache_entry *, void *), void *arg)
{
    size_t n = 0;
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

void memcache_counters(struct memcache_counters *out)
{
    pthread_mutex_lock(&lock);
    *out = counters;
    pthread_mutex_unlock(&lock);
}

void memcache_atfork_prepare(void) { pthread_mutex_lock(&lock); }
void memcache_atfork_release(void) { pthread_mutex_unlock(&lock); }
