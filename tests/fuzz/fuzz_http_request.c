/* fuzz_http_request.c — libFuzzer target for http_parse_request() and
 * http_looks_like_request() (shim/http.c).
 *
 * The input is a byte stream as a client would send it. It is parsed whole, then every
 * prefix input[0..k) is parsed as if only k bytes had arrived (every k when the input is at
 * most 512 bytes, else 64 evenly spaced k plus the ends). Each parse gets its own exactly
 * sized heap copy, so ASan reports any read past the bytes the parser was given.
 * Invariants (a violation aborts):
 *  - the result is DONE, INCOMPLETE or ERROR; the empty input is INCOMPLETE;
 *  - on DONE: head_len <= len, the head ends with CRLF CRLF, nheaders <= HTTP_MAX_HEADERS,
 *    minor_version is 0 or 1, content_length >= -1 (and at most 18 digits), chunked and a
 *    Content-Length never both, HTTP/1.1 has a Host, Expect only counts on HTTP/1.1; the
 *    method, the target and every header name and value lie inside [buf, buf+head_len);
 *    the method starts the buffer and is all tchar, names are tchar, values carry no CTL
 *    and no leading or trailing SP/HTAB;
 *  - streaming consistency: if the whole input is DONE with head_len H, every prefix
 *    shorter than H is INCOMPLETE (never ERROR) and every prefix of at least H bytes is DONE
 *    with the same fields (as offsets); if the whole input is not DONE, no prefix is DONE;
 *    a prefix that is ERROR means the whole input is ERROR (more bytes never repair it);
 *  - http_looks_like_request() is true for every prefix of an input it accepts, and true
 *    whenever the parser does not say ERROR;
 *  - http_read_target_leniently() gives slices inside the buffer, and reads the method and
 *    target the parser reads of every head it accepts. */
#include "../../shim/http.h"
#include "fuzz.h"
#include <string.h>

#define ALL_SPLITS_MAX 512
#define SAMPLED_SPLITS 64

/* A parse, its fields as offsets into the buffer so parses of different copies compare. */
struct outcome {
    enum http_parse_result rc;
    struct http_request req;
};

static bool same_slice_at(struct http_slice a, struct http_slice b) { return a.p == b.p && a.n == b.n; }

static int is_tchar(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')
        || (c && strchr("!#$%&'*+-.^_`|~", c));
}

static size_t off(const char *buf, struct http_slice s)
{
    return (size_t)((uintptr_t)s.p - (uintptr_t)buf);
}

static void check_slice(const char *buf, size_t head_len, struct http_slice s)
{
    FUZZ_CHECK(s.p != NULL);
    FUZZ_CHECK(fuzz_inside(buf, head_len, s.p, s.n));
}

static void check_done(const char *buf, size_t len, const struct http_request *r)
{
    FUZZ_CHECK(r->head_len >= 4 && r->head_len <= len);
    FUZZ_CHECK(memcmp(buf + r->head_len - 4, "\r\n\r\n", 4) == 0);
    FUZZ_CHECK(r->nheaders <= HTTP_MAX_HEADERS);
    FUZZ_CHECK(r->minor_version == 0 || r->minor_version == 1);
    FUZZ_CHECK(r->content_length >= -1 && r->content_length <= 999999999999999999LL);
    FUZZ_CHECK(!(r->chunked && r->content_length >= 0));
    FUZZ_CHECK(r->minor_version == 0 || r->has_host);
    FUZZ_CHECK(!r->expect_continue || r->minor_version == 1);

    check_slice(buf, r->head_len, r->method);
    FUZZ_CHECK(r->method.p == buf && r->method.n > 0);
    for (size_t i = 0; i < r->method.n; i++)
        FUZZ_CHECK(is_tchar((unsigned char)r->method.p[i]));
    check_slice(buf, r->head_len, r->target);
    FUZZ_CHECK(r->target.n > 0);
    for (size_t i = 0; i < r->target.n; i++) {
        unsigned char c = (unsigned char)r->target.p[i];
        FUZZ_CHECK(c > 0x20 && c != 0x7f);
    }
    size_t prev_end = off(buf, r->target) + r->target.n;
    for (size_t i = 0; i < r->nheaders; i++) {
        const struct http_header *h = &r->headers[i];
        check_slice(buf, r->head_len, h->name);
        check_slice(buf, r->head_len, h->value);
        FUZZ_CHECK(h->name.n > 0);
        FUZZ_CHECK(off(buf, h->name) > prev_end);          /* in order, no overlap */
        FUZZ_CHECK(off(buf, h->value) >= off(buf, h->name) + h->name.n + 1);
        for (size_t k = 0; k < h->name.n; k++)
            FUZZ_CHECK(is_tchar((unsigned char)h->name.p[k]));
        for (size_t k = 0; k < h->value.n; k++) {
            unsigned char c = (unsigned char)h->value.p[k];
            FUZZ_CHECK(c >= 0x20 || c == '\t');
            FUZZ_CHECK(c != 0x7f);
        }
        if (h->value.n) {
            FUZZ_CHECK(h->value.p[0] != ' ' && h->value.p[0] != '\t');
            FUZZ_CHECK(h->value.p[h->value.n - 1] != ' ' && h->value.p[h->value.n - 1] != '\t');
        }
        prev_end = off(buf, h->value) + h->value.n;
        /* the helpers the engine applies to every header must stay inside it too */
        (void)http_is_hop_by_hop(h->name);
        (void)http_list_has_token(h->value, "close");
        (void)http_slice_ieq(h->name, "content-length");
    }
    FUZZ_CHECK(prev_end + 4 <= r->head_len);
    (void)http_method_is(r, "HEAD");
    const char *line = http_connection_line(r->minor_version, r->keep_alive);
    FUZZ_CHECK(line != NULL);
}

