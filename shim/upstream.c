/* upstream.c — owns the upstream side: one libcurl multi handle driven by the engine's
 * loop (CURLMOPT_SOCKETFUNCTION / TIMERFUNCTION, one loop timer), which keeps the pool of
 * kept-alive upstream connections and ages idle ones out; and the shim's own FIFO queue per
 * upstream in front of it, which hands libcurl a transfer only when the upstream has a
 * connection slot under pool_max_per_host, oldest waiter first, and fails a waiter that
 * has waited pool_queue_timeout. Connections the app's own connects made come from pool.c.
 * Builds each upstream request from the app's (hop-by-hop headers dropped, libcurl's own
 * additions suppressed, pinned to the address the app connected to), and frames the
 * response back for the app's HTTP version, pausing libcurl when the app reads slowly.
 * It sees the app's connection only as the struct app_side the engine hands it, and
 * tells what it learns of a response to the cache only through the sink it was given
 * (upstream.h): no cache code here. */
#include "upstream.h"
#include "clock.h"
#include "pool.h"
#include "tls_front.h"
#include "log.h"
#include "loop.h"
#include "real.h"
#include "stats.h"
#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum body_mode { BODY_NONE, BODY_RAW, BODY_CHUNKED };

static int format_addr(char *out, size_t n, const union shim_sockaddr *a, uint16_t *port);

/* Debian's (and OpenSSL's default) directory of hashed system CA certificates */
#define SYSTEM_CA_PATH "/etc/ssl/certs"

struct transfer {
    CURL *easy;
    struct app_side *app;
    struct curl_slist *headers, *connect_to;
    struct buf head;                /* the response head, rewritten for the app */
    int status;
    struct http_framing framing;    /* what the head's framing headers say */
    int64_t content_length;         /* -1 when the upstream sent none, or chunked */
    bool upstream_chunked;
    bool head_done, head_sent, paused, send_paused, must_close, connected;
    enum body_mode mode;
    /* the cache's watcher of the response (store.c), ended once with sink_end */
    struct upstream_sink *sink;
    enum sink_end sink_end;
    bool absorbed;                  /* a 304 the sink asked for: nothing relayed */
    /* the app went away while the sink still wants the response: the fetch goes on for it,
     * with the app's side replaced by one of its own */
    bool detached;
    struct app_side own;
    /* a TLS probe (CONNECT_ONLY): whoever asked hears about the upstream's session */
    upstream_tls_probe_fn probe_done;
    void *probe_arg;
    bool is_probe;
    struct tls_check check;
    /* an intercepted connection's leg: held to what the app's verdict approved (a
     * reference); refused when the upstream presented anything else */
    struct tls_pin *pin;
    bool pin_refused;
    char own_tls_host[256];         /* own.tls_host, kept here: the app's may go first */
    char check_name[256];
    char check_where[INET6_ADDRSTRLEN + 8];
    /* the pool queue */
    bool admitted;                  /* handed to libcurl: holds one of the upstream's slots */
    int64_t queued_us;              /* when it started to wait (0: never waited) */
    struct transfer *qnext, *qprev; /* while waiting, in arrival order */
};

/* Per upstream: the slots in use and the requests waiting for one, oldest first. A FIFO of
 * our own because libcurl's pending list does not promise its order (a waiter could watch
 * newer requests go ahead); libcurl's own per-host cap stays as a backstop. */
struct pool_queue {
    unsigned in_use;
    struct transfer *head, *tail;
    struct loop_timer timeout;      /* the oldest waiter's pool_queue_timeout */
    bool pump;                      /* a slot came free: admit waiters after this event */
};
static struct pool_queue queues[RULES_MAX_UPSTREAMS];
static unsigned in_use_total;
static unsigned peak_now, peak_before;  /* in use at most, this second and the one before */
static struct loop_timer peak_timer;


struct curl_sock { struct loop_source src; struct loop_deferred reclaim; };

static const struct shim_config *cfg;

static CURLM *multi;
static struct loop_timer curl_timer;
static void limit_idle(void);
static CURLM *orphaned_multi;       /* a forked child's copy of the parent's: never used */
static char scratch[HEAD_MAX + 512];

/* ---- libcurl <-> epoll ---- */

static void reclaim_sock(struct loop_deferred *d)
{
    free((char *)d - offsetof(struct curl_sock, reclaim));
}

static void on_socket(struct loop_source *src, uint32_t events)
{
    int flags = ((events & EPOLLIN) ? CURL_CSELECT_IN : 0) | ((events & EPOLLOUT) ? CURL_CSELECT_OUT : 0)
              | ((events & (EPOLLERR | EPOLLHUP)) ? CURL_CSELECT_ERR : 0);
    int running;
    curl_multi_socket_action(multi, src->fd, flags, &running);
}

static int on_curl_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    (void)easy;
    (void)userp;
    struct curl_sock *cs = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (cs) {
            loop_remove(&cs->src);
            curl_multi_assign(multi, s, NULL);
            loop_defer(&cs->reclaim, reclaim_sock);
        }
        return 0;
    }
    uint32_t events = ((what & CURL_POLL_IN) ? EPOLLIN : 0) | ((what & CURL_POLL_OUT) ? EPOLLOUT : 0);
    if (!cs) {
        cs = calloc(1, sizeof *cs);
        if (!cs)
            return -1;
        if (loop_add(&cs->src, s, events, on_socket) != 0) {
            free(cs);
            return -1;
        }
        curl_multi_assign(multi, s, cs);
    } else {
        loop_watch(&cs->src, events);
    }
    return 0;
}

