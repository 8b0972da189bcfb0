/* tunnel.c — owns raw relays: a diverted connection whose bytes are not HTTP/1.x the
 * engine can answer (TLS, binary protocols, Upgrade, CONNECT, unparseable or oversized
 * requests) is connected to its real upstream, and bytes flow both ways untouched,
 * half-closes included. Both directions are bounded by the conn's buffers. */
#include "conn.h"
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct tunnel {
    struct ev_tag tag;
    struct conn *conn;
    int fd;
    uint32_t events;
    bool connecting, up_eof, up_shut, app_shut;
};

int tunnel_start(struct conn *c)
{
    struct tunnel *t = calloc(1, sizeof *t);
    if (!t)
        return -1;
    t->tag.kind = EV_TUNNEL_UP;
    t->conn = c;
    t->fd = socket(c->dest.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (t->fd < 0) {
        free(t);
        return -1;
    }
    fdtable_mark_engine(t->fd);
    if (shim_real.connect(t->fd, &c->dest.sa, c->dest_len) != 0 && errno != EINPROGRESS) {
        fdtable_clear(t->fd);
        shim_real.close(t->fd);
        free(t);
        return -1;
    }
    t->connecting = true;
    t->events = EPOLLOUT;
    if (engine_watch(t->fd, t->events, t, true) != 0) {
        fdtable_clear(t->fd);
        shim_real.close(t->fd);
        free(t);
        return -1;
    }
    c->tun = t;
    c->state = CS_TUNNEL;
    shim_debug("fd %d: tunnel to upstream opened", c->fd);
    return 0;
}

void tunnel_free(struct conn *c)
{
    struct tunnel *t = c->tun;
    c->tun = NULL;
    engine_unwatch(t->fd);     /* close() does not, while a forked child holds a copy */
    fdtable_clear(t->fd);
    shim_real.close(t->fd);
    engine_free_later(&t->tag);
}

/* Moves what can move now, propagates half-closes, and ends the relay when both
 * directions are done or the app has gone and its last bytes reached the upstream. */
void tunnel_pump(struct conn *c)
{
    struct tunnel *t = c->tun;
    if (!t || t->connecting)
        return;
    while (buf_len(&c->in)) {
        ssize_t n = send(t->fd, buf_head(&c->in), buf_len(&c->in), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            buf_consume(&c->in, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        conn_close(c);                 /* upstream refused our bytes: end both sides */
        return;
    }
    if (c->app_eof && !buf_len(&c->in) && !t->up_shut) {
        shutdown(t->fd, SHUT_WR);
        t->up_shut = true;
    }
    conn_flush(c);
    if (t->up_eof && !buf_len(&c->out) && !t->app_shut && !c->app_gone) {
        shutdown(c->fd, SHUT_WR);
        t->app_shut = true;
    }
    if ((c->app_gone && t->up_shut) || (t->up_shut && t->up_eof && !buf_len(&c->out))) {
        conn_close(c);
        return;
    }
    uint32_t want = 0;
    if (!t->up_eof && buf_len(&c->out) < OUT_SOFT)
        want |= EPOLLIN;
    if (buf_len(&c->in))
        want |= EPOLLOUT;
    if (want != t->events) {
        t->events = want;
        engine_watch(t->fd, want, t, false);
    }
}

void tunnel_on_upstream(void *tag, uint32_t ev)
{
    struct tunnel *t = tag;
    struct conn *c = t->conn;
    if (c->dead)
        return;
    if (t->connecting) {
        int err = 0;
        socklen_t len = sizeof err;
        if (shim_real.getsockopt(t->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err) {
            shim_debug("fd %d: tunnel connect failed: %s", c->fd, strerror(err));
            STAT_INC(c->upstream, errors_tunnel);
            conn_close(c);
            return;
        }
        t->connecting = false;
    }
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        for (int rounds = 0; rounds < 8 && !t->up_eof; rounds++) {
            size_t room = buf_make_room(&c->out, OUT_SOFT - buf_len(&c->out) < 16384 ? OUT_SOFT - buf_len(&c->out) : 16384);
            if (room == 0 || buf_len(&c->out) >= OUT_SOFT)
                break;
            ssize_t n = recv(t->fd, c->out.data + c->out.end, room, MSG_DONTWAIT);
            if (n > 0) {
                c->out.end += (size_t)n;
                continue;
            }
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                break;
            t->up_eof = true;          /* EOF or reset: deliver what we have, then end */
            if (n < 0)
                t->up_shut = true;
        }
    }
    tunnel_pump(c);
    if (!c->dead)
        conn_update_events(c);
}
