/*
 * epollclient - a plain, "unchanged legacy" non-blocking HTTP/1.x client for
 * the httpshim tests and benchmarks.  It knows nothing about the shim: it is
 * the program libhttpshim.so gets LD_PRELOADed into.  Everything runs from one
 * level-triggered epoll loop: socket() + fcntl(O_NONBLOCK), connect() that may
 * succeed at once or return EINPROGRESS (then EPOLLOUT + SO_ERROR), epoll
 * registration before or after connect(), partial writes, and its own response
 * parser (Content-Length, chunked, close-delimited, interim 1xx, HEAD/204/304).
 * Every wait is an epoll_wait() bounded by the per-request timeout.
 *
 * Modes: one connection per request (default; "Connection: close", up to
 * --concurrency connections at once), --keepalive (one connection, requests in
 * turn) and --pipeline (one connection, all requests written back to back).
 * If the server ends a persistent connection cleanly (Connection: close, or an
 * HTTP/1.0 reply without keep-alive) the remaining requests go out on a new
 * connection.  Run with --help for the options.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEAD_CAP   ((size_t)1 << 20)   /* response head (and chunk trailers) */
#define BODY_CAP   ((uint64_t)256 << 20)
#define READ_CHUNK 65536
#define LINE_CAP   4096                /* chunk-size line */

enum mode { M_CLOSE, M_KEEPALIVE, M_PIPELINE };
enum cstate { C_IDLE, C_START, C_CONNECTING, C_OPEN };
enum pstate { P_HEAD, P_LEN, P_EOF, P_CSIZE, P_CDATA, P_CCRLF, P_CTRAIL, P_DONE };

struct buf { char *p; size_t len, cap; };

struct conn {
    enum cstate st;
    int fd;
    bool registered, fresh;      /* fresh: start a new clock for request cur */
    uint32_t gen, events;        /* gen: bumped on close, tags epoll events */
    long cur, last;              /* requests [cur, last) belong to this slot */
    double t_req, deadline;      /* start of request cur; when it times out */
    struct buf w; size_t woff; int werr;
    struct buf r; size_t rpos;
    /* parser state of the response to request cur */
    enum pstate ps;
    size_t scan, trail;
    uint64_t left, body_n;
    int status;
    bool reusable, seen;         /* seen: an interim 1xx already arrived */
    struct buf body;             /* kept only with --out */
};

static struct {
    const char *host, *path, *method, *body, *out, *samples;
    int port, conc, timeout_ms;
    long count, warmup;
    long inline_limit;           /* > 0: the physical limit of an in-process hit (see usage) */
    enum mode mode;
    bool http10, reg_before, print_status, latency, keep_going, head_req, unique;
} opt = { .host = "127.0.0.1", .path = "/", .method = "GET", .conc = 1,
          .timeout_ms = 10000, .count = 1 };

static struct addrinfo *ai;
static const char **hdrs;        /* --header values */
static struct buf req;           /* one request, sent as is (N times pipelined) */
static size_t req_split;         /* --unique: where the request target ends in req */
static struct conn *conns;
static int ep = -1;
static FILE *outf;
static long next_req, n_ok, n_failed, n_lat;
static double *lat;
static bool stop;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static bool buf_reserve(struct buf *b, size_t need)
{
    if (b->cap - b->len >= need)
        return true;
    size_t nc = b->cap ? b->cap : 4096;
    while (nc - b->len < need)
        nc *= 2;
    char *p = realloc(b->p, nc);
    if (!p)
        return false;
    b->p = p;
    b->cap = nc;
    return true;
}

static bool buf_add(struct buf *b, const void *d, size_t n)
{
    if (n == 0)
        return true;
    if (!buf_reserve(b, n))
        return false;
    memcpy(b->p + b->len, d, n);
    b->len += n;
    return true;
}

__attribute__((format(printf, 2, 3)))
static void buf_printf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !buf_reserve(b, (size_t)n + 1)) {
        fputs("epollclient: out of memory\n", stderr);
        exit(1);
    }
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Append request number idx (0-based) to b: req as is, or with --unique the target
   followed by "?u=idx" ("&u=idx" when it already has a query). */
