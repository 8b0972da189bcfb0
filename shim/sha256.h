/* sha256.h - SHA-256, one-shot or incremental, and HMAC-SHA256 (see sha256.c for why
 * it is the shim's own). */
#ifndef HTTPSHIM_SHA256_H
#define HTTPSHIM_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define SHA256_BYTES 32

struct sha256_ctx { uint32_t h[8]; unsigned char buf[64]; size_t buf_len; uint64_t total; };

void sha256_init(struct sha256_ctx *c);
void sha256_update(struct sha256_ctx *c, const void *data, size_t len);
void sha256_final(struct sha256_ctx *c, unsigned char out[SHA256_BYTES]);
void sha256(const void *data, size_t len, unsigned char out[SHA256_BYTES]);
struct hmac_sha256_ctx { struct sha256_ctx inner; unsigned char key[64]; };
void hmac_sha256_init(struct hmac_sha256_ctx *c, const void *key, size_t key_len);
void hmac_sha256_update(struct hmac_sha256_ctx *c, const void *data, size_t len);
void hmac_sha256_final(struct hmac_sha256_ctx *c, unsigned char out[SHA256_BYTES]);

#endif
