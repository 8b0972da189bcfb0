/* fastpath.h — the app side of writes on a diverted connection, and memory hits answered
 * on the app's own thread (fastpath.c). */
#ifndef HTTPSHIM_FASTPATH_H
#define HTTPSHIM_FASTPATH_H
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include "fdtable.h"
#include "rules.h"

/* The real write the hook was asked for (write, send, sendmsg, writev...). */
typedef ssize_t (*fastpath_real_write)(void *arg);

/* A write of iov on diverted fd e: an inline answer (the request's length returned), or
 * the real write under the gate (its result). */
ssize_t fastpath_write(const struct shim_config *cfg, int fd, struct fd_entry *e, const struct iovec *iov, int iovcnt,
                       fastpath_real_write real, void *real_arg);

/* What an inline answer could not write into the pair: the engine sends it first. */
struct fastpath_handoff {
    struct fastpath_handoff *next;
    int engine_fd;
    uint64_t gen;
    bool close_after;                  /* the answer said close: the engine closes once sent */
    size_t len;
    char data[];
};
struct fastpath_handoff *fastpath_take_handoffs(void);   /* the engine's: all pending, or NULL */
/* need(e) is called before a real write on a diverted fd, and before a hand-off: the
 * engine must hear from that connection from then on. drop(e, conn) ends a connection the
 * engine never heard from (true), after an inline answer that closes it. */
void fastpath_init(void (*need)(struct fd_entry *e), bool (*drop)(struct fd_entry *e, void *conn));
void fastpath_forget(void);
#endif
