/* store.c — owns the cache side of a request. store_open() answers, for the request the
 * engine is about to answer: a hit (fresh, or stale within stale_while_revalidate, with
 * one background refresh per key), a wait (the Redis lookup, another request's fetch of
 * the key, or another process's behind the key's Redis lock), or a fetch, with the writer
 * that goes along with it. store_fresh_hit() asks the same question for the app's own
 * thread (memory only, fresh only). The writer watches the response go by (the upstream's
 * sink callbacks), stores it in both tiers once it is whole and allowed, lands the key's
 * flight for its waiters, renews an entry on a 304, and stands a stale entry in for an
 * upstream that fails. The tiers below are exact-key get/put (cache_memory.c,
 * cache_redis.c) and never call each other; the Vary marker and the variant behind it are
 * resolved here, once, for both; what an unsafe request's answer invalidates is
 * store_invalidation.c's. Engine thread only, but for store_fresh_hit(). */
#include "store.h"
#include "store_invalidation.h"
#include "cache_redis.h"
#include "clock.h"
#include "log.h"
#include "stats.h"
#include <stdlib.h>
#include <string.h>

/* Polls for the entry another process is fetching: 25, 50, 100, 200, 400, 400... ms. */
#define LOCK_POLL_FIRST_MS 25
#define LOCK_POLLS_MAX     64
#define INLINE_VARIANT_MAX 2048        /* store_fresh_hit: a longer variant key goes the engine's way */

static const struct shim_config *cfg;

void store_init(const struct shim_config *config)
{
    cfg = config;
    store_invalidation_init(config);
}

/* ---- the memory tier, through a Vary marker ---- */

/* The memory tier's entry for the request: the key's own, or, behind a Vary marker, the
 * variant the request's header values select, if it answers this request; fresh or not.
 * *variant_len: the variant's key when there was a marker (0 otherwise). */
static struct cache_entry *memory_entry(const char *key, size_t key_len, const struct http_request *req, char *variant,
                                        size_t variant_cap, size_t *variant_len)
{
    *variant_len = 0;
    struct cache_entry *e = memcache_get(key, key_len);
    if (e && cache_entry_is_vary_marker(e)) {
        *variant_len = cache_variant_key(key, key_len, e->vary, e->vary_len, req, variant, variant_cap);
        cache_entry_release(e);
        e = *variant_len ? memcache_get(variant, *variant_len) : NULL;
    }
    if (e && !cache_entry_matches_request(e, req)) {
        cache_entry_release(e);
        e = NULL;
    }
    return e;
}

/* The one test of freshness, for the app's thread and the engine's alike: an entry is
 * fresh until its expiry, from that instant on it is stale. */
static bool fresh_at(const struct cache_entry *e, int64_t now_ms)
{
    return now_ms < e->expires_at_ms;
}

struct cache_entry *store_fresh_hit(const struct http_request *req, const char *key, size_t key_len, int64_t now_ms)
{
    char variant[INLINE_VARIANT_MAX];
    size_t variant_len;
    struct cache_entry *e = memory_entry(key, key_len, req, variant, sizeof variant, &variant_len);
    if (e && !fresh_at(e, now_ms)) {
        cache_entry_release(e);        /* stale: the engine decides */
        e = NULL;
    }
    return e;
}

/* ---- waits ---- */

static void ready(struct store_request *r)
{
    r->ready(r);
}

/* Redis answered (or gave up) for the key or its variant: e is a reference, or NULL. A
 * marker joins the memory tier and the variant is asked for next; an entry is promoted to
 * the memory tier and served from our own reference. */
static void on_redis_answer(void *waiter, struct cache_entry *e)
{
    struct store_request *r = waiter;
    r->redis_ticket = NULL;
    if (e && cache_entry_is_vary_marker(e) && !r->redis_marker) {
        r->redis_marker = true;
        memcache_put(e);
    } else {
        r->redis_done = true;
        if (e && cache_entry_is_vary_marker(e)) {
            cache_entry_release(e);    /* a marker where the variant should be */
        } else if (e) {
            cache_entry_ref(e);
            memcache_put(e);
            r->found = e;
        }
    }
    ready(r);
}

