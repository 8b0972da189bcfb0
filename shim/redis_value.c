/* redis_value.c — owns the format of cache entries in Redis.
 *
 * "HSC1" | version u8 | flags u8 (1: a Vary marker, names in the header field) | status u16
 * | stored_at_ms i64 | expires_at_ms i64 | reason_len u16 | headers_len u32 | body_len u32
 * | key_len u32 | tag | key | reason | headers | body. Integers little-endian.
 *   The key is the internal cache key the value was written under. Redis keys are a hash
 *   of it (cache_redis.c), so the value carries it whole: a lookup accepts a value only
 *   when it names the very key asked for (a moved value, or the astronomically unlikely
 *   hash collision, is a miss), and `httpshim purge` reads it to match paths.
 *   version 5: tag = the first 8 bytes of SHA-256 of every byte of the value but the tag
 *              (a checksum: it catches damage, not forgery, the status and times too);
 *   version 4: tag = HMAC-SHA256(secret, every byte of the value but the tag), 32 bytes,
 *              written and accepted only with `redis_secret_file`: it also covers the
 *              status, the times and the key, so an entry cannot be moved to another key.
 *   Version 3 (the checksum over what follows the tag only: a damaged status was served)
 *   is another version's: a miss, left alone. Versions 1 and 2 (without key_len and key)
 *   were written under the old, readable Redis keys, which nothing reads any more.
 * Decoding checks every length against the value's size and every time against now. */
#include "redis_value.h"
#include "sha256.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAGIC "HSC1"
#define VERSION_CHECKSUM 5
#define VERSION_HMAC 4
#define VERSION_PAYLOAD_CHECKSUM 3      /* read as another version's */
#define FIXED REDIS_VALUE_FIXED         /* magic .. key_len */
#define TAG_CHECKSUM 8
#define TAG_HMAC SHA256_BYTES
_Static_assert(TAG_HMAC == 32, "REDIS_VALUE_KEY_SPAN counts a 32-byte tag");

