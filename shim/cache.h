/* cache.h — cache entries, keys and the storage policy (cache.c), and the memory tier
 * (cache_memory.c). An entry is immutable once built and reference counted, so a hit
 * can be streamed to a slow reader while the tier evicts it. */
#ifndef HTTPSHIM_CACHE_H
#define HTTPSHIM_CACHE_H
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uthash.h>
#include "http.h"
#include "rules.h"

#define CACHE_KEY_MAX 8192              /* longer keys: the request is not cached */

struct cache_entry {
    _Atomic int refs;
    int status;
    int64_t stored_at_ms;               /* wall clock, for Age */
    int64_t expires_at_ms;              /* wall clock: fresh until then */
    int64_t keep_until_ms;              /* wall clock: kept (stale) until then, >= expires */
    size_t charge;                      /* bytes counted against memory_max */
    const char *key;   size_t key_len;
    const char *reason; size_t reason_len;      /* "OK" */
    const char *headers; size_t headers_len;    /* end-to-end lines, each ending CRLF */
    const char *vary;  size_t vary_len;         /* request header names the response varies on */
    const char *vary_values; size_t vary_values_len;
    const char *body;  size_t body_len;
    /* memory tier bookkeeping, under its lock */
    UT_hash_handle hh;
    struct cache_entry *lru_prev, *lru_next;
    struct cache_entry *target_prev, *target_next;   /* the entries of one target URI */
    struct memcache_target *target;
    bool in_tier;
    int upstream;
};

/* ---- cache.c ---- */
/* The first cache rule of `u` matching the request's method and path, or NULL. HEAD
 * requests match GET rules (a HEAD is answered from a stored GET). */
const struct cache_rule *cache_rule_for(const struct upstream_rule *u, const struct http_request *req);
/* Writes the key for this request under rule r into out; returns its length, or 0 when
 * the request cannot be cached (key too long). https: it came over the app's own TLS,
 * terminated by the shim (an entry of its own, apart from plaintext's). */
size_t cache_key(const struct upstream_rule *u, const struct cache_rule *r, const struct http_request *req,
                 bool https, char *out, size_t cap);
/* The target URI of an unsafe request (POST, PUT, DELETE, PATCH, ...) whose success makes
 * the stored GET answers of that target stale (RFC 9111 4.4): writes the first part that
 * every such entry's key starts with (cache_key_target_len long) into target and returns
 * its length, 0 when the request invalidates nothing (a safe method, a method a rule
 * caches, a target no GET rule names). *own_len: the whole key of the GET the request
 * itself would make (its credentials, its key headers), 0 if none. */
size_t cache_invalidation_target(const struct upstream_rule *u, const struct http_request *req, bool https,
                                 char *target, size_t cap, char *own, size_t own_cap, size_t *own_len);
/* How much of a key is its target URI (see above). */
size_t cache_key_target_len(const char *key, size_t key_len);
/* The request's body joins the key (a line with its SHA-256), when it has one: a POST its
 * rule caches, or a search API's GET that carries its query in the body, is two requests
 * for two bodies. Returns the new length, or 0 when it does not fit. */
size_t cache_key_add_body(char *key, size_t key_len, size_t cap, const char *body, size_t body_len);
/* The request says `Cache-Control: no-store`: nothing of its response may be stored (RFC
 * 9111 5.2.1.5); a stored answer may still serve it. */
bool cache_request_no_store(const struct http_request *req);
/* Values of the request headers named in a Vary list, joined: what an entry's variant is. */
size_t cache_vary_values(const char *vary, size_t vary_len, const struct http_request *req, char *out, size_t cap);
bool cache_entry_matches_request(const struct cache_entry *e, const struct http_request *req);
/* A response that varies is stored under a variant key (the key plus the request's values
 * of the Vary headers), and a marker entry (status 0, no body, the Vary names) under the
 * plain key tells a lookup to look again under the variant key. */
static inline bool cache_entry_is_vary_marker(const struct cache_entry *e) { return e->status == 0; }
size_t cache_variant_key(const char *key, size_t key_len, const char *vary, size_t vary_len,
                         const struct http_request *req, char *out, size_t cap);

enum not_stored_reason {
    NS_NONE = 0, NS_METHOD, NS_STATUS, NS_NO_STORE, NS_PRIVATE, NS_SET_COOKIE, NS_VARY_STAR,
    NS_TOO_LARGE, NS_INCOMPLETE, NS_UNFRAMED, NS_ZERO_TTL, NS_NO_MEMORY, NS_MISFRAMED, NS_TRAILERS, NS_OBS_FOLD, NS_INVALIDATED, NS_HOP_FIELDS, NS__COUNT
};
extern const char *const cache_not_stored_names[NS__COUNT];