/* The flight this request waited on landed (or it stopped waiting). */
static void on_flight_landed(struct flight_waiter *w, enum flight_outcome how, struct cache_entry *e)
{
    struct store_request *r = (struct store_request *)(void *)((char *)w - offsetof(struct store_request, waiter));
    r->flight_checked = true;
    if (how == FLIGHT_SERVED) {
        r->found = e;
        r->found_by_flight = true;
    } else if (how == FLIGHT_TIMED_OUT) {
        STAT_INC(r->upstream, coalesce_timeouts);
        r->no_store = true;
    } else if (how == FLIGHT_FAILED && r->cached && r->stale_on_error) {
        STAT_INC(r->upstream, stale_if_error);
        r->found = r->cached;          /* the fetch it waited on failed: its stale entry */
        r->cached = NULL;
        r->found_stale_ok = true;
    }
    ready(r);
}

static void on_poll_due(struct loop_timer *timer);

/* Another process holds the key's lock: look for its entry again after a backoff, until
 * coalesce_timeout; then fetch, leading the flight. */
static void poll_later(struct store_request *r)
{
    int64_t now = clock_mono_us();
    if (now >= r->lock_deadline_us || r->polls >= LOCK_POLLS_MAX) {
        ready(r);                      /* waited coalesce_timeout: fetch it ourselves */
        return;
    }
    int64_t ms = LOCK_POLL_FIRST_MS << (r->polls < 4 ? r->polls : 4);
    int64_t left_ms = (r->lock_deadline_us - now + 999) / 1000;
    r->polls++;
    loop_timer_arm(&r->poll_timer, ms < left_ms ? ms : left_ms, on_poll_due);
}

static void on_lock_answer(void *waiter, enum redis_lock_result how)
{
    struct store_request *r = waiter;
    r->lock_ticket = NULL;
    if (how == REDIS_LOCK_TAKEN) {
        flight_lock_taken(r->lead);
    } else if (how == REDIS_LOCK_UNCACHEABLE) {
        /* another process's answer for the key could not be stored: fetch now, as it
         * did, without the lock (a storable answer is still stored) */
        atomic_fetch_add(&shim_redis.lock_uncacheable, 1);
        flight_mark_uncacheable(r->poll_key, r->poll_key_len);
    } else if (how == REDIS_LOCK_STORED && r->polls < LOCK_POLLS_MAX) {
        r->polls++;                    /* its holder stored it just now: read it at once */
        on_poll_due(&r->poll_timer);
        return;
    } else if (how == REDIS_LOCK_HELD_ELSEWHERE) {
        if (!r->polls)
            atomic_fetch_add(&shim_redis.lock_waits, 1);
        poll_later(r);
        return;
    }
    ready(r);                          /* ours, or Redis cannot say: fetch */
}

/* The other process stored a Vary marker: the entry to poll for is the variant this
 * request's header values select (the request is still at the front of the app's bytes). */
static bool poll_variant(struct store_request *r, const struct cache_entry *marker)
{
    static struct http_request req;    /* engine thread only */
    static char variant[CACHE_KEY_MAX];
    if (r->poll_variant || http_parse_request(buf_head(&r->app->in), buf_len(&r->app->in), &req) != HTTP_PARSE_DONE)
        return false;
    size_t n = cache_variant_key(r->poll_key, r->poll_key_len, marker->vary, marker->vary_len, &req, variant,
                                 sizeof variant);
    if (!n || !(r->poll_variant = malloc(n)))
        return false;
    memcpy(r->poll_variant, variant, n);
    r->poll_variant_len = n;
    return true;
}

static void on_poll_answer(void *waiter, struct cache_entry *e)
{
    struct store_request *r = waiter;
    r->redis_ticket = NULL;
    atomic_fetch_add(&shim_redis.lock_polls, 1);
    if (e && cache_entry_is_vary_marker(e)) {
        bool variant = poll_variant(r, e);
        memcache_put(e);               /* the marker, for this request's next look and others' */
        if (variant && (r->redis_ticket = redis_lookup(r->poll_variant, r->poll_variant_len, r->upstream,
                                                       on_poll_answer, r)))
            return;
        e = NULL;
    }
    if (e && !fresh_at(e, clock_wall_ms())) {
        cache_entry_release(e);        /* the expired entry the other process is fetching anew */
        e = NULL;
    }
    if (e) {                           /* the other process stored it */
        cache_entry_ref(e);
        memcache_put(e);
        r->found = e;
        r->found_by_flight = true;     /* (its fetch, this request's answer: coalesced) */
        ready(r);
        return;
    }
    if (!(r->lock_ticket = redis_lock(r->poll_key, r->poll_key_len, flight_lock_token(r->lead), on_lock_answer, r)))
        ready(r);
}

