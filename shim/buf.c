/* buf.c — owns the bounded byte queue every connection, transfer and stats client
 * buffers through (buf.h), and draining one into a socket. */
#include "buf.h"
#include "real.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

size_t buf_make_room(struct buf *b, size_t want)
{
    if (b->size - b->end >= want)
        return b->size - b->end;
    if (b->start > 0) {
        memmove(b->data, b->data + b->start, b->end - b->start);
        b->end -= b->start;
        b->start = 0;
        if (b->size - b->end >= want)
            return b->size - b->end;
    }
    if (b->size < b->cap) {
        size_t size = b->size ? b->size : BUF_INITIAL;
        while (size < b->end + want && size < b->cap)
            size *= 2;
        if (size > b->cap)
            size = b->cap;
        char *p = realloc(b->data, size);
        if (p) {
            b->data = p;
            b->size = size;
        }
    }
    return b->size - b->end;
}

int buf_append(struct buf *b, const void *p, size_t n)
{
    if (n == 0)
        return 0;                      /* data may still be NULL: memcpy must not see it */
    if (buf_make_room(b, n) < n)
        return -1;
    memcpy(b->data + b->end, p, n);
    b->end += n;
    return 0;
}

int buf_send(struct buf *b, int fd)
{
    while (buf_len(b)) {
        ssize_t n = real_send(fd, buf_head(b), buf_len(b), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0)
            buf_consume(b, (size_t)n);
        else if (n < 0 && errno == EINTR)
            continue;
        else
            return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    }
    return 0;
}

void buf_free(struct buf *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}
