/* redis_slot.h — Redis Cluster's key slots (redis_slot.c). */
#ifndef HTTPSHIM_REDIS_SLOT_H
#define HTTPSHIM_REDIS_SLOT_H
#include <stddef.h>
#include <stdint.h>

#define REDIS_SLOTS 16384

/* CRC16-CCITT (XMODEM), as Redis Cluster computes it. */
uint16_t redis_crc16(const char *p, size_t n);
/* The slot of a key: of its hash tag (the bytes between the first '{' and the first '}'
 * after it, when not empty), else of the whole key. */
unsigned redis_slot(const char *key, size_t n);
#endif