static void on_poll_due(struct loop_timer *timer)
{
    struct store_request *r = (struct store_request *)(void *)((char *)timer - offsetof(struct store_request, poll_timer));
    const char *k = r->poll_variant ? r->poll_variant : r->poll_key;
    size_t n = r->poll_variant ? r->poll_variant_len : r->poll_key_len;
    if (!(r->redis_ticket = redis_lookup(k, n, r->upstream, on_poll_answer, r)))
        ready(r);
}

/* ---- the writer: what a fetch stores ---- */

struct store_writer {
    struct upstream_sink sink;      /* first: what upstream.c holds */
    struct store_request *owner;    /* the request it fetches for, while both live */
    int upstream;
    bool store;                     /* the response may still be stored */
    bool stored;
    bool background;                /* a refresh no app waits on: stores whatever happens */
    bool stale_on_error;            /* a 5xx is not relayed: the owner's stale entry stands in */
    bool owes_redis;                /* counted in redis_write_owed() until freed */
    const struct cache_rule *rule;
    char *key;
    size_t key_len;
    char *request;                  /* the request's head, for the values of a Vary */
    size_t request_len;
    struct flight *flight;          /* led by this fetch: landed when it stores or cannot */
    struct cache_entry *revalidating;   /* whose validators were sent (a reference) */
    bool renew;                     /* ... and the upstream answered 304 */
    int status;
    char reason[64];
    size_t reason_len;
    int64_t content_length;
    bool chunked;
    struct response_policy policy;
    struct buf stored_head;         /* end-to-end header lines, minus Age */
    struct buf vary;                /* the response's Vary names */
    bool content_coded;             /* a Content-Encoding other than identity */
    struct buf body;                /* the whole body, up to max_object */
    uint64_t invalidations_seen;    /* invalidation_count() when it began */
    uint64_t purges_seen;           /* memcache_purge_count() when it began */
};

static bool writer_outdated(const struct store_writer *w)
{
    return w->key
           && (invalidated_since(w->key, w->key_len, w->invalidations_seen) || memcache_purge_count() != w->purges_seen);
}

/* 5xx; a status past 599 (no class of RFC 9110's, relayed as sent) is not one */
static bool server_error(int status)
{
    return status >= 500 && status <= 599;
}

static void not_stored(struct store_writer *w, enum not_stored_reason why, bool failed)
{
    if (!w->store)
        return;
    w->store = false;
    STAT_INC(w->upstream, not_stored[why]);
    buf_free(&w->body);
    buf_free(&w->stored_head);
    if (w->flight) {                   /* release the waiters now, not after the body */
        flight_mark_uncacheable(w->key, w->key_len);
        if (failed || why == NS_INCOMPLETE || why == NS_MISFRAMED || server_error(w->status))
            flight_fail(w->flight);    /* those with a stale entry may serve it */
        else
            flight_land(w->flight, NULL);
        w->flight = NULL;
    }
}

/* The marker under the request's own key that names the Vary headers (status 0, no body):
 * kept as long as the variant behind it, a stale one to be revalidated included, or that
 * variant is never found again once the TTL has passed. */
static int put_vary_marker(struct store_writer *w, const char *vary, size_t vary_len, int64_t ttl, int64_t keep)
{
    /* one marker for all the key's variants: another's that lives longer stays */
    struct cache_entry *held = memcache_get(w->key, w->key_len);
    bool longer = held && cache_entry_is_vary_marker(held) && held->keep_until_ms >= clock_wall_ms() + ttl + keep
                  && held->vary_len == vary_len && !memcmp(held->vary, vary, vary_len);
    cache_entry_release(held);
    if (longer)
        return 0;
    struct cache_entry *marker = cache_entry_new(w->key, w->key_len, 0, "", 0, "", 0, vary, vary_len, "", 0, "", 0, ttl);
    if (!marker)
        return -1;
    marker->upstream = w->upstream;
    marker->keep_until_ms += keep;
    if (cfg->cache == CACHE_REDIS)
        redis_store(marker, ttl + keep);
    memcache_put(marker);
    return 0;
}

