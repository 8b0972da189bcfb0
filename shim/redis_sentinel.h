/* redis_sentinel.h — the Redis tier's master, as the sentinels name it (redis_sentinel.c). */
#ifndef HTTPSHIM_REDIS_SENTINEL_H
#define HTTPSHIM_REDIS_SENTINEL_H
#include <stdbool.h>
#include <stddef.h>
#include "rules.h"

/* The master changed (a first answer, a +switch-master, a new answer after a doubt). */
typedef void (*sentinel_changed_fn)(void);

void sentinel_init(const struct shim_config *cfg, sentinel_changed_fn changed);
/* The master the sentinels named last; false while none has. */
bool sentinel_master(char *host, size_t host_cap, int *port);
/* The master failed the tier (a connection error, READONLY, MASTERDOWN, a ROLE that is
 * not master): the sentinels are asked again, one after another, with a bounded backoff. */
void sentinel_doubt(void);
/* The master named answered ROLE as master (redis_nodes.c): a change from it on is a failover. */
void sentinel_master_verified(void);
/* A forked child: the parent's connections are not its own. */
void sentinel_forget(void);
#endif
