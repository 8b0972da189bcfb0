/* upstream.c — owns the upstream side: one libcurl multi handle driven by the engine's
 * loop (its sockets and timer there: curl_loop.c), which keeps the pool of
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
#include "config.h"
#include "curl_loop.h"
#include "pool.h"
#include "pool_queue.h"
#include "tls_front.h"
#include "upstream_request.h"
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

#define DROP_MAX (64u << 10)            /* answer bytes read and dropped for an app that left */

struct transfer {
    CURL *easy;
    struct app_side *app;
    struct curl_slist *headers, *connect_to;
    struct buf head;                /* the response head, rewritten for the app */
    struct buf trailers;            /* the trailer fields after a chunked body, for the app's last chunk */
    bool had_trailers, folded;
    enum { LAST_NONE, LAST_RELAYED, LAST_DROPPED, LAST_FRAMING } last_line;   /* the header line before */
    int status;
    struct http_framing framing;    /* what the head's framing headers say */
    int64_t content_length;         /* -1 when the upstream sent none, or chunked */
    bool upstream_chunked, head_done, head_sent, paused, send_paused, must_close, connected;
    enum body_mode mode;
    /* the cache's watcher of the response (store.c), ended once with sink_end */
    struct upstream_sink *sink;
    enum sink_end sink_end;
    bool absorbed;                  /* a 304 the sink asked for: nothing relayed */
    bool stale_instead;             /* an error answer the sink replaced with its stale entry */
    struct upreq_silence silence;   /* before the head: upstream_timeout of it fails it (504) */
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
    bool pin_refused, once_only;    /* once_only: a method that is not idempotent, never sent twice */
    bool fd_short;                  /* its socket could not be had: it waits for another's connection */
    int64_t fd_short_since_us;      /* ... since then, pool_queue_timeout at most */
    bool upstream_closes;           /* the upstream ends the connection after this answer */
    unsigned sends;                 /* how many times libcurl was about to send the request */
    int64_t body_relayed;           /* BODY_RAW with a Content-Length: body bytes relayed */
    size_t dropped;                 /* body read for an app that left before its answer began */
    char own_tls_host[256];         /* own.tls_host, kept here: the app's may go first */
    char check_name[256];
    char check_where[INET6_ADDRSTRLEN + 8];
    struct pool_slot slot;          /* its place in the upstream's queue (pool_queue.c) */
    struct curl_hold hold;          /* the connection it sends on (curl_loop.c) */
};

static const struct shim_config *cfg;

static CURLM *multi;
static CURLM *orphaned_multi;       /* a forked child's copy of the parent's: never used */
static char scratch[HEAD_MAX + 512];

static curl_socket_t open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *addr)
{
    struct transfer *t = clientp;
    (void)purpose;
    /* the app's own connections reach the address it dialled, not another origin */
    bool adopt = !cfg->upstreams[t->app->upstream].origin_https && !t->is_probe;
    int fd = !config_test_socket_emfile_take() ? upreq_open_socket(t->app->upstream, adopt, addr)
                                               : (errno = EMFILE, -1);   /* (a test's: out of fds) */
    if (fd < 0 && (errno == EMFILE || errno == ENFILE)) {   /* nothing sent: it waits (requeue) */
        t->fd_short = true;
        if (!t->fd_short_since_us)
            t->fd_short_since_us = clock_mono_us();
        pool_queue_fd_short();
    }
    return fd < 0 ? CURL_SOCKET_BAD : fd;
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
    curl_loop_taken(&t->hold, (unsigned)conn_local_port, (unsigned)conn_primary_port);
    if (t->pin && !pin_holds(t)) {
        t->pin_refused = true;
        return CURL_PREREQFUNC_ABORT;
    }
    /* libcurl sends a request again on a new connection when a reused one ends before any
     * byte of the answer: the upstream may have acted on the first (a POST that charged a
     * card, then dropped the connection). Direct, the app's own connection would have seen
     * that end, and nothing sent twice: so does a method that is not idempotent here */
    if (t->sends++ > 0 && t->once_only) {
        shim_debug("fd %d: a request that is not idempotent is not sent a second time: the connection it went "
                   "on ended unanswered", t->app->fd);
        return CURL_PREREQFUNC_ABORT;
    }
    if (!t->connected) {
        t->connected = true;
        STAT_INC(t->app->upstream, in_flight_connected);
    }
    return CURL_PREREQFUNC_OK;
}

