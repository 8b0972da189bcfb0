/* ring.h — a bounded FIFO of fixed-size items (ring.c): it starts empty, grows by doubling
 * from 16 items up to `max`, and is then full. What the Redis protocol keeps in order per
 * connection (a server connection's owed replies, a session's command kinds). */
#ifndef HTTPSHIM_RING_H
#define HTTPSHIM_RING_H
#include <stddef.h>

struct ring {
    unsigned char *items;
    size_t item_size;
    unsigned head, count, cap, max;
};

#define RING_INIT(type, max_items) ((struct ring){ .item_size = sizeof(type), .max = (max_items) })

int ring_push(struct ring *r, const void *item);   /* 0; -1 when full or out of memory */
int ring_pop(struct ring *r, void *item);          /* 0; -1 when empty */
void *ring_at(const struct ring *r, unsigned i);   /* the i-th oldest, i < count */
static inline void ring_clear(struct ring *r) { r->count = 0; }   /* empty, memory kept */
void ring_free(struct ring *r);
#endif
