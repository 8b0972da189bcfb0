/* cache_redis.h — the Redis tier (cache_redis.c). */
#ifndef HTTPSHIM_CACHE_REDIS_H
#define HTTPSHIM_CACHE_REDIS_H
#include <stdbool.h>
#include "buf.h"
#include "cache.h"
#include "rules.h"

struct redis_ticket;
/* The lookup ended: e is a reference to the entry found (the callee owns it), or NULL. */
typedef void (*redis_lookup_done_fn)(void *waiter, struct cache_entry *e);

int redis_init(const struct shim_config *cfg);
void redis_forget(void);
/* Asks Redis for exactly key (an entry or a Vary marker: the caller resolves the variant)
 * on behalf of `waiter`, which hears back through done within redis_timeout unless it
 * cancels first. NULL: Redis cannot be asked now; go upstream. */
struct redis_ticket *redis_lookup(const char *key, size_t key_len, int upstream, redis_lookup_done_fn done,
                                  void *waiter);
void redis_cancel(struct redis_ticket *t);  /* done will not be called */

/* Keys are named in Redis <prefix>v3:<host>:<port>:<route>:<SHA-256 hex of key> (see
 * "Redis keys" in cache_redis.c). Cross-process coalescing: SET <that>:lock token NX PX
 * redis_lock_ttl; a holder whose answer could not be stored leaves the lock saying so
 * for uncacheable_ttl (UNCACHEABLE: fetch at once, as the holder did: hit-for-miss). */
/* STORED: not taken, the key's entry is in Redis, fresh (stored by the holder that has
 * just let go of the lock, between this process's lookup and its asking) */
enum redis_lock_result { REDIS_LOCK_TAKEN, REDIS_LOCK_HELD_ELSEWHERE, REDIS_LOCK_UNAVAILABLE, REDIS_LOCK_UNCACHEABLE,
                         REDIS_LOCK_STORED };
typedef void (*redis_lock_done_fn)(void *waiter, enum redis_lock_result how);
bool redis_available(void);                 /* connected, with room for a command */
/* Connected, and its last lookups were answered (none has waited its redis_timeout out
 * since the last answer): the cross-process lock is asked only then. */
bool redis_answering(void);
/* done hears within redis_timeout (UNAVAILABLE when Redis did not answer). NULL: Redis
 * cannot be asked now. */
struct redis_ticket *redis_lock(const char *key, size_t key_len, const char *token, redis_lock_done_fn done,
                                void *waiter);
void redis_unlock(const char *key, size_t key_len, const char *token);   /* only if still ours */
/* The holder's answer could not be stored: the lock (only if still ours) says so to the
 * other processes for ttl_ms, in place of being let go. */
void redis_lock_mark_uncacheable(const char *key, size_t key_len, const char *token, int64_t ttl_ms);
void redis_store(const struct cache_entry *e, int64_t ttl_ms);
/* DEL of the entry stored under this cache key (an unsafe request invalidated it); sent
 * when a connection can take it, and waited for at exit as a SET is. */
void redis_delete(const char *key, size_t key_len);
/* A transfer that may end in redis_store() began (+1) or ended (-1); see flush_at_exit. */
void redis_write_owed(int delta);
#endif