static const struct pool_queue_ops queue_ops;

int upstream_init(const struct shim_config *config)
{
    cfg = config;
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return -1;
    multi = curl_multi_init();
    if (!multi)
        return -1;
    curl_loop_attach(multi);
    unsigned most = cfg->pool_max_per_host;
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        if (rules_pool_max(cfg, &cfg->upstreams[i]) > most)
            most = rules_pool_max(cfg, &cfg->upstreams[i]);
    curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, (long)most);   /* backstop */
    pool_queue_init(cfg, &queue_ops);
    return 0;
}

void upstream_forget(void)
{
    orphaned_multi = multi;
    multi = NULL;
    curl_loop_forget();
    pool_queue_forget();
    upreq_easy_forget();               /* the parent's handles: never used again */
    pool_forget();
}

/* ---- response framing ---- */

/* A trailer field after a chunked body (libcurl reports each as a header line). Relayed in
 * the app's last chunk when its response is chunked too (an HTTP/1.1 app), minus framing and
 * hop-by-hop fields; a section over TRAILERS_MAX is dropped whole, which RFC 9110 6.5
 * allows a recipient that removes the chunked coding. Either way the response is not
 * stored: a hit could not carry them. */
static void on_trailer(struct transfer *t, const char *p, size_t l)
{
    if (l == 0 || t->absorbed)
        return;
    if (!t->had_trailers && t->sink)
        t->sink->ops->unstorable(t->sink, SINK_HAD_TRAILERS);
    t->had_trailers = true;
    struct http_slice name, value;
    if (t->mode != BODY_CHUNKED || t->app->app_gone || t->detached || t->trailers.cap == 0
        || !http_split_header_line(p, l, &name, &value)
        || http_is_hop_by_hop(name) || http_slice_ieq(name, "content-length"))
        return;
    if (buf_append(&t->trailers, p, l) != 0 || buf_append(&t->trailers, "\r\n", 2) != 0) {
        shim_debug("fd %d: trailer section over %d bytes: not relayed", t->app->fd, TRAILERS_MAX);
        buf_free(&t->trailers);
        t->trailers.cap = 0;           /* (and nothing after it) */
    }
}

/* An obsolete line folding (RFC 9112 5.2): the continuation joins the line before with
 * one space, as a proxy must forward it. A folded framing header fails the exchange (where
 * the body ends would be a guess); the response is never stored (what the cache read of
 * the line before was only its first part). */
static int unfold(struct transfer *t, const char *p, size_t l)
{
    if (t->last_line == LAST_FRAMING || t->last_line == LAST_NONE)
        return -1;
    if (!t->folded && t->sink && t->status / 100 != 1)
        t->sink->ops->unstorable(t->sink, SINK_FOLDED);
    t->folded = true;
    if (t->last_line != LAST_RELAYED)
        return 0;                      /* the rest of a hop-by-hop header: dropped with it */
    while (l && (*p == ' ' || *p == '\t')) {
        p++;
        l--;
    }
    t->head.end -= 2;                  /* the line before's CRLF */
    if (buf_append(&t->head, " ", 1) != 0 || buf_append(&t->head, p, l) != 0 || buf_append(&t->head, "\r\n", 2) != 0)
        return -1;
    return 0;
}

