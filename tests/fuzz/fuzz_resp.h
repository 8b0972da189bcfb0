/* fuzz_resp.h — the walk the two RESP harnesses share (fuzz_resp_command.c, the app's
 * commands; fuzz_resp_reply.c, the server's replies): a stream fed an input whole or in
 * chunks whose sizes cycle through given bytes, every item taken as soon as it is whole,
 * checked to be the next bytes of the input, handed to the harness's own check, and
 * recorded, so that the whole walk and the chunked one can be compared item by item. */
#ifndef HTTPSHIM_FUZZ_RESP_H
#define HTTPSHIM_FUZZ_RESP_H
#include "fuzz.h"
#include "../../shim/resp.h"
#include <stdbool.h>
#include <string.h>

#define FUZZ_RESP_ITEMS 2048           /* every item of a -max_len=4096 input (2 bytes each at least) */

struct fuzz_resp_seen {
    size_t n_items, taken;
    enum resp_next end;
    size_t raw_len[FUZZ_RESP_ITEMS];
    long what[FUZZ_RESP_ITEMS];        /* what the harness's check says of the item (argc, type) */
    const char *raw_at[FUZZ_RESP_ITEMS];   /* into the input */
};

/* The harness's check of one item, whose bytes are raw (p + at: the input, n long); whole:
 * the walk fed the input whole. Returns what to compare between the walks. */
typedef long (*fuzz_resp_check)(const char *p, size_t n, size_t at, const char *raw, const struct resp_item *it,
                                bool whole);

/* Frames p[0, n) fed in chunks (1 + sizes[k] % 64, cycling), or whole (sizes NULL).
 * count_pending: what the stream holds is checked against what was fed and not taken. */
static inline void fuzz_resp_walk(bool commands, const char *p, size_t n, const unsigned char *sizes,
                                  size_t n_sizes, fuzz_resp_check check, bool count_pending,
                                  struct fuzz_resp_seen *out)
{
    struct resp_stream s;
    FUZZ_CHECK(resp_stream_init(&s, commands) == 0);
    memset(out, 0, sizeof *out);
    out->end = RESP_MORE;
    size_t fed = 0, k = 0;
    while (1) {
        struct resp_item it;
        enum resp_next r = resp_stream_next(&s, &it);
        if (r == RESP_ITEM) {
            const char *raw = buf_head(&s.raw);
            FUZZ_CHECK(it.raw_len <= buf_len(&s.raw));
            FUZZ_CHECK(fuzz_inside(p, n, p + out->taken, it.raw_len) && !memcmp(raw, p + out->taken, it.raw_len));
            long what = check(p, n, out->taken, raw, &it, sizes == NULL);
            if (out->n_items < FUZZ_RESP_ITEMS) {
                out->raw_at[out->n_items] = p + out->taken;
                out->raw_len[out->n_items] = it.raw_len;
                out->what[out->n_items] = what;
            }
            out->n_items++;
            out->taken += it.raw_len;
            resp_item_done(&s, &it);
            FUZZ_CHECK(!count_pending || resp_stream_pending(&s) == fed - out->taken);
            continue;
        }
        if (r == RESP_PART)            /* (a value over the max: its header, as it came, ends the walk) */
            FUZZ_CHECK(!commands && fuzz_inside(p, n, p + out->taken, it.raw_len)
                       && !memcmp(buf_head(&s.raw), p + out->taken, it.raw_len) && !it.last);
        if (r == RESP_BAD && commands) {   /* what the app is answered: Redis's words, one line */
            char scratch[64];
            const char *why = resp_stream_refusal(&s, scratch, sizeof scratch);
            FUZZ_CHECK(why && !strncmp(why, "Protocol error", 14) && !strpbrk(why, "\r\n"));
        }
        if (r != RESP_MORE) {
            out->end = r;
            break;
        }
        if (count_pending) {           /* (and asked again with nothing fed, still more wanted) */
            FUZZ_CHECK(resp_stream_pending(&s) == fed - out->taken);
            FUZZ_CHECK(resp_stream_next(&s, &it) == RESP_MORE);
        }
        if (fed == n)
            break;
        size_t chunk = sizes ? (size_t)(1 + sizes[k++ % n_sizes] % 64) : n - fed;
        if (chunk > n - fed)
            chunk = n - fed;
        if (resp_stream_feed(&s, p + fed, chunk) != 0) {
            out->end = RESP_TOO_LARGE;
            break;
        }
        fed += chunk;
    }
    FUZZ_CHECK(out->taken <= n);
    resp_stream_free(&s);
}

/* Split points never matter: the two walks took the same items and ended the same way. */
static inline void fuzz_resp_same(const struct fuzz_resp_seen *a, const struct fuzz_resp_seen *b)
{
    FUZZ_CHECK(a->end == b->end && a->n_items == b->n_items && a->taken == b->taken);
    for (size_t i = 0; i < a->n_items && i < FUZZ_RESP_ITEMS; i++)
        FUZZ_CHECK(a->raw_len[i] == b->raw_len[i] && a->what[i] == b->what[i] && a->raw_at[i] == b->raw_at[i]);
}
/* A harness's whole run: the input's first byte is kept for the chunk sizes, the rest is
 * walked whole (after_whole, when given, then checks how that walk ended) and in chunks
 * (the sizes are the input's own bytes), and the two walks must agree. */
static inline int fuzz_resp_run(bool commands, const uint8_t *data, size_t size, fuzz_resp_check check,
                                bool count_pending, void (*after_whole)(const char *p, size_t n,
                                                                        const struct fuzz_resp_seen *whole))
{
    if (size < 1)
        return 0;
    const char *p = (const char *)data + 1;
    size_t n = size - 1;
    static struct fuzz_resp_seen whole, split;   /* (too large for the stack) */
    fuzz_resp_walk(commands, p, n, NULL, 0, check, count_pending, &whole);
    if (after_whole)
        after_whole(p, n, &whole);
    fuzz_resp_walk(commands, p, n, data, size, check, count_pending, &split);
    fuzz_resp_same(&whole, &split);
    return 0;
}
#endif
