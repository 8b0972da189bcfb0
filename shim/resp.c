/* resp.c — owns framing RESP for the Redis protocol proxy: the app's commands (arrays of
 * bulk strings, with their arguments for the proxy to read) and the server's replies
 * (whatever RESP2 item, only its type), found whole by hiredis's redisReader, and the
 * exact bytes of each item, kept alongside the reader's own copy (the reader compacts its
 * buffer as it goes, so the bytes of an item are counted, not pointed at). Bounded: a
 * command not yet whole may hold RESP_ITEM_MAX bytes, a reply RESP_REPLY_MAX (a value
 * the app stored is as large as Redis allows it; a command larger than the shim frames
 * can still go direct, a reply on a shared connection cannot). */
#include "resp.h"
#include <hiredis/hiredis.h>
#include <string.h>
#include <strings.h>

/* Commands are built with hiredis's own objects, but an array header is a promise of
 * elements that the reader allocates room for at once: "*100000000" would cost 800 MB
 * before a byte of it arrived. The elements a command can have are bounded by the bytes
 * it may hold (6 per empty argument), and a larger header is refused (a reader error:
 * not a command the shim carries). */
#define RESP_ARGS_MAX ((int)(RESP_ITEM_MAX / 6))
static redisReplyObjectFunctions bounded;
static void *(*hiredis_array)(const redisReadTask *, int);

static void *bounded_array(const redisReadTask *task, int elements)
{
    return elements > RESP_ARGS_MAX ? NULL : hiredis_array(task, elements);
}

int resp_stream_init(struct resp_stream *s, bool commands)
{
    s->commands = commands;
    s->taken = 0;
    s->max = commands ? RESP_ITEM_MAX : RESP_REPLY_MAX;
    s->raw = (struct buf){ .cap = s->max * 2 };
    /* replies: no functions, no allocation per item (the reader returns the type) */
    s->reader = commands ? redisReaderCreate() : redisReaderCreateWithFunctions(NULL);
    if (!s->reader)
        return -1;
    if (commands) {
        if (!hiredis_array) {          /* hiredis's own functions, the array one bounded */
            bounded = *s->reader->fn;
            hiredis_array = bounded.createArray;
            bounded.createArray = bounded_array;
        }
        s->reader->fn = &bounded;
    }
    s->reader->maxbuf = 64 * 1024;     /* an empty buffer larger than this is given back */
    return 0;
}

void resp_stream_free(struct resp_stream *s)
{
    if (s->reader)
        redisReaderFree(s->reader);
    s->reader = NULL;
    buf_free(&s->raw);
}

/* What the reader holds and has not parsed yet. */
static size_t unparsed(const struct resp_stream *s)
{
    return s->reader ? s->reader->len - s->reader->pos : 0;
}

/* Bytes held for the item not yet whole: what the reader has not parsed, and what it has. */
size_t resp_stream_pending(const struct resp_stream *s) { return unparsed(s) + s->taken; }

int resp_stream_feed(struct resp_stream *s, const char *p, size_t n)
{
    if (resp_stream_pending(s) + n > s->max + 64 * 1024 || buf_append(&s->raw, p, n) != 0)
        return -1;
    if (redisReaderFeed(s->reader, p, n) != REDIS_OK) {
        s->raw.end -= n;               /* (undo: the caller gives up on the stream anyway) */
        return -1;
    }
    return 0;
}

static bool is_command(const redisReply *r)
{
    if (r->type != REDIS_REPLY_ARRAY || r->elements == 0)
        return false;
    for (size_t i = 0; i < r->elements; i++)
        if (r->element[i]->type != REDIS_REPLY_STRING)
            return false;
    return true;
}

enum resp_next resp_stream_next(struct resp_stream *s, struct resp_item *it)
{
    *it = (struct resp_item){ 0 };
    if (unparsed(s) == 0)
        return RESP_MORE;
    /* the reader keeps what it has parsed of an item across calls: its bytes are counted
     * from where the last whole item ended */
    size_t before = unparsed(s);
    void *reply = NULL;
    if (redisReaderGetReply(s->reader, &reply) != REDIS_OK)
        return RESP_BAD;
    s->taken += before - unparsed(s);
    if (!reply)
        return resp_stream_pending(s) >= s->max ? RESP_TOO_LARGE : RESP_MORE;
    it->raw_len = s->taken;
    s->taken = 0;
    if (!s->commands) {
        it->type = (int)(long)reply;   /* with no functions the reader hands back the type */
        return RESP_ITEM;
    }
    redisReply *r = reply;
    it->type = r->type;
    if (!is_command(r)) {
        freeReplyObject(r);
        return RESP_BAD;
    }
    it->argv = r;
    return RESP_ITEM;
}

void resp_item_done(struct resp_stream *s, struct resp_item *it)
{
    buf_consume(&s->raw, it->raw_len);
    if (it->argv)
        freeReplyObject(it->argv);
    *it = (struct resp_item){ 0 };
}

size_t resp_argc(const struct resp_item *it) { return it->argv ? it->argv->elements : 0; }

const char *resp_arg(const struct resp_item *it, size_t i, size_t *len)
{
    if (i >= resp_argc(it)) {
        *len = 0;
        return "";
    }
    *len = it->argv->element[i]->len;
    return it->argv->element[i]->str;
}

bool resp_arg_is(const struct resp_item *it, size_t i, const char *word)
{
    size_t n, w = strlen(word);
    const char *a = resp_arg(it, i, &n);
    return i < resp_argc(it) && n == w && w <= RESP_ARG_TEXT && strncasecmp(a, word, w) == 0;
}
