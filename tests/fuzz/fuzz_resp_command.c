/* fuzz_resp_command.c — libFuzzer target for the framing of an app's Redis commands
 * (shim/resp.c over hiredis's redisReader): what the proxy reads of every byte an app sends
 * to a protocol = redis upstream.
 * The input's first byte chooses chunk sizes (1 + byte % 64, cycling through the input's
 * bytes as seeds); the rest is the app's stream, fed whole to one stream and in chunks to
 * another, taking every item as soon as it is whole.
 * Invariants (a violation aborts):
 *  - split points never matter: both streams give the same items (raw bytes and arguments)
 *    and end the same way (more wanted, not RESP, too large);
 *  - every item's raw bytes are a prefix of what was not yet taken, start with '*', and
 *    are an array of argc >= 1 bulk strings whose lengths add up within them;
 *  - an item's raw bytes, framed alone, give exactly that item and nothing more;
 *  - the bytes taken never exceed the input. */
#include "fuzz.h"
#include "../../shim/resp.h"
#include <hiredis/hiredis.h>
#include <string.h>

#define MAX_ITEMS 256

struct seen {
    size_t n_items, taken;
    enum resp_next end;
    size_t raw_len[MAX_ITEMS], argc[MAX_ITEMS];
    const char *raw_at[MAX_ITEMS];     /* into the input */
};

static void check_item(const char *raw, size_t n, const struct resp_item *it)
{
    FUZZ_CHECK(n >= 4 && raw[0] == '*');
    FUZZ_CHECK(resp_argc(it) >= 1);
    size_t sum = 0;
    for (size_t i = 0; i < resp_argc(it); i++) {
        size_t len;
        resp_arg(it, i, &len);
        sum += len;
    }
    FUZZ_CHECK(sum <= n);
    /* alone, the same item and nothing more */
    struct resp_stream again;
    FUZZ_CHECK(resp_stream_init(&again, true) == 0);
    FUZZ_CHECK(resp_stream_feed(&again, raw, n) == 0);
    struct resp_item one;
    FUZZ_CHECK(resp_stream_next(&again, &one) == RESP_ITEM);
    FUZZ_CHECK(one.raw_len == n && resp_argc(&one) == resp_argc(it));
    for (size_t i = 0; i < resp_argc(it); i++) {
        size_t a, b;
        const char *x = resp_arg(it, i, &a), *y = resp_arg(&one, i, &b);
        FUZZ_CHECK(a == b && !memcmp(x, y, a));
    }
    resp_item_done(&again, &one);
    FUZZ_CHECK(resp_stream_next(&again, &one) == RESP_MORE);
    resp_stream_free(&again);
}

static void frame(const char *p, size_t n, const unsigned char *sizes, size_t n_sizes, struct seen *out)
{
    struct resp_stream s;
    FUZZ_CHECK(resp_stream_init(&s, true) == 0);
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
            check_item(raw, it.raw_len, &it);
            if (out->n_items < MAX_ITEMS) {
                out->raw_at[out->n_items] = p + out->taken;
                out->raw_len[out->n_items] = it.raw_len;
                out->argc[out->n_items] = resp_argc(&it);
            }
            out->n_items++;
            out->taken += it.raw_len;
            resp_item_done(&s, &it);
            continue;
        }
        if (r != RESP_MORE) {
            out->end = r;
            break;
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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    const char *p = (const char *)data + 1;
    size_t n = size - 1;
    static struct seen whole, split;
    frame(p, n, NULL, 0, &whole);
    frame(p, n, data, size, &split);
    FUZZ_CHECK(whole.end == split.end && whole.n_items == split.n_items && whole.taken == split.taken);
    for (size_t i = 0; i < whole.n_items && i < MAX_ITEMS; i++)
        FUZZ_CHECK(whole.raw_len[i] == split.raw_len[i] && whole.argc[i] == split.argc[i]
                   && whole.raw_at[i] == split.raw_at[i]);
    return 0;
}