/* The response is whole: keep it if it is allowed. */
static void store_response(struct store_writer *w)
{
    if (w->content_length >= 0 && (size_t)w->content_length != buf_len(&w->body)) {
        not_stored(w, NS_INCOMPLETE, true);
        return;
    }
    if (writer_outdated(w)) {          /* its target was written to meanwhile */
        w->store = false;
        STAT_INC(w->upstream, not_stored[NS_INVALIDATED]);
        flight_land(w->flight, NULL);  /* (its waiters fetch again: no hit-for-miss) */
        w->flight = NULL;
        return;
    }
    static struct http_request req;    /* engine thread only */
    static char values[4096], variant[CACHE_KEY_MAX];
    size_t values_len = 0;
    if (buf_len(&w->vary)) {
        if (http_parse_request(w->request, w->request_len, &req) != HTTP_PARSE_DONE) {
            not_stored(w, NS_NO_MEMORY, false);
            return;
        }
        values_len = cache_vary_values(buf_head(&w->vary), buf_len(&w->vary), &req, values, sizeof values);
        if (values_len == (size_t)-1) {
            not_stored(w, NS_NO_MEMORY, false);
            return;
        }
    }
    int64_t ttl = 0, swr, sie;
    cache_policy_decide(&w->policy, w->rule, w->status, &ttl);
    cache_stale_windows(&w->policy, w->rule, &swr, &sie);
    int64_t keep = swr > sie ? swr : sie;   /* kept that long past the TTL, for stale serving */
    const char *key = w->key;
    size_t key_len = w->key_len;
    if (buf_len(&w->vary)) {
        key_len = cache_variant_key(w->key, w->key_len, buf_head(&w->vary), buf_len(&w->vary), &req, variant,
                                    sizeof variant);
        key = variant;
    }
    struct cache_entry *e = key_len ? cache_entry_new(key, key_len, w->status, w->reason, w->reason_len,
                                                      buf_head(&w->stored_head), buf_len(&w->stored_head),
                                                      buf_head(&w->vary), buf_len(&w->vary), values, values_len,
                                                      buf_head(&w->body), buf_len(&w->body), ttl)
                                    : NULL;
    if (!e) {
        not_stored(w, NS_NO_MEMORY, false);
        return;
    }
    e->upstream = w->upstream;
    e->stored_at_ms -= cache_policy_age_ms(&w->policy);   /* as old as it already was */
    struct http_slice etag, last_modified;
    cache_entry_validators(e, &etag, &last_modified);
    if ((etag.n || last_modified.n) && keep < ttl)
        keep = ttl;                    /* kept one more TTL, expired, to be revalidated */
    e->keep_until_ms += keep;
    if (buf_len(&w->vary) && put_vary_marker(w, buf_head(&w->vary), buf_len(&w->vary), ttl, keep) != 0) {
        cache_entry_release(e);
        not_stored(w, NS_NO_MEMORY, false);
        return;
    }
    if (cfg->cache == CACHE_REDIS)
        redis_store(e, ttl + keep);    /* on its way before the app has its last byte */
    flight_land(w->flight, e);         /* served from this reference even if memory is full */
    w->flight = NULL;
    memcache_put(e);
    w->stored = true;
    buf_free(&w->body);
    buf_free(&w->stored_head);
    STAT_INC(w->upstream, stored);
}

/* A 304 to the validators the writer sent: the entry is fresh again, body and headers as
 * they were, in both tiers; the app (and the flight's waiters) are answered from it. */
