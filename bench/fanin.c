/*
 * fanin - many concurrent keep-alive clients for bench/full's fan-in scenario.
 *
 * --threads T threads (default 200) each open ONE blocking TCP connection to --host/--port,
 * wait at a barrier until all have connected (so the T connections really are open at
 * once), then take request numbers from a shared atomic counter until --requests R
 * (default 10 000) have been handed out.  Request i is
 *     GET PATH?f=i HTTP/1.1   ("&f=i" when PATH has a query)
 * so no two requests share a URL.  Each response is read whole (Content-Length framing;
 * anything else is a failure); "Connection: close" (or an HTTP/1.0 reply without
 * keep-alive) makes the thread reconnect for its next request, counted as a reconnect.
 * Every send and receive has a timeout (SO_SNDTIMEO/SO_RCVTIMEO, --timeout MS, default
 * 10000): a request that times out or errs is counted as failed, its connection dropped.
 *
 * Prints one line:
 *   requests=R ok=N failed=N reconnects=N seconds=S rps=X p50_us=N p99_us=N max_us=N
 * (seconds: from the barrier to the last response).  Exit status 0 if every request got a
 * 200 response, 1 if any failed, 2 on bad usage.
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RBUF_CAP      65536                 /* response head must fit; body streams through */
#define BODY_CAP      ((uint64_t)64 << 20)
#define REQ_CAP       4096
#define THREADS_MAX   4096
#define REQUESTS_MAX  10000000L
#define ERR_PRINT_MAX 20                    /* failure messages printed, then only counted */

static struct {
    const char *host, *path;
    int port, threads, timeout_ms;
    long requests;
} opt = { .host = "127.0.0.1", .path = "/", .threads = 200, .timeout_ms = 10000,
          .requests = 10000 };

static struct addrinfo *ai;
static pthread_barrier_t barrier;
static atomic_long next_req, n_ok, n_failed, n_reconnects;
static atomic_int n_errs_printed;
static float *lat;                          /* µs per request index; NAN = none */
static char hostport[300];

struct reader {
    int fd;
    size_t pos, len;
    char buf[RBUF_CAP];
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

__attribute__((format(printf, 2, 3)))
static void failure(long idx, const char *fmt, ...)
{
    atomic_fetch_add(&n_failed, 1);
    if (atomic_fetch_add(&n_errs_printed, 1) >= ERR_PRINT_MAX)
        return;
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "fanin: request %ld: %s\n", idx, msg);
}

static int dial(void)
{
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = { .tv_sec = opt.timeout_ms / 1000,
                          .tv_usec = (opt.timeout_ms % 1000) * 1000 };
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0 ||
        connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* More bytes into r->buf; >0 ok, 0 EOF, <0 error (errno set). */
static ssize_t fill(struct reader *r)
{
    if (r->pos && r->pos == r->len)
        r->pos = r->len = 0;
    if (r->len == RBUF_CAP && r->pos) {
        memmove(r->buf, r->buf + r->pos, r->len - r->pos);
        r->len -= r->pos;
        r->pos = 0;
    }
    if (r->len == RBUF_CAP) {
        errno = EMSGSIZE;
        return -1;
    }
    for (;;) {
        ssize_t n = recv(r->fd, r->buf + r->len, RBUF_CAP - r->len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n > 0)
            r->len += (size_t)n;
        return n;
    }
}

static bool header_is(const char *line, size_t n, const char *name)
{
    size_t l = strlen(name);
    return n > l && strncasecmp(line, name, l) == 0 && line[l] == ':';
}

static bool value_has(const char *v, size_t n, const char *tok)
{
    size_t l = strlen(tok);
    for (size_t i = 0; i + l <= n; i++)
        if (strncasecmp(v + i, tok, l) == 0)
            return true;
    return false;
}

/* Read one response; returns NULL (sets *status, *keep) or what went wrong. */
static const char *read_response(struct reader *r, int *status, bool *keep)
{
    const char *end;
    for (;;) {
        end = r->len > r->pos ? memmem(r->buf + r->pos, r->len - r->pos, "\r\n\r\n", 4) : NULL;
        if (end)
            break;
        ssize_t n = fill(r);
        if (n == 0)
            return r->len > r->pos ? "connection closed in response head"
                                   : "connection closed before response";
        if (n < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK ? "timed out waiting for response"
                 : errno == EMSGSIZE ? "response head too large" : strerror(errno);
    }
    const char *p = r->buf + r->pos, *he = end + 2;   /* he: after the last header's CRLF */
    if (he - p < 12 || strncmp(p, "HTTP/1.", 7) != 0 || p[8] != ' ')
        return "malformed status line";
    bool http11 = p[7] == '1';
    *status = atoi(p + 9);
    bool have_cl = false, cclose = false, ckeep = false, te = false;
    uint64_t cl = 0;
    const char *sl_end = memchr(p, '\n', (size_t)(he - p));   /* found: he - 1 is a '\n' */
    for (const char *l = sl_end + 1; l < he;) {
        const char *e = memchr(l, '\n', (size_t)(he - l));
        size_t n = (size_t)(e - l);
        if (n && l[n - 1] == '\r')
            n--;
        if (header_is(l, n, "content-length")) {
            const char *v = l + 15;
            while (*v == ' ' || *v == '\t')
                v++;
            char *ve;
            errno = 0;
            unsigned long long x = strtoull(v, &ve, 10);
            if (errno || ve == v || x > BODY_CAP)
                return "bad Content-Length";
            cl = x;
            have_cl = true;
        } else if (header_is(l, n, "transfer-encoding")) {
            te = true;
        } else if (header_is(l, n, "connection")) {
            cclose |= value_has(l + 11, n - 11, "close");
            ckeep |= value_has(l + 11, n - 11, "keep-alive");
        }
        l = e + 1;
    }
    if (te || !have_cl)
        return "response not framed by Content-Length";
    *keep = http11 ? !cclose : ckeep;
    r->pos = (size_t)(end + 4 - r->buf);
    while (cl) {                             /* the body: counted, not kept */
        if (r->pos == r->len) {
            ssize_t n = fill(r);
            if (n == 0)
                return "connection closed in response body";
            if (n < 0)
                return errno == EAGAIN || errno == EWOULDBLOCK ? "timed out in response body"
                                                               : strerror(errno);
        }
        size_t k = r->len - r->pos < cl ? r->len - r->pos : (size_t)cl;
        r->pos += k;
        cl -= k;
    }
    return NULL;
}

static bool send_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return false;
        p += k;
        n -= (size_t)k;
    }
    return true;
}

