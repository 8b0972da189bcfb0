/* redis_link.h — one hiredis async connection driven by the engine's loop (redis_link.c):
 * the Redis tier's data connection and the sentinels' query and subscription connections
 * each are one. */
#ifndef HTTPSHIM_REDIS_LINK_H
#define HTTPSHIM_REDIS_LINK_H
#include <stdbool.h>
#include "loop.h"

struct redisAsyncContext;

struct redis_link {
    struct loop_source src;
    struct redisAsyncContext *ac;      /* NULL once hiredis has freed it (or before a connect) */
    int fd;
    bool want_read, want_write;
    /* called after each of the connection's events has been handled (may be NULL) */
    void (*after_io)(struct redis_link *l);
};

/* A non-blocking connect to host:port (or the Unix socket unix_path when it is not empty),
 * its callbacks set, its fd the engine's; -1 when it could not even start (host did not
 * resolve, among others); REDIS_LINK_RESOLVING when host's first address is still being
 * asked for (resolver.c: try again shortly, nothing failed). The context is freed by
 * hiredis (on an error, a disconnect or redisAsyncFree), and l->ac is NULL then. */
#define REDIS_LINK_RESOLVING (-2)
#define REDIS_LINK_RESOLVE_RETRY_MS 25 /* how soon to try again after REDIS_LINK_RESOLVING */
int redis_link_connect(struct redis_link *l, const char *host, int port, const char *unix_path,
                       void (*on_connect)(const struct redisAsyncContext *, int),
                       void (*on_disconnect)(const struct redisAsyncContext *, int));
/* Drops the connection now (its pending callbacks get NULL replies). */
void redis_link_drop(struct redis_link *l);
/* A forked child: the fd went with the other engine fds; the context stays allocated. */
void redis_link_forget(struct redis_link *l);
#endif
