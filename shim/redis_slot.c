/* redis_slot.c — owns Redis Cluster's key-to-slot function: CRC16 (XMODEM: polynomial
 * 0x1021, initial value 0, no reflection) of the key or of its hash tag, modulo 16384,
 * exactly as the cluster specification defines it, so that the shim sends each command to
 * the master that serves its key. */
#include "redis_slot.h"
#include <string.h>

uint16_t redis_crc16(const char *p, size_t n)
{
    uint16_t crc = 0;
    for (size_t i = 0; i < n; i++) {
        crc ^= (uint16_t)((unsigned char)p[i] << 8);
        for (int bit = 0; bit < 8; bit++)
            crc = (uint16_t)(crc & 0x8000 ? (crc << 1) ^ 0x1021 : crc << 1);
    }
    return crc;
}

unsigned redis_slot(const char *key, size_t n)
{
    const char *open = memchr(key, '{', n);
    if (open) {
        size_t after = (size_t)(open - key) + 1;
        const char *close = memchr(open + 1, '}', n - after);
        if (close && close > open + 1)
            return redis_crc16(open + 1, (size_t)(close - open - 1)) & (REDIS_SLOTS - 1);
    }
    return redis_crc16(key, n) & (REDIS_SLOTS - 1);
}
