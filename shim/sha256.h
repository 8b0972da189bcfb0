/* sha256.h - SHA-256 of one buffer (see sha256.c for why it is the shim's own). */
#ifndef HTTPSHIM_SHA256_H
#define HTTPSHIM_SHA256_H

#include <stddef.h>
#include <stdint.h>

#define SHA256_BYTES 32

void sha256(const void *data, size_t len, unsigned char out[SHA256_BYTES]);

#endif