static struct http_request lenient, strict;   /* static: ~3 KB each */

/* http_read_target_leniently(): what it gives lies inside the buffer (a method of tchar, a
 * target without SP, at most one Host), and it reads every request the parser accepts,
 * as the parser does. */
static void check_lenient(const char *buf, size_t len)
{
    bool ok = http_read_target_leniently(buf, len, &lenient);
    if (ok) {
        FUZZ_CHECK(lenient.method.p == buf && lenient.method.n > 0 && lenient.method.n < len);
        for (size_t i = 0; i < lenient.method.n; i++)
            FUZZ_CHECK(is_tchar((unsigned char)buf[i]));
        FUZZ_CHECK(lenient.target.n > 0 && lenient.target.p > buf && lenient.target.p + lenient.target.n <= buf + len);
        FUZZ_CHECK(!memchr(lenient.target.p, ' ', lenient.target.n));
        FUZZ_CHECK(lenient.nheaders == (lenient.has_host ? 1u : 0u));
        if (lenient.has_host)
            FUZZ_CHECK(lenient.headers[0].value.p >= buf && lenient.headers[0].value.p + lenient.headers[0].value.n
                       <= buf + len);
    }
    if (http_parse_request(buf, len, &strict) == HTTP_PARSE_DONE) {
        FUZZ_CHECK(ok);
        FUZZ_CHECK(same_slice_at(lenient.method, strict.method) && same_slice_at(lenient.target, strict.target));
    }
}

/* Parses data[0..len) from its own exactly sized heap copy. */
static void parse_copy(const uint8_t *data, size_t len, struct outcome *o, bool *looks)
{
    char *buf = malloc(len ? len : 1);
    if (!buf)
        abort();
    if (len)
        memcpy(buf, data, len);
    *looks = http_looks_like_request(buf, len);
    check_lenient(buf, len);
    o->rc = http_parse_request(buf, len, &o->req);
    FUZZ_CHECK(o->rc == HTTP_PARSE_DONE || o->rc == HTTP_PARSE_INCOMPLETE || o->rc == HTTP_PARSE_ERROR);
    if (o->rc != HTTP_PARSE_ERROR)
        FUZZ_CHECK(*looks);
    if (o->rc == HTTP_PARSE_DONE) {
        check_done(buf, len, &o->req);
        /* keep offsets only: the copy is freed below */
        struct http_request *r = &o->req;
        r->method.p = (const char *)(uintptr_t)off(buf, r->method);
        r->target.p = (const char *)(uintptr_t)off(buf, r->target);
        for (size_t i = 0; i < r->nheaders; i++) {
            r->headers[i].name.p = (const char *)(uintptr_t)off(buf, r->headers[i].name);
            r->headers[i].value.p = (const char *)(uintptr_t)off(buf, r->headers[i].value);
        }
    }
    free(buf);
}

static bool same_slice(struct http_slice a, struct http_slice b) { return a.p == b.p && a.n == b.n; }

static void check_same_head(const struct http_request *a, const struct http_request *b)
{
    FUZZ_CHECK(a->head_len == b->head_len);
    FUZZ_CHECK(same_slice(a->method, b->method) && same_slice(a->target, b->target));
    FUZZ_CHECK(a->minor_version == b->minor_version && a->content_length == b->content_length);
    FUZZ_CHECK(a->chunked == b->chunked && a->keep_alive == b->keep_alive);
    FUZZ_CHECK(a->expect_continue == b->expect_continue && a->upgrade == b->upgrade);
    FUZZ_CHECK(a->has_host == b->has_host && a->nheaders == b->nheaders);
    for (size_t i = 0; i < a->nheaders; i++) {
        FUZZ_CHECK(same_slice(a->headers[i].name, b->headers[i].name));
        FUZZ_CHECK(same_slice(a->headers[i].value, b->headers[i].value));
    }
}

static struct outcome whole, part;   /* static: struct http_request is ~3 KB */

static void check_prefix(const uint8_t *data, size_t k, bool whole_looks)
{
    bool looks;
    parse_copy(data, k, &part, &looks);
    if (whole_looks)
        FUZZ_CHECK(looks);
    if (k == 0)
        FUZZ_CHECK(part.rc == HTTP_PARSE_INCOMPLETE);
    if (part.rc == HTTP_PARSE_ERROR)
        FUZZ_CHECK(whole.rc == HTTP_PARSE_ERROR);
    if (whole.rc != HTTP_PARSE_DONE) {
        FUZZ_CHECK(part.rc != HTTP_PARSE_DONE);
        return;
    }
    if (k < whole.req.head_len) {
        FUZZ_CHECK(part.rc == HTTP_PARSE_INCOMPLETE);
    } else {
        FUZZ_CHECK(part.rc == HTTP_PARSE_DONE);
        check_same_head(&whole.req, &part.req);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    bool whole_looks;
    parse_copy(data, size, &whole, &whole_looks);
    if (size <= ALL_SPLITS_MAX) {
        for (size_t k = 0; k < size; k++)
            check_prefix(data, k, whole_looks);
    } else {
        for (size_t i = 0; i <= SAMPLED_SPLITS; i++)
            check_prefix(data, (size_t)((unsigned long long)size * i / (SAMPLED_SPLITS + 1)), whole_looks);
        check_prefix(data, size - 1, whole_looks);
        if (whole.rc == HTTP_PARSE_DONE) {         /* both sides of the head's end */
            check_prefix(data, whole.req.head_len - 1, whole_looks);
            check_prefix(data, whole.req.head_len, whole_looks);
        }
    }
    return 0;
}
