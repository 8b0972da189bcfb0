/* pool_queue.h — the shim's own FIFO queue per upstream in front of libcurl (pool_queue.c):
 * a request gets one of the upstream's pool_max_per_host slots, or waits its turn. */
#ifndef HTTPSHIM_POOL_QUEUE_H
#define HTTPSHIM_POOL_QUEUE_H
#include <stdbool.h>
#include <stdint.h>
#include "rules.h"

/* One request's place, embedded in the caller's object. */
struct pool_slot {
    int upstream;
    bool admitted;                  /* holds one of the upstream's slots */
    int64_t queued_us;              /* when it started to wait (0: never waited) */
    int fd;                         /* the app's side, for log lines */
    struct pool_slot *next, *prev;  /* while waiting, in arrival order */
};

struct pool_queue_ops {
    /* Hand the request to libcurl: 0, or -1 (then it is failed). */
    int (*admit)(struct pool_slot *s);
    /* The request waited pool_queue_timeout (or could not be admitted): fail it. The slot
     * is out of the queue; the callee frees its owner. */
    void (*fail)(struct pool_slot *s);
    /* How many connections libcurl may keep (in use and idle), after a change. */
    void (*keep_connections)(long n);
};

void pool_queue_init(const struct shim_config *cfg, const struct pool_queue_ops *ops);
void pool_queue_forget(void);         /* forked child: the waiters were the parent's */
/* A new request: admitted at once when the upstream has a free slot and no one waits
 * before it (0), or queued (0), or not admitted (-1: the caller fails it). */
int pool_queue_enter(struct pool_slot *s, int upstream, int fd);
/* The request is over: out of the queue, or its slot freed for the next waiter. */
void pool_queue_leave(struct pool_slot *s);
/* After transfers finished: slots that came free go to the oldest waiters. */
void pool_queue_pump(void);
/* An upstream socket could not be had (the process's fds ran out): transfers beyond those
 * running now wait for one to end, and take its connection, for the next second. */
void pool_queue_fd_short(void);
#endif