static size_t on_header(char *p, size_t size, size_t n, void *userdata)
{
    struct transfer *t = userdata;
    struct app_side *c = t->app;
    size_t len = size * n;
    size_t l = len;
    while (l && (p[l - 1] == '\r' || p[l - 1] == '\n'))
        l--;
    if (t->head_done) {
        on_trailer(t, p, l);
        return len;
    }
    if (len >= 5 && !memcmp(p, "HTTP/", 5)) {
        struct http_slice reason;
        if (!http_parse_status_line(p, l, &t->status, &reason))
            return 0;                  /* not a status line we can relay: fail the exchange */
        http_framing_init(&t->framing);
        t->head.start = t->head.end = 0;
        t->last_line = LAST_NONE;
        /* HTTP/1.0 closes after the answer unless it says keep-alive (RFC 9112 9.3) */
        t->upstream_closes = l >= 8 && !memcmp(p, "HTTP/1.0", 8);
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
            t->stale_instead = true;
            return 0;                  /* fail it here: nothing has reached the app */
        }
        if (framing == HTTP_FRAMING_BROKEN) {
            /* lengths that disagree, or a coding we cannot relay: where the body ends is a
             * guess, and a guess must not reach the app or the cache (RFC 9112 6.3) */
            shim_debug("fd %d: upstream response framing is ambiguous: exchange failed", c->fd);
            return 0;
        }
        bool no_body = c->req_is_head || t->status == 204 || t->status == 304;
        /* the upstream ends its connection after this answer (Connection: close, an
         * HTTP/1.0 answer, a body the close delimits): so does the app's, as it would
         * direct, where a client that reads to the end would otherwise wait forever */
        bool close_delimited = !no_body && t->content_length < 0 && !t->upstream_chunked;
        bool keep = c->req_keep_alive && !t->upstream_closes && !close_delimited;
        char extra[160];
        size_t e = 0;
        if (no_body) {
            t->mode = BODY_NONE;
            if (t->content_length >= 0)
                e += (size_t)snprintf(extra + e, sizeof extra - e, "Content-Length: %lld\r\n", (long long)t->content_length);
            else if (c->req_is_head && t->upstream_chunked && c->req_minor >= 1)   /* (what a GET's body would be) */
                e += (size_t)snprintf(extra + e, sizeof extra - e, "Transfer-Encoding: chunked\r\n");
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
    if (p[0] == ' ' || p[0] == '\t')
        return unfold(t, p, l) == 0 ? len : 0;
    struct http_slice name, value;
    if (!http_split_header_line(p, l, &name, &value)) {
        /* no colon, or a name that is not a token: not a field libcurl frames by either;
         * dropped, as a lenient client ignores it, and the response never stored */
        if (!t->folded && t->sink && t->status / 100 != 1)
            t->sink->ops->unstorable(t->sink, SINK_FOLDED);
        t->folded = true;
        t->last_line = LAST_DROPPED;
        return len;
    }
    bool spaced = name.p[name.n] != ':';
    if (spaced && (http_slice_ieq(name, "content-length") || http_slice_ieq(name, "transfer-encoding"))) {
        /* "Content-Length : 3": libcurl does not frame by it, and a client may or may not;
         * where the body ends would be a guess (RFC 9112 5.1 forbids the white space) */
        shim_debug("fd %d: upstream framing header with white space before its colon: exchange failed", c->fd);
        return 0;
    }
    t->last_line = LAST_FRAMING;
    if (http_framing_header(&t->framing, name, value))
        return len;                    /* re-emitted once framing is decided */
    t->last_line = LAST_DROPPED;
    if (http_slice_ieq(name, "connection")) {
        bool closes = http_list_has_token(value, "close");
        if (closes || http_list_has_token(value, "keep-alive"))
            t->upstream_closes = closes;
        /* fields it names are for this connection (RFC 9110 7.6.1): relayed, never stored */
        if (t->sink && t->status / 100 != 1 && http_connection_names_fields(value))
            t->sink->ops->unstorable(t->sink, SINK_HOP_FIELDS);
    }
    if (http_is_hop_by_hop(name))
        return len;
    struct http_slice line = { p, l };
    if (spaced) {                      /* "Name : value": relayed without the white space */
        int k = snprintf(scratch, sizeof scratch, "%.*s: %.*s", (int)name.n, name.p, (int)value.n, value.p);
        if (k < 0 || (size_t)k >= sizeof scratch)
            return 0;
        line = (struct http_slice){ scratch, (size_t)k };
    }
    if (t->sink && t->status / 100 != 1)
        t->sink->ops->header(t->sink, name, value, line);
    if (buf_append(&t->head, line.p, line.n) != 0 || buf_append(&t->head, "\r\n", 2) != 0)
        return 0;                      /* response head over RESP_HEAD_MAX */
    t->last_line = LAST_RELAYED;
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
    if (t->content_length >= 0 && !t->upstream_chunked && !t->absorbed) {
        if ((int64_t)len > t->content_length - t->body_relayed) {
            /* more than the head promised: bytes the app would read as its next response,
             * and the cache as nothing; libcurl hands them on only if it framed the body
             * otherwise than the shim read the head */
            shim_debug("fd %d: the upstream sent more body than its Content-Length: exchange failed", c->fd);
            return 0;
        }
        t->body_relayed += (int64_t)len;
    }
    if (c->app_gone || t->detached) {  /* only the cache (and the flight's waiters) want it */
        if (!sink_wants(t)) {
            /* an app that sent its request and left: a short answer is read to its end and
             * dropped, so the upstream connection stays pooled and the app's next pipelined
             * request goes too; a long one is cut */
            t->dropped += len;
            return !t->detached && t->dropped <= DROP_MAX ? len : 0;
        }
        t->sink->ops->body(t->sink, p, len);
        return sink_wants(t) ? len : 0;
    }
    if (t->mode == BODY_NONE || len == 0)
        return len;
    size_t need = len + (t->mode == BODY_CHUNKED ? 32 : 0) + (t->head_sent ? 0 : buf_len(&t->head));
    if (buf_len(&c->out) && buf_len(&c->out) + need > OUT_SOFT) {
        t->paused = true;
        if (t->content_length >= 0 && !t->upstream_chunked)
            t->body_relayed -= (int64_t)len;   /* libcurl hands the same bytes again */
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

/* The easy handle for app's request (upstream_request.c), wired to this transfer. */
static int build(struct transfer *t, const struct http_request *req, const char *body, size_t body_len)
{
    struct app_side *c = t->app;
    const struct upstream_rule *u = &cfg->upstreams[c->upstream];
    CURL *e = t->easy;
    struct http_slice etag = { 0 }, last_modified = { 0 };
    if (t->sink)
        t->sink->ops->validators(t->sink, &etag, &last_modified);
    struct upreq_where where = { .scheme = "http", .host = u->host, .port = u->port, .pin = &c->dest };
    if (c->tls_host) {
        /* the app's own TLS was terminated: the leg to the upstream is TLS again, for the
         * name the app asked for, pinned to the address it dialled, verified by libcurl,
         * and held to what the app's own verdict approved before any byte is sent */
        if (!c->tls_pin)
            return -1;
        where = (struct upreq_where){ "https", c->tls_host, u->port, &c->dest, true };
        t->pin = tls_front_pin_ref(c->tls_pin);   /* checked in on_prereq */
    } else if (u->origin_https) {
        /* the app's plain HTTP, carried over TLS to the origin, verified as strictly as
         * libcurl verifies by default: the system store, plus the rule's tls_ca_file */
        where = (struct upreq_where){ "https", u->origin_host, u->origin_port, NULL, true };
    }
    if (upreq_build(e, cfg, u, &where, req, etag, last_modified, &t->headers, &t->connect_to) != 0)
        return -1;
    t->once_only = !http_method_is(req, "GET") && !http_method_is(req, "HEAD") && !http_method_is(req, "OPTIONS")
                   && !http_method_is(req, "TRACE") && !http_method_is(req, "PUT") && !http_method_is(req, "DELETE");
    /* Such a request, first on a connection the app has just made, takes a kept connection
     * only if it was busy within the last second (libcurl's idle age, in whole seconds: 0
     * takes one idle under a second), else a new one: a connection the upstream is closing
     * for its idle timeout as the request arrives loses it unanswered, where direct the
     * app's new connection never meets that race (an adversarial pass: 2 to 5 POSTs in
     * 100 lost). A stream of them still shares the pool */
    if (t->once_only && c->requests <= 1)
        curl_easy_setopt(e, CURLOPT_MAXAGE_CONN, 0L);
    if (!http_method_is(req, "HEAD") && !(http_method_is(req, "GET") && req->content_length < 0)) {
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
    upreq_watch_silence(e, &t->silence, &t->status, &t->send_paused, cfg->upstream_timeout_ms);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, open_socket);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, t);
    curl_easy_setopt(e, CURLOPT_PREREQFUNCTION, on_prereq);
    curl_easy_setopt(e, CURLOPT_PREREQDATA, t);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, upreq_close_socket);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, t);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, t);
    curl_easy_setopt(e, CURLOPT_PRIVATE, t);
    return 0;
}

