/* resp_test.c — exercises shim/resp.c's bounds on their edges, which the fuzzer's small
 * inputs never reach: a command not yet whole that holds exactly RESP_ITEM_MAX bytes is
 * too large (the session stops reading there, so "more" would wait forever), one byte
 * less is not, and a bulk announced longer than that is too large at once; a reply may be far larger than a command and still framed whole; an array
 * header promising more elements than the bytes allowed is too large (the command goes
 * direct), not allocated. And
 * redis_slot.c against the cluster specification's own examples.
 * Prints "N passed, N failed" and exits 0 only when every check passed. */
#include "../../shim/redis_slot.h"
#include "../../shim/resp.h"
#include "check.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* An incomplete "SET k <value>" whose bytes fed add up to exactly `total`. */
static enum resp_next feed_incomplete(struct resp_stream *s, size_t total, size_t value_len)
{
    char head[64];
    int k = snprintf(head, sizeof head, "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%zu\r\n", value_len);
    char *all = malloc(total);
    if (!all)
        return RESP_BAD;
    memcpy(all, head, (size_t)k);
    memset(all + k, 'v', total - (size_t)k);
    enum resp_next r = RESP_MORE;
    for (size_t off = 0; off < total && r == RESP_MORE; off += 16384) {
        size_t n = total - off < 16384 ? total - off : 16384;
        if (resp_stream_feed(s, all + off, n) != 0) {
            r = RESP_BAD;
            break;
        }
        struct resp_item it;
        r = resp_stream_next(s, &it);
    }
    free(all);
    return r;
}

int main(void)
{
    struct resp_stream s;
    /* (a value of RESP_ITEM_MAX bytes: the command is longer than that, its one bulk not) */
    resp_stream_init(&s, true);
    check(feed_incomplete(&s, RESP_ITEM_MAX, RESP_ITEM_MAX) == RESP_TOO_LARGE,
          "a command holding exactly RESP_ITEM_MAX bytes, not yet whole, is too large");
    resp_stream_free(&s);

    resp_stream_init(&s, true);
    check(feed_incomplete(&s, RESP_ITEM_MAX - 1, RESP_ITEM_MAX) == RESP_MORE,
          "one byte less is still being read");
    resp_stream_free(&s);

    resp_stream_init(&s, true);
    check(feed_incomplete(&s, 64, (size_t)RESP_ITEM_MAX + 1) == RESP_TOO_LARGE,
          "a bulk announced longer than RESP_ITEM_MAX is too large at its header");
    resp_stream_free(&s);

    resp_stream_init(&s, true);
    check(resp_stream_feed(&s, "*100000000\r\n", 12) == 0, "an array header is taken");
    struct resp_item it;
    check(resp_stream_next(&s, &it) == RESP_TOO_LARGE,
          "a header promising more elements than the bytes allow is too large (direct), not allocated");
    resp_stream_free(&s);

    /* a 3 MB bulk reply, fed in pieces: one item of exactly its bytes */
    size_t value = 3u << 20;
    char head[32];
    int k = snprintf(head, sizeof head, "$%zu\r\n", value);
    size_t total = (size_t)k + value + 2;
    char *reply = malloc(total);
    if (!reply)
        return 2;
    memcpy(reply, head, (size_t)k);
    memset(reply + k, 'r', value);
    memcpy(reply + k + value, "\r\n", 2);
    resp_stream_init(&s, false);
    enum resp_next r = RESP_MORE;
    for (size_t off = 0; off < total && r == RESP_MORE; off += 16384) {
        size_t n = total - off < 16384 ? total - off : 16384;
        if (resp_stream_feed(&s, reply + off, n) != 0) {
            r = RESP_BAD;
            break;
        }
        r = resp_stream_next(&s, &it);
    }
    check(r == RESP_ITEM && it.raw_len == total, "a 3 MB reply is framed whole");
    if (r == RESP_ITEM)
        resp_item_done(&s, &it);
    resp_stream_free(&s);
    free(reply);

    /* the cluster specification's examples, and what redis-cli CLUSTER KEYSLOT answers */
    check(redis_crc16("123456789", 9) == 0x31C3, "CRC16 of 123456789 is 0x31C3");
    check(redis_slot("foo", 3) == 12182, "slot of foo is 12182");
    check(redis_slot("{user1000}.following", 20) == redis_slot("{user1000}.followers", 20)
          && redis_slot("{user1000}.following", 20) == redis_slot("user1000", 8), "a hash tag decides the slot");
    check(redis_slot("foo{}{bar}", 10) == (redis_crc16("foo{}{bar}", 10) & 16383), "an empty tag: the whole key");
    check(redis_slot("foo{{bar}}zap", 13) == redis_slot("{bar", 4), "the tag ends at the first } after the first {");

    return check_report();
}
