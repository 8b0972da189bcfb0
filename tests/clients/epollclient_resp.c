/* epollclient_resp.c — epollclient's response parser: the head (status, framing,
 * whether the connection may be reused), then a body by Content-Length, chunked (with
 * trailers) or to EOF, interim 1xx skipped, HEAD/204/304 bodiless; each response ends in
 * complete() or fail() (epollclient.c). */
#include "epollclient.h"

/* Length of the head (through its blank line) at p, or 0 if incomplete. */
static size_t head_end(const char *p, size_t n, size_t *scan)
{
    for (size_t i = *scan; i < n; i++) {
        if (p[i] != '\n')
            continue;
        if (i + 1 < n && p[i + 1] == '\n')
            return i + 2;
        if (i + 2 < n && p[i + 1] == '\r' && p[i + 2] == '\n')
            return i + 3;
        if (i + 2 >= n) {
            *scan = i;
            return 0;
        }
    }
    *scan = n;
    return 0;
}

static bool name_is(const char *s, size_t n, const char *name)
{
    return n == strlen(name) && strncasecmp(s, name, n) == 0;
}

static bool is_ws(char ch) { return ch == ' ' || ch == '\t'; }

/* Does the comma-separated list [v, e) contain tok (only as last, if last)? */
static bool has_token(const char *v, const char *e, const char *tok, bool last)
{
    bool found = false;
    while (v < e) {
        const char *c = memchr(v, ',', (size_t)(e - v));
        const char *te = c ? c : e;
        while (v < te && is_ws(*v))
            v++;
        const char *t = te;
        while (t > v && is_ws(t[-1]))
            t--;
        bool m = name_is(v, (size_t)(t - v), tok);
        if (m && !last)
            return true;
        if (t > v)
            found = m;
        v = c ? c + 1 : e;
    }
    return found;
}

