/* redis_value.h — the bytes of a cache entry in Redis (redis_value.c): versioned,
 * checksummed (or, with a fleet secret, authenticated), and range-checked on the way
 * back, so nothing Redis holds is trusted until it decodes whole. */
#ifndef HTTPSHIM_REDIS_VALUE_H
#define HTTPSHIM_REDIS_VALUE_H
#include <stddef.h>
#include <stdint.h>
#include "cache.h"

/* An entry's times must lie within this of now (stored-at up to REDIS_VALUE_SKEW_MS ahead:
 * the writer's clock may run ahead of ours). */
#define REDIS_VALUE_MAX_AGE_MS  (10LL * 366 * 24 * 3600 * 1000)
#define REDIS_VALUE_SKEW_MS     (5LL * 60 * 1000)

struct redis_secret { const unsigned char *bytes; size_t len; };   /* len 0: none */

/* The value to SET for entry e under key; malloc'ed, *len its size. NULL: no memory. */
unsigned char *redis_value_encode(const struct cache_entry *e, const char *key, size_t key_len,
                                  struct redis_secret secret, size_t *len);

enum redis_value_verdict {
    REDIS_VALUE_OK,
    REDIS_VALUE_CORRUPT,               /* not a whole, intact, plausible entry: delete it */
    REDIS_VALUE_UNAUTHENTICATED,       /* with a secret: not signed by it. Delete it */
    REDIS_VALUE_FOREIGN,               /* signed under a secret this process lacks: leave it */
    REDIS_VALUE_NO_MEMORY,             /* intact, but no memory to hold it: leave it */
};
/* Decodes a GET reply; on OK *out is a new entry (refs 1) expiring in ttl_ms. */
enum redis_value_verdict redis_value_decode(const char *key, size_t key_len, const unsigned char *v, size_t n,
                                            int64_t ttl_ms, int64_t now_ms, struct redis_secret secret,
                                            struct cache_entry **out);
#endif