static void add_req(struct buf *b, long idx)
{
    bool ok;
    if (!opt.unique) {
        ok = buf_add(b, req.p, req.len);
    } else {
        char q[32];
        int n = snprintf(q, sizeof q, "%cu=%ld", strchr(opt.path, '?') ? '&' : '?', idx);
        ok = buf_add(b, req.p, req_split) && buf_add(b, q, (size_t)n) &&
             buf_add(b, req.p + req_split, req.len - req_split);
    }
    if (!ok) {
        fputs("epollclient: out of memory\n", stderr);
        exit(1);
    }
}

/* ---- connection slots ------------------------------------------------- */

static int watch(struct conn *c, uint32_t ev)
{
    if (c->registered && c->events == ev)
        return 0;
    struct epoll_event e = { .events = ev };
    e.data.u64 = (uint64_t)c->gen << 32 | (uint32_t)(c - conns);
    if (epoll_ctl(ep, c->registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &e) < 0)
        return -1;
    c->registered = true;
    c->events = ev;
    return 0;
}

static void conn_close(struct conn *c)
{
    if (c->fd >= 0) {
        if (c->registered)
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->registered = false;
    c->gen++;
    c->w.len = c->woff = 0;
    c->werr = 0;
    c->r.len = c->rpos = 0;
}

static void resp_reset(struct conn *c)
{
    c->ps = P_HEAD;
    c->scan = c->trail = 0;
    c->left = c->body_n = 0;
    c->status = 0;
    c->reusable = c->seen = false;
    c->body.len = 0;
}

static void pump_write(struct conn *c);

/* Request c->cur is finished (done or failed, already counted): move on. */
static void next_work(struct conn *c, bool keep_conn)
{
    c->cur++;
    if (opt.mode == M_CLOSE) {
        conn_close(c);
        if (next_req < opt.count) {
            c->cur = next_req++;
            c->last = c->cur + 1;
            c->fresh = true;
            c->st = C_START;
        } else {
            c->st = C_IDLE;
        }
        return;
    }
    if (c->cur >= c->last || !keep_conn) {
        conn_close(c);
        c->st = c->cur >= c->last ? C_IDLE : C_START;
        c->fresh = opt.mode == M_KEEPALIVE;   /* pipelined ones keep their clock */
        return;
    }
    resp_reset(c);
    c->deadline = now() + opt.timeout_ms / 1e3;
    if (opt.mode == M_KEEPALIVE) {
        c->t_req = now();
        c->w.len = c->woff = 0;
        add_req(&c->w, c->cur);
        pump_write(c);
    }
}

__attribute__((format(printf, 2, 3)))
static void fail(struct conn *c, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "epollclient: request %ld: ", c->cur + 1);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    n_failed++;
    if (!opt.keep_going)
        stop = true;
    next_work(c, false);
}

static void complete(struct conn *c)
{
    double t = now();
    if (opt.print_status)
        fprintf(stderr, "%d\n", c->status);
    if (outf && c->body.len)
        fwrite(c->body.p, 1, c->body.len, outf);
    n_ok++;
    if (c->cur >= opt.warmup)
        lat[n_lat++] = (t - c->t_req) * 1e6;
    /* a broken write, or (keepalive) a reply before our request went out
       completely, leaves the connection out of step: do not reuse it */
    next_work(c, c->reusable && !c->werr &&
                 (opt.mode != M_KEEPALIVE || c->woff == c->w.len));
}

static void pump_write(struct conn *c)
{
    while (c->woff < c->w.len && !c->werr) {
        ssize_t n = write(c->fd, c->w.p + c->woff, c->w.len - c->woff);
        if (n > 0)
            c->woff += (size_t)n;
        else if (n < 0 && errno == EINTR)
            continue;
        else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        else
            c->werr = n < 0 ? errno : EPIPE;  /* keep reading: a reply may be there */
    }
    uint32_t ev = EPOLLIN;
    if (c->woff < c->w.len && !c->werr)
        ev |= EPOLLOUT;
    if (watch(c, ev) < 0)
        fail(c, "epoll_ctl: %s", strerror(errno));
}

/* --inline-limit: what an answer made inside the process cannot beat. The connection is
 * a socketpair, and this same thread, once the request is written, writes a response
 * with a body of that size into the other end and closes it: a socketpair, the two
 * writes and the client's own reads, nothing else. */