/* What the response's own headers say, gathered while its head streams by. */
struct response_policy {
    bool no_store, private_, no_cache, set_cookie, vary_star, must_revalidate;
    int64_t max_age_s, s_maxage_s;      /* -1 when absent */
    int64_t swr_s, sie_s;               /* stale-while-revalidate, stale-if-error; -1 absent */
    int64_t expires_ms, date_ms;        /* -1 when absent */
    int64_t age_s;                      /* Age (the upstream is a cache too), 0 when absent */
};
void cache_policy_init(struct response_policy *p);
/* How old the response already was when it arrived (its Age, at most a year): an entry
 * made from it is dated that much earlier, so a hit's Age counts it (RFC 9111 4.2.3). */
int64_t cache_policy_age_ms(const struct response_policy *p);
void cache_policy_header(struct response_policy *p, struct http_slice name, struct http_slice value);
/* NS_NONE and the TTL to store with, or why it must not be stored. */
enum not_stored_reason cache_policy_decide(const struct response_policy *p, const struct cache_rule *r,
                                           int status, int64_t *ttl_ms);

/* How long past its TTL a response may be served stale: while it is refreshed in the
 * background, and when the upstream fails. The rule's windows; with
 * respect_cache_control the response's own (RFC 5861) replace them, and
 * must-revalidate or proxy-revalidate forbid both. */
void cache_stale_windows(const struct response_policy *p, const struct cache_rule *r, int64_t *swr_ms,
                         int64_t *sie_ms);
/* The same for a stored entry, from its headers. */
void cache_entry_stale_windows(const struct cache_entry *e, const struct cache_rule *r, int64_t *swr_ms,
                               int64_t *sie_ms);
/* The entry's ETag and Last-Modified values (n = 0 when absent). */
void cache_entry_validators(const struct cache_entry *e, struct http_slice *etag, struct http_slice *last_modified);
/* The request's own If-None-Match (or, without one, If-Modified-Since) matches the entry:
 * it may be answered 304. */
bool cache_entry_not_modified(const struct cache_entry *e, const struct http_request *req);
/* The entry's header lines a 304 carries (RFC 9110 15.4.5) into out; their length. */
size_t cache_entry_304_headers(const struct cache_entry *e, char *out, size_t cap);
/* The head of a response from e, in HTTP/1.minor with the request's connection semantics
 * (304 and the revalidation headers when not_modified), with Content-Length and Age, into
 * out; its length, 0 when it does not fit. */
size_t cache_entry_head(const struct cache_entry *e, int minor, bool keep_alive, bool not_modified, int64_t now_ms,
                        char *out, size_t cap);
/* A copy of e, fresh again for ttl_ms (a 304 renewed it), kept keep_ms past that. */
struct cache_entry *cache_entry_renewed(const struct cache_entry *e, int64_t ttl_ms, int64_t keep_ms);

/* Builds one immutable entry (one allocation) with refs = 1. */
struct cache_entry *cache_entry_new(const char *key, size_t key_len, int status, const char *reason,
                                    size_t reason_len, const char *headers, size_t headers_len,
                                    const char *vary, size_t vary_len, const char *vary_values,
                                    size_t vary_values_len, const char *body, size_t body_len, int64_t ttl_ms);
void cache_entry_ref(struct cache_entry *e);
void cache_entry_release(struct cache_entry *e);

/* ---- cache_memory.c: uthash + LRU under one mutex, byte-capped ---- */
struct memcache_counters { uint64_t evictions, expired, entries, bytes; };
void memcache_configure(int64_t max_bytes);
/* The entry for key (a new reference), or NULL: fresh, or stale but still kept (the caller
 * checks expires_at_ms). Entries past keep_until_ms are dropped. */
struct cache_entry *memcache_get(const char *key, size_t key_len);
/* Inserts (replacing any entry with the same key) and evicts LRU entries down to the cap.
 * Takes over the caller's reference. */
void memcache_put(struct cache_entry *e);
size_t memcache_purge(bool (*match)(const struct cache_entry *, void *), void *arg);
/* Purges so far (`httpshim purge`): a fetch begun before one stores nothing, as it may
 * carry what the purge was for. */
uint64_t memcache_purge_count(void);
/* Removes every entry whose key starts with this target URI (cache_key_target_len),
 * calling gone (outside the tier's lock) with each; returns how many. */
size_t memcache_invalidate(const char *target, size_t target_len,
                           void (*gone)(const struct cache_entry *, void *), void *arg);
void memcache_counters(struct memcache_counters *out);
void memcache_atfork_prepare(void);
void memcache_atfork_release(void);
#endif