static void on_curl_timeout(struct loop_timer *timer)
{
    (void)timer;
    int running;
    curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
}

static int on_curl_timer(CURLM *m, long timeout_ms, void *userp)
{
    (void)m;
    (void)userp;
    if (timeout_ms < 0) {
        loop_timer_cancel(&curl_timer);
        return 0;
    }
    return loop_timer_arm(&curl_timer, timeout_ms, on_curl_timeout);
}

static curl_socket_t open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *addr)
{
    struct transfer *t = clientp;
    (void)purpose;
    /* the app's own connections reach the address it dialled, not another origin */
    int fd = cfg->upstreams[t->app->upstream].origin_https || t->is_probe
             ? -1 : pool_take_offered(t->app->upstream, &addr->addr);
    if (fd >= 0) {
        /* libcurl will connect() the socket it is given; this one is connected already,
         * so the connect hook answers 0 for it (marking it CURL_SOCKOPT_ALREADY_CONNECTED
         * failed the transfer with libcurl 7.88's multi interface here) */
        struct fd_entry *e = fdtable_slot(fd);
        if (e) {
            e->upstream = t->app->upstream;
            atomic_store(&e->connected_already, 1);
        }
        STAT_INC(t->app->upstream, upstream_conns_opened);
        STAT_INC(t->app->upstream, pool_open);
        return fd;
    }
    fd = real_socket(addr->family, addr->socktype | SOCK_CLOEXEC, addr->protocol);
    if (fd < 0)
        return CURL_SOCKET_BAD;
    fdtable_mark_engine(fd);
    struct fd_entry *e = fdtable_slot(fd);
    if (e)
        e->upstream = t->app->upstream;   /* which gauge the close decrements */
    STAT_INC(t->app->upstream, upstream_conns_opened);
    STAT_INC(t->app->upstream, pool_open);
    return fd;
}

/* libcurl may close a pooled socket long after the transfer that opened it is gone:
 * the upstream comes from the fd table, never from clientp. */
static int close_socket(void *clientp, curl_socket_t fd)
{
    (void)clientp;
    const struct fd_entry *e = fdtable_slot(fd);
    if (e && atomic_load(&e->kind) == FD_ENGINE)
        STAT_DEC(e->upstream, pool_open);
    return fdtable_close_engine_fd(fd);
}

/* The transfer has its connection (new or reused) and is about to send. */
/* libcurl's last word before the request goes out, on a new or a reused connection: the
 * leg of an intercepted connection carries it only to the upstream the app approved. */
static bool pin_holds(struct transfer *t)
{
    struct curl_tlssessioninfo *tls = NULL;
    return curl_easy_getinfo(t->easy, CURLINFO_TLS_SSL_PTR, &tls) == CURLE_OK && tls
           && tls->backend == CURLSSLBACKEND_OPENSSL && tls_front_pin_holds(t->pin, tls->internals);
}

static int on_prereq(void *clientp, char *conn_primary_ip, char *conn_local_ip, int conn_primary_port,
                     int conn_local_port)
{
    struct transfer *t = clientp;
    (void)conn_primary_ip;
    (void)conn_local_ip;
    (void)conn_primary_port;
    (void)conn_local_port;
    if (t->pin && !pin_holds(t)) {
        t->pin_refused = true;
        return CURL_PREREQFUNC_ABORT;
    }
    if (!t->connected) {
        t->connected = true;
        STAT_INC(t->app->upstream, in_flight_connected);
    }
    return CURL_PREREQFUNC_OK;
}

int upstream_init(const struct shim_config *config)
{
    cfg = config;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return -1;
    multi = curl_multi_init();
    if (!multi)
        return -1;
    curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
    curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
    curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)cfg->pool_max_per_host);   /* backstop */
    limit_idle();
    return 0;
}

void upstream_forget(void)
{
    orphaned_multi = multi;
    multi = NULL;
    curl_timer.slot = 0;
    memset(queues, 0, sizeof queues);   /* the waiters were the parent's */
    in_use_total = peak_now = peak_before = 0;
    peak_timer.slot = 0;
    pool_forget();
}

/* ---- response framing ---- */