static struct buf limit_resp;

static void limit_answer(int peer)
{
    if (!limit_resp.len) {
        buf_printf(&limit_resp, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                "Server: httpshim-test-upstream\r\nX-Served: 1\r\nAge: 0\r\n"
                                "Content-Length: %ld\r\nConnection: close\r\n\r\n", opt.inline_limit);
        for (long i = 0; i < opt.inline_limit; i++)
            buf_add(&limit_resp, "a", 1);
    }
    ssize_t w = write(peer, limit_resp.p, limit_resp.len);
    (void)w;
    close(peer);
}

static void start_conn(struct conn *c)
{
    if (c->fresh)
        c->t_req = now();
    c->fresh = false;
    c->deadline = now() + opt.timeout_ms / 1e3;
    resp_reset(c);
    long n = opt.mode == M_PIPELINE ? c->last - c->cur : 1;
    for (long i = 0; i < n; i++)
        add_req(&c->w, c->cur + i);
    int peer = -1;
    if (opt.inline_limit) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) {
            fail(c, "socketpair: %s", strerror(errno));
            return;
        }
        c->fd = sv[0];
        peer = sv[1];
    } else {
        c->fd = socket(ai->ai_family, SOCK_STREAM, 0);
    }
    if (c->fd < 0) {
        fail(c, "socket: %s", strerror(errno));
        return;
    }
    int fl = fcntl(c->fd, F_GETFL);
    if (fl < 0 || fcntl(c->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        fail(c, "fcntl: %s", strerror(errno));
        return;
    }
    if (opt.reg_before && watch(c, EPOLLOUT | EPOLLIN) < 0) {
        fail(c, "epoll_ctl: %s", strerror(errno));
        return;
    }
    if (peer >= 0) {
        c->st = C_OPEN;
        pump_write(c);
        limit_answer(peer);
    } else if (connect(c->fd, ai->ai_addr, ai->ai_addrlen) == 0) {
        c->st = C_OPEN;
        pump_write(c);
    } else if (errno == EINPROGRESS || errno == EINTR) {
        c->st = C_CONNECTING;
        if (!opt.reg_before && watch(c, EPOLLOUT) < 0)
            fail(c, "epoll_ctl: %s", strerror(errno));
    } else {
        fail(c, "connect: %s", strerror(errno));
    }
}

/* ---- response parser -------------------------------------------------- */

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
static void parse(struct conn *c)
{
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
            k = n < c->left ? n : (size_t)c->left;
            if (!sink(c, p, k))
                return;
            c->rpos += k;
            c->left -= k;
            if (c->left)
                goto out;
            c->ps = P_DONE;
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
            k = n < c->left ? n : (size_t)c->left;
            if (!sink(c, p, k))
                return;
            c->rpos += k;
            c->left -= k;
            if (c->left)
                goto out;
            c->ps = P_CCRLF;
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

static void handle_eof(struct conn *c, int err)
{
    if (!err && c->ps == P_EOF) {
        complete(c);
        return;
    }
    const char *why = c->ps != P_HEAD ? "connection closed in response body"
                    : c->seen || c->rpos < c->r.len ? "connection closed in response head"
                    : "connection closed before response";
    if (err)
        fail(c, "%s (read: %s)", why, strerror(err));
    else if (c->werr)
        fail(c, "%s (write: %s)", why, strerror(c->werr));
    else
        fail(c, "%s", why);
}

static void do_read(struct conn *c)
{
    if (!buf_reserve(&c->r, READ_CHUNK)) {
        fail(c, "out of memory");
        return;
    }
    ssize_t n = read(c->fd, c->r.p + c->r.len, c->r.cap - c->r.len);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
        return;
    if (n <= 0) {
        handle_eof(c, n < 0 ? errno : 0);
        return;
    }
    c->r.len += (size_t)n;
    parse(c);
}

static void on_event(struct conn *c, uint32_t ev)
{
    uint32_t gen = c->gen;
    if (c->st == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err)
            fail(c, "connect: %s", strerror(err));
        else if (ev & EPOLLOUT) {
            c->st = C_OPEN;
            pump_write(c);
        } else if (ev & (EPOLLERR | EPOLLHUP))
            fail(c, "connect: connection failed");
        return;
    }
    if (c->st != C_OPEN)
        return;
    if (ev & EPOLLOUT)
        pump_write(c);
    if (c->gen == gen && c->st == C_OPEN && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)))
        do_read(c);
}

