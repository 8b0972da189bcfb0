/* http.c — the HTTP/1.x request parser: request line, header fields, framing
 * (Content-Length, chunked), connection semantics; and the pieces of a response head the
 * upstream path judges: status line, header lines, framing. Strict by design: ambiguous framing
 * (CL + TE, conflicting CLs, obs-fold, bare LF) is an error, which makes the engine relay
 * the bytes untouched instead of guessing. No allocation, no copies, no locale. */
#include "http.h"
#include <string.h>
#include <strings.h>

static const unsigned char tchar_table[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1,
    ['+'] = 1, ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1, ['~'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1, ['7'] = 1,
    ['8'] = 1, ['9'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1, ['G'] = 1, ['H'] = 1,
    ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1, ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1,
    ['Q'] = 1, ['R'] = 1, ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1,
    ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1, ['g'] = 1, ['h'] = 1,
    ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1, ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1,
    ['q'] = 1, ['r'] = 1, ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1,
    ['y'] = 1, ['z'] = 1,
};

static inline bool is_tchar(unsigned char c) { return tchar_table[c] != 0; }
static inline bool is_vchar(unsigned char c) { return c > 0x20 && c != 0x7f; }
static inline char lower(char c) { return (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c; }

bool http_slice_ieq(struct http_slice s, const char *lit)
{
    size_t n = strlen(lit);
    if (s.n != n)
        return false;
    for (size_t i = 0; i < n; i++)
        if (lower(s.p[i]) != lower(lit[i]))
            return false;
    return true;
}

bool http_method_is(const struct http_request *req, const char *m)
{
    size_t n = strlen(m);
    return req->method.n == n && memcmp(req->method.p, m, n) == 0;
}

bool http_absolute_target(struct http_slice target, struct http_slice *scheme, struct http_slice *authority,
                          struct http_slice *rest)
{
    const char *t = target.p, *end = t + target.n;
    const char *sep = target.n && *t != '/' ? memmem(t, target.n, "://", 3) : NULL;
    if (!sep)
        return false;                  /* origin-, asterisk- or authority-form */
    const char *a = sep + 3, *stop = a;
    while (stop < end && *stop != '/' && *stop != '?' && *stop != '#')
        stop++;                        /* (RFC 3986 3.2: the authority ends at the first of them) */
    *scheme = (struct http_slice){ t, (size_t)(sep - t) };
    *authority = (struct http_slice){ a, (size_t)(stop - a) };
    *rest = (struct http_slice){ stop, (size_t)(end - stop) };
    return true;
}

bool http_list_has_token(struct http_slice v, const char *token)
{
    size_t i = 0;
    while (i < v.n) {
        while (i < v.n && (v.p[i] == ' ' || v.p[i] == '\t' || v.p[i] == ','))
            i++;
        size_t start = i;
        while (i < v.n && v.p[i] != ',')
            i++;
        size_t end = i;
        while (end > start && (v.p[end - 1] == ' ' || v.p[end - 1] == '\t'))
            end--;
        struct http_slice item = { v.p + start, end - start };
        if (item.n && http_slice_ieq(item, token))
            return true;
    }
    return false;
}

/* Proxy-Authorization and Proxy-Authenticate are not among them: the shim is invisible,
 * so the upstream is the hop the app addressed, and when that is a forward proxy they are
 * its credentials and its challenge. */
bool http_is_hop_by_hop(struct http_slice name)
{
    static const char *const hop[] = {
        "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection",
    };
    for (size_t i = 0; i < sizeof hop / sizeof hop[0]; i++)
        if (http_slice_ieq(name, hop[i]))
            return true;
    return false;
}

/* A Connection value that names a field beyond the hop-by-hop ones the shim drops anyway
 * (Apache's "Connection: Upgrade" with its Upgrade offer is common, and harmless). */
bool http_connection_names_fields(struct http_slice value)
{
    for (size_t i = 0; i < value.n;) {
        while (i < value.n && (value.p[i] == ' ' || value.p[i] == '\t' || value.p[i] == ','))
            i++;
        size_t start = i;
        while (i < value.n && value.p[i] != ',')
            i++;
        struct http_slice token = { value.p + start, i - start };
        while (token.n && (token.p[token.n - 1] == ' ' || token.p[token.n - 1] == '\t'))
            token.n--;
        if (token.n && !http_is_hop_by_hop(token) && !http_slice_ieq(token, "close"))
            return true;
    }
    return false;
}

bool http_looks_like_request(const char *buf, size_t len)
{
    size_t i = 0;
    for (; i < len && i < 32; i++) {
        unsigned char c = (unsigned char)buf[i];
        if (c == ' ')
            return i > 0;
        if (!is_tchar(c))
            return false;
    }
    return i < 32;                     /* still reading a plausible method */
}

/* Finds the end of the line starting at `pos`; requires CRLF. Returns the index of
 * '\r', or (size_t)-1 for incomplete, (size_t)-2 for a bare LF or stray CR. */
static size_t line_end(const char *buf, size_t len, size_t pos)
{
    const char *cr = memchr(buf + pos, '\r', len - pos);
    const char *lf = memchr(buf + pos, '\n', cr ? (size_t)(cr - (buf + pos)) : len - pos);
    if (lf)
        return (size_t)-2;
    if (!cr)
        return (size_t)-1;
    size_t at = (size_t)(cr - buf);
    if (at + 1 >= len)
        return (size_t)-1;
    return buf[at + 1] == '\n' ? at : (size_t)-2;
}

static bool parse_content_length(struct http_slice v, int64_t *out)
{
    if (v.n == 0 || v.n > 18)
        return false;
    int64_t n = 0;
    for (size_t i = 0; i < v.n; i++) {
        if (v.p[i] < '0' || v.p[i] > '9')
            return false;
        n = n * 10 + (v.p[i] - '0');
    }
    *out = n;
    return true;
}

static enum http_parse_result parse_request_line(const char *buf, size_t eol, struct http_request *req)
{
    size_t i = 0;
    while (i < eol && is_tchar((unsigned char)buf[i]))
        i++;
    if (i == 0 || i >= eol || buf[i] != ' ')
        return HTTP_PARSE_ERROR;
    req->method = (struct http_slice){ buf, i };
    size_t t = ++i;
    while (i < eol && is_vchar((unsigned char)buf[i]))
        i++;
    if (i == t || i >= eol || buf[i] != ' ')
        return HTTP_PARSE_ERROR;
    req->target = (struct http_slice){ buf + t, i - t };
    i++;
    if (eol - i != 8 || memcmp(buf + i, "HTTP/1.", 7) != 0)
        return HTTP_PARSE_ERROR;
    char minor = buf[i + 7];
    if (minor != '0' && minor != '1')
        return HTTP_PARSE_ERROR;
    req->minor_version = minor - '0';
    return HTTP_PARSE_DONE;
}

enum http_parse_result http_parse_request(const char *buf, size_t len, struct http_request *req)
{
    if (!http_looks_like_request(buf, len))
        return HTTP_PARSE_ERROR;
    size_t eol = line_end(buf, len, 0);
    if (eol == (size_t)-1)
        return HTTP_PARSE_INCOMPLETE;
    if (eol == (size_t)-2)
        return HTTP_PARSE_ERROR;
    memset(req, 0, offsetof(struct http_request, headers));
    req->content_length = -1;
    if (parse_request_line(buf, eol, req) != HTTP_PARSE_DONE)
        return HTTP_PARSE_ERROR;

    bool conn_close = false, conn_keep_alive = false, seen_te = false;
    size_t pos = eol + 2;
    for (;;) {
        eol = line_end(buf, len, pos);
        if (eol == (size_t)-1)
            return HTTP_PARSE_INCOMPLETE;
        if (eol == (size_t)-2)
            return HTTP_PARSE_ERROR;
        if (eol == pos) {              /* blank line: end of head */
            req->head_len = pos + 2;
            break;
        }
        if (req->nheaders == HTTP_MAX_HEADERS)
            return HTTP_PARSE_ERROR;
        size_t i = pos;
        while (i < eol && is_tchar((unsigned char)buf[i]))
            i++;
        if (i == pos || i >= eol || buf[i] != ':')
            return HTTP_PARSE_ERROR;   /* also rejects obs-fold (leading SP/HTAB) */
        struct http_header *h = &req->headers[req->nheaders++];
        h->name = (struct http_slice){ buf + pos, i - pos };
        i++;
        while (i < eol && (buf[i] == ' ' || buf[i] == '\t'))
            i++;
        size_t vend = eol;
        while (vend > i && (buf[vend - 1] == ' ' || buf[vend - 1] == '\t'))
            vend--;
        for (size_t k = i; k < vend; k++) {
            unsigned char c = (unsigned char)buf[k];
            if ((c < 0x20 && c != '\t') || c == 0x7f)
                return HTTP_PARSE_ERROR;
        }
        h->value = (struct http_slice){ buf + i, vend - i };
        pos = eol + 2;

        if (http_slice_ieq(h->name, "content-length")) {
            int64_t cl;
            if (!parse_content_length(h->value, &cl))
                return HTTP_PARSE_ERROR;
            if (req->content_length >= 0 && req->content_length != cl)
                return HTTP_PARSE_ERROR;
            req->content_length = cl;
        } else if (http_slice_ieq(h->name, "transfer-encoding")) {
            if (seen_te || !http_slice_ieq(h->value, "chunked"))
                return HTTP_PARSE_ERROR;
            seen_te = true;
            req->chunked = true;
        } else if (http_slice_ieq(h->name, "connection")) {
            conn_close |= http_list_has_token(h->value, "close");
            conn_keep_alive |= http_list_has_token(h->value, "keep-alive");
            req->upgrade |= http_list_has_token(h->value, "upgrade");
        } else if (http_slice_ieq(h->name, "upgrade")) {
            req->upgrade = true;
        } else if (http_slice_ieq(h->name, "expect")) {
            if (!http_slice_ieq(h->value, "100-continue"))
                return HTTP_PARSE_ERROR;
            req->expect_continue = req->minor_version >= 1;
        } else if (http_slice_ieq(h->name, "host")) {
            if (req->has_host)
                return HTTP_PARSE_ERROR;
            req->has_host = true;
        }
    }
    if (req->chunked && req->content_length >= 0)
        return HTTP_PARSE_ERROR;       /* request smuggling shape: let the upstream judge */
    if (req->minor_version == 1 && !req->has_host)
        return HTTP_PARSE_ERROR;
    req->keep_alive = req->minor_version >= 1 ? !conn_close : (conn_keep_alive && !conn_close);
    return HTTP_PARSE_DONE;
}

bool http_read_target_leniently(const char *buf, size_t len, struct http_request *req)
{
    memset(req, 0, offsetof(struct http_request, headers));
    req->content_length = -1;
    const char *lf = memchr(buf, '\n', len);
    if (!lf)
        return false;
    size_t eol = (size_t)(lf - buf);
    if (eol && buf[eol - 1] == '\r')
        eol--;
    size_t i = 0;
    while (i < eol && is_tchar((unsigned char)buf[i]))
        i++;
    if (!i || i >= eol || buf[i] != ' ')
        return false;
    req->method = (struct http_slice){ buf, i };
    size_t t = ++i;
    while (i < eol && buf[i] != ' ')
        i++;
    if (i == t)
        return false;
    req->target = (struct http_slice){ buf + t, i - t };
    req->minor_version = 1;
    /* the first Host line, however its lines end (a bare LF, a space before the colon) */
    for (size_t pos = (size_t)(lf - buf) + 1; pos < len;) {
        const char *next = memchr(buf + pos, '\n', len - pos);
        size_t end = next ? (size_t)(next - buf) : len, stop = end;
        if (stop > pos && buf[stop - 1] == '\r')
            stop--;
        if (stop == pos)
            break;                     /* the blank line: no Host */
        if (stop - pos > 5 && !strncasecmp(buf + pos, "host", 4) && (buf[pos + 4] == ':' || buf[pos + 4] == ' ')) {
            size_t v = pos + 4;
            while (v < stop && (buf[v] == ' ' || buf[v] == '\t'))
                v++;
            if (v < stop && buf[v] == ':') {
                v++;
                while (v < stop && (buf[v] == ' ' || buf[v] == '\t'))
                    v++;
                size_t ve = stop;
                while (ve > v && (buf[ve - 1] == ' ' || buf[ve - 1] == '\t'))
                    ve--;
                req->headers[0] = (struct http_header){ { buf + pos, 4 }, { buf + v, ve - v } };
                req->nheaders = 1;
                req->has_host = true;
                break;
            }
        }
        if (!next)
            break;
        pos = end + 1;
    }
    return true;
}

const char *http_connection_line(int minor, bool keep_alive)
{
    if (minor >= 1)
        return keep_alive ? "" : "Connection: close\r\n";
    return keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n";
}

/* ---- responses ---- */

bool http_parse_status_line(const char *line, size_t len, int *status, struct http_slice *reason)
{
    if (len < 12 || memcmp(line, "HTTP/1.", 7) || (line[7] != '0' && line[7] != '1') || line[8] != ' ')
        return false;
    int code = 0;
    for (int i = 9; i < 12; i++) {
        if (line[i] < '0' || line[i] > '9')
            return false;
        code = code * 10 + (line[i] - '0');
    }
    if (code < 100 || (len > 12 && line[12] != ' '))
        return false;
    size_t from = len > 12 ? 13 : 12;
    while (from < len && line[from] == ' ')
        from++;
    *status = code;
    *reason = (struct http_slice){ line + from, len - from };
    return true;
}

bool http_split_header_line(const char *line, size_t len, struct http_slice *name, struct http_slice *value)
{
    const char *colon = memchr(line, ':', len), *name_end = colon;
    /* white space before the colon: a server must refuse it in a request, a proxy remove it
     * from a response (RFC 9112 5.1); only responses come here */
    while (name_end && name_end > line && (name_end[-1] == ' ' || name_end[-1] == '\t'))
        name_end--;
    if (!colon || name_end == line)
        return false;
    for (const char *c = line; c < name_end; c++)
        if (!is_tchar((unsigned char)*c))
            return false;
    const char *v = colon + 1, *end = line + len;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    *name = (struct http_slice){ line, (size_t)(name_end - line) };
    *value = (struct http_slice){ v, (size_t)(end - v) };
    return true;
}

void http_framing_init(struct http_framing *f)
{
    f->content_length = -1;
    f->chunked = f->has_te = f->conflict = false;
}

/* Every element of a Content-Length list must be the same valid number ("5, 5" is 5). */
static void take_content_length(struct http_framing *f, struct http_slice v)
{
    size_t i = 0;
    bool any = false;
    while (i <= v.n) {
        size_t start = i;
        while (i < v.n && v.p[i] != ',')
            i++;
        struct http_slice item = { v.p + start, i - start };
        while (item.n && (item.p[0] == ' ' || item.p[0] == '\t')) {
            item.p++;
            item.n--;
        }
        while (item.n && (item.p[item.n - 1] == ' ' || item.p[item.n - 1] == '\t'))
            item.n--;
        int64_t n;
        if (!parse_content_length(item, &n) || (f->content_length >= 0 && n != f->content_length)) {
            f->conflict = true;
            return;
        }
        f->content_length = n;
        any = true;
        i++;
    }
    if (!any)
        f->conflict = true;
}

bool http_framing_header(struct http_framing *f, struct http_slice name, struct http_slice value)
{
    if (http_slice_ieq(name, "content-length")) {
        take_content_length(f, value);
        return true;
    }
    if (!http_slice_ieq(name, "transfer-encoding"))
        return false;
    /* only a single "chunked" is relayable: another coding would reach the app unlabelled
     * (Transfer-Encoding is hop-by-hop), and a repeated one is a framing attack */
    if (f->has_te || !http_slice_ieq(value, "chunked"))
        f->conflict = true;
    f->has_te = true;
    f->chunked = !f->conflict;
    return true;
}

enum http_framing_verdict http_framing_verdict(const struct http_framing *f)
{
    if (f->conflict)
        return HTTP_FRAMING_BROKEN;
    if (f->chunked && f->content_length >= 0)
        return HTTP_FRAMING_UNSTORABLE;
    return HTTP_FRAMING_OK;
}