static size_t on_header(char *p, size_t size, size_t n, void *userdata)
{
    struct transfer *t = userdata;
    struct app_side *c = t->app;
    size_t len = size * n;
    if (t->head_done)
        return len;                    /* trailers: not relayed */
    size_t l = len;
    while (l && (p[l - 1] == '\r' || p[l - 1] == '\n'))
        l--;
    if (len >= 5 && !memcmp(p, "HTTP/", 5)) {
        struct http_slice reason;
        if (!http_parse_status_line(p, l, &t->status, &reason))
            return 0;                  /* not a status line we can relay: fail the exchange */
        http_framing_init(&t->framing);
        t->head.start = t->head.end = 0;
        if (t->sink && t->status / 100 != 1)
            t->sink->ops->begin(t->sink, t->status, reason);
        int k = reason.n ? snprintf(scratch, sizeof scratch, "HTTP/1.%d %03d %.*s\r\n", c->req_minor, t->status,
                                    (int)reason.n, reason.p)
                         : snprintf(scratch, sizeof scratch, "HTTP/1.%d %03d\r\n", c->req_minor, t->status);
        return (k > 0 && (size_t)k < sizeof scratch && buf_append(&t->head, scratch, (size_t)k) == 0) ? len : 0;
    }
    if (l == 0) {                      /* end of a head */
        if (t->status / 100 == 1) {
            t->status = 0;             /* interim response: libcurl handles it */
            return len;
        }
        enum http_framing_verdict framing = http_framing_verdict(&t->framing);
        t->upstream_chunked = t->framing.chunked;
        t->content_length = t->framing.chunked ? -1 : t->framing.content_length;
        enum sink_verdict verdict = t->sink ? t->sink->ops->head_done(t->sink, t->content_length, t->upstream_chunked,
                                                                      framing)
                                            : SINK_RELAY;
        if (verdict == SINK_ABSORB) {
            t->absorbed = true;        /* the cache's validators matched: relay nothing */
            t->mode = BODY_NONE;
            t->head_done = true;
            return len;
        }
        if (verdict == SINK_FAIL) {
            shim_debug("fd %d: upstream answered %d: the stale entry is served instead", c->fd, t->status);
            return 0;                  /* fail it here: nothing has reached the app */
        }
        if (framing == HTTP_FRAMING_BROKEN) {
            /* lengths that disagree, or a coding we cannot relay: where the body ends is a
             * guess, and a guess must not reach the app or the cache (RFC 9112 6.3) */
            shim_debug("fd %d: upstream response framing is ambiguous: exchange failed", c->fd);
            return 0;
        }
        bool no_body = c->req_is_head || t->status == 204 || t->status == 304;
        bool keep = c->req_keep_alive;
        char extra[160];
        size_t e = 0;
        if (no_body) {
            t->mode = BODY_NONE;
            if (t->content_length >= 0)
                e += (size_t)snprintf(extra + e, sizeof extra - e, "Content-Length: %lld\r\n", (long long)t->content_length);
        } else if (t->content_length >= 0 && !t->upstream_chunked) {
            t->mode = BODY_RAW;
            e += (size_t)snprintf(extra + e, sizeof extra - e, "Content-Length: %lld\r\n", (long long)t->content_length);
        } else if (c->req_minor >= 1) {
            t->mode = BODY_CHUNKED;
            e += (size_t)snprintf(extra + e, sizeof extra - e, "Transfer-Encoding: chunked\r\n");
        } else {
            t->mode = BODY_RAW;        /* an HTTP/1.0 app: the close delimits the body */
            keep = false;
        }
        if (c->req_minor >= 1 && !keep)
            e += (size_t)snprintf(extra + e, sizeof extra - e, "Connection: close\r\n");
        else if (c->req_minor == 0)
            e += (size_t)snprintf(extra + e, sizeof extra - e, keep ? "Connection: keep-alive\r\n" : "Connection: close\r\n");
        e += (size_t)snprintf(extra + e, sizeof extra - e, "\r\n");
        t->must_close = !keep;
        t->head_done = true;
        return buf_append(&t->head, extra, e) == 0 ? len : 0;
    }
    if (!t->status)
        return 0;
    struct http_slice name, value;
    if (!http_split_header_line(p, l, &name, &value))
        return 0;
    if (http_framing_header(&t->framing, name, value))
        return len;                    /* re-emitted once framing is decided */
    if (http_is_hop_by_hop(name))
        return len;
    if (t->sink && t->status / 100 != 1)
        t->sink->ops->header(t->sink, name, value, (struct http_slice){ p, l });
    if (buf_append(&t->head, p, l) != 0 || buf_append(&t->head, "\r\n", 2) != 0)
        return 0;                      /* response head over RESP_HEAD_MAX */
    return len;
}

static int send_head(struct transfer *t)
{
    if (t->head_sent)
        return 0;
    if (buf_append(&t->app->out, buf_head(&t->head), buf_len(&t->head)) != 0)
        return -1;
    t->head_sent = true;
    buf_free(&t->head);
    return 0;
}

static bool sink_wants(struct transfer *t)
{
    return t->sink && t->sink->ops->wanted(t->sink);
}

