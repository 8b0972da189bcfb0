/* fuzz_resp_reply.c — libFuzzer target for the framing of a server's replies (shim/resp.c's
 * reply framer, RESP2 and RESP3, read from their headers): what the proxy reads of every
 * byte a protocol = redis upstream sends back on a shared connection.
 * The input's first byte chooses chunk sizes (1 + byte % 64, cycling through the input's
 * bytes as seeds); the rest is the server's stream, fed whole to one stream and in chunks
 * to another, taking every reply as soon as it is whole.
 * Invariants (a violation aborts):
 *  - split points never matter: both streams give the same items (raw bytes and type) and
 *    end the same way (more wanted, not RESP, too large, a value in parts);
 *  - every item's raw bytes are a prefix of what was not yet taken (so the items, one
 *    after the other, are a prefix of the input), end with CRLF, and what is held but not
 *    taken is what resp_stream_pending says; asked again with nothing fed, a stream that
 *    wanted more still does;
 *  - an item's raw bytes, framed alone, give exactly that item (length and type) and then
 *    RESP_MORE; all of them but the last byte give RESP_MORE;
 *  - a reference framer written here from the grammar (recursive descent over the bytes
 *    not yet taken, not a copy of frame_reply) finds every item the same length, and ends
 *    the same way where the grammar is plain (see ref_number for where it is not);
 *  - an item's type is that of its first type byte not an attribute's: ERROR for `-` and
 *    `!`, RESP_REPLY_PUSH for `>`, else STATUS;
 *  - the bytes taken never exceed the input.
 *
 * The grammar, as the reference reads it: a line is a type byte, text, and CRLF, the first
 * LF ending it, RESP_LINE_MAX bytes at most.
 *   + - : , (     simple lines, any text
 *   _             null, no text;  # a boolean, `t` or `f`
 *   $ ! =         a length, then that many bytes and CRLF; `$-1` is a null with no bytes;
 *                 a length over RESP_REPLY_MAX is too large, but for a reply that
 *                 is that value alone (no attribute before it): the framer hands it
 *                 on in parts, its header first
 *   * ~ > % |     a count, then that many elements (`%` and `|`: that many pairs); `*-1`
 *                 is a null; at most RESP_DEPTH_MAX of them hold elements still to come
 *                 around any element
 *   |             an attribute: it annotates the element after it and is not one itself
 * anything else (streamed types included) is not RESP. */
#include "fuzz_resp.h"
#include <hiredis/hiredis.h>
#include <stdbool.h>
#include <string.h>

/* ---- the reference framer ---- */

enum ref_end { REF_WHOLE, REF_MORE, REF_BAD, REF_TOO_LARGE, REF_PARTS };

struct ref {
    const char *p;
    size_t n, at;                      /* the bytes, and how far the reply has been read */
    bool odd;                          /* read something no server writes (see ref_number) */
    char type;                         /* the reply's first type byte not an attribute's */
};

/* The line at r->at: its type byte and the text between it and the CR. */
static enum ref_end ref_line(struct ref *r, char *type, const char **text, size_t *text_len)
{
    const char *s = r->p + r->at;
    size_t left = r->n - r->at, lf = 0;
    while (lf < left && lf < RESP_LINE_MAX && s[lf] != '\n')
        lf++;
    if (lf == RESP_LINE_MAX)
        return REF_BAD;                /* the LF would make the line longer than allowed */
    if (lf == left)
        return REF_MORE;
    if (lf < 2 || s[lf - 1] != '\r')
        return REF_BAD;                /* no type byte, or a bare LF */
    for (size_t i = 1; i + 1 < lf; i++)
        if (s[i] == '\r')
            r->odd = true;             /* a bare CR inside: RESP has none, a framer may let it be */
    *type = s[0];
    *text = s + 1;
    *text_len = lf - 2;
    r->at += lf + 1;
    return REF_WHOLE;
}

/* A length or a count: decimal digits, or "-1" for a null where one is allowed. Odd, and
 * left to the framer to take or refuse: leading zeros, "-0" (taken as 0 here), a count
 * larger than any reply held whole (so when such a reply is refused is the framer's
 * business). Values saturate far above RESP_REPLY_MAX. */
static bool ref_number(struct ref *r, const char *s, size_t len, bool null_ok, long long *v)
{
    bool neg = len > 0 && s[0] == '-';
    size_t i = neg ? 1 : 0;
    if (i == len)
        return false;
    if (s[i] == '0' && len - i > 1)
        r->odd = true;
    long long x = 0;
    for (; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        x = x > 100000000000000LL ? 1000000000000000LL : x * 10 + (s[i] - '0');
    }
    if (neg && x == 0)
        r->odd = true;
    else if (neg && !(x == 1 && null_ok))
        return false;
    *v = neg ? -x : x;
    return true;
}

/* One element at r->at and the attributes before it; `open` aggregates around it still
 * wait for elements; `top`: the reply itself (its type is recorded). */