static int hexval(char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

static bool is_digit(char ch) { return ch >= '0' && ch <= '9'; }

/* Parse a complete head of h bytes; NULL or an error.  Sets the framing. */
static const char *parse_head(struct conn *c, const char *p, size_t h)
{
    const char *end = p + h, *eol = memchr(p, '\n', h);
    size_t l = (size_t)(eol - p);
    if (l && p[l - 1] == '\r')
        l--;
    if (l < 12 || memcmp(p, "HTTP/", 5) != 0 || !is_digit(p[5]) || p[6] != '.' ||
        !is_digit(p[7]) || p[8] != ' ' || !is_digit(p[9]) || !is_digit(p[10]) ||
        !is_digit(p[11]) || (l > 12 && p[12] != ' '))
        return "malformed status line";
    bool http11 = p[5] > '1' || (p[5] == '1' && p[7] >= '1');
    int status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    bool cclose = false, ckeep = false, te = false, chunked = false, have_cl = false;
    uint64_t cl = 0;

    for (const char *q = eol + 1; q < end;) {
        const char *e = memchr(q, '\n', (size_t)(end - q)), *next = e + 1;
        const char *ve = e;
        if (ve > q && ve[-1] == '\r')
            ve--;
        if (ve == q)
            break;
        if (is_ws(*q)) {             /* obsolete line folding: ignore */
            q = next;
            continue;
        }
        const char *colon = memchr(q, ':', (size_t)(ve - q));
        if (!colon)
            return "malformed header line";
        const char *ne = colon, *v = colon + 1;
        while (ne > q && is_ws(ne[-1]))
            ne--;
        while (v < ve && is_ws(*v))
            v++;
        while (ve > v && is_ws(ve[-1]))
            ve--;
        size_t nl = (size_t)(ne - q);
        if (name_is(q, nl, "content-length")) {
            uint64_t x = 0;
            if (v == ve)
                return "invalid Content-Length";
            for (const char *d = v; d < ve; d++) {
                if (!is_digit(*d) || x > BODY_CAP)
                    return "invalid Content-Length";
                x = x * 10 + (uint64_t)(*d - '0');
            }
            if (have_cl && x != cl)
                return "conflicting Content-Length headers";
            have_cl = true;
            cl = x;
        } else if (name_is(q, nl, "transfer-encoding")) {
            te = true;
            chunked = has_token(v, ve, "chunked", true);
        } else if (name_is(q, nl, "connection")) {
            cclose |= has_token(v, ve, "close", false);
            ckeep |= has_token(v, ve, "keep-alive", false);
        }
        q = next;
    }

    if (status >= 100 && status < 200 && status != 101) {
        c->seen = true;              /* interim: the final response follows */
        return NULL;
    }
    c->status = status;
    c->reusable = http11 ? !cclose : ckeep;
    if (opt.head_req || status == 101 || status == 204 || status == 304) {
        c->ps = P_DONE;
        if (status == 101)
            c->reusable = false;
    } else if (te) {
        c->ps = chunked ? P_CSIZE : P_EOF;
    } else if (have_cl) {
        if (cl > BODY_CAP)
            return "response body exceeds 256 MiB";
        c->left = cl;
        c->ps = cl ? P_LEN : P_DONE;
    } else {
        c->ps = P_EOF;
    }
    if (c->ps == P_EOF)
        c->reusable = false;
    return NULL;
}

static bool sink(struct conn *c, const char *p, size_t n)
{
    if (c->body_n + n > BODY_CAP) {
        fail(c, "response body exceeds 256 MiB");
        return false;
    }
    c->body_n += n;
    if (outf && !buf_add(&c->body, p, n)) {
        fail(c, "out of memory");
        return false;
    }
    return true;
}

/* Consume what is buffered; may complete/fail requests and close c. */
/* A counted stretch of body (Content-Length, or a chunk's data): -1 failed, 0 more to
 * come, 1 done (the parser moves on to next). */
static int take_counted(struct conn *c, const char *p, size_t n, enum pstate next)
{
    size_t k = n < c->left ? n : (size_t)c->left;
    if (!sink(c, p, k))
        return -1;
    c->rpos += k;
    c->left -= k;
    if (c->left)
        return 0;
    c->ps = next;
    return 1;
}

void parse_response(struct conn *c)
{
    int took;
    uint32_t gen = c->gen;
    while (c->gen == gen && !stop) {
        char *p = c->r.p + c->rpos;
        size_t n = c->r.len - c->rpos, k;
        const char *nl, *err;
        switch (c->ps) {
        case P_HEAD:
            while (c->scan == 0 && n && (*p == '\r' || *p == '\n')) {
                p++, n--, c->rpos++;
            }
            k = head_end(p, n, &c->scan);
            if (!k || k > HEAD_CAP) {
                if (k || n > HEAD_CAP)
                    fail(c, "response head exceeds 1 MiB");
                goto out;
            }
            c->rpos += k;
            c->scan = 0;
            if ((err = parse_head(c, p, k)) != NULL)
                fail(c, "%s", err);
            break;
        case P_LEN:
            if ((took = take_counted(c, p, n, P_DONE)) <= 0) {
                if (took < 0)
                    return;
                goto out;
            }
            break;
        case P_EOF:                  /* completed by handle_eof() */
            if (!sink(c, p, n))
                return;
            c->rpos += n;
            goto out;
        case P_CSIZE: {
            if (!(nl = memchr(p, '\n', n))) {
                if (n > LINE_CAP)
                    fail(c, "chunk size line too long");
                goto out;
            }
            uint64_t size = 0;
            const char *d = p;
            for (; hexval(*d) >= 0; d++) {
                size = size * 16 + (uint64_t)hexval(*d);
                if (c->body_n + size > BODY_CAP) {
                    fail(c, "response body exceeds 256 MiB");
                    return;
                }
            }
            if (d == p || !(is_ws(*d) || *d == ';' || *d == '\r' || *d == '\n')) {
                fail(c, "malformed chunk size line");
                return;
            }
            c->rpos += (size_t)(nl - p) + 1;
            c->left = size;
            c->ps = size ? P_CDATA : P_CTRAIL;
            break;
        }
        case P_CDATA:
            if ((took = take_counted(c, p, n, P_CCRLF)) <= 0) {
                if (took < 0)
                    return;
                goto out;
            }
            break;
        case P_CCRLF:
            if (n == 0 || (n == 1 && *p == '\r'))
                goto out;
            k = *p == '\n' ? 1 : (*p == '\r' && p[1] == '\n') ? 2 : 0;
            if (!k) {
                fail(c, "malformed chunk terminator");
                return;
            }
            c->rpos += k;
            c->ps = P_CSIZE;
            break;
        case P_CTRAIL:               /* trailers are ignored */
            if (!(nl = memchr(p, '\n', n))) {
                if (c->trail + n > HEAD_CAP)
                    fail(c, "chunk trailers exceed 1 MiB");
                goto out;
            }
            k = (size_t)(nl - p) + 1;
            c->rpos += k;
            c->trail += k;
            if (k == 1 || (k == 2 && *p == '\r'))
                c->ps = P_DONE;
            break;
        case P_DONE:
            complete(c);
            break;
        }
    }
    return;
out:
    if (c->rpos == c->r.len) {
        c->r.len = c->rpos = 0;
    } else if (c->rpos) {
        memmove(c->r.p, c->r.p + c->rpos, c->r.len - c->rpos);
        c->r.len -= c->rpos;
        c->rpos = 0;
    }
}
