/* buf.h — a bounded byte queue (buf.c): bytes live in data[start, end); it grows by
 * doubling up to cap, then callers must stop producing (backpressure). */
#ifndef HTTPSHIM_BUF_H
#define HTTPSHIM_BUF_H
#include <stddef.h>

struct buf { char *data; size_t start, end, size, cap; };

/* Small on purpose: most exchanges are a few hundred bytes each way, and per-connection
 * buffers of 16 KiB made the engine's malloc arena grow and trim (madvise + TLB
 * shootdowns) on every burst of connections. Bigger ones grow by doubling. */
#define BUF_INITIAL 1024

static inline size_t buf_len(const struct buf *b) { return b->end - b->start; }
static inline char *buf_head(const struct buf *b) { return b->data + b->start; }
static inline void buf_consume(struct buf *b, size_t n)
{
    b->start += n;
    if (b->start == b->end)
        b->start = b->end = 0;
}
/* Makes room for `want` more bytes at the end (compacting, then growing up to cap).
 * Returns the free bytes at the end afterwards, which may be less than want. */
size_t buf_make_room(struct buf *b, size_t want);
int buf_append(struct buf *b, const void *p, size_t n);   /* 0, or -1 if over cap */
void buf_free(struct buf *b);
/* Sends what b holds to a non-blocking socket until it is drained or the socket is full:
 * 0, or -1 when the socket failed (the peer is gone). */
int buf_send(struct buf *b, int fd);
#endif
