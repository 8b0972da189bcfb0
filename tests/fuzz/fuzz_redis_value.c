/* fuzz_redis_value.c — the Redis value decoder (shim/redis_value.c) on arbitrary bytes,
 * with and without a fleet secret. Checks: decoding never reads outside the value; an
 * entry that decodes has its fields inside its own allocation, a status in range (or is
 * a Vary marker) and plausible times; re-encoding a decoded entry and decoding that again
 * gives the same entry; a value encoded under one key never decodes under another with
 * a secret, nor without one; a value signed under a secret is never accepted without it;
 * and the key a value carries, read without verifying (redis_value_key, what `httpshim
 * purge` uses), lies inside the value and is the key of any value that decodes. With bit
 * 1 of the first byte set, the harness first re-signs the mutated value the way the
 * README documents (the SHA-256 prefix for version 5, the HMAC for version 4), so that
 * the fuzzer also reaches the length, key, status and time checks behind the integrity
 * check. */
#include "fuzz.h"
#include "../../shim/redis_value.h"
#include "../../shim/sha256.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOW_MS 1767225600000LL          /* a fixed "now": runs are reproducible */

static void check_entry(const struct cache_entry *e)
{
    const char *lo = (const char *)e, *hi = lo + e->charge;   /* charge >= the allocation */
    FUZZ_CHECK(cache_entry_is_vary_marker(e) ? e->vary_len > 0 && e->body_len == 0
                                        : e->status >= 200 && e->status <= 599 && e->status != 206 && e->status != 304);
    FUZZ_CHECK(e->body_len == 0 || (e->body >= lo && e->body + e->body_len <= hi));
    FUZZ_CHECK(e->headers_len == 0 || (e->headers >= lo && e->headers + e->headers_len <= hi));
    FUZZ_CHECK(e->stored_at_ms >= NOW_MS - REDIS_VALUE_MAX_AGE_MS && e->stored_at_ms <= NOW_MS + REDIS_VALUE_SKEW_MS);
}

/* README: version 5 tag = SHA-256(value[:38] value[46:])[:8]; version 4 tag =
 * HMAC-SHA256(secret, value[:38] value[70:]). */
static void resign(unsigned char *v, size_t n, struct redis_secret s)
{
    if (n >= 46 && v[4] == 5) {
        struct sha256_ctx c;
        unsigned char d[SHA256_BYTES];
        sha256_init(&c);
        sha256_update(&c, v, 38);
        sha256_update(&c, v + 46, n - 46);
        sha256_final(&c, d);
        memcpy(v + 38, d, 8);
    } else if (n >= 70 && v[4] == 4 && s.len) {
        struct hmac_sha256_ctx c;
        hmac_sha256_init(&c, s.bytes, s.len);
        hmac_sha256_update(&c, v, 38);
        hmac_sha256_update(&c, v + 70, n - 70);
        hmac_sha256_final(&c, v + 38);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    static const unsigned char secret_bytes[] = "fuzz-secret";
    struct redis_secret none = { NULL, 0 }, secret = { secret_bytes, sizeof secret_bytes - 1 };
    struct redis_secret use = (data[0] & 1) ? secret : none;
    int64_t ttl = (int64_t)(data[1] & 0x7f) * 1000 + 1;
    unsigned char *v = malloc(size - 2 ? size - 2 : 1);   /* exactly sized: ASan sees over-reads */
    if (!v)
        return 0;
    memcpy(v, data + 2, size - 2);
    static const char key[] = "GET http://h:80/p\nhost: h";
    if (data[0] & 2)
        resign(v, size - 2, use);
    const char *carried = NULL;
    size_t carried_len = 0;
    bool has_key = redis_value_key(v, size - 2, &carried, &carried_len);
    FUZZ_CHECK(!has_key || ((const unsigned char *)carried >= v && carried_len <= size - 2
                            && (const unsigned char *)carried + carried_len <= v + (size - 2)));
    struct cache_entry *e = NULL;
    enum redis_value_verdict verdict = redis_value_decode(key, sizeof key - 1, v, size - 2, ttl, NOW_MS, use, &e);
    FUZZ_CHECK((verdict == REDIS_VALUE_OK) == (e != NULL));
    if (e) {
        check_entry(e);
        FUZZ_CHECK(has_key && carried_len == sizeof key - 1 && !memcmp(carried, key, carried_len));
        size_t n = 0;
        unsigned char *again = redis_value_encode(e, key, sizeof key - 1, use, &n);
        if (again) {
            struct cache_entry *e2 = NULL;
            FUZZ_CHECK(redis_value_decode(key, sizeof key - 1, again, n, ttl, NOW_MS, use, &e2) == REDIS_VALUE_OK);
            FUZZ_CHECK(e2->status == e->status && e2->body_len == e->body_len && e2->stored_at_ms == e->stored_at_ms
                  && (e->body_len == 0 || !memcmp(e2->body, e->body, e->body_len)));
            cache_entry_release(e2);
            struct cache_entry *moved = NULL;
            static const char other[] = "GET http://h:80/q\nhost: h";
            FUZZ_CHECK(redis_value_decode(other, sizeof other - 1, again, n, ttl, NOW_MS, use, &moved)
                  == (use.len ? REDIS_VALUE_UNAUTHENTICATED : REDIS_VALUE_CORRUPT));
            if (use.len) {
                struct cache_entry *unsigned_e = NULL;
                FUZZ_CHECK(redis_value_decode(key, sizeof key - 1, again, n, ttl, NOW_MS, none, &unsigned_e)
                      == REDIS_VALUE_FOREIGN);
            }
            free(again);
        }
        cache_entry_release(e);
    }
    free(v);
    return 0;
}
