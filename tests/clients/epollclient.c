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
#include "epollclient.h"

struct options opt = { .host = "127.0.0.1", .path = "/", .method = "GET", .conc = 1,
          .timeout_ms = 10000, .count = 1 };
static struct addrinfo *ai;
static const char **hdrs;        /* --header values */
static struct buf req;           /* one request, sent as is (N times pipelined) */
static size_t req_split;         /* --unique: where the request target ends in req */
static struct conn *conns;
static int ep = -1;
FILE *outf;
static long next_req, n_ok, n_failed, n_lat;
static double *lat;
bool stop;

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

bool buf_add(struct buf *b, const void *d, size_t n)
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
void fail(struct conn *c, const char *fmt, ...)
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

void complete(struct conn *c)
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
    parse_response(c);
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
