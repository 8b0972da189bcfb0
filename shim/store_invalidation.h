/* store_invalidation.h — what a write to a URL does to the cache (store_invalidation.c);
 * store_invalidation_sink, store_invalidate_now and store_invalidate_unread, the engine's,
 * are declared in store.h. */
#ifndef HTTPSHIM_STORE_INVALIDATION_H
#define HTTPSHIM_STORE_INVALIDATION_H
#include "store.h"
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

void store_invalidation_init(const struct shim_config *config);
/* How many targets have been invalidated so far; a fetch notes it when it begins. */
uint64_t invalidation_count(void);
/* Whether key's target was invalidated since the count was `seen` (or too long ago to
 * tell: as if it had been). */
bool invalidated_since(const char *key, size_t key_len, uint64_t seen);
#endif