static void renew(struct store_writer *w)
{
    struct cache_entry *old = w->revalidating;
    int64_t ttl = 0, swr, sie;
    cache_entry_stale_windows(old, w->rule, &swr, &sie);
    bool fresh_again = cache_policy_decide(&w->policy, w->rule, old->status, &ttl) == NS_NONE;
    int64_t keep = swr > sie ? swr : sie;
    struct cache_entry *r = fresh_again && !writer_outdated(w) ? cache_entry_renewed(old, ttl, keep > ttl ? keep : ttl)
                                                               : NULL;
    if (!r) {
        flight_land(w->flight, NULL);  /* this once the app is answered from the old entry */
        w->flight = NULL;
        return;
    }
    int64_t px = r->keep_until_ms - r->stored_at_ms;
    r->stored_at_ms -= cache_policy_age_ms(&w->policy);   /* the 304's Age */
    if (old->vary_len)                 /* a variant: its marker lives as long again */
        put_vary_marker(w, old->vary, old->vary_len, ttl, px > ttl ? px - ttl : 0);
    if (cfg->cache == CACHE_REDIS)
        redis_store(r, px);
    flight_land(w->flight, r);
    w->flight = NULL;
    STAT_INC(w->upstream, revalidated);
    if (w->owner) {                    /* what its request is answered from */
        cache_entry_release(w->owner->cached);
        cache_entry_ref(r);
        w->owner->cached = r;
    }
    memcache_put(r);
}

static struct store_writer *writer_of(struct upstream_sink *s)
{
    return (struct store_writer *)(void *)s;
}

static void sink_validators(struct upstream_sink *s, struct http_slice *etag, struct http_slice *last_modified)
{
    struct store_writer *w = writer_of(s);
    if (w->revalidating)
        cache_entry_validators(w->revalidating, etag, last_modified);
}

static void sink_begin(struct upstream_sink *s, int status, struct http_slice reason)
{
    struct store_writer *w = writer_of(s);
    w->status = status;
    w->reason_len = reason.n < sizeof w->reason ? reason.n : sizeof w->reason;
    memcpy(w->reason, reason.p, w->reason_len);
    w->stored_head.start = w->stored_head.end = 0;
    w->vary.start = w->vary.end = 0;
    w->content_coded = false;
    cache_policy_init(&w->policy);
}

static void sink_header(struct upstream_sink *s, struct http_slice name, struct http_slice value, struct http_slice line)
{
    struct store_writer *w = writer_of(s);
    if (!w->store && !w->revalidating)
        return;
    cache_policy_header(&w->policy, name, value);
    if (!w->store)
        return;
    bool vary = http_slice_ieq(name, "vary");
    if (http_slice_ieq(name, "content-encoding") && !http_slice_ieq(value, "identity"))
        w->content_coded = true;
    if (vary && buf_len(&w->vary) && buf_append(&w->vary, ",", 1))
        not_stored(w, NS_NO_MEMORY, false);
    else if (vary && buf_append(&w->vary, value.p, value.n))
        not_stored(w, NS_NO_MEMORY, false);
    if (!http_slice_ieq(name, "age")
        && (buf_append(&w->stored_head, line.p, line.n) || buf_append(&w->stored_head, "\r\n", 2)))
        not_stored(w, NS_NO_MEMORY, false);
}

/* A body in a content coding (gzip, br) is what the upstream chose for this request's
 * Accept-Encoding; one that did not say `Vary: Accept-Encoding` (nginx's gzip_vary is off by
 * default) would have it served to a client that never asked for gzip and cannot read it.
 * Such an entry varies on Accept-Encoding all the same: the stored headers stay as sent. */
static void vary_on_coding(struct store_writer *w)
{
    struct http_slice names = { buf_head(&w->vary), buf_len(&w->vary) };
    if (!w->content_coded || http_list_has_token(names, "accept-encoding"))
        return;
    if ((buf_len(&w->vary) && buf_append(&w->vary, ",", 1)) || buf_append(&w->vary, "accept-encoding", 15))
        not_stored(w, NS_NO_MEMORY, false);
}