/* ---- the queue's side of a transfer (pool_queue.c) ---- */

static struct transfer *transfer_of(struct pool_slot *s)
{
    return (struct transfer *)(void *)((char *)s - offsetof(struct transfer, slot));
}

static int admit(struct pool_slot *s)
{
    return curl_multi_add_handle(multi, transfer_of(s)->easy) == CURLM_OK ? 0 : -1;
}

static void fail_waiter(struct pool_slot *s);

static void keep_connections(long n) { curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, n); }

static const struct pool_queue_ops queue_ops = { admit, fail_waiter, keep_connections };

static void transfer_free(struct transfer *t)
{
    pool_queue_leave(&t->slot);
    curl_loop_let_go(&t->hold);
    if (t->app && !t->is_probe) {
        STAT_DEC(t->app->upstream, in_flight);
        if (t->connected)
            STAT_DEC(t->app->upstream, in_flight_connected);
    }
    if (t->easy)
        upreq_easy_put(t->easy, t->is_probe);
    curl_slist_free_all(t->headers);
    curl_slist_free_all(t->connect_to);
    buf_free(&t->head);
    buf_free(&t->trailers);
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
    t->trailers.cap = TRAILERS_MAX;
    t->content_length = -1;
    t->easy = upreq_easy_get();
    STAT_INC(c->upstream, in_flight);
    if (!t->easy || build(t, req, body, body_len) != 0) {
        transfer_free(t);
        return NULL;
    }
    if (pool_queue_enter(&t->slot, c->upstream, c->fd) != 0) {
        transfer_free(t);
        return NULL;
    }
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

bool upstream_refresh(const struct app_side *app, const struct http_request *req, const char *body, size_t body_len,
                      struct upstream_sink *sink)
{
    struct transfer *t = transfer_new(sink);
    if (!t)
        return false;
    own_side(t, app);
    t->detached = true;
    t->own.req_keep_alive = true;
    STAT_INC(app->upstream, upstream_requests);
    STAT_INC(app->upstream, refreshes);
    return start(t, &t->own, req, body, body_len) != NULL;   /* (the body is copied: the app moves on) */
}

/* A transfer whose socket could not be had (the process out of fds) was never sent: back
 * in its upstream's queue, behind the ceiling that makes it wait for a connection another
 * transfer leaves (pool_queue_fd_short), rather than failed with a request the app wrote. */
static bool requeue(struct transfer *t)
{
    t->fd_short = false;
    curl_multi_remove_handle(multi, t->easy);
    pool_queue_leave(&t->slot);
    return pool_queue_enter(&t->slot, t->app->upstream, t->app->fd) == 0;
}

/* A waiter the shim gives up on: its exchange fails before any response, and the app's
 * connection is closed, as a reset would close it. */
static void fail_waiter(struct pool_slot *s)
{
    struct transfer *t = transfer_of(s);
    struct app_side *app = t->app;
    bool detached = t->detached;
    t->sink_end = SINK_DROPPED;
    transfer_free(t);                  /* a detached one's side goes with it: no one to tell */
    if (!detached)
        app->ops->exchange_done(app, EXCHANGE_UNANSWERED, true);
}

void upstream_abort(struct transfer *t)
{
    if (t->slot.admitted)
        curl_multi_remove_handle(multi, t->easy);
    transfer_free(t);
}

static int own_flush(struct app_side *app) { buf_consume(&app->out, buf_len(&app->out)); return 0; }
static void own_rewatch(struct app_side *app) { (void)app; }
static void own_exchange_done(struct app_side *app, enum exchange_end how, bool must_close)
{
    (void)app, (void)how, (void)must_close;
}
static const struct app_side_ops own_ops = { own_flush, own_rewatch, own_exchange_done };

bool upstream_awaiting_answer(const struct transfer *t) { return !t->head_done && !t->send_paused; }

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

bool upstream_paused(const struct transfer *t) { return t->paused; }

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
    const struct upreq_where where = { "https", host, u->port, dest, true };
    if (!t->easy || upreq_aim(t->easy, &where, &t->connect_to) != 0) {
        transfer_free(t);
        return NULL;
    }
    CURL *e = t->easy;
    curl_easy_setopt(e, CURLOPT_CONNECT_ONLY, 1L);
    /* a resumed session shows no certificate: the probe must see the chain */
    curl_easy_setopt(e, CURLOPT_SSL_SESSIONID_CACHE, 0L);
    upreq_verify_tls(e, u);
    curl_easy_setopt(e, CURLOPT_SSL_CTX_FUNCTION, tls_front_probe_ctx);
    curl_easy_setopt(e, CURLOPT_SSL_CTX_DATA, &t->check);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)cfg->upstream_timeout_ms);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETFUNCTION, open_socket);
    curl_easy_setopt(e, CURLOPT_OPENSOCKETDATA, t);
    curl_easy_setopt(e, CURLOPT_CLOSESOCKETFUNCTION, upreq_close_socket);
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

