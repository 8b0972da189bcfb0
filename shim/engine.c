/* engine.c — owns the connection state machine: the app side of every diverted
 * connection (reading requests, writing responses, backpressure) and the exchange on it,
 * answered from the memory tier, by the Redis tier (cache_redis.c), through the upstream
 * (upstream.c), or by handing the whole connection to a raw tunnel (tunnel.c). The thread
 * that runs it all is engine_thread.c's. Nothing here blocks. */
#include "engine.h"
#include "clock.h"
#include "cache.h"
#include "store.h"
#include "redis_session.h"
#include "fastpath.h"
#include "conn.h"
#include "http.h"
#include "linger.h"
#include "log.h"
#include "loop.h"
#include "real.h"
#include "stats.h"
#include "tunnel.h"
#include "tls_decide.h"
#include "tls_front.h"
#include "tls_hello.h"
#include "tls_marks.h"
#include <arpa/inet.h>
#include <sys/socket.h>
#include "upstream.h"
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

enum conn_state {
    CS_HTTP,            /* reading requests; no exchange in flight */
    CS_UPSTREAM,        /* an exchange is in flight through libcurl */
    CS_HIT,             /* streaming a cached entry to the app */
    CS_CACHE_WAIT,      /* the cache side waits: Redis (at most redis_timeout), another
                         * request's or process's fetch (at most coalesce_timeout) */
    CS_VERIFY,          /* a ClientHello waits while the upstream's chain is checked */
    CS_GONE,            /* closed, or handed to a tunnel or a TLS front: memory goes after the batch */
};
static const char *const state_names[] = { "HTTP", "UPSTREAM", "HIT", "CACHE_WAIT", "VERIFY", "GONE" };

struct conn {
    struct app_side side;           /* first: what upstream.c sees of the connection */
    struct loop_source src;         /* the engine's end of the socketpair */
    struct loop_deferred reclaim;
    enum conn_state state;
    bool closing;                   /* close once `out` has drained */
    bool reset_app;                 /* ... and then as a reset, not an end of file */
    bool left_unanswered;           /* the app closed right after its request: see conn_update_events */
    bool awaiting_room;             /* a request waits until the app takes its earlier answers (conn_process) */
    /* the app's fd and its socketpair end's identity, once the engine hears it: what a
     * reset is delivered through */
    int app_fd;
    dev_t app_dev;
    ino_t app_ino;
    /* the request being answered (its bytes stay at the front of `in`) */
    size_t req_total;               /* head + body bytes */
    bool continue_sent;
    int64_t req_started_us;
    struct cache_entry *hit;        /* CS_HIT: the entry being sent, a reference held */
    size_t hit_off, hit_len;        /* body bytes sent so far, and to send */
    bool hit_must_close;
    struct store_request store;     /* the request's cache side (store.c) */
    bool counted;                   /* this request is in the stats already */
    int rule_index;                 /* the cache rule the request matched, -1: none */
    /* TLS the app encrypts itself: looked at once, at the connection's first bytes */
    bool tls_checked;
    struct tls_decision tls;        /* CS_VERIFY: waiting on the upstream's verdict */
    char tls_host[256];             /* a terminated connection's plaintext: the name of its legs */
    struct transfer *xfer;          /* CS_UPSTREAM */
    /* the gate of the app's fd (fdgate.h): who may write into the pair */
    struct fdgate_engine gate;
    struct loop_timer gate_retry;   /* an app thread held the gate: write a little later */

    struct conn *next, *prev;       /* all live conns, under the engine lock */
};

static struct {
    pthread_mutex_t lock;           /* guards the conn list */
    struct conn *conns;
    const struct shim_config *cfg;
} E = { .lock = PTHREAD_MUTEX_INITIALIZER };

/* Conns a forked child inherited from its parent's engine: kept reachable, never used. */
static struct conn *orphaned_conns;

static struct http_request scratch_req;   /* engine thread only */
static char recv_scratch[16384];          /* engine thread only: c->side.in grows by what arrived */
static char key_scratch[CACHE_KEY_MAX];   /* engine thread only */

static void conn_process(struct conn *c);
static void conn_resume(struct conn *c);

static struct conn *conn_of(struct app_side *app)
{
    return (struct conn *)(void *)((char *)app - offsetof(struct conn, side));
}

/* ---- states: every change goes through conn_to, in the debug log by name ---- */

static void conn_to(struct conn *c, enum conn_state to)
{
    if (c->state != to)
        shim_debug("fd %d: %s -> %s", c->side.fd, state_names[c->state], state_names[to]);
    c->state = to;
}

/* ---- the gate: the engine and the app's inline hits never write into the pair at once ---- */

static void on_gate_retry(struct loop_timer *timer);