static enum sink_verdict sink_head_done(struct upstream_sink *s, int64_t content_length, bool chunked,
                                        enum http_framing_verdict framing)
{
    struct store_writer *w = writer_of(s);
    if (w->revalidating && w->status == 304) {
        w->renew = true;               /* our validators matched: renew the entry, relay nothing */
        return SINK_ABSORB;
    }
    if (w->stale_on_error && server_error(w->status)) {
        not_stored(w, NS_STATUS, true);
        return SINK_FAIL;
    }
    if (framing == HTTP_FRAMING_BROKEN || framing == HTTP_FRAMING_UNSTORABLE)
        not_stored(w, NS_MISFRAMED, framing == HTTP_FRAMING_BROKEN);   /* (broken: upstream.c fails it) */
    if (w->status == 204) {            /* no body, whatever else its head says (RFC 9112 6.3) */
        content_length = 0;
        chunked = false;
    }
    w->content_length = content_length;
    w->chunked = chunked;
    if (w->store) {
        int64_t ttl;
        enum not_stored_reason why = cache_policy_decide(&w->policy, w->rule, w->status, &ttl);
        if (why != NS_NONE)
            not_stored(w, why, false);
        else if (content_length > cfg->max_object)
            not_stored(w, NS_TOO_LARGE, false);
        else if (content_length < 0 && !chunked)
            not_stored(w, NS_UNFRAMED, false);   /* a close-delimited body cannot prove it is whole */
        else
            vary_on_coding(w);
    }
    return SINK_RELAY;
}

static void sink_body(struct upstream_sink *s, const char *p, size_t n)
{
    struct store_writer *w = writer_of(s);
    if (!w->store || w->stored)
        return;
    if (buf_append(&w->body, p, n) != 0) {
        not_stored(w, NS_TOO_LARGE, false);
        return;
    }
    if (w->content_length >= 0 && buf_len(&w->body) == (size_t)w->content_length)
        store_response(w);             /* whole by its length: stored at once */
}

static void sink_unstorable(struct upstream_sink *s, enum sink_unstorable why)
{
    struct store_writer *w = writer_of(s);
    if (!w->stored)                    /* (only a chunked body has trailers: stored at its end) */
        not_stored(w, why == SINK_FOLDED ? NS_OBS_FOLD : why == SINK_HOP_FIELDS ? NS_HOP_FIELDS : NS_TRAILERS, false);
}

static bool sink_wanted(struct upstream_sink *s)
{
    struct store_writer *w = writer_of(s);
    return w->store && !w->stored && (w->background || flight_has_waiters(w->flight));
}

static void writer_free(struct store_writer *w)
{
    if (w->owner)
        w->owner->writer = NULL;
    flight_land(w->flight, NULL);      /* (still held: its waiters fetch on their own) */
    if (w->owes_redis)
        redis_write_owed(-1);
    cache_entry_release(w->revalidating);
    buf_free(&w->stored_head);
    buf_free(&w->vary);
    buf_free(&w->body);
    free(w->request);
    free(w->key);
    free(w);
}

static void sink_end(struct upstream_sink *s, enum sink_end how)
{
    struct store_writer *w = writer_of(s);
    if (how == SINK_WHOLE && w->renew)
        renew(w);
    else if (how == SINK_WHOLE && w->store && !w->stored)
        store_response(w);
    else if (how == SINK_FAILED)
        not_stored(w, NS_INCOMPLETE, true);
    writer_free(w);
}

static const struct upstream_sink_ops writer_ops = {
    sink_validators, sink_begin, sink_header, sink_head_done, sink_body, sink_unstorable, sink_wanted, sink_end,
};

struct upstream_sink *store_writer_sink(struct store_writer *w) { return w ? &w->sink : NULL; }

/* The writer of a fetch: it stores (with rule, key and flight: storable) and revalidates
 * `stale` (its validators), or only watches for a 5xx to stand a stale entry in for.
 * NULL when there is nothing to do, or no memory (then the flight has landed empty). */
static struct store_writer *writer_new(int upstream, const struct cache_rule *rule, const char *key, size_t key_len,
                                       const char *head, size_t head_len, struct flight *flight,
                                       struct cache_entry *stale, bool stale_on_error)
{
    struct http_slice etag = { 0 }, last_modified = { 0 };
    if (rule && stale)
        cache_entry_validators(stale, &etag, &last_modified);
    if (!rule && !stale_on_error)
        return NULL;
    struct store_writer *w = calloc(1, sizeof *w);
    if (w && rule && (!(w->key = malloc(key_len)) || !(w->request = malloc(head_len)))) {
        free(w->key);
        free(w);
        w = NULL;
    }
    if (!w) {
        flight_land(flight, NULL);
        return NULL;
    }
    w->sink.ops = &writer_ops;
    w->upstream = upstream;
    w->invalidations_seen = invalidation_count();
    w->purges_seen = memcache_purge_count();
    w->stale_on_error = stale && stale_on_error;
    w->content_length = -1;
    w->stored_head.cap = RESP_HEAD_MAX;
    w->vary.cap = 1024;
    w->body.cap = (size_t)cfg->max_object;
    if (rule) {
        memcpy(w->key, key, key_len);
        w->key_len = key_len;
        memcpy(w->request, head, head_len);
        w->request_len = head_len;
        w->rule = rule;
        w->store = true;
        w->owes_redis = true;
        redis_write_owed(1);
        w->flight = flight;
        if (etag.n || last_modified.n) {
            cache_entry_ref(stale);
            w->revalidating = stale;
        }
    } else {
        flight_land(flight, NULL);
    }
    return w;
}