static const char *phase(const struct conn *c)
{
    if (c->st == C_CONNECTING)
        return "connecting";
    if (c->woff < c->w.len && !c->werr)
        return "sending request";
    if (c->ps == P_HEAD)
        return c->seen || c->rpos < c->r.len ? "reading response head"
                                             : "waiting for response";
    return "reading response body";
}

/* ---- main ------------------------------------------------------------- */

static void usage(FILE *f)
{
    fputs(
"usage: epollclient --port N [--host ADDR] [--path P] [--method M]\n"
"         [--header 'Name: value']... [--body STRING] [--count N]\n"
"         [--conn-per-request | --keepalive | --pipeline] [--http10]\n"
"         [--register before|after] [--concurrency C] [--timeout MS]\n"
"         [--out FILE|-] [--print-status] [--latency] [--warmup K]\n"
"         [--keep-going] [--unique] [--samples FILE] [--clearenv]\n"
"  --host ADDR        numeric IPv4/IPv6 address (default 127.0.0.1)\n"
"  --count N          number of requests (default 1)\n"
"  --conn-per-request new connection + 'Connection: close' per request (default)\n"
"  --keepalive        one connection, requests one after another\n"
"  --pipeline         one connection, all requests written at once\n"
"  --http10           send HTTP/1.0 requests\n"
"  --register WHEN    epoll_ctl(ADD) before or after connect() (default after)\n"
"  --concurrency C    C connections at once (--conn-per-request only)\n"
"  --timeout MS       per-request timeout (default 10000)\n"
"  --out FILE         write all response bodies to FILE ('-' = stdout)\n"
"  --print-status     print each status code on stderr\n"
"  --latency          print 'requests= ok= p50_us= p90_us= p99_us= max_us= mean_us='\n"
"  --warmup K         leave the first K requests out of the latency stats\n"
"  --keep-going       continue after failed requests (exit 1 if any failed)\n"
"  --unique           a distinct URL per request: '?u=INDEX' ('&u=' if the path\n"
"                     has a query) appended to the path of request INDEX (0-based)\n"
"  --samples FILE     write every latency measured (µs, one per line, in completion\n"
"                     order, warmup excluded) to FILE\n"
"  --clearenv         clearenv() before the first connect, as a server that scrubs\n"
"                     its workers' environment does\n"
"  --inline-limit N   no server: each connection is a socketpair whose other end this\n"
"                     thread answers (a hit-like head, an N-byte body) and closes, right\n"
"                     after the request is written; the least an in-process hit costs\n"
"exit: 0 all requests got a complete final response, 1 otherwise, 2 usage\n", f);
}