static size_t on_body(char *p, size_t size, size_t n, void *userdata)
{
    struct transfer *t = userdata;
    struct app_side *c = t->app;
    size_t len = size * n;
    if (!t->head_done)
        return 0;
    if (c->app_gone || t->detached) {  /* only the cache (and the flight's waiters) want it */
        if (!sink_wants(t))
            return 0;
        t->sink->ops->body(t->sink, p, len);
        return sink_wants(t) ? len : 0;
    }
    if (t->mode == BODY_NONE || len == 0)
        return len;
    size_t need = len + (t->mode == BODY_CHUNKED ? 32 : 0) + (t->head_sent ? 0 : buf_len(&t->head));
    if (buf_len(&c->out) && buf_len(&c->out) + need > OUT_SOFT) {
        t->paused = true;
        return CURL_WRITEFUNC_PAUSE;
    }
    if (buf_make_room(&c->out, need) < need || send_head(t) != 0)
        return 0;
    if (t->mode == BODY_CHUNKED) {
        char hdr[24];
        int k = snprintf(hdr, sizeof hdr, "%zx\r\n", len);
        buf_append(&c->out, hdr, (size_t)k);
    }
    buf_append(&c->out, p, len);
    if (t->mode == BODY_CHUNKED)
        buf_append(&c->out, "\r\n", 2);
    /* the sink first: a response it completes is stored (and on its way to Redis) before
     * the app has its last byte, so even an app that leaves by _exit() at once has shared it */
    if (t->sink)
        t->sink->ops->body(t->sink, p, len);
    if (c->ops->flush(c) != 0)
        return 0;
    c->ops->rewatch(c);                 /* whatever the app has not taken yet needs EPOLLOUT */
    return len;
}

/* ---- requests ---- */

/* Streams a large request body from the app's buffer; pauses when it runs dry. */
static size_t on_read(char *dst, size_t size, size_t n, void *userdata)
{
    struct transfer *t = userdata;
    struct app_side *c = t->app;
    size_t max = size * n, avail = buf_len(&c->in);
    if (avail > c->body_left)
        avail = (size_t)c->body_left;
    if (avail > max)
        avail = max;
    if (c->body_left == 0)
        return 0;
    if (avail == 0) {
        if (c->app_eof)
            return CURL_READFUNC_ABORT;
        t->send_paused = true;
        return CURL_READFUNC_PAUSE;
    }
    memcpy(dst, buf_head(&c->in), avail);
    buf_consume(&c->in, avail);
    c->body_left -= avail;
    c->ops->rewatch(c);
    return avail;
}

static void apply_pause(struct transfer *t)
{
    curl_easy_pause(t->easy, (t->paused ? CURLPAUSE_RECV : 0) | (t->send_paused ? CURLPAUSE_SEND : 0));
}

void upstream_body_arrived(struct transfer *t)
{
    if (t && t->send_paused) {
        t->send_paused = false;
        apply_pause(t);
    }
}