static void *worker(void *arg)
{
    (void)arg;
    struct reader *r = malloc(sizeof *r);
    if (!r) {
        fputs("fanin: out of memory\n", stderr);
        exit(1);
    }
    r->pos = r->len = 0;
    r->fd = dial();
    int connect_errno = r->fd < 0 ? errno : 0;
    pthread_barrier_wait(&barrier);
    if (r->fd < 0 && atomic_fetch_add(&n_errs_printed, 1) < ERR_PRINT_MAX)
        fprintf(stderr, "fanin: connect before the start: %s (retried with the first request)\n",
                strerror(connect_errno));
    char sep = strchr(opt.path, '?') ? '&' : '?';
    bool had_conn = r->fd >= 0;
    for (;;) {
        long idx = atomic_fetch_add(&next_req, 1);
        if (idx >= opt.requests)
            break;
        double t0 = now();
        if (r->fd < 0) {
            r->fd = dial();
            if (r->fd < 0) {
                failure(idx, "connect: %s", strerror(errno));
                continue;
            }
            if (had_conn)
                atomic_fetch_add(&n_reconnects, 1);
            had_conn = true;
            r->pos = r->len = 0;
        }
        char req[REQ_CAP];
        int n = snprintf(req, sizeof req, "GET %s%cf=%ld HTTP/1.1\r\nHost: %s\r\n\r\n",
                         opt.path, sep, idx, hostport);
        const char *err = NULL;
        int status = 0;
        bool keep = false;
        if (n < 0 || (size_t)n >= sizeof req)
            err = "request too long";
        else if (!send_all(r->fd, req, (size_t)n))
            err = errno == EAGAIN || errno == EWOULDBLOCK ? "timed out sending" : strerror(errno);
        else
            err = read_response(r, &status, &keep);
        if (!err && status != 200) {
            failure(idx, "status %d", status);
        } else if (err) {
            failure(idx, "%s", err);
            keep = false;
        } else {
            atomic_fetch_add(&n_ok, 1);
            lat[idx] = (float)((now() - t0) * 1e6);
        }
        if (!keep || r->pos != r->len) {     /* closed, failed, or stray bytes: new conn */
            close(r->fd);
            r->fd = -1;
        }
    }
    if (r->fd >= 0)
        close(r->fd);
    free(r);
    return NULL;
}