static enum ref_end ref_element(struct ref *r, unsigned open, bool top)
{
    for (bool first = true;; first = false) {   /* attributes, then the element they annotate */
        char t;
        const char *text;
        size_t len;
        long long v;
        enum ref_end e = ref_line(r, &t, &text, &len);
        if (e != REF_WHOLE)
            return e;
        if (top && t != '|')
            r->type = t;
        switch (t) {
        case '+': case '-': case ':': case ',': case '(':
            return REF_WHOLE;
        case '_':
            return len == 0 ? REF_WHOLE : REF_BAD;
        case '#':
            return len == 1 && (text[0] == 't' || text[0] == 'f') ? REF_WHOLE : REF_BAD;
        case '$': case '!': case '=':
            if (!ref_number(r, text, len, t == '$', &v))
                return REF_BAD;
            if (v < 0)
                return REF_WHOLE;
            if (v > (long long)RESP_REPLY_MAX)
                return top && first ? REF_PARTS : REF_TOO_LARGE;   /* (a reply that is a value alone: in parts) */
            if (r->n - r->at < (size_t)v + 2)
                return REF_MORE;
            if (r->p[r->at + (size_t)v] != '\r' || r->p[r->at + (size_t)v + 1] != '\n')
                return REF_BAD;
            r->at += (size_t)v + 2;
            return REF_WHOLE;
        case '*': case '~': case '>': case '%': case '|':
            if (!ref_number(r, text, len, t == '*', &v))
                return REF_BAD;
            if (v > (long long)RESP_REPLY_MAX)
                r->odd = true;
            if (t == '%' || t == '|')
                v *= 2;
            if (v > 0 && open == RESP_DEPTH_MAX)
                return REF_BAD;
            for (long long i = 0; i < v; i++)
                if ((e = ref_element(r, open + 1, false)) != REF_WHOLE)
                    return e;
            if (t == '|')
                continue;
            return REF_WHOLE;
        default:
            return REF_BAD;
        }
    }
}

static int type_of(char t)
{
    switch (t) {
    case '-': case '!':
        return REDIS_REPLY_ERROR;
    case '>':
        return RESP_REPLY_PUSH;
    default:
        return REDIS_REPLY_STATUS;
    }
}

/* The framer's item at `at` of the input, against the reference's reading of the same bytes. */
static void check_reference_item(const char *p, size_t n, size_t at, const struct resp_item *it)
{
    struct ref r = { .p = p + at, .n = n - at };
    FUZZ_CHECK(ref_element(&r, 0, true) == REF_WHOLE && r.at == it->raw_len);
    FUZZ_CHECK(it->type == type_of(r.type));
}

/* How the framer's stream ended at `at` (no item there), against the reference. */
static void check_reference_end(const char *p, size_t n, size_t at, enum resp_next end)
{
    struct ref r = { .p = p + at, .n = n - at };
    enum ref_end e = ref_element(&r, 0, true);
    if (r.odd)
        return;
    FUZZ_CHECK(e != REF_WHOLE);        /* a reply the framer missed */
    FUZZ_CHECK(e != REF_MORE || end == RESP_MORE);
    FUZZ_CHECK(e != REF_BAD || end == RESP_BAD);
    FUZZ_CHECK(e != REF_TOO_LARGE || end == RESP_BAD || end == RESP_TOO_LARGE);
    FUZZ_CHECK(end != RESP_TOO_LARGE || e == REF_TOO_LARGE);
    FUZZ_CHECK(end != RESP_PART || e == REF_PARTS);
    FUZZ_CHECK(e != REF_PARTS || end == RESP_PART || end == RESP_BAD);   /* (a length past any server's) */
}

/* ---- the framer ---- */

static void check_item(const char *raw, size_t n, const struct resp_item *it)
{
    FUZZ_CHECK(n >= 3 && raw[n - 2] == '\r' && raw[n - 1] == '\n');
    FUZZ_CHECK(it->argv == NULL);
    if (raw[0] != '|')
        FUZZ_CHECK(it->type == type_of(raw[0]));
    /* alone, the same item and nothing more */
    struct resp_stream again;
    struct resp_item one;
    FUZZ_CHECK(resp_stream_init(&again, false) == 0);
    FUZZ_CHECK(resp_stream_feed(&again, raw, n) == 0);
    FUZZ_CHECK(resp_stream_next(&again, &one) == RESP_ITEM);
    FUZZ_CHECK(one.raw_len == n && one.type == it->type);
    resp_item_done(&again, &one);
    FUZZ_CHECK(resp_stream_pending(&again) == 0);
    FUZZ_CHECK(resp_stream_next(&again, &one) == RESP_MORE);
    resp_stream_free(&again);
    /* and not whole a byte short of its end */
    FUZZ_CHECK(resp_stream_init(&again, false) == 0);
    FUZZ_CHECK(resp_stream_feed(&again, raw, n - 1) == 0);
    FUZZ_CHECK(resp_stream_next(&again, &one) == RESP_MORE);
    FUZZ_CHECK(resp_stream_pending(&again) == n - 1);
    resp_stream_free(&again);
}

/* (the walk's check: the whole walk's items also against the reference; what is compared
 * between the walks is the item's type) */
static long check_reply(const char *p, size_t n, size_t at, const char *raw, const struct resp_item *it, bool whole)
{
    check_item(raw, it->raw_len, it);
    if (whole)
        check_reference_item(p, n, at, it);
    return it->type;
}

static void check_whole_end(const char *p, size_t n, const struct fuzz_resp_seen *whole)
{
    check_reference_end(p, n, whole->taken, whole->end);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return fuzz_resp_run(false, data, size, check_reply, true, check_whole_end);
}
