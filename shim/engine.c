/* engine.c — owns the engine thread: its epoll loop, the eventfd and timerfd, the app
 * side of every diverted connection (reading requests, writing responses, backpressure)
 * and the per-connection state machine that hands exchanges to upstream.c or the whole
 * connection to tunnel.c. Started on the first diverted connect; after fork the child
 * starts its own. Nothing here blocks. */
#include "conn.h"
#include "lazylib.h"
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/uio.h>

static struct {
    pthread_mutex_t lock;           /* guards started/failed and the conn list */
    bool started, failed;
    int epfd, wakefd, timerfd, tickfd;
    struct ev_tag wake_tag, timer_tag, tick_tag;
    struct conn *conns;
    struct conn *dead;              /* freed after the current epoll batch */
    struct ev_tag *dead_tags;
    const struct shim_config *cfg;
} E = { .lock = PTHREAD_MUTEX_INITIALIZER, .epfd = -1, .wakefd = -1, .timerfd = -1, .tickfd = -1 };

/* Conns a forked child inherited from its parent's engine: kept reachable, never used. */
static struct conn *orphaned_conns;

static struct http_request scratch_req;   /* engine thread only */
static char recv_scratch[16384];          /* engine thread only: c->in grows by what arrived */

size_t buf_make_room(struct buf *b, size_t want)
{
    if (b->size - b->end >= want)
        return b->size - b->end;
    if (b->start > 0) {
        memmove(b->data, b->data + b->start, b->end - b->start);
        b->end -= b->start;
        b->start = 0;
        if (b->size - b->end >= want)
            return b->size - b->end;
    }
    if (b->size < b->cap) {
        size_t size = b->size ? b->size : BUF_INITIAL;
        while (size < b->end + want && size < b->cap)
            size *= 2;
        if (size > b->cap)
            size = b->cap;
        char *p = realloc(b->data, size);
        if (p) {
            b->data = p;
            b->size = size;
        }
    }
    return b->size - b->end;
}

int buf_append(struct buf *b, const void *p, size_t n)
{
    if (buf_make_room(b, n) < n)
        return -1;
    memcpy(b->data + b->end, p, n);
    b->end += n;
    return 0;
}

void buf_free(struct buf *b)
{
    free(b->data);
    memset(b, 0, sizeof *b);
}

const struct shim_config *engine_config(void) { return E.cfg; }

int engine_watch(int fd, uint32_t events, void *tag, bool add)
{
    struct epoll_event ev = { .events = events, .data.ptr = tag };
    return shim_real.epoll_ctl(E.epfd, add ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, fd, &ev);
}

void engine_unwatch(int fd)
{
    shim_real.epoll_ctl(E.epfd, EPOLL_CTL_DEL, fd, NULL);
}

/* ---- the app side ---- */

