/* curl_loop.c — owns the bridge between libcurl's multi handle and the engine's loop:
 * libcurl's sockets in the epoll set (an idle pooled connection's parked there, watched
 * for input only, instead of leaving and rejoining the set between its transfers) and
 * libcurl's one timer. Engine thread only; upstream.c owns the multi handle. */
#include "curl_loop.h"
#include "fdtable.h"
#include "log.h"
#include "loop.h"
#include "real.h"
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* parked: out of libcurl's set, watched for input only; idle: parked because its transfer
 * ended and libcurl keeps the connection (not because a transfer is paused) */
struct curl_sock {
    struct loop_source src;
    struct loop_deferred reclaim;
    bool parked, idle;
    const CURL *left_by;               /* the transfer whose end (or pause) parked it */
    uint16_t local_port, peer_port;    /* idle: how a transfer taking it up names it */
    struct curl_sock *idle_prev, *idle_next;
};
static struct curl_sock *idle_head;    /* the idle ones */
static struct curl_hold *holds;        /* the transfers that hold a connection now */

static bool held(unsigned local_port, unsigned peer_port)
{
    for (const struct curl_hold *h = holds; h; h = h->next)
        if (h->local_port == local_port && h->peer_port == peer_port)
            return true;
    return false;
}

static void idle_clear(struct curl_sock *cs)
{
    if (!cs->idle)
        return;
    if (cs->idle_prev)
        cs->idle_prev->idle_next = cs->idle_next;
    else
        idle_head = cs->idle_next;
    if (cs->idle_next)
        cs->idle_next->idle_prev = cs->idle_prev;
    cs->idle_prev = cs->idle_next = NULL;
    cs->idle = false;
}

static void idle_set(struct curl_sock *cs, unsigned local_port, unsigned peer_port)
{
    if (cs->idle)
        return;
    cs->local_port = (uint16_t)local_port;
    cs->peer_port = (uint16_t)peer_port;
    cs->idle = true;
    cs->idle_prev = NULL;
    cs->idle_next = idle_head;
    if (idle_head)
        idle_head->idle_prev = cs;
    idle_head = cs;
}

static CURLM *multi;
static struct loop_timer curl_timer;

static void reclaim_sock(struct loop_deferred *d)
{
    free((char *)d - offsetof(struct curl_sock, reclaim));
}

/* An idle kept-alive connection's socket stays in the epoll set, parked: libcurl removes
 * it from its set after every transfer and adds it back for the next, which cost an
 * EPOLL_CTL_DEL and an EPOLL_CTL_ADD per pooled request. A parked socket is watched for
 * input only, so the one thing it can report is the upstream closing it (or sending
 * something unasked): then it leaves the set for good, and libcurl finds the connection
 * dead when it next tries it. It leaves the set too when libcurl closes it (close_socket).
 * Indexed by fd; the engine's thread only. */
static struct curl_sock **parked;
static int parked_cap;
static struct curl_sock **orphaned_parked;   /* a forked child's inheritance */

static void sock_release(struct curl_sock *cs)
{
    if (cs->parked && cs->src.fd < parked_cap && parked[cs->src.fd] == cs)
        parked[cs->src.fd] = NULL;
    cs->parked = false;
    idle_clear(cs);
    loop_remove(&cs->src);
    loop_defer(&cs->reclaim, reclaim_sock);
}

static bool sock_park(struct curl_sock *cs)
{
    int fd = cs->src.fd;
    if (!cs->src.active || cs->src.events != EPOLLIN || fd < 0 || fd >= FDTABLE_MAX)
        return false;
    if (fd >= parked_cap) {
        int cap = parked_cap ? parked_cap : 64;
        while (cap <= fd)
            cap *= 2;
        struct curl_sock **grown = realloc(parked, (size_t)cap * sizeof *grown);
        if (!grown)
            return false;
        memset(grown + parked_cap, 0, (size_t)(cap - parked_cap) * sizeof *grown);
        parked = grown;
        parked_cap = cap;
    }
    if (parked[fd]) {                  /* its socket was closed behind libcurl's back: the */
        parked[fd]->src.active = false;  /* registration went with it (this one is cs's) */
        parked[fd]->parked = false;
        loop_defer(&parked[fd]->reclaim, reclaim_sock);
    }
    parked[fd] = cs;
    cs->parked = true;
    return true;
}

static struct curl_sock *sock_unpark(int fd)
{
    struct curl_sock *cs = fd >= 0 && fd < parked_cap ? parked[fd] : NULL;
    if (cs) {
        parked[fd] = NULL;
        cs->parked = false;
        idle_clear(cs);
    }
    return cs;
}

/* Bytes on an idle pooled connection answer no request (sent past a Content-Length, a
 * body after a HEAD, a 204 or a 304, in a segment of their own): libcurl would take the
 * connection as alive and read them as the next request's answer, another app
 * connection's. The connection is shut both ways and what waits is read away, so that
 * libcurl's own check before it reuses a connection finds it ended (anything the upstream
 * sends after the shutdown resets it) and opens another. At most 256 KiB is read: past
 * that the socket still refuses the next send, and libcurl sends the request again on a
 * new connection, as for any reused connection that died. */