static void put_u(unsigned char *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_u(const unsigned char *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* The tag's size for a version this file writes (or wrote: 3), 0 for any other. */
static size_t tag_size(unsigned char version)
{
    return version == VERSION_CHECKSUM || version == VERSION_PAYLOAD_CHECKSUM ? TAG_CHECKSUM
           : version == VERSION_HMAC                                         ? TAG_HMAC
                                                                             : 0;
}

/* The key's length is in the fixed part and the key leads the payload, so the MAC over
 * both binds the value to exactly one key. */
static void tag_hmac(struct redis_secret s, const unsigned char *v, size_t n, unsigned char out[TAG_HMAC])
{
    struct hmac_sha256_ctx c;
    hmac_sha256_init(&c, s.bytes, s.len);
    hmac_sha256_update(&c, v, FIXED);
    hmac_sha256_update(&c, v + FIXED + TAG_HMAC, n - FIXED - TAG_HMAC);
    hmac_sha256_final(&c, out);
}

/* Every byte but the tag's, as the HMAC covers them. */
static void tag_checksum(const unsigned char *v, size_t n, unsigned char out[TAG_CHECKSUM])
{
    struct sha256_ctx c;
    unsigned char digest[SHA256_BYTES];
    sha256_init(&c);
    sha256_update(&c, v, FIXED);
    sha256_update(&c, v + FIXED + TAG_CHECKSUM, n - FIXED - TAG_CHECKSUM);
    sha256_final(&c, digest);
    memcpy(out, digest, TAG_CHECKSUM);
}

/* Constant time: the comparison must not tell a forger how many bytes were right. */
static bool same_bytes(const unsigned char *a, const unsigned char *b, size_t n)
{
    unsigned char d = 0;
    for (size_t i = 0; i < n; i++)
        d |= a[i] ^ b[i];
    return d == 0;
}

void redis_value_entry_prefix(struct redis_secret secret, char out[REDIS_VALUE_PREFIX_LEN])
{
    memcpy(out, MAGIC, 4);
    out[4] = secret.len ? VERSION_HMAC : VERSION_CHECKSUM;
    out[5] = 0;                        /* (flags: not a Vary marker) */
}

unsigned char *redis_value_encode(const struct cache_entry *e, const char *key, size_t key_len,
                                  struct redis_secret secret, size_t *len)
{
    bool marker = cache_entry_is_vary_marker(e);
    const char *headers = marker ? e->vary : e->headers;
    size_t headers_len = marker ? e->vary_len : e->headers_len;
    if (key_len > UINT32_MAX || headers_len > UINT32_MAX || e->body_len > UINT32_MAX || e->reason_len > UINT16_MAX)
        return NULL;
    size_t tag = secret.len ? TAG_HMAC : TAG_CHECKSUM;
    size_t n = FIXED + tag + key_len + e->reason_len + headers_len + e->body_len;
    unsigned char *v = malloc(n);
    if (!v)
        return NULL;
    redis_value_entry_prefix(secret, (char *)v);
    v[5] = marker ? 1 : 0;
    put_u(v + 6, (uint64_t)e->status, 2);
    put_u(v + 8, (uint64_t)e->stored_at_ms, 8);
    put_u(v + 16, (uint64_t)e->expires_at_ms, 8);
    put_u(v + 24, e->reason_len, 2);
    put_u(v + 26, headers_len, 4);
    put_u(v + 30, e->body_len, 4);
    put_u(v + 34, key_len, 4);
    unsigned char *p = v + FIXED + tag;
    if (key_len)
        memcpy(p, key, key_len);
    p += key_len;
    if (e->reason_len)
        memcpy(p, e->reason, e->reason_len);
    if (headers_len)
        memcpy(p + e->reason_len, headers, headers_len);
    if (e->body_len)
        memcpy(p + e->reason_len + headers_len, e->body, e->body_len);
    if (secret.len)
        tag_hmac(secret, v, n, v + FIXED);
    else
        tag_checksum(v, n, v + FIXED);
    *len = n;
    return v;
}

bool redis_value_key(const unsigned char *v, size_t n, const char **key, size_t *key_len)
{
    if (n < FIXED || memcmp(v, MAGIC, 4))
        return false;
    size_t tag = tag_size(v[4]);
    size_t len = (size_t)get_u(v + 34, 4);
    if (!tag || n - FIXED < tag || n - FIXED - tag < len)
        return false;
    *key = (const char *)v + FIXED + tag;
    *key_len = len;
    return true;
}

enum redis_value_verdict redis_value_decode(const char *key, size_t key_len, const unsigned char *v, size_t n,
                                            int64_t ttl_ms, int64_t now_ms, struct redis_secret secret,
                                            struct cache_entry **out)
{
    *out = NULL;
    if (n > 4 && !memcmp(v, MAGIC, 4) && v[4] == VERSION_PAYLOAD_CHECKSUM)
        return secret.len ? REDIS_VALUE_UNAUTHENTICATED : REDIS_VALUE_FOREIGN;
    if (n < FIXED || memcmp(v, MAGIC, 4) || !tag_size(v[4]) || v[5] > 1)
        return REDIS_VALUE_CORRUPT;
    size_t tag = tag_size(v[4]);
    size_t reason_len = (size_t)get_u(v + 24, 2), headers_len = (size_t)get_u(v + 26, 4);
    size_t body_len = (size_t)get_u(v + 30, 4), stored_key_len = (size_t)get_u(v + 34, 4);
    int status = (int)get_u(v + 6, 2);
    bool marker = v[5] == 1;
    if (n < FIXED + tag || FIXED + tag + stored_key_len + reason_len + headers_len + body_len != n
        || (marker ? (status != 0 || !headers_len || body_len)
                   : (status < 200 || status > 599 || status == 206 || status == 304)))   /* (what no rule stores) */
        return REDIS_VALUE_CORRUPT;
    /* the value must be the one written for this key, not another's moved here */
    const unsigned char *stored_key = v + FIXED + tag;
    bool key_is_ours = stored_key_len == key_len && (!key_len || !memcmp(stored_key, key, key_len));
    if (v[4] == VERSION_HMAC) {
        if (!secret.len)
            return REDIS_VALUE_FOREIGN;
        unsigned char want[TAG_HMAC];
        tag_hmac(secret, v, n, want);
        if (!same_bytes(want, v + FIXED, TAG_HMAC) || !key_is_ours)
            return REDIS_VALUE_UNAUTHENTICATED;
    } else {
        if (secret.len)
            return REDIS_VALUE_UNAUTHENTICATED;    /* anyone can write a checksum */
        unsigned char want[TAG_CHECKSUM];
        tag_checksum(v, n, want);
        if (memcmp(want, v + FIXED, TAG_CHECKSUM) || !key_is_ours)
            return REDIS_VALUE_CORRUPT;
    }
    /* times as signed values, compared without arithmetic that could overflow */
    int64_t stored_at = (int64_t)get_u(v + 8, 8), expires_at = (int64_t)get_u(v + 16, 8);
    int64_t oldest = now_ms - REDIS_VALUE_MAX_AGE_MS, newest = now_ms + REDIS_VALUE_SKEW_MS;
    int64_t latest_expiry = now_ms + REDIS_VALUE_MAX_AGE_MS;
    if (stored_at < oldest || stored_at > newest || expires_at < stored_at || expires_at > latest_expiry
        || ttl_ms <= 0 || ttl_ms > REDIS_VALUE_MAX_AGE_MS)
        return REDIS_VALUE_CORRUPT;
    const char *p = (const char *)stored_key + stored_key_len;
    struct cache_entry *e = marker ? cache_entry_new(key, key_len, 0, "", 0, "", 0, p + reason_len, headers_len,
                                                     "", 0, "", 0, ttl_ms)
                                   : cache_entry_new(key, key_len, status, p, reason_len, p + reason_len, headers_len,
                                                     "", 0, "", 0, p + reason_len + headers_len, body_len, ttl_ms);
    if (!e)
        return REDIS_VALUE_NO_MEMORY;
    e->stored_at_ms = stored_at;
    if (expires_at < e->keep_until_ms)
        e->expires_at_ms = expires_at; /* Redis keeps it stale (PX = TTL + stale window) */
    *out = e;
    return REDIS_VALUE_OK;
}