int conn_flush(struct conn *c)
{
    if (c->app_gone)
        return -1;
    while (buf_len(&c->out)) {
        ssize_t n = send(c->fd, buf_head(&c->out), buf_len(&c->out), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            buf_consume(&c->out, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        c->app_gone = true;
        return -1;
    }
    return 0;
}

void conn_close(struct conn *c)
{
    if (c->dead)
        return;
    c->dead = true;
    if (c->xfer || c->hit)
        STAT_INC(c->upstream, errors_app);   /* the app left in the middle of an answer */
    if (c->xfer)
        upstream_abort(c);
    if (c->tun)
        tunnel_free(c);
    if (c->hit) {
        cache_entry_release(c->hit);
        c->hit = NULL;
    }
    redis_cancel(c);
    if (c->redis_hit) {
        cache_entry_release(c->redis_hit);
        c->redis_hit = NULL;
    }
    /* Leave the epoll set explicitly: close() alone does not when a forked child still
     * holds a copy of the fd, and its events would then name a freed conn. */
    engine_unwatch(c->fd);
    fdtable_clear(c->fd);
    shim_real.close(c->fd);
    c->fd = -1;
    pthread_mutex_lock(&E.lock);
    if (c->prev)
        c->prev->next = c->next;
    else if (E.conns == c)
        E.conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    pthread_mutex_unlock(&E.lock);
    c->next_dead = E.dead;
    E.dead = c;
}

void engine_free_later(struct ev_tag *tag)
{
    tag->kind = EV_DEAD;
    tag->next_dead = E.dead_tags;
    E.dead_tags = tag;
}

static void free_dead(void)
{
    while (E.dead_tags) {
        struct ev_tag *t = E.dead_tags;
        E.dead_tags = t->next_dead;
        free(t);
    }
    while (E.dead) {
        struct conn *c = E.dead;
        E.dead = c->next_dead;
        buf_free(&c->in);
        buf_free(&c->out);
        free(c);
    }
}

void conn_update_events(struct conn *c)
{
    if (c->dead)
        return;
    if (c->app_gone && c->state != CS_TUNNEL) {
        conn_close(c);
        return;
    }
    if (c->closing && !buf_len(&c->out) && c->state == CS_HTTP) {
        conn_close(c);
        return;
    }
    conn_watch_app(c);
}

void conn_watch_app(struct conn *c)
{
    uint32_t want = 0;
    if (!c->app_eof && !c->closing && buf_len(&c->in) < IN_CAP)
        want |= EPOLLIN;
    if ((buf_len(&c->out) || c->state == CS_HIT) && !c->app_gone)
        want |= EPOLLOUT;
    if (want != c->events) {
        c->events = want;
        engine_watch(c->fd, want, c, false);
    }
}

static void start_tunnel(struct conn *c)
{
    STAT_INC(c->upstream, tunnels);
    if (tunnel_start(c) != 0) {
        STAT_INC(c->upstream, errors_tunnel);
        c->closing = true;
    }
}

/* Bookkeeping when an exchange ends: drop its request bytes, record its latency. */
static void exchange_finish(struct conn *c, bool ok, bool must_close, bool hit)
{
    c->state = CS_HTTP;
    buf_consume(&c->in, c->req_total);
    c->req_total = 0;
    c->continue_sent = false;
    c->redis_checked = false;
    if (c->body_left) {
        c->body_left = 0;
        must_close = true;             /* the rest of the body would read as a request */
    }
    if (ok)
        stats_observe_latency(c->upstream, hit, stats_now_us() - c->req_started_us);
    if (!ok || must_close)
        c->closing = true;
}

/* Sends the rest of a hit: the head already in `out`, then the body straight from the
 * entry, one writev at a time. True when it is all sent (or the app went away). */
static bool hit_pump(struct conn *c)
{
    while (buf_len(&c->out) || c->hit_off < c->hit_len) {
        struct iovec iov[2];
        int n = 0;
        if (buf_len(&c->out))
            iov[n++] = (struct iovec){ buf_head(&c->out), buf_len(&c->out) };
        if (c->hit_off < c->hit_len)
            iov[n++] = (struct iovec){ (char *)c->hit->body + c->hit_off, c->hit_len - c->hit_off };
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        ssize_t w = sendmsg(c->fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return false;
        if (w < 0) {
            c->app_gone = true;
            break;
        }
        size_t sent = (size_t)w, from_out = sent < buf_len(&c->out) ? sent : buf_len(&c->out);
        buf_consume(&c->out, from_out);
        c->hit_off += sent - from_out;
    }
    STAT_ADD(c->upstream, bytes_from_cache, c->hit_off);
    cache_entry_release(c->hit);
    c->hit = NULL;
    exchange_finish(c, !c->app_gone, c->hit_must_close, true);
    return true;
}

/* Starts answering from a cached entry; the head goes through `out`, which is empty. */
static bool serve_hit(struct conn *c, struct cache_entry *e)
{
    int64_t age = (cache_now_ms() - e->stored_at_ms) / 1000;
    char line[256];
    int k = snprintf(line, sizeof line, "HTTP/1.%d %d %.*s\r\n", c->req_minor, e->status, (int)e->reason_len, e->reason);
    bool ok = k > 0 && (size_t)k < sizeof line && buf_append(&c->out, line, (size_t)k) == 0
              && buf_append(&c->out, e->headers, e->headers_len) == 0;
    k = snprintf(line, sizeof line, "Content-Length: %zu\r\nAge: %lld\r\n%s\r\n", e->body_len, (long long)(age < 0 ? 0 : age),
                 http_connection_line(c->req_minor, c->req_keep_alive));
    ok = ok && k > 0 && (size_t)k < sizeof line && buf_append(&c->out, line, (size_t)k) == 0;
    if (!ok) {                         /* cannot happen with an empty `out`; be safe */
        cache_entry_release(e);
        buf_consume(&c->out, buf_len(&c->out));
        return false;
    }
    STAT_INC(c->upstream, hits);
    c->hit = e;
    c->hit_off = 0;
    c->hit_len = c->req_is_head ? 0 : e->body_len;
    c->hit_must_close = !c->req_keep_alive;
    c->state = CS_HIT;
    return true;
}

static char key_scratch[CACHE_KEY_MAX];   /* engine thread only */

/* Answers requests at the front of `in`, one exchange at a time so responses go back
 * in request order (pipelining is honoured, not parallelised). */
void conn_process(struct conn *c)
{
    while (!c->dead && c->state == CS_HTTP && !c->closing) {
        if (buf_len(&c->out) > OUT_SOFT / 2)
            return;                    /* the app is slow to read: wait before the next one */
        size_t avail = buf_len(&c->in);
        if (avail == 0) {
            if (c->app_eof)
                c->closing = true;
            return;
        }
        struct http_request *req = &scratch_req;
        enum http_parse_result r = http_parse_request(buf_head(&c->in), avail, req);
        if (r == HTTP_PARSE_INCOMPLETE) {
            if (avail >= HEAD_MAX || c->app_eof)
                start_tunnel(c);       /* let the upstream itself judge it */
            return;
        }
        if (r == HTTP_PARSE_ERROR || req->head_len > HEAD_MAX || req->upgrade || req->chunked
            || http_method_is(req, "CONNECT")) {
            shim_debug("fd %d: not relayable as HTTP (%s), tunnelling", c->fd,
                       r == HTTP_PARSE_ERROR ? "unparsed" : "upgrade/chunked/large body");
            start_tunnel(c);
            return;
        }
        /* A body that fits is passed whole; a larger one streams through `in`. */
        bool streaming = req->content_length > (int64_t)(IN_CAP - req->head_len);
        size_t body_len = req->content_length > 0 && !streaming ? (size_t)req->content_length : 0;
        c->req_total = req->head_len + body_len;
        c->req_minor = req->minor_version;
        c->req_keep_alive = req->keep_alive;
        c->req_is_head = http_method_is(req, "HEAD");
        if (avail < c->req_total || (streaming && !c->continue_sent && req->expect_continue)) {
            if (req->expect_continue && !c->continue_sent) {
                static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
                buf_append(&c->out, cont, sizeof cont - 1);
                c->continue_sent = true;
            }
            if (c->app_eof)
                start_tunnel(c);
            if (!streaming)
                return;
        }
        if ((!c->continue_sent || streaming) && !c->redis_checked)
            c->req_started_us = stats_now_us();
        const struct upstream_rule *u = &E.cfg->upstreams[c->upstream];
        const struct cache_rule *rule = E.cfg->cache != CACHE_OFF ? cache_rule_for(u, req) : NULL;
        size_t key_len = rule ? cache_key(u, rule, req, key_scratch, sizeof key_scratch) : 0;
        if (key_len && buf_len(&c->out))
            return;                    /* a hit goes out in one piece: wait for `out` to drain */
        if (!c->redis_checked)
            STAT_INC(c->upstream, requests);
        if (key_len) {
            struct cache_entry *e = c->redis_hit ? c->redis_hit : memcache_get(key_scratch, key_len);
            c->redis_hit = NULL;
            if (e && cache_entry_is_vary_marker(e)) {
                static char variant[CACHE_KEY_MAX];
                size_t n = cache_variant_key(key_scratch, key_len, e->vary, e->vary_len, req, variant, sizeof variant);
                cache_entry_release(e);
                e = n ? memcache_get(variant, n) : NULL;
            }
            if (e && !cache_entry_matches_request(e, req)) {
                cache_entry_release(e);
                e = NULL;
            }
            if (e && serve_hit(c, e)) {
                if (hit_pump(c))
                    continue;          /* sent whole: on to the next pipelined request */
                return;
            }
            if (!e && E.cfg->cache == CACHE_REDIS && !c->redis_checked && !streaming
                && redis_lookup(c, key_scratch, key_len)) {
                c->state = CS_REDIS;
                return;
            }
            STAT_INC(c->upstream, misses);
        }
        bool storable = key_len && !streaming
                        && (http_method_is(req, "GET") || (!c->req_is_head && strcmp(rule->method, "GET")));
        c->state = CS_UPSTREAM;
        STAT_INC(c->upstream, upstream_requests);
        c->body_left = streaming ? (uint64_t)req->content_length : 0;
        if (upstream_start(c, req, buf_head(&c->in) + req->head_len, streaming ? (size_t)-1 : body_len,
                           storable ? rule : NULL, key_scratch, key_len) != 0) {
            STAT_INC(c->upstream, errors_upstream);
            c->state = CS_HTTP;
            c->closing = true;
            return;
        }
        if (streaming) {               /* the read callback takes the body from here on */
            buf_consume(&c->in, req->head_len);
            c->req_total = 0;
        }
        return;
    }
}

void redis_lookup_done(struct conn *c, struct cache_entry *e)
{
    c->state = CS_HTTP;
    c->redis_checked = true;
    if (e) {
        cache_entry_ref(e);
        memcache_put(e);               /* promoted to the memory tier ... */
        c->redis_hit = e;              /* ... and served from our own reference */
    }
    conn_process(c);
    if (!c->dead) {
        if (c->state != CS_HIT)
            conn_flush(c);
        conn_update_events(c);
    }
}

void conn_exchange_done(struct conn *c, bool ok, bool must_close)
{
    exchange_finish(c, ok, must_close, false);
    conn_flush(c);
    conn_process(c);
    conn_flush(c);
    conn_update_events(c);
}

static void on_app_event(struct conn *c, uint32_t ev)
{
    if (ev & (EPOLLERR | EPOLLHUP)) {
        c->app_gone = c->app_eof = true;
        buf_consume(&c->out, buf_len(&c->out));
    }
    if (c->state == CS_HIT) {
        hit_pump(c);
    } else if ((ev & EPOLLOUT) && conn_flush(c) == 0 && c->xfer && buf_len(&c->out) <= OUT_SOFT / 2) {
        upstream_resume(c);
    }
    if (ev & (EPOLLIN | EPOLLHUP)) {
        for (int rounds = 0; rounds < 8 && !c->app_eof; rounds++) {
            size_t room = IN_CAP - buf_len(&c->in);
            if (room > sizeof recv_scratch)
                room = sizeof recv_scratch;
            if (room == 0)
                break;
            ssize_t n = recv(c->fd, recv_scratch, room, MSG_DONTWAIT);
            if (n > 0) {
                if (buf_append(&c->in, recv_scratch, (size_t)n) != 0) {
                    c->app_gone = c->app_eof = true;     /* out of memory: give up on this one */
                    break;
                }
                continue;
            }
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                c->app_eof = true;
            break;
        }
    }
    if (c->state == CS_TUNNEL)
        tunnel_pump(c);
    else if (c->xfer && c->body_left && (buf_len(&c->in) || c->app_eof))
        upstream_body_arrived(c);
    else
        conn_process(c);
    if (!c->dead) {
        if (c->state != CS_HIT)
            conn_flush(c);
        conn_update_events(c);
    }
}

/* ---- the loop ---- */

static void *engine_main(void *arg)
{
    (void)arg;
    shim_in_engine = 1;
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(E.epfd, evs, 64, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            shim_log("engine: epoll_wait failed: %s", strerror(errno));
            return NULL;
        }
        for (int i = 0; i < n; i++) {
            struct ev_tag *tag = evs[i].data.ptr;
            uint32_t ev = evs[i].events;
            switch (tag->kind) {
            case EV_APP: {
                struct conn *c = (struct conn *)tag;
                if (!c->dead)
                    on_app_event(c, ev);
                break;
            }
            case EV_TUNNEL_UP:
                tunnel_on_upstream(tag, ev);
                break;
            case EV_CURL:
                upstream_on_socket(tag, ev);
                break;
            case EV_TIMER: {
                uint64_t ticks;
                ssize_t r = read(E.timerfd, &ticks, sizeof ticks);
                (void)r;
                upstream_on_timer();
                break;
            }
            case EV_TICK: {
                uint64_t ticks;
                ssize_t r = read(E.tickfd, &ticks, sizeof ticks);
                (void)r;
                stats_tick();
                break;
            }
            case EV_STATS:
                stats_on_event(tag, ev);
                break;
            case EV_REDIS:
            case EV_REDIS_TIMER:
                redis_on_event(tag, ev);
                break;
            case EV_WAKE: {
                uint64_t v;
                ssize_t r = read(E.wakefd, &v, sizeof v);
                (void)r;
                break;
            }
            default:
                break;
            }
            upstream_reap();
        }
        free_dead();
    }
}

int engine_timer_arm(long timeout_ms)
{
    struct itimerspec its = { 0 };
    if (timeout_ms == 0)
        its.it_value.tv_nsec = 1;      /* zero would disarm */
    else if (timeout_ms > 0) {
        its.it_value.tv_sec = timeout_ms / 1000;
        its.it_value.tv_nsec = (timeout_ms % 1000) * 1000000L;
    }
    return timerfd_settime(E.timerfd, 0, &its, NULL);
}

static int start_locked(void)
{
    E.cfg = shim_config_get();
    if (!E.cfg)
        return -1;
    if (lazylib_load() != 0) {
        shim_log("engine not started: connections go direct");
        return -1;
    }
    E.epfd = epoll_create1(EPOLL_CLOEXEC);
    E.wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    E.timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    E.tickfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (E.epfd < 0 || E.wakefd < 0 || E.timerfd < 0 || E.tickfd < 0)
        goto fail;
    fdtable_mark_engine(E.epfd);
    fdtable_mark_engine(E.wakefd);
    fdtable_mark_engine(E.timerfd);
    fdtable_mark_engine(E.tickfd);
    E.wake_tag.kind = EV_WAKE;
    E.timer_tag.kind = EV_TIMER;
    E.tick_tag.kind = EV_TICK;
    struct itimerspec second = { .it_interval = { 1, 0 }, .it_value = { 1, 0 } };
    if (engine_watch(E.wakefd, EPOLLIN, &E.wake_tag, true) || engine_watch(E.timerfd, EPOLLIN, &E.timer_tag, true)
        || engine_watch(E.tickfd, EPOLLIN, &E.tick_tag, true) || timerfd_settime(E.tickfd, 0, &second, NULL))
        goto fail;
    stats_server_start(E.cfg);        /* no stats socket is no reason to run unshimmed */
    memcache_configure(E.cfg->memory_max);
    if (upstream_init(E.cfg) != 0)
        goto fail;
    if (redis_init(E.cfg) != 0)
        shim_log("redis tier could not start: memory tier and upstream only");
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);   /* the app's signals stay with the app */
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    int rc = pthread_create(&th, &attr, engine_main, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0)
        goto fail;
    pthread_setname_np(th, "httpshim");
    shim_debug("engine started");
    return 0;
fail:
    shim_log("engine could not start (%s): connections go direct", strerror(errno));
    return -1;
}

int engine_ensure_started(void)
{
    pthread_mutex_lock(&E.lock);
    if (!E.started) {
        E.started = true;
        E.failed = start_locked() != 0;
    }
    bool failed = E.failed;
    pthread_mutex_unlock(&E.lock);
    return failed ? -1 : 0;
}

int engine_adopt(int engine_fd, int upstream, const union shim_sockaddr *dest, socklen_t dest_len)
{
    struct conn *c = calloc(1, sizeof *c);
    if (!c)
        return -1;
    c->tag.kind = EV_APP;
    c->fd = engine_fd;
    c->upstream = upstream;
    c->dest = *dest;
    c->dest_len = dest_len;
    c->state = CS_HTTP;
    c->in.cap = IN_CAP;
    c->out.cap = OUT_CAP;
    c->events = EPOLLIN;
    pthread_mutex_lock(&E.lock);
    c->next = E.conns;
    if (E.conns)
        E.conns->prev = c;
    E.conns = c;
    pthread_mutex_unlock(&E.lock);
    STAT_INC(upstream, client_connections);
    /* from here on the engine thread owns c */
    if (engine_watch(engine_fd, EPOLLIN, c, true) != 0) {
        pthread_mutex_lock(&E.lock);
        if (c->prev)
            c->prev->next = c->next;
        else
            E.conns = c->next;
        if (c->next)
            c->next->prev = c->prev;
        pthread_mutex_unlock(&E.lock);
        free(c);
        return -1;
    }
    return 0;
}

void engine_atfork_prepare(void)
{
    pthread_mutex_lock(&E.lock);
    memcache_atfork_prepare();
}

void engine_atfork_parent(void)
{
    memcache_atfork_release();
    pthread_mutex_unlock(&E.lock);
}

void engine_atfork_child(void)
{
    /* The engine thread did not survive the fork. Its fds are copies that would keep
     * the parent's connections open: close them, forget the state, start afresh on the
     * next diverted connect. Only async-signal-safe work here. */
    fdtable_close_engine_fds();
    if (E.started && !E.failed)
        upstream_forget();
    if (E.conns) {
        struct conn *last = E.conns;
        while (last->next)
            last = last->next;
        last->next = orphaned_conns;
        orphaned_conns = E.conns;
    }
    E.conns = NULL;
    E.dead = NULL;
    E.dead_tags = NULL;
    E.started = E.failed = false;
    E.epfd = E.wakefd = E.timerfd = E.tickfd = -1;
    stats_server_atfork_child();
    if (E.cfg && E.cfg->cache == CACHE_REDIS)
        redis_forget();
    stats_reset();
    memcache_atfork_release();
    pthread_mutex_unlock(&E.lock);
}
