/* redis_value.h — the bytes of a cache entry in Redis (redis_value.c): versioned,
 * checksummed (or, with a fleet secret, authenticated), carrying the internal key they
 * were written for, and range-checked on the way back, so nothing Redis holds is trusted
 * until it decodes whole. */
#ifndef HTTPSHIM_REDIS_VALUE_H
#define HTTPSHIM_REDIS_VALUE_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "cache.h"

/* What follows redis_prefix in every Redis key the library writes and reads:
 * <prefix>v3:<host>:<port>:<route>:<SHA-256 hex of the internal key>[:lock] (made in
 * cache_redis.c); `httpshim purge` scans for it. */
#define REDIS_KEY_FORMAT_TAG "v3:"

/* The bytes before a value's tag; the tag (8 bytes, or 32 with a secret) comes next,
 * then the key. */
#define REDIS_VALUE_FIXED 38
/* The first bytes of an entry (not a Vary marker) this process writes, and where its
 * expires-at (i64 little-endian, ms since the epoch) sits: what the cross-process lock's
 * script reads of an entry to tell whether it is there and fresh. */
#define REDIS_VALUE_PREFIX_LEN 6
#define REDIS_VALUE_EXPIRES_AT 16
/* The first bytes of a value that hold its key whenever the key is one the library makes
 * (at most CACHE_KEY_MAX): what a reader of keys only needs to fetch (GETRANGE). */
#define REDIS_VALUE_KEY_SPAN (REDIS_VALUE_FIXED + 32 + CACHE_KEY_MAX)

/* An entry's times must lie within this of now (stored-at up to REDIS_VALUE_SKEW_MS ahead:
 * the writer's clock may run ahead of ours). */
#define REDIS_VALUE_MAX_AGE_MS  (10LL * 366 * 24 * 3600 * 1000)
#define REDIS_VALUE_SKEW_MS     (5LL * 60 * 1000)

struct redis_secret { const unsigned char *bytes; size_t len; };   /* len 0: none */
void redis_value_entry_prefix(struct redis_secret secret, char out[REDIS_VALUE_PREFIX_LEN]);

/* The value to SET for entry e under key (which it carries); malloc'ed, *len its size.
 * NULL: no memory. */
unsigned char *redis_value_encode(const struct cache_entry *e, const char *key, size_t key_len,
                                  struct redis_secret secret, size_t *len);

enum redis_value_verdict {
    REDIS_VALUE_OK,
    REDIS_VALUE_CORRUPT,               /* not a whole, intact, plausible entry: delete it */
    REDIS_VALUE_UNAUTHENTICATED,       /* with a secret: not signed by it. Delete it */
    REDIS_VALUE_FOREIGN,               /* signed under a secret this process lacks, or version 3: leave it */
    REDIS_VALUE_NO_MEMORY,             /* intact, but no memory to hold it: leave it */
};
/* Decodes a GET reply for key; on OK *out is a new entry (refs 1) expiring in ttl_ms. A
 * value that carries another key (moved, or a hash collision) is CORRUPT, or
 * UNAUTHENTICATED with a secret. */
enum redis_value_verdict redis_value_decode(const char *key, size_t key_len, const unsigned char *v, size_t n,
                                            int64_t ttl_ms, int64_t now_ms, struct redis_secret secret,
                                            struct cache_entry **out);

/* The internal key a value says it was written for, read WITHOUT verifying anything but
 * the bounds: for tools that sort entries (httpshim purge), never for serving. v may be
 * only the value's first bytes (at least REDIS_VALUE_KEY_SPAN of them find any key the
 * library writes). True with *key pointing into v; false when v is not a value of this
 * format or is cut short before the end of the key. */
bool redis_value_key(const unsigned char *v, size_t n, const char **key, size_t *key_len);
#endif