/* The chunked body's end for the app, with the upstream's trailer fields. */
static int last_chunk(struct transfer *t)
{
    struct buf *out = &t->app->out;
    if (buf_append(out, "0\r\n", 3) != 0)
        return -1;
    if (buf_len(&t->trailers) && buf_append(out, buf_head(&t->trailers), buf_len(&t->trailers)) != 0)
        return -1;
    return buf_append(out, "\r\n", 2);
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
        curl_socket_t kept = CURL_SOCKET_BAD;   /* its connection, if libcurl keeps it */
        long local_port = 0, peer_port = 0;
        curl_loop_let_go(&t->hold);
        if (result == CURLE_COULDNT_CONNECT && t->fd_short
            && clock_mono_us() - t->fd_short_since_us < cfg->pool_queue_timeout_ms * 1000 && requeue(t))
            continue;
        if (curl_easy_getinfo(msg->easy_handle, CURLINFO_ACTIVESOCKET, &kept) == CURLE_OK && kept != CURL_SOCKET_BAD
            && curl_easy_getinfo(msg->easy_handle, CURLINFO_LOCAL_PORT, &local_port) == CURLE_OK
            && curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIMARY_PORT, &peer_port) == CURLE_OK)
            curl_loop_watch_idle(kept, msg->easy_handle, (unsigned)local_port, (unsigned)peer_port);
        bool ok = result == CURLE_OK && t->head_done;
        if (ok && !t->absorbed && (send_head(t) != 0 || (t->mode == BODY_CHUNKED && last_chunk(t) != 0)))
            ok = false;
        bool refused = !ok && (t->pin_refused || result == CURLE_PEER_FAILED_VERIFICATION);
        if (refused)
            upstream_verify_failed(t);
        if (!ok) {
            long os_errno = 0;
            curl_easy_getinfo(t->easy, CURLINFO_OS_ERRNO, &os_errno);
            /* (the errno libcurl keeps is the last one it saw: only a failed send or receive
             * is this exchange's own) */
            c->upstream_reset = (result == CURLE_RECV_ERROR || result == CURLE_SEND_ERROR)
                                && (os_errno == ECONNRESET || os_errno == EPIPE);
            /* an answer that is not HTTP, a head the header callback refused, or silence
             * past upstream_timeout: the app hears a gateway's 502 or 504, not an end of file */
            bool invalid = result == CURLE_WEIRD_SERVER_REPLY || result == CURLE_UNSUPPORTED_PROTOCOL
                           || (result == CURLE_WRITE_ERROR && !t->head_done);
            bool silent = result == CURLE_OPERATION_TIMEDOUT || t->silence.overdue;
            c->gateway_status = t->head_sent || t->stale_instead ? 0 : invalid ? 502 : silent ? 504 : 0;
            shim_debug("fd %d: upstream exchange failed: %s%s", c->fd, curl_easy_strerror(result), c->upstream_reset ? " (reset)" : "");
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
    pool_queue_pump();
}