static int add_header(struct transfer *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int add_header(struct transfer *t, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(scratch, sizeof scratch, fmt, ap);
    va_end(ap);
    if (k < 0 || (size_t)k >= sizeof scratch)
        return -1;
    struct curl_slist *l = curl_slist_append(t->headers, scratch);
    if (!l)
        return -1;
    t->headers = l;
    return 0;
}

static bool named_in_connection(const struct http_request *req, struct http_slice name)
{
    for (size_t i = 0; i < req->nheaders; i++)
        if (http_slice_ieq(req->headers[i].name, "connection")) {
            char tok[64];
            if (name.n >= sizeof tok)
                return false;
            memcpy(tok, name.p, name.n);
            tok[name.n] = 0;
            if (http_list_has_token(req->headers[i].value, tok))
                return true;
        }
    return false;
}

void upstream_dialled_text(const union shim_sockaddr *a, char *out, size_t n)
{
    char ip[INET6_ADDRSTRLEN + 2];
    uint16_t port;
    format_addr(ip, sizeof ip, a, &port);
    snprintf(out, n, "%s:%u", ip, port);
}

static int format_addr(char *out, size_t n, const union shim_sockaddr *a, uint16_t *port)
{
    char ip[INET6_ADDRSTRLEN];
    if (a->sa.sa_family == AF_INET) {
        inet_ntop(AF_INET, &a->in.sin_addr, ip, sizeof ip);
        *port = ntohs(a->in.sin_port);
        return snprintf(out, n, "%s", ip);
    }
    if (IN6_IS_ADDR_V4MAPPED(&a->in6.sin6_addr))
        inet_ntop(AF_INET, a->in6.sin6_addr.s6_addr + 12, ip, sizeof ip);
    else
        inet_ntop(AF_INET6, &a->in6.sin6_addr, ip, sizeof ip);
    *port = ntohs(a->in6.sin6_port);
    return snprintf(out, n, strchr(ip, ':') ? "[%s]" : "%s", ip);
}

/* libcurl's full verification (peer and host name), against the system store plus the
 * rule's tls_ca_file */
static void verify_tls(CURL *e, const struct upstream_rule *u)
{
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    if (u->tls_ca_file[0]) {
        curl_easy_setopt(e, CURLOPT_CAINFO, u->tls_ca_file);
        curl_easy_setopt(e, CURLOPT_CAPATH, SYSTEM_CA_PATH);
    }
}

/* The transfer's URL (scheme://host:port/), and with pin, the address libcurl connects to
 * for it: the one the app dialled. */
static int aim(struct transfer *t, const char *scheme, const char *host, unsigned port, const union shim_sockaddr *pin)
{
    bool v6 = strchr(host, ':') != NULL;
    snprintf(scratch, sizeof scratch, v6 ? "%s://[%s]:%u/" : "%s://%s:%u/", scheme, host, port);
    curl_easy_setopt(t->easy, CURLOPT_URL, scratch);
    if (!pin)
        return 0;
    char ip[INET6_ADDRSTRLEN + 2];
    uint16_t pport;
    format_addr(ip, sizeof ip, pin, &pport);
    snprintf(scratch, sizeof scratch, v6 ? "[%s]:%u:%s:%u" : "%s:%u:%s:%u", host, port, ip, pport);
    t->connect_to = curl_slist_append(NULL, scratch);
    if (!t->connect_to)
        return -1;
    curl_easy_setopt(t->easy, CURLOPT_CONNECT_TO, t->connect_to);
    return 0;
}

static int build(struct transfer *t, const struct http_request *req, const char *body, size_t body_len)
{
    struct app_side *c = t->app;
    const struct upstream_rule *u = &cfg->upstreams[c->upstream];
    CURL *e = t->easy;
    if (c->tls_host) {
        /* the app's own TLS was terminated: the leg to the upstream is TLS again, for the
         * name the app asked for, pinned to the address it dialled, verified by libcurl,
         * and held to what the app's own verdict approved before any byte is sent */
        if (!c->tls_pin || aim(t, "https", c->tls_host, u->port, &c->dest) != 0)
            return -1;
        verify_tls(e, u);
        t->pin = tls_front_pin_ref(c->tls_pin);   /* checked in on_prereq */
    } else if (u->origin_https) {
        /* the app's plain HTTP, carried over TLS to the origin, verified as strictly as
         * libcurl verifies by default: the system store, plus the rule's tls_ca_file */
        if (aim(t, "https", u->origin_host, u->origin_port, NULL) != 0)
            return -1;
        verify_tls(e, u);
    } else if (aim(t, "http", u->host, u->port, &c->dest) != 0) {
        return -1;
    }
    snprintf(scratch, sizeof scratch, "%.*s", (int)req->target.n, req->target.p);
    curl_easy_setopt(e, CURLOPT_REQUEST_TARGET, scratch);

    struct http_slice etag = { 0 }, last_modified = { 0 };
    if (t->sink)
        t->sink->ops->validators(t->sink, &etag, &last_modified);
    bool own_validators = etag.n || last_modified.n;
    bool has_accept = false, has_type = false;
    for (size_t i = 0; i < req->nheaders; i++) {
        struct http_slice n = req->headers[i].name, v = req->headers[i].value;
        if (http_is_hop_by_hop(n) || http_slice_ieq(n, "content-length") || http_slice_ieq(n, "expect")
            || named_in_connection(req, n))
            continue;
        if (own_validators && (http_slice_ieq(n, "if-none-match") || http_slice_ieq(n, "if-modified-since")))
            continue;                  /* the cache's go instead: the answer is for its entry */
        has_accept |= http_slice_ieq(n, "accept");
        has_type |= http_slice_ieq(n, "content-type");
        /* "Name;" is libcurl's spelling of a header with an empty value */
        int rc = v.n ? add_header(t, "%.*s: %.*s", (int)n.n, n.p, (int)v.n, v.p) : add_header(t, "%.*s;", (int)n.n, n.p);
        if (rc)
            return -1;
    }
    if ((etag.n && add_header(t, "If-None-Match: %.*s", (int)etag.n, etag.p))
        || (last_modified.n && add_header(t, "If-Modified-Since: %.*s", (int)last_modified.n, last_modified.p)))
        return -1;
    if ((!has_accept && add_header(t, "Accept:")) || add_header(t, "Expect:")
        || (!req->has_host && add_header(t, "Host:")) || (!has_type && add_header(t, "Content-Type:")))
        return -1;
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, t->headers);

    if (http_method_is(req, "HEAD")) {
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    } else if (http_method_is(req, "GET") && req->content_length < 0) {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    } else {
        snprintf(scratch, sizeof scratch, "%.*s", (int)req->method.n, req->method.p);
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, scratch);
        if (body_len == (size_t)-1) {
            curl_easy_setopt(e, CURLOPT_POST, 1L);
            curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)c->body_left);
            curl_easy_setopt(e, CURLOPT_READFUNCTION, on_read);
            curl_easy_setopt(e, CURLOPT_READDATA, t);
        } else if (req->content_length >= 0) {
            curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
            curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, body_len ? body : "");
        }
    }
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    curl_easy_setopt(e, CURLOPT_PATH_AS_IS, 1L);
    curl_easy_setopt(e, CURLOPT_HTTP_CONTENT_DECODING, 0L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)cfg->upstream_timeout_ms);
    long secs = (long)((cfg->upstream_timeout_ms + 999) / 1000);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, secs);
    curl_easy_setopt(e, CURLOPT_MAXAGE_CONN, (long)((cfg->pool_idle_timeout_ms + 999) / 1000));
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, open_socket);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, t);
    curl_easy_setopt(e, CURLOPT_PREREQFUNCTION, on_prereq);
    curl_easy_setopt(e, CURLOPT_PREREQDATA, t);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, close_socket);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, t);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, t);
    curl_easy_setopt(e, CURLOPT_PRIVATE, t);
    return 0;
}