/* ---- store_open ---- */

/* One background refresh of a stale entry, leading the key's flight; off the app's
 * connection, conditional on the entry's validators. */
static void refresh_in_background(const struct store_query *q, struct cache_entry *stale, struct flight *f)
{
    struct store_writer *w = writer_new(q->upstream, q->rule, q->key, q->key_len, buf_head(&q->app->in),
                                        q->req->head_len, f, stale, false);
    if (!w)
        return;
    w->background = true;
    upstream_refresh(q->app, q->req, q->body, q->body_len, &w->sink);
}

/* An entry past its TTL: within stale_while_revalidate it is served now and refreshed in
 * the background (one refresh per key: the refresh leads the key's flight); otherwise it
 * stays with the request, for its fetch to revalidate and, within stale_if_error, to fall
 * back on. NULL: go on as a miss. */
static struct cache_entry *past_ttl(struct store_request *r, const struct store_query *q, struct cache_entry *e)
{
    int64_t swr, sie, late = clock_wall_ms() - e->expires_at_ms;
    cache_entry_stale_windows(e, q->rule, &swr, &sie);
    if (late < swr) {
        /* a request whose answer could be stored (not a HEAD: its answer has no body) is
         * sent again, body and all; the entry is served stale meanwhile */
        struct flight *f = q->storable && !flight_find(q->key, q->key_len)
                           ? flight_begin(q->key, q->key_len) : NULL;
        if (f)
            refresh_in_background(q, e, f);
        STAT_INC(q->upstream, stale_while_revalidate);
        return e;
    }
    cache_entry_release(r->cached);
    r->cached = e;
    r->stale_on_error = late < sie;
    return NULL;
}

/* Asks Redis for the key, or for the variant a marker it answered points to. */
static bool ask_redis(struct store_request *r, const struct store_query *q, const char *variant, size_t variant_len)
{
    if (cfg->cache != CACHE_REDIS || r->redis_done)
        return false;
    const char *k = r->redis_marker ? variant : q->key;
    size_t n = r->redis_marker ? variant_len : q->key_len;
    if (!n || !(r->redis_ticket = redis_lookup(k, n, q->upstream, on_redis_answer, r))) {
        r->redis_done = true;
        return false;
    }
    return true;
}

/* One fetch per key across processes, too: the first to take the key's lock fetches. */
static bool take_lock(struct store_request *r, const struct store_query *q, struct flight *f)
{
    if (cfg->cache != CACHE_REDIS || r->lock_checked || !redis_answering())
        return false;                  /* (in-process coalescing only, meanwhile) */
    r->lock_checked = true;
    r->app = q->app;
    free(r->poll_key);
    if (!(r->poll_key = malloc(q->key_len)))
        return false;
    memcpy(r->poll_key, q->key, q->key_len);
    r->poll_key_len = q->key_len;
    r->lock_deadline_us = clock_mono_us() + cfg->coalesce_timeout_ms * 1000;
    if (!(r->lock_ticket = redis_lock(q->key, q->key_len, flight_lock_token(f), on_lock_answer, r)))
        return false;
    r->lead = f;
    return true;
}

static enum store_answer fetch(struct store_request *r, const struct store_query *q, struct flight *flight,
                               struct store_writer **writer)
{
    /* a miss is a request that goes upstream: one that waited on another process's lock
     * and then found its entry is a hit (and coalesced), never both */
    STAT_INC(q->upstream, misses);
    bool storable = q->storable && !r->no_store;
    *writer = writer_new(q->upstream, storable ? q->rule : NULL, q->key, q->key_len, buf_head(&q->app->in),
                         q->req->head_len, flight, r->cached, r->stale_on_error);
    if (*writer) {
        (*writer)->owner = r;
        r->writer = *writer;
    }
    return STORE_FETCH;
}

