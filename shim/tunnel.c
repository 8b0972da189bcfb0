/* tunnel.c — owns raw relays: a diverted connection whose bytes are not HTTP/1.x the
 * engine can answer (TLS, binary protocols, Upgrade, CONNECT, unparseable or oversized
 * requests) is handed over whole — the app's socketpair end and whatever was already
 * read from it — connected to its real upstream, and bytes flow both ways untouched,
 * half-closes included. Both directions are bounded buffers. */
#include "tunnel.h"
#include "conn.h"
#include "log.h"
#include "pool.h"
#include "real.h"
#include "stats.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct tunnel {
    struct loop_source app, up;     /* the app's socketpair end, the real upstream socket */
    struct loop_deferred reclaim;
    int upstream;
    struct buf to_up, to_app;
    bool connecting, dead;
    bool app_eof, app_gone;         /* the app shut its write side / closed */
    bool up_eof, up_shut, app_shut;
    struct tunnel *next, *prev;     /* live tunnels, for a forked child to abandon */
};

static struct tunnel *live;
static struct tunnel *orphaned;     /* a forked child's inheritance: reachable, never used */
static char scratch[16384];         /* engine thread only */

static void reclaim(struct loop_deferred *d)
{
    struct tunnel *t = (struct tunnel *)((char *)d - offsetof(struct tunnel, reclaim));
    buf_free(&t->to_up);
    buf_free(&t->to_app);
    free(t);
}

static void tunnel_close(struct tunnel *t)
{
    if (t->dead)
        return;
    t->dead = true;
    loop_remove(&t->app);
    loop_remove(&t->up);
    fdtable_close_engine_fd(t->app.fd);
    fdtable_close_engine_fd(t->up.fd);
    if (t->prev)
        t->prev->next = t->next;
    else
        live = t->next;
    if (t->next)
        t->next->prev = t->prev;
    loop_defer(&t->reclaim, reclaim);
}

static void flush_to_app(struct tunnel *t)
{
    if (!t->app_gone && buf_send(&t->to_app, t->app.fd) != 0)
        t->app_gone = true;
}

static void watch_app(struct tunnel *t)
{
    uint32_t want = 0;
    if (!t->app_eof && buf_len(&t->to_up) < IN_CAP)
        want |= EPOLLIN;
    if (buf_len(&t->to_app) && !t->app_gone)
        want |= EPOLLOUT;
    loop_watch(&t->app, want);
}

/* Moves what can move now, propagates half-closes, and ends the relay when both
 * directions are done or the app has gone and its last bytes reached the upstream. */
static void pump(struct tunnel *t)
{
    if (t->connecting)
        return;
    if (buf_send(&t->to_up, t->up.fd) != 0) {
        tunnel_close(t);               /* upstream refused our bytes: end both sides */
        return;
    }
    if (t->app_eof && !buf_len(&t->to_up) && !t->up_shut) {
        real_shutdown(t->up.fd, SHUT_WR);
        t->up_shut = true;
    }
    flush_to_app(t);
    if (t->up_eof && !buf_len(&t->to_app) && !t->app_shut && !t->app_gone) {
        real_shutdown(t->app.fd, SHUT_WR);
        t->app_shut = true;
    }
    if ((t->app_gone && t->up_shut) || (t->up_shut && t->up_eof && !buf_len(&t->to_app))) {
        tunnel_close(t);
        return;
    }
    uint32_t want = 0;
    if (!t->up_eof && buf_len(&t->to_app) < OUT_SOFT)
        want |= EPOLLIN;
    if (buf_len(&t->to_up))
        want |= EPOLLOUT;
    loop_watch(&t->up, want);
}

