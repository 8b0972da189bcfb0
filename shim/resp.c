/* resp.c — owns framing RESP for the Redis protocol proxy: the app's commands (arrays of
 * bulk strings, with their arguments for the proxy to read), found whole by hiredis's
 * redisReader, and the exact bytes of each, kept alongside the reader's own copy (the
 * reader compacts its buffer as it goes, so the bytes of an item are counted, not pointed
 * at); and the server's replies (any RESP2 or RESP3 item, only its type), found whole by
 * reading their headers and stepping over their contents, resumed where the last bytes
 * ended, with no object built (Debian's hiredis 0.14 knows no RESP3 type). Bounded: a
 * command not yet whole may hold RESP_ITEM_MAX bytes, a reply RESP_REPLY_MAX (a command
 * larger than the shim frames can still go direct, a reply on a shared connection cannot:
 * a value alone larger than that, as large as Redis allows, is handed on in parts). Between commands, what
 * Redis itself ignores (empty lines, empty arrays) is stepped over, and an inline command
 * is told apart, for the session to send direct. */
#include "resp.h"
#include <hiredis/hiredis.h>
#include <limits.h>
#include <stdio.h>
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
    s->ignored = 0;
    s->max = commands ? RESP_ITEM_MAX : RESP_REPLY_MAX;
    s->hold = commands ? RESP_HOLD_MAX : s->max + 64 * 1024;
    s->raw = (struct buf){ .cap = s->hold + s->max };
    s->reply_type = 0;
    s->depth = 0;
    s->part_left = 0;
    s->reader = NULL;
    if (!commands)
        return 0;                      /* framed here, no reader */
    s->reader = redisReaderCreate();
    if (!s->reader)
        return -1;
    {
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
size_t resp_stream_pending(const struct resp_stream *s)
{
    return s->commands ? unparsed(s) + s->taken : buf_len(&s->raw);
}

size_t resp_stream_pending_command(const struct resp_stream *s)
{
    return resp_stream_pending(s) - s->ignored;
}

int resp_stream_feed(struct resp_stream *s, const char *p, size_t n)
{
    if (resp_stream_pending(s) + n > s->hold || buf_append(&s->raw, p, n) != 0)
        return -1;
    if (s->commands && redisReaderFeed(s->reader, p, n) != REDIS_OK) {
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

/* ---- replies ---- */

static enum resp_next more_or_large(const struct resp_stream *s)
{
    return buf_len(&s->raw) >= s->max ? RESP_TOO_LARGE : RESP_MORE;
}

/* The decimal between a header's type byte and its CR, within [lo, hi]. */
static bool header_number(const char *p, size_t n, long long lo, long long hi, long long *out)
{
    if (n == 0 || n > 20)
        return false;
    bool neg = p[0] == '-';
    size_t i = neg ? 1 : 0;
    if (i == n)
        return false;
    long long v = 0;
    for (; i < n; i++) {
        if (p[i] < '0' || p[i] > '9' || v > (hi + 9) / 10)
            return false;
        v = v * 10 + (p[i] - '0');
    }
    v = neg ? -v : v;
    if (v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

static int reply_type_of(char t)
{
    return t == '-' || t == '!' ? REDIS_REPLY_ERROR : t == '>' ? RESP_REPLY_PUSH : REDIS_REPLY_STATUS;
}

/* One header at s->taken and what it opens or ends. An attribute (`|`) annotates the
 * element after it and is not one itself: it leaves its parent's count alone, and a
 * reply that starts with one is whole only with the element it annotates. */
static enum resp_next frame_reply(struct resp_stream *s, struct resp_item *it)
{
    size_t have = buf_len(&s->raw);
    if (s->part_left) {                /* (taken is 0 here: each part is taken whole) */
        if (!have)
            return RESP_MORE;
        s->taken = have < s->part_left ? have : (size_t)s->part_left;
        s->part_left -= s->taken;
        it->raw_len = s->taken;
        it->last = !s->part_left;
        it->type = reply_type_of(s->reply_type);
        if (it->last)
            s->reply_type = 0;
        return RESP_PART;
    }
    if (s->taken >= have)
        return more_or_large(s);       /* (and a stream never fed has no buffer yet) */
    const char *base = buf_head(&s->raw);
    while (s->taken < have) {         /* (each turn takes 3 bytes at least, or returns) */
        const char *p = base + s->taken;
        size_t avail = have - s->taken;
        const char *nl = memchr(p, '\n', avail < RESP_LINE_MAX ? avail : RESP_LINE_MAX);
        if (!nl)
            return avail >= RESP_LINE_MAX ? RESP_BAD : more_or_large(s);
        size_t line = (size_t)(nl - p) + 1;
        if (line < 3 || nl[-1] != '\r')
            return RESP_BAD;
        const char *num = p + 1;
        size_t num_len = line - 3;
        char t = p[0];
        size_t step = line;
        long long n = 0;
        bool opens = false, attribute = t == '|';
        switch (t) {
        case '+': case '-': case ':': case ',': case '(':
            break;
        case '_':
            if (num_len)
                return RESP_BAD;
            break;
        case '#':
            if (num_len != 1 || (num[0] != 't' && num[0] != 'f'))
                return RESP_BAD;
            break;
        case '$': case '!': case '=':
            if (!header_number(num, num_len, t == '$' ? -1 : 0, 1LL << 40, &n))
                return RESP_BAD;
            if (n > (long long)s->max && (s->depth || s->taken))
                return RESP_TOO_LARGE;     /* never held whole */
            if (n > (long long)s->max) {   /* a value alone: relayed in parts, never held whole */
                s->taken = line;
                s->part_left = (uint64_t)n + 2;
                s->reply_type = t;
                it->raw_len = line;
                it->type = reply_type_of(t);
                return RESP_PART;
            }
            if (n >= 0) {
                if (avail < line + (size_t)n + 2)
                    return more_or_large(s);
                if (p[line + (size_t)n] != '\r' || p[line + (size_t)n + 1] != '\n')
                    return RESP_BAD;
                step = line + (size_t)n + 2;
            }
            break;
        case '*': case '~': case '>': case '%': case '|':
            if (!header_number(num, num_len, t == '*' ? -1 : 0, 1LL << 40, &n))
                return RESP_BAD;
            if (t == '%' || t == '|')
                n *= 2;
            opens = n > 0;
            break;
        default:
            return RESP_BAD;           /* (streamed types too: no server sends them) */
        }
        if (opens && s->depth == RESP_DEPTH_MAX)
            return RESP_BAD;           /* (before anything moves: asked again, the same answer) */
        if (s->depth == 0 && !attribute)
            s->reply_type = t;
        s->taken += step;
        if (opens) {
            s->open[s->depth].left = n;
            s->open[s->depth].attribute = attribute;
            s->depth++;
            continue;
        }
        /* an element is whole: so is each aggregate it was the last of */
        bool ended_attribute = attribute;
        while (!ended_attribute && s->depth > 0 && --s->open[s->depth - 1].left == 0) {
            s->depth--;
            ended_attribute = s->open[s->depth].attribute;
        }
        if (s->depth == 0 && !ended_attribute) {
            it->raw_len = s->taken;
            it->type = reply_type_of(s->reply_type);
            s->reply_type = 0;
            return RESP_ITEM;
        }
    }
    return more_or_large(s);
}

/* Between commands, what Redis reads and ignores: an empty line (`\r\n`, `\n`) and an
 * array of no elements (`*0`, `*-1`). Stepped over (and counted into the next command's
 * bytes, which the server ignores in turn when they are forwarded). RESP_ITEM: nothing
 * (more) to step over; RESP_MORE: not known yet; RESP_INLINE: an inline command is next. */
static enum resp_next skip_ignored(struct resp_stream *s)
{
    for (;;) {
        const char *p = s->reader->buf + s->reader->pos;
        size_t n = unparsed(s), skip = 0;
        if (n == 0)
            return RESP_MORE;
        if (p[0] == '\n')
            skip = 1;
        else if (p[0] == '\r')
            skip = n < 2 ? 0 : p[1] == '\n' ? 2 : (size_t)-1;
        else if (p[0] == '*') {
            const char *cr = memchr(p, '\r', n < 24 ? n : 24);
            long long v;
            if (!cr)
                return n < 24 ? RESP_MORE : RESP_ITEM;
            if ((size_t)(cr - p) + 1 >= n)
                return RESP_MORE;
            if (cr[1] != '\n' || !header_number(p + 1, (size_t)(cr - p) - 1, -1000000000LL, 0, &v))
                return RESP_ITEM;      /* a command (or what the reader will refuse) */
            skip = (size_t)(cr - p) + 2;
        } else {
            return RESP_INLINE;
        }
        if (skip == 0)
            return RESP_MORE;
        if (skip == (size_t)-1)
            return RESP_INLINE;        /* a line that starts with a bare CR: inline text */
        s->reader->pos += skip;
        s->taken += skip;
        s->ignored += skip;
    }
}

/* Whether the reader waits on a bulk string longer than a command the shim holds: it
 * stands on that bulk's length, its `$` taken (hiredis parses a bulk only once it is
 * whole). Such a command goes direct at once, where the server's own limits answer it
 * (its protocol error for a length past proto-max-bulk-len), not after a megabyte came. */
static bool waits_on_a_long_bulk(const struct resp_stream *s)
{
    const char *p = s->reader->buf + s->reader->pos;
    size_t n = unparsed(s);
    if (n && p[0] == '$')
        p++, n--;
    else if (s->reader->pos == 0 || p[-1] != '$')
        return false;
    const char *cr = memchr(p, '\r', n < 24 ? n : 24);
    long long len;   /* (a CR not followed by LF ends no line for the reader: its error comes later, whole) */
    return cr && cr + 1 < p + n && cr[1] == '\n' && header_number(p, (size_t)(cr - p), -1, 1LL << 62, &len)
           && len > (long long)s->max;
}

/* An array header promising more arguments than a command the shim holds can have: such a
 * command is larger than it frames (and goes direct, the server's limits judging it). */
static bool more_args_than_held(const struct resp_stream *s)
{
    const char *p = s->reader->buf + s->reader->pos;
    size_t n = unparsed(s);
    const char *cr = n && p[0] == '*' ? memchr(p, '\r', n < 24 ? n : 24) : NULL;
    long long v;
    return cr && header_number(p + 1, (size_t)(cr - p) - 1, RESP_ARGS_MAX + 1LL, 1LL << 62, &v);
}

/* A length as Redis reads one (util.c's string2ll): no sign but a leading '-', no leading
 * zero, no space, at most 20 characters. */
static bool redis_number(const char *p, size_t n, long long *out)
{
    if (n == 0 || n > 20)
        return false;
    if (n == 1 && p[0] == '0') {
        *out = 0;
        return true;
    }
    bool neg = p[0] == '-';
    size_t i = neg ? 1 : 0;
    if (i == n || p[i] < '1' || p[i] > '9')
        return false;
    unsigned long long v = 0;
    for (; i < n; i++) {
        if (p[i] < '0' || p[i] > '9' || v > (ULLONG_MAX - 9) / 10)
            return false;
        v = v * 10 + (unsigned)(p[i] - '0');
    }
    if (v > (unsigned long long)LLONG_MAX)
        return false;
    *out = neg ? -(long long)v : (long long)v;
    return true;
}

#define REDIS_INLINE_MAX   (64u << 10)           /* a header line Redis waits for */
#define REDIS_BULK_MAX     (512LL << 20)         /* proto-max-bulk-len's default */

const char *resp_stream_refusal(const struct resp_stream *s, char *scratch, size_t cap)
{
    const char *p = buf_head(&s->raw);
    size_t n = buf_len(&s->raw), i = 0;
    long long count = 0, len;
    while (i < n && count <= 0) {      /* what Redis steps over: empty lines, empty arrays */
        const char *cr = memchr(p + i, '\r', n - i);
        if (p[i] == '\n' || (p[i] == '\r' && i + 1 < n && p[i + 1] == '\n')) {
            i += p[i] == '\n' ? 1 : 2;
            continue;
        }
        if (p[i] != '*' || !cr)
            return !cr && n - i > REDIS_INLINE_MAX ? "Protocol error: too big mbulk count string" : "Protocol error";
        if (!redis_number(p + i + 1, (size_t)(cr - p) - i - 1, &count) || count > INT_MAX)
            return "Protocol error: invalid multibulk length";
        i = (size_t)(cr - p) + 2;
    }
    for (; count > 0 && i < n; count--) {
        const char *cr = memchr(p + i, '\r', n - i);
        if (!cr)
            return n - i > REDIS_INLINE_MAX ? "Protocol error: too big bulk count string" : "Protocol error";
        if (p[i] != '$') {
            char got = p[i] == '\n' || p[i] == '\r' ? ' ' : p[i];   /* (Redis writes no line break into an error) */
            snprintf(scratch, cap, "Protocol error: expected '$', got '%c'", got);
            return scratch;
        }
        if (!redis_number(p + i + 1, (size_t)(cr - p) - i - 1, &len) || len < 0 || len > REDIS_BULK_MAX)
            return "Protocol error: invalid bulk length";
        i = (size_t)(cr - p) + 2 + (size_t)len + 2;
    }
    return "Protocol error";
}

enum resp_next resp_stream_next(struct resp_stream *s, struct resp_item *it)
{
    *it = (struct resp_item){ 0 };
    if (!s->commands)
        return frame_reply(s, it);
    if (unparsed(s) == 0)
        return RESP_MORE;
    if (s->reader->ridx == -1) {       /* (between items: the reader is inside none) */
        enum resp_next at = skip_ignored(s);
        if (at != RESP_ITEM)
            return at == RESP_MORE && resp_stream_pending(s) >= s->max ? RESP_TOO_LARGE : at;
        if (more_args_than_held(s))
            return RESP_TOO_LARGE;
    }
    /* the reader keeps what it has parsed of an item across calls: its bytes are counted
     * from where the last whole item ended */
    size_t before = unparsed(s);
    void *reply = NULL;
    if (redisReaderGetReply(s->reader, &reply) != REDIS_OK)
        return RESP_BAD;
    s->taken += before - unparsed(s);
    if (!reply)
        return resp_stream_pending(s) >= s->max || waits_on_a_long_bulk(s) ? RESP_TOO_LARGE : RESP_MORE;
    it->raw_len = s->taken;
    s->taken = 0;
    s->ignored = 0;
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
    if (!s->commands)
        s->taken -= it->raw_len < s->taken ? it->raw_len : s->taken;   /* framed from the next one on */
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