enum store_answer store_open(struct store_request *r, const struct store_query *q, struct cache_entry **hit,
                             struct store_writer **writer)
{
    static char variant[CACHE_KEY_MAX];   /* engine thread only */
    size_t variant_len = 0;
    *hit = NULL;
    *writer = NULL;
    struct cache_entry *e = r->found;
    bool by_flight = r->found_by_flight, stale_ok = r->found_stale_ok;
    r->found = NULL;
    r->found_by_flight = r->found_stale_ok = false;
    if (!e)
        e = memory_entry(q->key, q->key_len, q->req, variant, sizeof variant, &variant_len);
    else if (!cache_entry_matches_request(e, q->req)) {
        cache_entry_release(e);
        e = NULL;
    }
    if (e && !stale_ok && !fresh_at(e, clock_wall_ms()))
        e = past_ttl(r, q, e);
    if (e && r->lead) {
        /* found while leading: the waiters get it too, unless it is one variant read from
         * Redis (found through a Vary marker: it carries no Vary values of its own, and the
         * waiters' values may select another), which they look for again themselves */
        bool one_variant = !e->vary_len && (variant_len || r->poll_variant || r->redis_marker);
        flight_land(r->lead, one_variant ? NULL : e);
        r->lead = NULL;
    }
    if (e) {
        if (by_flight)
            STAT_INC(q->upstream, coalesced);
        *hit = e;
        return STORE_HIT;
    }
    if (r->lead) {                     /* back from the lock: fetch, leading its flight */
        struct flight *f = r->lead;
        r->lead = NULL;
        return fetch(r, q, f, writer);
    }
    /* a HEAD may wait on a GET's fetch (it is answered from the stored GET), but starts
     * no flight: it stores nothing */
    bool coalesce = cfg->coalesce && !q->rule->no_coalesce && !r->flight_checked
                    && !flight_is_uncacheable(q->key, q->key_len);
    struct flight *other = coalesce ? flight_find(q->key, q->key_len) : NULL;
    if (other) {
        if (flight_join(other, &r->waiter))
            return STORE_WAIT;
        r->no_store = true;            /* too many wait: fetch alongside, leave the store to it */
    }
    if (ask_redis(r, q, variant, variant_len))
        return STORE_WAIT;
    struct flight *f = coalesce && q->storable && !r->no_store ? flight_begin(q->key, q->key_len) : NULL;
    if (f && take_lock(r, q, f))
        return STORE_WAIT;
    return fetch(r, q, f, writer);     /* (no flight: no memory for one, or not coalesced) */
}

bool store_after_fetch(struct store_request *r, enum exchange_end how)
{
    if (!r->cached || (how != EXCHANGE_ABSORBED && !(how == EXCHANGE_UNANSWERED && r->stale_on_error)))
        return false;
    if (how == EXCHANGE_UNANSWERED)
        STAT_INC(r->upstream, stale_if_error);
    cache_entry_release(r->found);
    r->found = r->cached;              /* renewed by a 304, or stale instead of an error */
    r->cached = NULL;
    r->found_stale_ok = true;
    return true;
}

void store_request_init(struct store_request *r, int upstream, void (*ready_fn)(struct store_request *r))
{
    memset(r, 0, sizeof *r);
    r->upstream = upstream;
    r->ready = ready_fn;
    r->waiter.done = on_flight_landed;
}

void store_request_done(struct store_request *r)
{
    flight_leave(&r->waiter);
    loop_timer_cancel(&r->poll_timer);
    redis_cancel(r->lock_ticket);
    redis_cancel(r->redis_ticket);
    flight_land(r->lead, NULL);        /* its waiters fetch on their own */
    cache_entry_release(r->found);
    cache_entry_release(r->cached);
    if (r->writer)
        r->writer->owner = NULL;       /* its fetch may go on (detached), without us */
    free(r->poll_key);
    free(r->poll_variant);
    struct store_request fresh;
    store_request_init(&fresh, r->upstream, r->ready);
    *r = fresh;
}