/* May the engine write to the app now? While an app thread holds the gate (an inline
 * answer being written) it is called back shortly. */
static bool gate_take(struct conn *c)
{
    if (fdgate_engine_take(&c->gate))
        return true;
    if (!loop_timer_armed(&c->gate_retry))
        loop_timer_arm(&c->gate_retry, 1, on_gate_retry);
    return false;
}

static int conn_flush(struct conn *c)
{
    if (c->side.app_gone) {
        buf_consume(&c->side.out, buf_len(&c->side.out));   /* (no one will read it: gone, as sent) */
        return -1;
    }
    if (!buf_len(&c->side.out) || !gate_take(c))
        return 0;
    if (buf_send(&c->side.out, c->side.fd) == 0)
        return 0;
    c->side.app_gone = true;
    return -1;
}

static void reclaim_conn(struct loop_deferred *d)
{
    struct conn *c = (struct conn *)(void *)((char *)d - offsetof(struct conn, reclaim));
    buf_free(&c->side.in);
    buf_free(&c->side.out);
    free(c);
}

static void unlink_conn(struct conn *c)
{
    pthread_mutex_lock(&E.lock);
    if (c->prev)
        c->prev->next = c->next;
    else if (E.conns == c)
        E.conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    pthread_mutex_unlock(&E.lock);
}

/* The one place a connection's pending work is cancelled, by what its state waits on: an
 * exchange in flight (its fetch may go on for others), a hit being sent, the cache side's
 * wait, the TLS verdict. The request's cache side is dropped whatever the state. */
static void conn_cancel_pending(struct conn *c)
{
    switch (c->state) {
    case CS_UPSTREAM:
        if (!c->xfer)
            break;
        STAT_INC(c->side.upstream, errors_app);   /* the app left in the middle of an answer */
        upstream_app_gone(c->xfer);
        c->xfer = NULL;
        break;
    case CS_HIT:
        STAT_INC(c->side.upstream, errors_app);
        cache_entry_release(c->hit);
        c->hit = NULL;
        break;
    case CS_VERIFY:
    case CS_CACHE_WAIT:
    case CS_HTTP:
    case CS_GONE:
        break;
    }
    store_request_done(&c->store);
    tls_decide_cancel(&c->tls);
}

/* Ends the conn's part: what it holds is released and its memory goes after this batch.
 * The fd is closed unless a tunnel took it over. */
/* The upstream reset the connection mid-exchange: so does the app's, as a TCP reset
 * would reach it direct (ECONNRESET after what it was sent, where an end of file would
 * let a lenient client take a cut body as whole: Ruby's Net::HTTP, LWP). A Unix socket
 * closed with unread bytes in its queue gives its peer ECONNRESET: one byte goes into
 * the engine's end through the app's fd number, while the fd table says that number is
 * still this connection's app end and the close hooks wait for it (fdtable_touch): never
 * a dup of it, whose close would drop the process's locks on a file that took the number. */
