/* ring.c — owns the bounded FIFO of fixed-size items (ring.h). */
#include "ring.h"
#include <stdlib.h>
#include <string.h>

void *ring_at(const struct ring *r, unsigned i)
{
    return r->items + (size_t)((r->head + i) % r->cap) * r->item_size;
}

int ring_push(struct ring *r, const void *item)
{
    if (r->count == r->cap) {
        if (r->cap >= r->max)
            return -1;
        unsigned cap = r->cap ? r->cap * 2 : 16;
        if (cap > r->max)
            cap = r->max;
        unsigned char *items = malloc((size_t)cap * r->item_size);
        if (!items)
            return -1;
        for (unsigned i = 0; i < r->count; i++)   /* oldest first, from 0 */
            memcpy(items + (size_t)i * r->item_size, ring_at(r, i), r->item_size);
        free(r->items);
        r->items = items;
        r->cap = cap;
        r->head = 0;
    }
    memcpy(ring_at(r, r->count), item, r->item_size);
    r->count++;
    return 0;
}

int ring_pop(struct ring *r, void *item)
{
    if (!r->count)
        return -1;
    memcpy(item, ring_at(r, 0), r->item_size);
    r->head = (r->head + 1) % r->cap;
    r->count--;
    return 0;
}

void ring_free(struct ring *r)
{
    free(r->items);
    r->items = NULL;
    r->head = r->count = r->cap = 0;
}