static long num_arg(const char *name, const char *s, long lo, long hi)
{
    char *e;
    errno = 0;
    long v = strtol(s, &e, 10);
    if (errno || e == s || *e || v < lo || v > hi) {
        fprintf(stderr, "epollclient: bad --%s '%s'\n", name, s);
        exit(2);
    }
    return v;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double p)
{
    if (!n_lat)
        return 0;
    long i = (long)ceil(p / 100 * (double)n_lat) - 1;
    return lat[i < 0 ? 0 : i >= n_lat ? n_lat - 1 : i];
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"host", 1, 0, 'H'}, {"port", 1, 0, 'p'}, {"path", 1, 0, 'P'},
        {"method", 1, 0, 'm'}, {"header", 1, 0, 'h'}, {"body", 1, 0, 'b'},
        {"count", 1, 0, 'n'}, {"conn-per-request", 0, 0, 'C'},
        {"keepalive", 0, 0, 'k'}, {"pipeline", 0, 0, 'l'}, {"http10", 0, 0, '0'},
        {"register", 1, 0, 'r'}, {"out", 1, 0, 'o'}, {"print-status", 0, 0, 's'},
        {"latency", 0, 0, 'L'}, {"warmup", 1, 0, 'w'}, {"keep-going", 0, 0, 'g'},
        {"concurrency", 1, 0, 'c'}, {"timeout", 1, 0, 't'}, {"help", 0, 0, 'x'},
        {"unique", 0, 0, 'u'}, {"samples", 1, 0, 'S'}, {"clearenv", 0, 0, 'E'},
        {"inline-limit", 1, 0, 'I'},
        {0, 0, 0, 0}};
    hdrs = calloc((size_t)argc, sizeof *hdrs);
    int nh = 0, ch;
    bool user_host = false, clear_env = false;
    if (!hdrs)
        return 1;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'H': opt.host = optarg; break;
        case 'p': opt.port = (int)num_arg("port", optarg, 1, 65535); break;
        case 'P': opt.path = optarg; break;
        case 'm': opt.method = optarg; break;
        case 'h':
            hdrs[nh++] = optarg;
            user_host |= strncasecmp(optarg, "host:", 5) == 0;
            break;
        case 'b': opt.body = optarg; break;
        case 'n': opt.count = num_arg("count", optarg, 1, 100000000); break;
        case 'C': opt.mode = M_CLOSE; break;
        case 'k': opt.mode = M_KEEPALIVE; break;
        case 'l': opt.mode = M_PIPELINE; break;
        case '0': opt.http10 = true; break;
        case 'r':
            if (strcmp(optarg, "before") && strcmp(optarg, "after")) {
                fprintf(stderr, "epollclient: --register must be before or after\n");
                return 2;
            }
            opt.reg_before = strcmp(optarg, "before") == 0;
            break;
        case 'o': opt.out = optarg; break;
        case 's': opt.print_status = true; break;
        case 'I': opt.inline_limit = num_arg("inline-limit", optarg, 1, 100000000); break;
        case 'L': opt.latency = true; break;
        case 'w': opt.warmup = num_arg("warmup", optarg, 0, 100000000); break;
        case 'g': opt.keep_going = true; break;
        case 'c': opt.conc = (int)num_arg("concurrency", optarg, 1, 100000); break;
        case 't': opt.timeout_ms = (int)num_arg("timeout", optarg, 1, 86400000); break;
        case 'u': opt.unique = true; break;
        case 'S': opt.samples = optarg; break;
        case 'E': clear_env = true; break;
        default:
            usage(ch == 'x' ? stdout : stderr);
            return ch == 'x' ? 0 : 2;
        }
    }
    if (optind < argc || !opt.port || (opt.conc > 1 && opt.mode != M_CLOSE)) {
        fputs(!opt.port ? "epollclient: --port is required\n"
              : optind < argc ? "epollclient: unexpected argument\n"
              : "epollclient: --concurrency > 1 needs --conn-per-request\n", stderr);
        return 2;
    }
    if (opt.conc > opt.count)
        opt.conc = (int)opt.count;
    opt.head_req = strcmp(opt.method, "HEAD") == 0;
    if (clear_env && clearenv() != 0)
        return 2;

    char port[8];
    snprintf(port, sizeof port, "%d", opt.port);
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV };
    int gai = getaddrinfo(opt.host, port, &hints, &ai);
    if (gai) {
        fprintf(stderr, "epollclient: bad --host '%s': %s\n", opt.host, gai_strerror(gai));
        return 2;
    }

    /* the request, identical for every repetition (--unique: but for the query) */
    bool v6 = strchr(opt.host, ':') != NULL;
    buf_printf(&req, "%s %s", opt.method, opt.path);
    req_split = req.len;
    buf_printf(&req, " HTTP/1.%d\r\n", opt.http10 ? 0 : 1);
    if (!user_host)
        buf_printf(&req, "Host: %s%s%s:%d\r\n", v6 ? "[" : "", opt.host, v6 ? "]" : "",
                   opt.port);
    for (int i = 0; i < nh; i++)
        buf_printf(&req, "%s\r\n", hdrs[i]);
    if (opt.mode == M_CLOSE && !opt.http10)
        buf_printf(&req, "Connection: close\r\n");
    else if (opt.mode != M_CLOSE && opt.http10)
        buf_printf(&req, "Connection: keep-alive\r\n");
    if (opt.body)
        buf_printf(&req, "Content-Length: %zu\r\n", strlen(opt.body));
    buf_printf(&req, "\r\n%s", opt.body ? opt.body : "");
    free(hdrs);

    if (opt.out) {
        outf = strcmp(opt.out, "-") == 0 ? stdout : fopen(opt.out, "wb");
        if (!outf) {
            fprintf(stderr, "epollclient: %s: %s\n", opt.out, strerror(errno));
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    lat = malloc((size_t)opt.count * sizeof *lat);
    conns = calloc((size_t)opt.conc, sizeof *conns);
    struct epoll_event *evs = calloc((size_t)opt.conc, sizeof *evs);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (!lat || !conns || !evs || ep < 0) {
        fprintf(stderr, "epollclient: setup: %s\n", strerror(errno));
        return 1;
    }
    for (int i = 0; i < opt.conc; i++) {
        struct conn *c = &conns[i];
        c->fd = -1;
        c->fresh = true;
        c->st = C_START;
        c->cur = opt.mode == M_CLOSE ? next_req++ : 0;
        c->last = opt.mode == M_CLOSE ? c->cur + 1 : opt.count;
    }

    while (!stop) {
        for (int i = 0; i < opt.conc && !stop; i++)
            while (conns[i].st == C_START && !stop)
                start_conn(&conns[i]);
        double t = now(), dl = INFINITY;
        for (int i = 0; i < opt.conc; i++)
            if (conns[i].st >= C_CONNECTING && conns[i].deadline < dl)
                dl = conns[i].deadline;
        if (stop || dl == INFINITY)
            break;
        int ms = dl <= t ? 0 : (int)ceil((dl - t) * 1e3);
        int n = epoll_wait(ep, evs, opt.conc, ms);
        if (n < 0 && errno != EINTR) {
            fprintf(stderr, "epollclient: epoll_wait: %s\n", strerror(errno));
            return 1;
        }
        for (int i = 0; i < n && !stop; i++) {
            struct conn *c = &conns[(uint32_t)evs[i].data.u64];
            if ((uint32_t)(evs[i].data.u64 >> 32) == c->gen)
                on_event(c, evs[i].events);
        }
        t = now();
        for (int i = 0; i < opt.conc && !stop; i++) {
            struct conn *c = &conns[i];
            if (c->st >= C_CONNECTING && t >= c->deadline)
                fail(c, "timed out after %d ms (%s)", opt.timeout_ms, phase(c));
        }
    }

    int rc = n_ok == opt.count ? 0 : 1;
    if (opt.keep_going && n_failed)
        fprintf(stderr, "epollclient: %ld of %ld requests failed\n", n_failed, opt.count);
    if (outf && (fflush(outf) != 0 || ferror(outf) || (outf != stdout && fclose(outf)))) {
        fprintf(stderr, "epollclient: writing %s failed\n", opt.out);
        rc = 1;
    }
    if (opt.samples) {
        FILE *sf = fopen(opt.samples, "w");
        bool bad = !sf;
        if (sf) {
            for (long i = 0; i < n_lat; i++)
                fprintf(sf, "%.0f\n", lat[i]);
            bad = ferror(sf) != 0;
            bad |= fclose(sf) != 0;
        }
        if (bad) {
            fprintf(stderr, "epollclient: writing %s failed\n", opt.samples);
            rc = 1;
        }
    }
    if (opt.latency) {
        double sum = 0;
        qsort(lat, (size_t)n_lat, sizeof *lat, cmp_double);
        for (long i = 0; i < n_lat; i++)
            sum += lat[i];
        printf("requests=%ld ok=%ld", opt.count, n_ok);
        if (opt.keep_going)
            printf(" failed=%ld", n_failed);
        printf(" p50_us=%.0f p90_us=%.0f p99_us=%.0f max_us=%.0f mean_us=%.0f\n",
               pct(50), pct(90), pct(99), n_lat ? lat[n_lat - 1] : 0,
               n_lat ? sum / (double)n_lat : 0);
        fflush(stdout);              /* the figures are final: out before exit handlers run */
    }
    for (int i = 0; i < opt.conc; i++) {
        conn_close(&conns[i]);
        free(conns[i].w.p);
        free(conns[i].r.p);
        free(conns[i].body.p);
    }
    free(conns);
    free(evs);
    free(lat);
    free(req.p);
    freeaddrinfo(ai);
    close(ep);
    return rc;
}