static void reset_app_end(struct conn *c)
{
    if (c->app_fd < 0)
        return;
    fdtable_touch(c->app_fd);
    const struct fd_entry *e = fdtable_if_diverted(c->app_fd);
    if (e && e->engine_fd == c->side.fd && e->dev == c->app_dev && e->ino == c->app_ino)
        real_send(c->app_fd, "!", 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    fdtable_untouch();
}

static void conn_retire(struct conn *c, bool close_fd)
{
    conn_cancel_pending(c);
    conn_to(c, CS_GONE);
    loop_timer_cancel(&c->gate_retry);
    fdgate_engine_shut(&c->gate);
    fdtable_release_owner(c->side.fd, c);
    tls_front_pin_release(c->side.tls_pin);
    c->side.tls_pin = NULL;
    if (close_fd) {
        loop_remove(&c->src);
        if (c->reset_app && !c->side.app_gone)
            reset_app_end(c);
        fdtable_close_engine_fd(c->side.fd);
    }
    c->side.fd = -1;
    unlink_conn(c);
    loop_defer(&c->reclaim, reclaim_conn);
}

static void conn_close(struct conn *c)
{
    if (c->state != CS_GONE)
        conn_retire(c, true);
}

/* Only adjusts epoll interest: safe inside libcurl's callbacks. */
static void conn_watch_app(struct conn *c)
{
    uint32_t want = 0;
    if (!c->side.app_eof && !c->closing && buf_len(&c->side.in) < IN_CAP)
        want |= EPOLLIN;
    /* (a transfer paused on a full `out`, or a request waiting for room, is resumed on
     * EPOLLOUT: asked for as long as they wait, whichever flush emptied `out`) */
    if ((buf_len(&c->side.out) || c->state == CS_HIT || c->awaiting_room || (c->xfer && upstream_paused(c->xfer)))
        && !c->side.app_gone)
        want |= EPOLLOUT;
    loop_watch(&c->src, want);
}

static void conn_update_events(struct conn *c)
{
    if (c->state == CS_GONE)
        return;
    if (c->side.app_gone) {
        /* A request the app closed on at once (a fire-and-forget POST) goes on until its
         * answer begins, so the upstream hears it, as direct; one it waited for and gave up
         * on is dropped now, its upstream connection free for the next */
        bool just_sent = c->left_unanswered || clock_mono_us() - c->req_started_us < 100000;
        if (c->state == CS_UPSTREAM && c->xfer && !c->side.body_left && just_sent && upstream_awaiting_answer(c->xfer)) {
            loop_remove(&c->src);      /* (which would report the hang-up for ever) */
            return;
        }
        conn_close(c);
        return;
    }
    if (c->closing && !buf_len(&c->side.out) && c->state == CS_HTTP) {
        /* (an answer cut short is a reset, never lingered: the app hears it) */
        if (!c->reset_app && linger_adopt(&c->src))
            conn_retire(c, false);     /* the end is linger.c's now */
        else
            conn_close(c);
        return;
    }
    if (c->state == CS_HTTP && !c->xfer && !c->hit && !buf_len(&c->side.in) && !buf_len(&c->side.out)
        && !c->side.app_eof)
        fdgate_engine_release(&c->gate);   /* nothing held: the app's next hit may be answered inline */
    conn_watch_app(c);
}

/* The connection is not HTTP this engine can answer: a tunnel takes it over, fd, bytes
 * read and bytes owed. On failure the conn stays, to close once `out` drains. */
enum tunnel_why { TUNNEL_TLS, TUNNEL_NOT_HTTP, TUNNEL_TOO_LARGE, TUNNEL_OTHER };

static void start_tunnel(struct conn *c, enum tunnel_why why)
{
    fdgate_engine_shut(&c->gate);
    if (c->side.tls_host) {
        /* the plaintext of TLS the app encrypts itself, terminated here: a raw tunnel
         * carried it unencrypted to the upstream's TLS port (credentials, bodies), and
         * whatever answered there reached the app inside its verified session. It ends,
         * as a connection whose server gave up: the app's TLS sees the end */
        STAT_INC(c->side.upstream, tls_not_relayable);
        shim_debug("fd %d: intercepted, not relayable as HTTP: ended, never tunnelled in plaintext", c->side.fd);
        c->closing = true;
        return;
    }
    STAT_INC(c->side.upstream, tunnels);
    if (why == TUNNEL_TLS)
        STAT_INC(c->side.upstream, tunnels_tls);
    else if (why == TUNNEL_NOT_HTTP)
        STAT_INC(c->side.upstream, tunnels_not_http);
    else if (why == TUNNEL_TOO_LARGE)
        STAT_INC(c->side.upstream, tunnels_too_large);
    else
        STAT_INC(c->side.upstream, tunnels_other);
    if (tunnel_start(&c->src, c->side.upstream, &c->side.dest, c->side.dest_len, &c->side.in, &c->side.out,
                     c->side.app_eof) != 0) {
        STAT_INC(c->side.upstream, errors_tunnel);
        c->closing = true;
        return;
    }
    conn_retire(c, false);
}

/* A protocol = redis upstream's connection: a session of redis_session.c takes the fd over
 * with the bytes read so far. On failure the conn stays, to close. */
static void start_redis(struct conn *c)
{
    fdgate_engine_shut(&c->gate);
    if (redis_session_start(&c->src, c->side.upstream, &c->side.dest, c->side.dest_len, &c->side.in,
                            c->side.app_eof) != 0) {
        c->closing = true;
        return;
    }
    conn_retire(c, false);
}

/* Bookkeeping when an exchange ends: drop its request bytes, record its latency. */
static void exchange_finish(struct conn *c, bool ok, bool must_close, bool hit)
{
    conn_to(c, CS_HTTP);
    buf_consume(&c->side.in, c->req_total);
    c->req_total = 0;
    c->continue_sent = false;
    c->counted = false;
    store_request_done(&c->store);
    if (c->side.body_left) {
        c->side.body_left = 0;
        must_close = true;             /* the rest of the body would read as a request */
    }
    if (ok)
        stats_observe_latency(c->side.upstream, hit, clock_mono_us() - c->req_started_us);
    if (!ok || must_close)
        c->closing = true;
}

/* Sends the rest of a hit: the head already in `out`, then the body straight from the
 * entry, one writev at a time. True when it is all sent (or the app went away). */
static bool hit_pump(struct conn *c)
{
    if (!gate_take(c))
        return false;                  /* an app thread is writing into the pair: shortly */
    while (buf_len(&c->side.out) || c->hit_off < c->hit_len) {
        struct iovec iov[2];
        int n = 0;
        if (buf_len(&c->side.out))
            iov[n++] = (struct iovec){ buf_head(&c->side.out), buf_len(&c->side.out) };
        if (c->hit_off < c->hit_len)
            iov[n++] = (struct iovec){ (char *)c->hit->body + c->hit_off, c->hit_len - c->hit_off };
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        ssize_t w = real_sendmsg(c->side.fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return false;
        if (w < 0) {
            c->side.app_gone = true;
            break;
        }
        size_t sent = (size_t)w, from_out = sent < buf_len(&c->side.out) ? sent : buf_len(&c->side.out);
        buf_consume(&c->side.out, from_out);
        c->hit_off += sent - from_out;
    }
    STAT_ADD(c->side.upstream, bytes_from_cache, c->hit_off);
    cache_entry_release(c->hit);
    c->hit = NULL;
    exchange_finish(c, !c->side.app_gone, c->hit_must_close, true);
    return true;
}

/* Starts answering from a cached entry; the head goes through `out`, which is empty. A
 * request whose own validators match the entry gets 304 and no body. */
static bool serve_hit(struct conn *c, struct cache_entry *e, const struct http_request *req)
{
    static char head[RESP_HEAD_MAX + 512];   /* engine thread only */
    bool not_modified = cache_entry_not_modified(e, req);
    size_t n = cache_entry_head(e, c->side.req_minor, c->side.req_keep_alive, not_modified, clock_wall_ms(), head,
                                sizeof head);
    if (!n || buf_append(&c->side.out, head, n) != 0) {   /* cannot happen with an empty `out`; be safe */
        cache_entry_release(e);
        buf_consume(&c->side.out, buf_len(&c->side.out));
        return false;
    }
    STAT_INC(c->side.upstream, hits);
    if (c->rule_index >= 0)
        STAT_RULE(c->side.upstream, c->rule_index, hits);
    if (not_modified)
        STAT_INC(c->side.upstream, not_modified);
    c->hit = e;
    c->hit_off = 0;
    c->hit_len = c->side.req_is_head || not_modified ? 0 : e->body_len;
    c->hit_must_close = !c->side.req_keep_alive;
    conn_to(c, CS_HIT);
    return true;
}

static struct conn *conn_new(int fd, int upstream, const union shim_sockaddr *dest, socklen_t dest_len,
                             _Atomic uint64_t *gate, uint64_t gate_gen);

static void tunnel_tls(struct conn *c, _Atomic uint64_t *why, const char *what)
{
    atomic_fetch_add_explicit(why, 1, memory_order_relaxed);
    shim_debug("fd %d: TLS from the app, tunnelled: %s", c->side.fd, what);
    start_tunnel(c, TUNNEL_TLS);
}

static void on_tls_decided(struct tls_decision *d);

/* The app's TLS is terminated here: its socketpair end and the ClientHello go to a
 * tls_front, whose plaintext side becomes a new connection of the engine's, whose
 * exchanges go to the upstream over HTTPS for the same name. */
static void intercept_tls(struct conn *c)
{
    int sv[2];
    struct upstream_stats *st = &shim_stats[c->side.upstream];
    fdgate_engine_shut(&c->gate);
    if (real_socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) {
        tunnel_tls(c, &st->tls_tunnel_unverified, "no socketpair for the plaintext");
        return;
    }
    fdtable_mark_engine(sv[0]);
    fdtable_mark_engine(sv[1]);
    struct conn *plain = conn_new(sv[0], c->side.upstream, &c->side.dest, c->side.dest_len, NULL, 0);
    if (plain)
        snprintf(plain->tls_host, sizeof plain->tls_host, "%s", c->tls.name);
    struct tls_front_app app = { c->app_fd, c->app_dev, c->app_ino };
    if (!plain || tls_front_start(&c->src, &app, sv[1], sv[0], c->side.upstream, c->tls.name, &c->side.in) != 0) {
        if (plain)
            conn_close(plain);
        else
            fdtable_close_engine_fd(sv[0]);
        fdtable_close_engine_fd(sv[1]);
        tunnel_tls(c, &st->tls_tunnel_unverified, "could not answer for the name");
        return;
    }
    plain->side.tls_host = plain->tls_host;
    plain->side.tls_pin = c->tls.pin;  /* moved: every leg it opens is held to it */
    c->tls.pin = NULL;
    plain->tls_checked = true;         /* what it carries is the plaintext */
    shim_debug("fd %d: TLS from the app for %s terminated; plaintext on fd %d", c->side.fd, c->tls.name, sv[0]);
    conn_retire(c, false);
}

static void act_on_tls(struct conn *c)
{
    if (c->tls.outcome == TLS_TO_INTERCEPT) {
        intercept_tls(c);
        return;
    }
    tunnel_tls(c, c->tls.why, c->tls.what);
}

/* The upstream's verdict came in for a connection that waited on it. */
static void on_tls_decided(struct tls_decision *d)
{
    struct conn *c = (struct conn *)(void *)((char *)d - offsetof(struct conn, tls));
    conn_to(c, CS_HTTP);
    act_on_tls(c);
    if (c->state != CS_GONE)
        conn_update_events(c);
}

/* At the connection's first bytes: TLS the app encrypts itself is tunnelled, or (on an
 * intercepting upstream, from a context that trusts the shim's CA, once the upstream has
 * proved itself as that context would check it) terminated (tls_decide.c). True: the
 * connection is taken care of, or waits. */
static bool took_tls(struct conn *c)
{
    enum tls_outcome o = tls_decide(&c->tls, E.cfg, c->side.upstream, c->side.fd, &c->side.dest, c->side.dest_len,
                                    buf_head(&c->side.in), buf_len(&c->side.in), c->side.app_eof);
    c->tls_checked = o != TLS_NEEDS_MORE;
    if (o == TLS_IS_NOT_TLS)
        return false;
    if (o == TLS_DECIDING)
        conn_to(c, CS_VERIFY);
    else if (o != TLS_NEEDS_MORE)
        act_on_tls(c);
    return true;
}

/* Answers requests at the front of `in`, one exchange at a time so responses go back
 * in request order (pipelining is honoured, not parallelised). */
static void conn_process(struct conn *c)
{
    c->awaiting_room = false;
    while (c->state == CS_HTTP && !c->closing) {
        /* the app is slow to read: the next request waits, and EPOLLOUT stays asked for
         * until it can go, even once a flush elsewhere (libcurl's callbacks, an exchange's
         * end, this event's last) has emptied `out` after this check: no other event may
         * come (so for a hit that waits for `out` to drain, below) */
        if (buf_len(&c->side.out) > OUT_SOFT / 2) {
            c->awaiting_room = true;
            return;
        }
        size_t avail = buf_len(&c->side.in);
        if (avail == 0) {
            if (c->side.app_eof)
                c->closing = true;
            return;
        }
        if (E.cfg->upstreams[c->side.upstream].protocol == PROTO_REDIS) {
            start_redis(c);            /* the Redis protocol: its own session takes over */
            return;
        }
        if (!c->tls_checked && took_tls(c))
            return;
        struct http_request *req = &scratch_req;
        enum http_parse_result r = http_parse_request(buf_head(&c->side.in), avail, req);
        if (r == HTTP_PARSE_INCOMPLETE) {
            if (avail >= HEAD_MAX || c->side.app_eof) {   /* let the upstream itself judge it */
                store_invalidate_unread(c->side.upstream, buf_head(&c->side.in), avail, c->side.tls_host != NULL);
                start_tunnel(c, avail >= HEAD_MAX ? TUNNEL_TOO_LARGE : TUNNEL_NOT_HTTP);
            }
            return;
        }
        if (r == HTTP_PARSE_ERROR || req->head_len > HEAD_MAX || req->upgrade || req->chunked
            || http_method_is(req, "CONNECT")) {
            shim_debug("fd %d: not relayable as HTTP (%s), tunnelling", c->side.fd,
                       r == HTTP_PARSE_ERROR ? "unparsed" : "upgrade/chunked/large body");
            if (r == HTTP_PARSE_DONE)  /* its answer goes by unread: a POST's may have changed its URL */
                store_invalidate_now(c->side.upstream, req, c->side.tls_host != NULL);
            else
                store_invalidate_unread(c->side.upstream, buf_head(&c->side.in), avail, c->side.tls_host != NULL);
            start_tunnel(c, r == HTTP_PARSE_ERROR ? TUNNEL_NOT_HTTP
                            : req->head_len > HEAD_MAX ? TUNNEL_TOO_LARGE : TUNNEL_OTHER);
            return;
        }
        /* A body that fits is passed whole; a larger one streams through `in`. */
        bool streaming = req->content_length > (int64_t)(IN_CAP - req->head_len);
        size_t body_len = req->content_length > 0 && !streaming ? (size_t)req->content_length : 0;
        c->req_total = req->head_len + body_len;
        c->side.req_minor = req->minor_version;
        c->side.req_keep_alive = req->keep_alive;
        c->side.req_is_head = http_method_is(req, "HEAD");
        if (avail < c->req_total || (streaming && !c->continue_sent && req->expect_continue)) {
            if (req->expect_continue && !c->continue_sent) {
                static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
                buf_append(&c->side.out, cont, sizeof cont - 1);
                c->continue_sent = true;
            }
            if (c->side.app_eof) {
                start_tunnel(c, TUNNEL_OTHER);   /* the body will never be whole */
                return;
            }
            if (!streaming)
                return;
        }
        if ((!c->continue_sent || streaming) && !c->counted)
            c->req_started_us = clock_mono_us();
        const struct upstream_rule *u = &E.cfg->upstreams[c->side.upstream];
        const struct cache_rule *rule = E.cfg->cache != CACHE_OFF ? cache_rule_for(u, req) : NULL;
        /* a body too large to hold is never part of a cached exchange */
        bool https = c->side.tls_host != NULL;
        size_t key_len = rule && !streaming ? cache_key(u, rule, req, https, key_scratch, sizeof key_scratch) : 0;
        const char *body = buf_head(&c->side.in) + req->head_len;
        key_len = cache_key_add_body(key_scratch, key_len, sizeof key_scratch, body, body_len);
        if (key_len && buf_len(&c->side.out)) {
            c->awaiting_room = true;   /* a hit goes out in one piece: wait for `out` to drain */
            return;
        }
        if (!c->counted) {
            c->side.requests++;
            STAT_INC(c->side.upstream, requests);
            c->rule_index = rule ? (int)(rule - u->cache_rules) : -1;
            if (rule)
                STAT_RULE(c->side.upstream, c->rule_index, requests);
        }
        c->counted = true;
        bool storable = key_len && !streaming && !cache_request_no_store(req)
                        && (http_method_is(req, "GET") || (!c->side.req_is_head && strcmp(rule->method, "GET")));
        struct store_writer *writer = NULL;
        if (key_len) {
            const struct store_query q = { c->side.upstream, rule, req, body, body_len, key_scratch, key_len, storable,
                                           &c->side };
            struct cache_entry *hit;
            enum store_answer answer = store_open(&c->store, &q, &hit, &writer);
            if (answer == STORE_HIT) {
                if (!serve_hit(c, hit, req)) {
                    c->closing = true;
                    return;
                }
                if (hit_pump(c))
                    continue;          /* sent whole: on to the next pipelined request */
                return;
            }
            if (answer == STORE_WAIT) {
                conn_to(c, CS_CACHE_WAIT);
                return;
            }
        }
        conn_to(c, CS_UPSTREAM);
        STAT_INC(c->side.upstream, upstream_requests);
        c->side.body_left = streaming ? (uint64_t)req->content_length : 0;
        struct upstream_sink *sink = key_len ? store_writer_sink(writer)
                                             : store_invalidation_sink(c->side.upstream, req, https);
        c->xfer = upstream_start(&c->side, req, body, streaming ? (size_t)-1 : body_len, sink);
        if (!c->xfer) {
            STAT_INC(c->side.upstream, errors_upstream);
            conn_to(c, CS_HTTP);
            c->closing = true;
            return;
        }
        if (streaming) {               /* the read callback takes the body from here on */
            buf_consume(&c->side.in, req->head_len);
            c->req_total = 0;
        }
        return;
    }
}

/* A lookup the request waited for has answered: go on with it. */
static void conn_resume(struct conn *c)
{
    conn_to(c, CS_HTTP);
    conn_process(c);
    if (c->state != CS_GONE) {
        if (c->state != CS_HIT)
            conn_flush(c);
        conn_update_events(c);
    }
}

/* The cache side's wait ended: go on with the request. */
static void on_store_ready(struct store_request *r)
{
    conn_resume((struct conn *)(void *)((char *)r - offsetof(struct conn, store)));
}

static void conn_exchange_done(struct conn *c, bool ok, bool must_close)
{
    exchange_finish(c, ok, must_close, false);
    conn_flush(c);
    conn_process(c);
    if (c->state == CS_GONE)
        return;
    conn_flush(c);
    conn_update_events(c);
}

/* The upstream answered with bytes that are not an HTTP/1.x response the shim can relay
 * (not HTTP, a broken status line, framing that disagrees with itself, a head over
 * RESP_HEAD_MAX: 502), or stayed silent past upstream_timeout (504): as any gateway, the
 * shim answers and closes the connection. An end of file instead would read as a
 * kept-alive connection the server had dropped, which clients answer by sending the
 * request again (Java's HttpURLConnection, even a POST): the upstream has had it once. */
static void answer_as_gateway(struct conn *c, int status)
{
    const char *what = status == 504 ? "504 Gateway Timeout" : "502 Bad Gateway";
    const char *why = status == 504 ? "httpshim: the upstream did not answer within upstream_timeout\n"
                                    : "httpshim: the upstream's answer was not an HTTP/1.1 response it could relay\n";
    char head[160];
    int k = snprintf(head, sizeof head, "HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n", what, strlen(why));
    if (k > 0 && (size_t)k < sizeof head && buf_append(&c->side.out, head, (size_t)k) == 0 && !c->side.req_is_head)
        buf_append(&c->side.out, why, strlen(why));
}

/* What upstream.c calls back through. */
static int side_flush(struct app_side *app) { return conn_flush(conn_of(app)); }
static void side_rewatch(struct app_side *app) { conn_watch_app(conn_of(app)); }
static void side_exchange_done(struct app_side *app, enum exchange_end how, bool must_close)
{
    struct conn *c = conn_of(app);
    c->xfer = NULL;
    if (!c->side.body_left && store_after_fetch(&c->store, how)) {
        conn_resume(c);                /* answered from the entry a 304 renewed, or a stale one */
        return;
    }
    c->reset_app = how != EXCHANGE_OK && c->side.upstream_reset;
    c->side.upstream_reset = false;
    bool answered = how == EXCHANGE_UNANSWERED && c->side.gateway_status && !c->side.app_gone;
    if (answered)
        answer_as_gateway(c, c->side.gateway_status);
    else if (how != EXCHANGE_OK && c->side.tls_host)
        tls_front_plain_failed(c->side.fd, c->reset_app);   /* (it closes: its front ends the app's TLS cut) */
    c->side.gateway_status = 0;
    conn_exchange_done(c, how == EXCHANGE_OK, must_close);
}
static const struct app_side_ops side_ops = { side_flush, side_rewatch, side_exchange_done };

static void on_app_event(struct loop_source *src, uint32_t ev);

static void on_gate_retry(struct loop_timer *timer)
{
    struct conn *c = (struct conn *)(void *)((char *)timer - offsetof(struct conn, gate_retry));
    if (c->state != CS_GONE)
        on_app_event(&c->src, EPOLLOUT);   /* as if the app had room again */
}

/* Rests of inline answers the pair did not take: they go out before anything else. */
void engine_take_handoffs(void)
{
    struct fastpath_handoff *h = fastpath_take_handoffs();
    while (h) {
        struct fastpath_handoff *next = h->next;
        struct conn *c = fdtable_owner(h->engine_fd);
        if (c && c->state != CS_GONE && fdgate_engine_live(&c->gate, h->gen)) {   /* (the app made the loop hear it) */
            struct buf joined = { .cap = OUT_CAP + h->len };
            if (buf_append(&joined, h->data, h->len) == 0
                && buf_append(&joined, buf_head(&c->side.out), buf_len(&c->side.out)) == 0) {
                buf_free(&c->side.out);
                c->side.out = joined;
                c->side.out.cap = OUT_CAP + h->len;
            } else {
                buf_free(&joined);
                c->side.app_gone = true;   /* no memory: the answer cannot be finished */
            }
            if (h->close_after)
                c->closing = true;
            if (c->state != CS_HIT)
                conn_flush(c);
            conn_update_events(c);
        }
        free(h);
        h = next;
    }
}

static void on_app_event(struct loop_source *src, uint32_t ev)
{
    struct conn *c = (struct conn *)(void *)((char *)src - offsetof(struct conn, src));
    if (ev & (EPOLLERR | EPOLLHUP)) {
        c->side.app_gone = true;
        buf_consume(&c->side.out, buf_len(&c->side.out));
        /* what the app sent before it closed is still read, as a server would: a request
         * it did not wait for reaches the upstream (its answer dropped), a Redis app's last
         * commands run */
        if ((ev & EPOLLERR) || !(ev & EPOLLIN))
            c->side.app_eof = true;
    }
    if (c->state == CS_HIT) {
        hit_pump(c);
    } else if ((ev & EPOLLOUT) && conn_flush(c) == 0 && c->xfer && buf_len(&c->side.out) <= OUT_SOFT / 2) {
        upstream_resume(c->xfer);      /* (EPOLLOUT is asked for while it is paused: conn_watch_app) */
    }
    if (ev & (EPOLLIN | EPOLLHUP)) {
        bool got = false;
        for (int rounds = 0; rounds < 8 && !c->side.app_eof; rounds++) {
            size_t room = IN_CAP - buf_len(&c->side.in);
            if (room > sizeof recv_scratch)
                room = sizeof recv_scratch;
            if (room == 0)
                break;
            /* read the gate before the read: a write the app makes after it bumps the
             * sequence, and the hand-back fails until that write has been read too */
            uint64_t before = fdgate_engine_before_read(&c->gate);
            ssize_t n = recv(c->side.fd, recv_scratch, room, MSG_DONTWAIT);
            if (n > 0) {
                gate_take(c);          /* bytes the app wrote past the hooks, too, go the engine's way */
                if (buf_append(&c->side.in, recv_scratch, (size_t)n) != 0) {
                    c->side.app_gone = c->side.app_eof = true;     /* out of memory: give up on this one */
                    break;
                }
                got = true;
                continue;
            }
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                fdgate_engine_read_all(&c->gate, before);
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                c->side.app_eof = true;
            break;
        }
        if (c->side.app_gone && got)
            c->left_unanswered = true;     /* (read with the hang-up: sent, then closed at once) */
    }
    if (c->xfer && c->side.body_left && (buf_len(&c->side.in) || c->side.app_eof))
        upstream_body_arrived(c->xfer);
    else
        conn_process(c);
    if (c->state != CS_GONE) {
        if (c->state != CS_HIT)
            conn_flush(c);
        conn_update_events(c);
    }
}

static struct conn *conn_new(int engine_fd, int upstream, const union shim_sockaddr *dest, socklen_t dest_len,
                             _Atomic uint64_t *gate, uint64_t gate_gen)
{
    struct conn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    fdgate_engine_init(&c->gate, gate, gate_gen);
    c->rule_index = -1;
    c->app_fd = -1;
    fdtable_set_owner(engine_fd, c);   /* read by the engine only, after loop_add */
    c->side.ops = &side_ops;
    store_request_init(&c->store, upstream, on_store_ready);
    tls_decide_init(&c->tls, on_tls_decided);
    c->side.fd = engine_fd;
    c->side.upstream = upstream;
    c->side.dest = *dest;
    c->side.dest_len = dest_len;
    c->side.in.cap = IN_CAP;
    c->side.out.cap = OUT_CAP;
    conn_to(c, CS_HTTP);
    pthread_mutex_lock(&E.lock);
    c->next = E.conns;
    if (E.conns)
        E.conns->prev = c;
    E.conns = c;
    pthread_mutex_unlock(&E.lock);
    if (gate) {                        /* an app's connection: registered when first needed */
        c->src.fd = engine_fd;
        return c;
    }
    /* from here on the engine thread owns c */
    if (loop_add(&c->src, engine_fd, EPOLLIN, on_app_event) != 0) {
        unlink_conn(c);
        free(c);
        return NULL;
    }
    return c;
}

/* From an app thread: the engine must hear from this connection from now on (the app
 * writes for real, or an inline answer leaves the engine a rest to send). Connections of
 * an app fd are registered with the loop only then: one that only ever had inline answers
 * never is. */
void engine_need(struct fd_entry *e)
{
    /* every real write comes here: a plain load answers all but the first; a connection
     * diverted before a fork is the parent's engine's, which listens to it already (hooks.c),
     * and its conn, in a child, a copy of the parent's memory. Told by the process, not the
     * fork count: one diverted by another thread while this one forked counted as older
     * than the fork in the parent, and was never listened to (a request lost for ever) */
    if (!fdtable_unheard(e) || e->pid_at_divert != fdtable_pid || !fdtable_claim_heard(e))
        return;
    fdtable_close_kept_app_end(e);     /* now the app's close must be the last: the engine hears it */
    struct conn *c = e->engine_conn;
    if (c) {                           /* (before loop_add publishes the conn to the engine) */
        c->app_fd = (int)(e - fdtable_base);
        c->app_dev = e->dev;
        c->app_ino = e->ino;
    }
    if (c && loop_add(&c->src, c->side.fd, EPOLLIN, on_app_event) != 0)
        real_shutdown(c->side.fd, SHUT_RDWR);   /* cannot listen: the app sees the connection end */
}

bool engine_drop_unseen(struct fd_entry *e, void *conn)
{
    struct conn *c = conn;
    if (!c || !fdtable_claim_dropped(e))
        return false;
    unlink_conn(c);                    /* the engine never saw it: nothing else refers to it */
    fdtable_release_owner(c->side.fd, c);
    if (fdtable_bury(c->side.fd) > 0)  /* its close is the engine's, off the app's thread */
        loop_wake();
    buf_free(&c->side.in);
    buf_free(&c->side.out);
    free(c);
    return true;
}

void *engine_adopt(int engine_fd, int upstream, const union shim_sockaddr *dest, socklen_t dest_len,
                   _Atomic uint64_t *gate, uint64_t gate_gen)
{
    struct conn *c = conn_new(engine_fd, upstream, dest, dest_len, gate, gate_gen);
    if (!c)
        return NULL;
    STAT_INC(upstream, client_connections);
    return c;
}

void engine_conns_init(const struct shim_config *cfg) { E.cfg = cfg; }

void engine_conns_lock(void) { pthread_mutex_lock(&E.lock); }
void engine_conns_unlock(void) { pthread_mutex_unlock(&E.lock); }

void engine_conns_forget(void)
{
    if (E.conns) {
        struct conn *last = E.conns;
        while (last->next)
            last = last->next;
        last->next = orphaned_conns;
        orphaned_conns = E.conns;
    }
    E.conns = NULL;
}