/* libcurl counts busy connections in its cache too, and closes the oldest idle one when a
 * connection comes back to a full cache. Room for the busy ones alone would churn under
 * load (a burst of completions leaves many idle for an instant, they are closed, and the
 * next requests connect again), so the room is the busiest the pool has been in the last
 * one to two seconds, plus pool_idle_max per upstream: idle connections beyond that are
 * closed once the load has gone down. */
static void limit_idle(void)
{
    unsigned busy = peak_now > peak_before ? peak_now : peak_before;
    if (in_use_total > busy)
        busy = in_use_total;
    long keep = (long)busy + (long)cfg->pool_idle_max * (long)cfg->n_upstreams;
    curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, keep > 0 ? keep : 1L);
}

static void on_peak_second(struct loop_timer *timer)
{
    peak_before = peak_now;
    peak_now = in_use_total;
    limit_idle();
    if (peak_before || in_use_total)
        loop_timer_arm(timer, 1000, on_peak_second);
}

static int admit(struct transfer *t)
{
    if (curl_multi_add_handle(multi, t->easy) != CURLM_OK)
        return -1;
    int up = t->app->upstream;
    t->admitted = true;
    queues[up].in_use++;
    in_use_total++;
    if (in_use_total > peak_now)
        peak_now = in_use_total;
    if (!loop_timer_armed(&peak_timer))
        loop_timer_arm(&peak_timer, 1000, on_peak_second);
    limit_idle();
    if (t->queued_us)
        stats_observe_queue_wait(up, clock_mono_us() - t->queued_us);
    return 0;
}

static void unqueue(struct transfer *t)
{
    struct pool_queue *q = &queues[t->app->upstream];
    if (t->qprev)
        t->qprev->qnext = t->qnext;
    else
        q->head = t->qnext;
    if (t->qnext)
        t->qnext->qprev = t->qprev;
    else
        q->tail = t->qprev;
    t->qnext = t->qprev = NULL;
    STAT_DEC(t->app->upstream, queue_waiting);
}

static bool queued(const struct transfer *t)
{
    return t->queued_us && !t->admitted;
}

static void on_queue_timeout(struct loop_timer *timer);

static void arm_queue_timeout(struct pool_queue *q)
{
    if (!q->head) {
        loop_timer_cancel(&q->timeout);
        return;
    }
    int64_t now = clock_mono_us();
    int64_t due_ms = (q->head->queued_us - now) / 1000 + cfg->pool_queue_timeout_ms;
    int64_t probe = pool_probe_started_us((int)(q - queues));
    if (probe) {                       /* look again when the probe stops holding the queue */
        int64_t hold_ms = (probe - now) / 1000 + POOL_PROBE_HOLD_MS + 1;
        if (hold_ms < due_ms)
            due_ms = hold_ms;
    }
    loop_timer_arm(&q->timeout, due_ms > 0 ? due_ms : 0, on_queue_timeout);
}

static void transfer_free(struct transfer *t)
{
    if (queued(t))
        unqueue(t);
    if (t->admitted) {
        struct pool_queue *q = &queues[t->app->upstream];
        q->in_use--;
        in_use_total--;
        q->pump = q->head != NULL;
        limit_idle();
    }
    if (t->app && !t->is_probe) {
        STAT_DEC(t->app->upstream, in_flight);
        if (t->connected)
            STAT_DEC(t->app->upstream, in_flight_connected);
    }
    if (t->easy)
        curl_easy_cleanup(t->easy);
    curl_slist_free_all(t->headers);
    curl_slist_free_all(t->connect_to);
    buf_free(&t->head);
    if (t->sink)                       /* last: it may hand the waiters on its key their answer */
        t->sink->ops->end(t->sink, t->sink_end);
    if (t->is_probe)
        tls_front_check_release(&t->check);
    tls_front_pin_release(t->pin);
    tls_front_pin_release(t->own.tls_pin);
    buf_free(&t->own.in);
    buf_free(&t->own.out);
    free(t);
}

/* Sets up the transfer for app's request and hands it to libcurl or the queue. */
static struct transfer *start(struct transfer *t, struct app_side *c, const struct http_request *req, const char *body,
                              size_t body_len)
{
    t->app = c;
    t->head.cap = RESP_HEAD_MAX;
    t->content_length = -1;
    t->easy = curl_easy_init();
    STAT_INC(c->upstream, in_flight);
    if (!t->easy || build(t, req, body, body_len) != 0) {
        transfer_free(t);
        return NULL;
    }
    struct pool_queue *q = &queues[c->upstream];
    if (q->in_use < cfg->pool_max_per_host && !q->head && !pool_probe_holds(c->upstream)) {
        if (admit(t) != 0) {
            transfer_free(t);
            return NULL;
        }
        return t;
    }
    t->queued_us = clock_mono_us();     /* behind every earlier waiter */
    t->qprev = q->tail;
    if (q->tail)
        q->tail->qnext = t;
    else
        q->head = t;
    q->tail = t;
    STAT_INC(c->upstream, queue_waiting);
    STAT_INC(c->upstream, queue_waits);
    if (q->head == t)
        arm_queue_timeout(q);
    return t;
}