/* An idle connection spoke: the upstream ended it (or reset it), or sent bytes no request
 * asked for (shut here). Either way it is no live connection any more: libcurl finds out
 * only when it next tries it, and the pool must not count it meanwhile (an app's connect
 * to an upstream that died is then made for real, and refused as direct). */
static void idle_connection_spoke(int fd)
{
    char scrap[16384];
    ssize_t n = recv(fd, scrap, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return;                        /* nothing after all */
    fdtable_note_peer_gone(fd);
    if (n != 1)
        return;                        /* ended: libcurl closes it when it next looks */
    shim_debug("an idle upstream connection (fd %d) sent bytes no request asked for: shut", fd);
    real_shutdown(fd, SHUT_RDWR);
    for (int i = 0; i < 16 && recv(fd, scrap, sizeof scrap, MSG_DONTWAIT) > 0; i++)
        ;
}

static void on_socket(struct loop_source *src, uint32_t events)
{
    struct curl_sock *cs = (struct curl_sock *)(void *)((char *)src - offsetof(struct curl_sock, src));
    if (cs->parked) {                  /* a parked connection spoke: closed, or unasked bytes */
        if (cs->idle)                  /* (a paused transfer's is its answer arriving) */
            idle_connection_spoke(cs->src.fd);
        sock_release(cs);
        return;
    }
    int flags = ((events & EPOLLIN) ? CURL_CSELECT_IN : 0) | ((events & EPOLLOUT) ? CURL_CSELECT_OUT : 0)
              | ((events & (EPOLLERR | EPOLLHUP)) ? CURL_CSELECT_ERR : 0);
    int running;
    curl_multi_socket_action(multi, src->fd, flags, &running);
}

static int on_curl_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    (void)userp;
    struct curl_sock *cs = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (cs) {
            cs->left_by = easy;        /* a transfer that ended, or one that paused */
            curl_multi_assign(multi, s, NULL);
            if (!sock_park(cs))
                sock_release(cs);
        }
        return 0;
    }
    uint32_t events = ((what & CURL_POLL_IN) ? EPOLLIN : 0) | ((what & CURL_POLL_OUT) ? EPOLLOUT : 0);
    if (!cs && (cs = sock_unpark(s)) != NULL)
        curl_multi_assign(multi, s, cs);
    if (!cs) {
        cs = calloc(1, sizeof *cs);
        if (!cs)
            return -1;
        if (loop_add(&cs->src, s, events, on_socket) != 0) {
            free(cs);
            return -1;
        }
        curl_multi_assign(multi, s, cs);
    } else if (loop_watch(&cs->src, events) != 0) {
        curl_multi_assign(multi, s, NULL);
        sock_release(cs);
        return -1;
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

void curl_loop_attach(CURLM *m)
{
    multi = m;
    curl_multi_setopt(m, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
    curl_multi_setopt(m, CURLMOPT_TIMERFUNCTION, on_curl_timer);
}

void curl_loop_watch_idle(curl_socket_t fd, const CURL *ended, unsigned local_port, unsigned peer_port)
{
    if (fd < 0 || fd >= FDTABLE_MAX || held(local_port, peer_port))
        return;                        /* (taken up already by the next transfer) */
    if (fd < parked_cap && parked[fd]) {
        /* parked when this transfer let go of it (the usual case), not by a later one that
         * took the connection up and paused */
        if (parked[fd]->left_by == ended)
            idle_set(parked[fd], local_port, peer_port);
        return;
    }
    /* never watched (the transfer never waited); one a later transfer is using is in the
     * set already, and the add fails */
    struct curl_sock *cs = calloc(1, sizeof *cs);
    if (!cs)
        return;
    if (loop_add(&cs->src, fd, EPOLLIN, on_socket) != 0) {
        free(cs);
        return;
    }
    if (sock_park(cs))
        idle_set(cs, local_port, peer_port);
    else
        sock_release(cs);
}

void curl_loop_taken(struct curl_hold *h, unsigned local_port, unsigned peer_port)
{
    curl_loop_let_go(h);               /* (sent again on another connection: that one now) */
    h->local_port = local_port;
    h->peer_port = peer_port;
    h->held = true;
    h->prev = NULL;
    h->next = holds;
    if (holds)
        holds->prev = h;
    holds = h;
    for (struct curl_sock *cs = idle_head, *next; cs; cs = next) {
        next = cs->idle_next;
        if (cs->local_port == local_port && cs->peer_port == peer_port)
            idle_clear(cs);            /* (its answer may arrive while it is parked: a pause) */
    }
}

void curl_loop_let_go(struct curl_hold *h)
{
    if (!h->held)
        return;
    if (h->prev)
        h->prev->next = h->next;
    else
        holds = h->next;
    if (h->next)
        h->next->prev = h->prev;
    h->prev = h->next = NULL;
    h->held = false;
}

void curl_loop_closing(int fd)
{
    struct curl_sock *cs = sock_unpark(fd);
    if (cs)
        sock_release(cs);
}

void curl_loop_forget(void)
{
    multi = NULL;
    curl_timer.slot = 0;
    orphaned_parked = parked;          /* the parent's sockets (its loop is forgotten too): */
    parked = NULL;                     /* kept, not freed, in a forked child's atfork handler */
    idle_head = NULL;
    holds = NULL;                      /* (the parent's transfers: forgotten with its handle) */
    parked_cap = 0;
}
