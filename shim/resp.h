/* resp.h — framing RESP (resp.c): the commands an app sends, each found whole by hiredis's
 * redisReader (the one RESP parser of the library), and the replies a server sends, RESP2
 * or RESP3, each found whole by a framer that reads only their headers (Debian's hiredis
 * 0.14 knows no RESP3); the exact bytes of each kept so that they are forwarded as they
 * came. */
#ifndef HTTPSHIM_RESP_H
#define HTTPSHIM_RESP_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "buf.h"

#define RESP_ITEM_MAX   (1u << 20)     /* bytes held for one command not yet whole */
#define RESP_HOLD_MAX   (16u << 20)    /* bytes of whole commands held, not yet sent on */
#define RESP_REPLY_MAX  (64u << 20)    /* bytes held for one server reply not yet whole */
#define RESP_ARG_TEXT   64             /* resp_arg_is compares names up to this long */

struct redisReader;
struct redisReply;

#define RESP_DEPTH_MAX  64             /* aggregates open at once in one reply */
#define RESP_LINE_MAX   (64u << 10)    /* a reply's header or simple line, CRLF included */
#define RESP_REPLY_PUSH 100            /* resp_item.type of a RESP3 push: out of band, no reply */

struct resp_stream {
    struct redisReader *reader;        /* commands only */
    struct buf raw;                    /* the bytes fed and not yet taken, as they came */
    bool commands;                     /* an app's commands (argv kept), else replies (types only) */
    size_t taken;                      /* bytes read of the item not yet whole (the reader's, or framed) */
    size_t ignored;                    /* commands: of those, what Redis ignores, stepped over before it */
    size_t max;                        /* RESP_ITEM_MAX for commands, RESP_REPLY_MAX for replies */
    size_t hold;                       /* what it may hold in all: RESP_HOLD_MAX for commands */
    /* replies: the reply not yet whole, its type byte and the aggregates open in it */
    char reply_type;
    unsigned depth;
    struct { long long left; bool attribute; } open[RESP_DEPTH_MAX];
    uint64_t part_left;                /* bytes of the reply relayed in parts still to come */
};

enum resp_next {
    RESP_MORE,                         /* nothing whole yet */
    RESP_ITEM,                         /* one item: its raw_len bytes at the front of raw */
    RESP_BAD,                          /* not RESP (or a command that is not an array of strings) */
    RESP_TOO_LARGE,                    /* an item of the stream's max or more, not yet whole */
    RESP_INLINE,                       /* commands: an inline command (not an array) comes next */
    RESP_PART,                         /* replies: a part of a bulk string over max at the top level,
                                        * its header first (whole when `last`), relayed as it comes */
};

struct resp_item {
    size_t raw_len;
    int type;                          /* REDIS_REPLY_* of the item (of the command: ARRAY; a
                                        * RESP3 reply: ERROR for an error, RESP_REPLY_PUSH, else
                                        * STATUS) */
    struct redisReply *argv;           /* commands: the array of arguments; free with resp_item_done */
    bool last;                         /* RESP_PART: the reply ends with it */
};

int resp_stream_init(struct resp_stream *s, bool commands);
void resp_stream_free(struct resp_stream *s);
/* Adds bytes; -1 when they would hold more than the stream's max beyond the items found. */
int resp_stream_feed(struct resp_stream *s, const char *p, size_t n);
enum resp_next resp_stream_next(struct resp_stream *s, struct resp_item *it);
/* Commands: after RESP_BAD, the error Redis itself answers to those bytes, in its words
 * ("Protocol error: invalid bulk length"; scratch holds one that names a byte). */
const char *resp_stream_refusal(const struct resp_stream *s, char *scratch, size_t cap);
/* The item's bytes were used: they leave raw, and its arguments are freed. */
void resp_item_done(struct resp_stream *s, struct resp_item *it);
/* Bytes held that no whole item accounts for yet. */
size_t resp_stream_pending(const struct resp_stream *s);
/* Commands: of those, the ones that may still be a command (not stepped over as ignored). */
size_t resp_stream_pending_command(const struct resp_stream *s);

/* Commands: the number of arguments, argument i (name first), and whether it is `word`
 * (ASCII case-insensitively). */
size_t resp_argc(const struct resp_item *it);
const char *resp_arg(const struct resp_item *it, size_t i, size_t *len);
bool resp_arg_is(const struct resp_item *it, size_t i, const char *word);
#endif