static struct transfer *transfer_new(struct upstream_sink *sink)
{
    struct transfer *t = calloc(1, sizeof *t);
    if (!t) {
        if (sink)
            sink->ops->end(sink, SINK_FAILED);
        return NULL;
    }
    t->sink = sink;
    t->sink_end = SINK_FAILED;         /* until the transfer proves otherwise */
    return t;
}

struct transfer *upstream_start(struct app_side *c, const struct http_request *req, const char *body,
                                size_t body_len, struct upstream_sink *sink)
{
    struct transfer *t = transfer_new(sink);
    return t ? start(t, c, req, body, body_len) : NULL;
}

static const struct app_side_ops own_ops;

/* The transfer's own app side, for a fetch no app connection waits on: where it goes and
 * how the request was framed, nothing delivered anywhere. */
static void own_side(struct transfer *t, const struct app_side *app)
{
    t->own = (struct app_side){ .ops = &own_ops, .fd = -1, .upstream = app->upstream, .dest = app->dest,
                                .dest_len = app->dest_len, .req_minor = app->req_minor,
                                .req_keep_alive = app->req_keep_alive, .req_is_head = app->req_is_head };
    t->own.in.cap = IN_CAP;
    t->own.out.cap = OUT_CAP;
    if (app->tls_host) {               /* a refresh of an intercepted entry is HTTPS too */
        snprintf(t->own_tls_host, sizeof t->own_tls_host, "%s", app->tls_host);
        t->own.tls_host = t->own_tls_host;
        t->own.tls_pin = tls_front_pin_ref(app->tls_pin);
    }
}

bool upstream_refresh(const struct app_side *app, const struct http_request *req, struct upstream_sink *sink)
{
    struct transfer *t = transfer_new(sink);
    if (!t)
        return false;
    own_side(t, app);
    t->detached = true;
    t->own.req_keep_alive = true;
    STAT_INC(app->upstream, upstream_requests);
    STAT_INC(app->upstream, refreshes);
    return start(t, &t->own, req, "", 0) != NULL;
}

/* A waiter the shim gives up on: its exchange fails before any response, and the app's
 * connection is closed, as a reset would close it. */
static void fail_waiter(struct transfer *t)
{
    struct app_side *app = t->app;
    bool detached = t->detached;
    t->sink_end = SINK_DROPPED;
    transfer_free(t);                  /* a detached one's side goes with it: no one to tell */
    if (!detached)
        app->ops->exchange_done(app, EXCHANGE_UNANSWERED, true);
}

static void on_queue_timeout(struct loop_timer *timer)
{
    struct pool_queue *q = (struct pool_queue *)(void *)((char *)timer - offsetof(struct pool_queue, timeout));
    int64_t oldest_allowed = clock_mono_us() - cfg->pool_queue_timeout_ms * 1000;
    for (int n = 0; q->head && q->head->queued_us <= oldest_allowed && n < 100000; n++) {
        struct transfer *t = q->head;
        STAT_INC(t->app->upstream, queue_timeouts);
        shim_debug("fd %d: waited pool_queue_timeout for an upstream connection: closed", t->app->fd);
        fail_waiter(t);
    }
    q->pump = q->head != NULL;         /* a probe may have stopped holding it */
    arm_queue_timeout(q);
}

/* Slots came free: the oldest waiters get them. */
static void pump_queues(void)
{
    for (size_t up = 0; up < cfg->n_upstreams; up++) {
        struct pool_queue *q = &queues[up];
        if (pool_probe_settled((int)up))
            q->pump = true;
        if (!q->pump || pool_probe_holds((int)up))
            continue;
        q->pump = false;
        while (q->head && q->in_use < cfg->pool_max_per_host) {
            struct transfer *t = q->head;
            unqueue(t);
            if (admit(t) != 0)
                fail_waiter(t);
        }
        arm_queue_timeout(q);
    }
}

void upstream_abort(struct transfer *t)
{
    if (t->admitted)
        curl_multi_remove_handle(multi, t->easy);
    transfer_free(t);
}

static int own_flush(struct app_side *app)
{
    buf_consume(&app->out, buf_len(&app->out));
    return 0;
}
static void own_rewatch(struct app_side *app) { (void)app; }
static void own_exchange_done(struct app_side *app, enum exchange_end how, bool must_close)
{
    (void)app;
    (void)how;
    (void)must_close;
}
static const struct app_side_ops own_ops = { own_flush, own_rewatch, own_exchange_done };

void upstream_app_gone(struct transfer *t)
{
    struct app_side *app = t->app;
    if (!sink_wants(t)) {
        t->sink_end = SINK_DROPPED;
        upstream_abort(t);
        return;
    }
    own_side(t, app);
    t->app = &t->own;
    t->detached = true;
    shim_debug("fd %d: the app went away; the fetch goes on for the requests waiting on it", app->fd);
    if (t->paused) {
        t->paused = false;
        apply_pause(t);
    }
}

void upstream_resume(struct transfer *t)
{
    if (t && t->paused) {
        t->paused = false;
        apply_pause(t);
    }
}

