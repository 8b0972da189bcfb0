/* fuzz_resp_command.c — libFuzzer target for the framing of an app's Redis commands
 * (shim/resp.c over hiredis's redisReader): what the proxy reads of every byte an app sends
 * to a protocol = redis upstream.
 * The input's first byte chooses chunk sizes (1 + byte % 64, cycling through the input's
 * bytes as seeds); the rest is the app's stream, fed whole to one stream and in chunks to
 * another, taking every item as soon as it is whole.
 * Invariants (a violation aborts):
 *  - split points never matter: both streams give the same items (raw bytes and arguments)
 *    and end the same way (more wanted, not RESP, too large, an inline command next);
 *  - every item's raw bytes are a prefix of what was not yet taken, start with '*' (or
 *    with what Redis ignores before a command, stepped over: an empty line, an empty
 *    array), and are an array of argc >= 1 bulk strings whose lengths add up within them;
 *  - an item's raw bytes, framed alone, give exactly that item and nothing more;
 *  - the bytes taken never exceed the input. */
#include "fuzz_resp.h"
#include <hiredis/hiredis.h>
#include <string.h>

static void check_item(const char *raw, size_t n, const struct resp_item *it)
{
    FUZZ_CHECK(n >= 4 && (raw[0] == '*' || raw[0] == '\r' || raw[0] == '\n'));
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

/* (the walk's check: what is compared between the walks is the item's argc) */
static long check_command(const char *p, size_t n, size_t at, const char *raw, const struct resp_item *it, bool whole)
{
    (void)p, (void)n, (void)at, (void)whole;
    check_item(raw, it->raw_len, it);
    return (long)resp_argc(it);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_resp_run(true, data, size, check_command, false, NULL);
}
