/* redis_nodes.h — the Redis tier's server connections (redis_nodes.c): one server, the
 * master the sentinels name, or a cluster's masters by key slot. */
#ifndef HTTPSHIM_REDIS_NODES_H
#define HTTPSHIM_REDIS_NODES_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "rules.h"

struct redis_node;
struct redisAsyncContext;
struct redisReply;
typedef void redis_reply_fn(struct redisAsyncContext *ac, void *reply, void *privdata);

/* usable: a connection may carry the tier's commands now (what was owed to Redis can go);
 * wake: a deadline of the nodes' changed (the caller's timer asks nodes_due again). */
void nodes_init(const struct shim_config *cfg, void (*usable)(void), void (*wake)(void));
void nodes_forget(void);               /* a forked child: the parent's connections are not its own */

/* The node that serves `key` (a cluster's: its slot's master) if it can take `commands`
 * more now: connected and checked, or, early, a connection still being made (hiredis
 * queues the bytes meanwhile): reads even behind a SELECT not yet answered (a refused one
 * drops the connection before their replies are read), writes only once the SELECT is
 * taken (they would run in database 0). NULL: the tier cannot be asked now. */
enum nodes_early { NODES_USABLE, NODES_EARLY_READ, NODES_EARLY_WRITE };
struct redis_node *nodes_for_key(const char *key, size_t n, unsigned commands, enum nodes_early early);
/* Queues a command on the node, counted in flight; -1 when it could not be queued. */
int nodes_command(struct redis_node *node, redis_reply_fn *fn, void *privdata, const char *fmt, ...);
/* Sends what is queued on the node at once rather than on the loop's next turn. */
void nodes_write_now(struct redis_node *node);
/* SET payload bytes queued on the node, not yet answered: what it holds, and a change. */
size_t nodes_pending(const struct redis_node *node);
void nodes_add_pending(struct redis_node *node, size_t bytes);
/* A reply (NULL when the connection went) came on ac: one command less in flight there,
 * and `bytes` of payload answered. */
void nodes_replied(const struct redisAsyncContext *ac, size_t bytes);
/* An error reply on ac, counted. READONLY or MASTERDOWN: that server is not the master (it
 * is dropped and the sentinels asked again). MOVED: the slot's master is another (the map
 * follows). For MOVED and ASK, returns the node the command belongs on now (*ask: send
 * ASKING first); else NULL. */
struct redis_node *nodes_error(struct redisAsyncContext *ac, const struct redisReply *r, bool *ask);
/* When nodes_tick wants to run next (monotonic ms), -1 for never; and the run. */
int64_t nodes_due(void);
void nodes_tick(int64_t now_ms);
/* The single server's host name is still being resolved (no connection to queue on yet),
 * and: look again within 2 ms rather than 25, for lookups that wait on it. */
bool nodes_naming(void);
void nodes_hurry(int64_t now_ms);
#endif