void *upstream_tls_probe(int upstream, const char *host, const union shim_sockaddr *dest, socklen_t dest_len,
                         upstream_tls_probe_fn done, void *arg)
{
    const struct upstream_rule *u = &cfg->upstreams[upstream];
    struct transfer *t = strlen(host) < sizeof t->check_name ? calloc(1, sizeof *t) : NULL;
    if (!t)
        return NULL;
    snprintf(t->check_name, sizeof t->check_name, "%s", host);
    t->own = (struct app_side){ .ops = &own_ops, .fd = -1, .upstream = upstream, .dest = *dest, .dest_len = dest_len };
    t->app = &t->own;
    t->detached = t->is_probe = true;
    t->probe_done = done;
    t->probe_arg = arg;
    upstream_dialled_text(dest, t->check_where, sizeof t->check_where);
    t->easy = curl_easy_init();
    if (!t->easy || aim(t, "https", host, u->port, dest) != 0) {
        transfer_free(t);
        return NULL;
    }
    CURL *e = t->easy;
    curl_easy_setopt(e, CURLOPT_CONNECT_ONLY, 1L);
    /* a resumed session shows no certificate: the probe must see the chain */
    curl_easy_setopt(e, CURLOPT_SSL_SESSIONID_CACHE, 0L);
    verify_tls(e, u);
    curl_easy_setopt(e, CURLOPT_SSL_CTX_FUNCTION, tls_front_probe_ctx);
    curl_easy_setopt(e, CURLOPT_SSL_CTX_DATA, &t->check);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)cfg->upstream_timeout_ms);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, open_socket);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, t);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, close_socket);
    curl_easy_setopt(e, CURLOPT_PRIVATE, t);
    if (curl_multi_add_handle(multi, e) != CURLM_OK) {
        transfer_free(t);
        return NULL;
    }
    return t;
}

void upstream_tls_probe_cancel(void *probe)
{
    struct transfer *t = probe;
    if (t)
        t->probe_done = NULL;          /* reaped as usual, heard by no one */
}

/* A probe finished: what it found is kept (tls_front.c) for its caller, and for every
 * context that asks about the same name within the minute. */
static void probe_finished(struct transfer *t, CURLcode result)
{
    if (result != CURLE_OK)
        shim_debug("TLS probe of upstream %d: %s", t->app->upstream, curl_easy_strerror(result));
    tls_front_keep_probe(t->check_name, t->check_where, t->app->upstream, result == CURLE_OK, &t->check);
    if (t->probe_done)
        t->probe_done(t->probe_arg);
    curl_multi_remove_handle(multi, t->easy);
    transfer_free(t);
}

/* The upstream presented a certificate libcurl or the app's approval refuses: no byte of
 * the request went out; no stale answer hides it, and for an intercepted connection the
 * kept verdict goes, so the app's next connection meets the real certificate. */
static void upstream_verify_failed(struct transfer *t)
{
    struct app_side *c = t->app;
    STAT_INC(c->upstream, tls_upstream_verify_failed);
    shim_debug("fd %d: the upstream's certificate was refused (%s): request not sent", c->fd,
               t->pin_refused ? "not what the app approved" : "libcurl's verification");
    if (c->tls_host) {
        char where[INET6_ADDRSTRLEN + 8];
        upstream_dialled_text(&c->dest, where, sizeof where);
        tls_front_forget_verdict(c->tls_host, where, c->upstream);
    }
}

void upstream_reap(void)
{
    if (!multi)
        return;
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(multi, &left))) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        struct transfer *t = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&t);
        CURLcode result = msg->data.result;
        if (t->is_probe) {
            probe_finished(t, result);
            continue;
        }
        struct app_side *c = t->app;
        bool ok = result == CURLE_OK && t->head_done;
        if (ok && !t->absorbed
            && (send_head(t) != 0 || (t->mode == BODY_CHUNKED && buf_append(&c->out, "0\r\n\r\n", 5) != 0)))
            ok = false;
        bool refused = !ok && (t->pin_refused || result == CURLE_PEER_FAILED_VERIFICATION);
        if (refused)
            upstream_verify_failed(t);
        if (!ok) {
            shim_debug("fd %d: upstream exchange failed: %s", c->fd, curl_easy_strerror(result));
            if (c->app_gone)
                STAT_INC(c->upstream, errors_app);
            else
                STAT_INC(c->upstream, errors_upstream);
        }
        t->sink_end = ok ? SINK_WHOLE : c->app_gone && !t->detached ? SINK_DROPPED : SINK_FAILED;
        enum exchange_end how = ok ? (t->absorbed ? EXCHANGE_ABSORBED : EXCHANGE_OK)
                              : refused ? EXCHANGE_REFUSED
                              : t->head_sent ? EXCHANGE_FAILED : EXCHANGE_UNANSWERED;
        long connects = 1;
        curl_easy_getinfo(t->easy, CURLINFO_NUM_CONNECTS, &connects);
        if (ok && connects == 0)
            STAT_INC(c->upstream, upstream_conn_reuses);
        bool must_close = how == EXCHANGE_OK && t->must_close, detached = t->detached;
        curl_multi_remove_handle(multi, t->easy);
        transfer_free(t);              /* the sink hears its end before the app side does */
        if (!detached)                 /* a detached transfer's side went with it */
            c->ops->exchange_done(c, c->app_gone && how != EXCHANGE_OK ? EXCHANGE_FAILED : how, must_close);
    }
    pump_queues();
}