static long num_arg(const char *name, const char *s, long lo, long hi)
{
    char *e;
    errno = 0;
    long v = strtol(s, &e, 10);
    if (errno || e == s || *e || v < lo || v > hi) {
        fprintf(stderr, "fanin: bad --%s '%s'\n", name, s);
        exit(2);
    }
    return v;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static void usage(FILE *f)
{
    fputs("usage: fanin --port N [--host ADDR] [--threads T] [--requests R]\n"
          "             [--path PREFIX] [--timeout MS]\n"
          "  --host ADDR     numeric IPv4/IPv6 address (default 127.0.0.1)\n"
          "  --threads T     threads, one keep-alive connection each (default 200)\n"
          "  --requests R    requests in all, shared by the threads (default 10000)\n"
          "  --path PREFIX   request i asks for PREFIX?f=i (default /)\n"
          "  --timeout MS    per send/receive timeout (default 10000)\n"
          "prints: requests= ok= failed= reconnects= seconds= rps= p50_us= p99_us= max_us=\n"
          "exit: 0 every request got a 200, 1 otherwise, 2 usage\n", f);
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"host", 1, 0, 'H'}, {"port", 1, 0, 'p'}, {"threads", 1, 0, 'T'},
        {"requests", 1, 0, 'n'}, {"path", 1, 0, 'P'}, {"timeout", 1, 0, 't'},
        {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'H': opt.host = optarg; break;
        case 'p': opt.port = (int)num_arg("port", optarg, 1, 65535); break;
        case 'T': opt.threads = (int)num_arg("threads", optarg, 1, THREADS_MAX); break;
        case 'n': opt.requests = num_arg("requests", optarg, 1, REQUESTS_MAX); break;
        case 'P': opt.path = optarg; break;
        case 't': opt.timeout_ms = (int)num_arg("timeout", optarg, 1, 3600000); break;
        default:
            usage(ch == 'h' ? stdout : stderr);
            return ch == 'h' ? 0 : 2;
        }
    }
    if (optind < argc || !opt.port || opt.path[0] != '/' || strlen(opt.path) > REQ_CAP / 2) {
        usage(stderr);
        return 2;
    }
    char port[8];
    snprintf(port, sizeof port, "%d", opt.port);
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV };
    int gai = getaddrinfo(opt.host, port, &hints, &ai);
    if (gai) {
        fprintf(stderr, "fanin: bad --host '%s': %s\n", opt.host, gai_strerror(gai));
        return 2;
    }
    bool v6 = strchr(opt.host, ':') != NULL;
    snprintf(hostport, sizeof hostport, "%s%s%s:%d", v6 ? "[" : "", opt.host, v6 ? "]" : "",
             opt.port);
    signal(SIGPIPE, SIG_IGN);

    lat = malloc((size_t)opt.requests * sizeof *lat);
    pthread_t *th = calloc((size_t)opt.threads, sizeof *th);
    if (!lat || !th) {
        fputs("fanin: out of memory\n", stderr);
        return 1;
    }
    for (long i = 0; i < opt.requests; i++)
        lat[i] = NAN;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    if (pthread_barrier_init(&barrier, NULL, (unsigned)opt.threads + 1) != 0) {
        fputs("fanin: pthread_barrier_init failed\n", stderr);
        return 1;
    }
    for (int i = 0; i < opt.threads; i++) {
        int e = pthread_create(&th[i], &attr, worker, NULL);
        if (e) {
            fprintf(stderr, "fanin: pthread_create: %s\n", strerror(e));
            exit(1);                         /* the barrier would never open */
        }
    }
    pthread_barrier_wait(&barrier);
    double t0 = now();
    for (int i = 0; i < opt.threads; i++)
        pthread_join(th[i], NULL);
    double secs = now() - t0;

    long nl = 0;
    for (long i = 0; i < opt.requests; i++)
        if (!isnan(lat[i]))
            lat[nl++] = lat[i];
    qsort(lat, (size_t)nl, sizeof *lat, cmp_float);
#define PCT(p) (nl ? (double)lat[(long)ceil((p) / 100.0 * (double)nl) - 1] : 0.0)
    long ok = atomic_load(&n_ok), failed = atomic_load(&n_failed);
    printf("requests=%ld ok=%ld failed=%ld reconnects=%ld seconds=%.3f rps=%.0f "
           "p50_us=%.0f p99_us=%.0f max_us=%.0f\n", opt.requests, ok, failed,
           atomic_load(&n_reconnects), secs, secs > 0 ? (double)ok / secs : 0.0,
           PCT(50), PCT(99), nl ? (double)lat[nl - 1] : 0.0);
    fflush(stdout);                          /* out before the exit handlers run */
    pthread_attr_destroy(&attr);
    pthread_barrier_destroy(&barrier);
    free(th);
    free(lat);
    freeaddrinfo(ai);
    return ok == opt.requests && failed == 0 ? 0 : 1;
}
