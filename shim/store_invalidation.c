/* store_invalidation.c — owns invalidation (RFC 9111 4.4): the sink that watches the answer
 * to an unsafe request and, once it is not an error, drops every stored GET answer of its
 * target from both tiers and from the flights under way; and the record of the last
 * targets invalidated, by which a fetch begun before a write to its target stores nothing
 * (store.c's writer asks). Engine thread only. */
#include "store_invalidation.h"
#include "cache_redis.h"
#include "log.h"
#include "stats.h"
#include <stdlib.h>
#include <string.h>

static const struct shim_config *cfg;

void store_invalidation_init(const struct shim_config *config) { cfg = config; }

/* The last targets invalidated, by the number of the invalidation: a fetch that began
 * before one of its own target's stores nothing (it may carry what was true before the
 * write), and a fetch older than all of them stores nothing either. */
#define RECENT_INVALIDATIONS 64
static uint64_t invalidations;
static uint64_t recent_targets[RECENT_INVALIDATIONS];

static uint64_t target_hash(const char *key, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ULL;    /* FNV-1a */
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)key[i]) * 0x100000001b3ULL;
    return h;
}

static void note_invalidation(const char *target, size_t len)
{
    recent_targets[invalidations % RECENT_INVALIDATIONS] = target_hash(target, len);
    invalidations++;
}

uint64_t invalidation_count(void) { return invalidations; }

bool invalidated_since(const char *key, size_t key_len, uint64_t seen)
{
    if (seen == invalidations)
        return false;
    if (invalidations - seen > RECENT_INVALIDATIONS)
        return true;
    uint64_t h = target_hash(key, cache_key_target_len(key, key_len));
    for (uint64_t i = seen; i < invalidations; i++)
        if (recent_targets[i % RECENT_INVALIDATIONS] == h)
            return true;
    return false;
}

/* Watches the answer to an unsafe request: once it is not an error (or never came: the
 * upstream may have acted all the same), every stored GET answer of the target goes, from
 * the memory tier and from Redis, before the app can read the answer and ask again. */
struct invalidation {
    struct upstream_sink sink;
    int upstream;
    bool decided;
    size_t target_len, own_len;
    char keys[];                       /* the target URI, then the request's own GET key */
};

static void forget_in_redis(const struct cache_entry *e, void *arg)
{
    (void)arg;
    redis_delete(e->key, e->key_len);
}

static struct invalidation *invalidation_of(struct upstream_sink *s) { return (struct invalidation *)(void *)s; }

static void invalidate(struct invalidation *v)
{
    bool redis = cfg->cache == CACHE_REDIS;
    note_invalidation(v->keys, v->target_len);
    flight_invalidate(v->keys, v->target_len);   /* later requests join no fetch begun before */
    size_t n = memcache_invalidate(v->keys, v->target_len, redis ? forget_in_redis : NULL, NULL);
    if (redis && v->own_len)           /* what this process never held, the request itself would read */
        redis_delete(v->keys + v->target_len, v->own_len);
    STAT_INC(v->upstream, invalidations);
    STAT_ADD(v->upstream, invalidated, n);
    shim_debug("invalidated %zu entries of %.*s", n, (int)v->target_len, v->keys);
}

static void inval_validators(struct upstream_sink *s, struct http_slice *etag, struct http_slice *last_modified)
{
    (void)s, (void)etag, (void)last_modified;
}

static void inval_begin(struct upstream_sink *s, int status, struct http_slice reason)
{
    (void)reason;
    struct invalidation *v = invalidation_of(s);
    if (v->decided)
        return;
    v->decided = true;
    if (status < 400)
        invalidate(v);
}

static void inval_header(struct upstream_sink *s, struct http_slice name, struct http_slice value, struct http_slice line)
{
    (void)s, (void)name, (void)value, (void)line;
}

static enum sink_verdict inval_head_done(struct upstream_sink *s, int64_t content_length, bool chunked,
                                         enum http_framing_verdict framing)
{
    (void)s, (void)content_length, (void)chunked, (void)framing;
    return SINK_RELAY;
}

static void inval_body(struct upstream_sink *s, const char *p, size_t n) { (void)s, (void)p, (void)n; }
static void inval_unstorable(struct upstream_sink *s, enum sink_unstorable why) { (void)s, (void)why; }
static bool inval_wanted(struct upstream_sink *s) { (void)s; return false; }

static void inval_end(struct upstream_sink *s, enum sink_end how)
{
    (void)how;
    struct invalidation *v = invalidation_of(s);
    if (!v->decided)
        invalidate(v);
    free(v);
}

static const struct upstream_sink_ops invalidation_ops = {
    inval_validators, inval_begin, inval_header, inval_head_done, inval_body, inval_unstorable, inval_wanted, inval_end,
};

struct upstream_sink *store_invalidation_sink(int upstream, const struct http_request *req, bool https)
{
    if (cfg->cache == CACHE_OFF)
        return NULL;
    static char target[CACHE_KEY_MAX], own[CACHE_KEY_MAX];   /* (engine thread only) */
    size_t own_len;
    size_t target_len = cache_invalidation_target(&cfg->upstreams[upstream], req, https, target, sizeof target, own,
                                                  sizeof own, &own_len);
    if (!target_len)
        return NULL;
    struct invalidation *v = malloc(sizeof *v + target_len + own_len);
    if (!v)
        return NULL;
    v->sink.ops = &invalidation_ops;
    v->upstream = upstream;
    v->decided = false;
    v->target_len = target_len;
    v->own_len = own_len;
    memcpy(v->keys, target, target_len);
    memcpy(v->keys + target_len, own, own_len);
    return &v->sink;
}

void store_invalidate_now(int upstream, const struct http_request *req, bool https)
{
    struct upstream_sink *s = store_invalidation_sink(upstream, req, https);
    if (s)
        s->ops->end(s, SINK_FAILED);   /* no answer will be seen: as if none came */
}

void store_invalidate_unread(int upstream, const char *head, size_t len, bool https)
{
    static struct http_request req;    /* (engine thread only) */
    if (cfg->cache != CACHE_OFF && http_read_target_leniently(head, len, &req))
        store_invalidate_now(upstream, &req, https);
}