static void on_app(struct loop_source *src, uint32_t ev)
{
    struct tunnel *t = (struct tunnel *)((char *)src - offsetof(struct tunnel, app));
    if (ev & (EPOLLERR | EPOLLHUP)) {
        t->app_gone = t->app_eof = true;
        buf_consume(&t->to_app, buf_len(&t->to_app));
    }
    if (ev & EPOLLOUT)
        flush_to_app(t);
    if (ev & (EPOLLIN | EPOLLHUP)) {
        for (int rounds = 0; rounds < 8 && !t->app_eof; rounds++) {
            size_t room = IN_CAP - buf_len(&t->to_up);
            if (room > sizeof scratch)
                room = sizeof scratch;
            if (room == 0)
                break;
            ssize_t n = recv(t->app.fd, scratch, room, MSG_DONTWAIT);
            if (n > 0) {
                if (buf_append(&t->to_up, scratch, (size_t)n) != 0) {
                    t->app_gone = t->app_eof = true;     /* out of memory: give up on this one */
                    break;
                }
                continue;
            }
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                t->app_eof = true;
            break;
        }
    }
    pump(t);
    if (!t->dead)
        watch_app(t);
}

static void on_upstream(struct loop_source *src, uint32_t ev)
{
    struct tunnel *t = (struct tunnel *)((char *)src - offsetof(struct tunnel, up));
    if (t->connecting) {
        int err = 0;
        socklen_t len = sizeof err;
        if (real_getsockopt(t->up.fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err) {
            shim_debug("fd %d: tunnel connect failed: %s", t->app.fd, strerror(err));
            STAT_INC(t->upstream, errors_tunnel);
            tunnel_close(t);
            return;
        }
        t->connecting = false;
    }
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        for (int rounds = 0; rounds < 8 && !t->up_eof; rounds++) {
            size_t free_room = OUT_SOFT - buf_len(&t->to_app) < sizeof scratch ? OUT_SOFT - buf_len(&t->to_app)
                                                                                 : sizeof scratch;
            size_t room = buf_make_room(&t->to_app, free_room);
            if (room == 0 || buf_len(&t->to_app) >= OUT_SOFT)
                break;
            ssize_t n = recv(t->up.fd, t->to_app.data + t->to_app.end, room, MSG_DONTWAIT);
            if (n > 0) {
                t->to_app.end += (size_t)n;
                continue;
            }
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                break;
            t->up_eof = true;          /* EOF or reset: deliver what we have, then end */
            if (n < 0)
                t->up_shut = true;
        }
    }
    pump(t);
    if (!t->dead)
        watch_app(t);
}

int tunnel_start(struct loop_source *app_src, int upstream, const union shim_sockaddr *dest, socklen_t dest_len,
                 struct buf *to_upstream, struct buf *to_app, bool app_eof)
{
    struct tunnel *t = calloc(1, sizeof *t);
    if (!t)
        return -1;
    t->upstream = upstream;
    /* A cold pool's probe is the app's own connection, made for real and waiting for a
     * transfer (pool.c): the app's connection is this tunnel, so it carries it, as direct
     * (else the upstream sees a connection that never speaks, and the tunnel waits out a
     * handshake of its own). */
    int fd = pool_take_offered(upstream, &dest->sa);
    bool connected = fd >= 0;
    if (!connected) {
        fd = fdtable_raise(real_socket(dest->sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
        if (fd < 0) {
            free(t);
            return -1;
        }
        fdtable_mark_engine(fd);
    }
    if ((!connected && real_connect(fd, &dest->sa, dest_len) != 0 && errno != EINPROGRESS)
        || loop_add(&t->up, fd, EPOLLOUT, on_upstream) != 0) {
        fdtable_close_engine_fd(fd);
        free(t);
        return -1;
    }
    t->connecting = true;
    t->app_eof = app_eof;
    uint32_t app_events = (!app_eof && buf_len(to_upstream) < IN_CAP ? EPOLLIN : 0) | (buf_len(to_app) ? EPOLLOUT : 0);
    if (loop_move(app_src, &t->app, app_events, on_app) != 0) {
        loop_remove(&t->up);
        fdtable_close_engine_fd(fd);
        free(t);
        return -1;
    }
    t->to_up = *to_upstream;
    t->to_app = *to_app;
    memset(to_upstream, 0, sizeof *to_upstream);
    memset(to_app, 0, sizeof *to_app);
    t->next = live;
    if (live)
        live->prev = t;
    live = t;
    shim_debug("fd %d: tunnel to upstream opened%s", t->app.fd, connected ? " (on the app's own connection)" : "");
    return 0;
}

void tunnel_forget(void)
{
    if (live) {
        struct tunnel *last = live;
        while (last->next)
            last = last->next;
        last->next = orphaned;
        orphaned = live;
    }
    live = NULL;
}
