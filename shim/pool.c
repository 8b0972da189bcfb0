/* pool.c — owns what the pool knows beyond libcurl: connections the app's own connects
 * made while the pool was cold (hooks.c connects for real so that the app sees the real
 * connect error), kept a few seconds for the next transfer to that address; the one probe
 * per upstream at a time, during which that upstream's transfers wait (pool_queue.c) until
 * the engine sees its handshake complete; and the connects of a cold burst made for real
 * alongside it, counted so that the burst never opens more than pool_max_per_host
 * connections. Shared by app threads and the engine thread: atomics and one lock. */
#include "pool.h"
#include "clock.h"
#include "fdtable.h"
#include "log.h"
#include "loop.h"
#include "real.h"
#include "stats.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>

/* Connections the app's own connects made while the pool was cold (hooks.c), waiting for
 * the transfer that will use them: a few seconds at most, then closed. Filled from app
 * threads, hence the lock. */
#define OFFERED_MAX 1024                /* a cold burst's connects, each brought its own */
#define OFFERED_MAX_AGE_US (3 * 1000000LL)
static struct {
    pthread_mutex_t lock;
    int n;
    struct offered { int fd, upstream; union shim_sockaddr dest; int64_t at_us; } conns[OFFERED_MAX];
} offered = { .lock = PTHREAD_MUTEX_INITIALIZER };
static _Atomic int offered_count[RULES_MAX_UPSTREAMS];

/* One probe at a time per upstream (hooks.c): while it runs, the upstream's transfers wait
 * in the queue, so the connection it makes is the one the first of them uses and a cold
 * burst never opens more than pool_max_per_host. A probe that does not settle within
 * POOL_PROBE_HOLD_MS (a non-blocking app that never asks SO_ERROR) stops holding them. */
static _Atomic int64_t probe_started_us[RULES_MAX_UPSTREAMS];   /* 0: none in flight */
static _Atomic int probe_settled[RULES_MAX_UPSTREAMS];

/* The addresses of each upstream that a real connect reached (a few, the newest kept) and
 * the one the probe in flight dials, under offered.lock: a connect is answered at once
 * only for an address known to answer. An upstream name with two addresses (localhost:
 * 127.0.0.1 and ::1, a server listening on one) must not have the dead one's connect
 * succeed because the live one's did. */
#define PROVEN_MAX 8
static struct proven { union shim_sockaddr addr[PROVEN_MAX]; int n, next; union shim_sockaddr probing; }
    proven[RULES_MAX_UPSTREAMS];
static bool same_address(const struct sockaddr *a, const union shim_sockaddr *b);

/* The engine's own look at a probe's handshake: the app learns that its connect completed
 * only when it next asks (SO_ERROR, connect again), which an event loop with hundreds of
 * connects to issue first does many milliseconds later; the engine watches a duplicate of
 * the probe's socket and, the moment it is connected, says so (pool_probe_connected): the
 * queue then lets the held transfers go, counting the probe's connection, which joins the
 * pool when the app asks, against the cap (pool_connects_in_flight). A failed handshake
 * changes nothing: the app finds out and ends the probe. */
static _Atomic int64_t probe_connected_for[RULES_MAX_UPSTREAMS];   /* probe_started_us it was seen for */
static struct probe_watch {
    struct loop_source src;
    struct loop_deferred done;
    int up;
    int64_t started_us;
} watches[RULES_MAX_UPSTREAMS];
static _Atomic int watch_busy[RULES_MAX_UPSTREAMS];

static bool probe_in_flight(int up, int64_t *at)
{
    *at = atomic_load(&probe_started_us[up]);
    return *at && clock_mono_us() - *at < POOL_PROBE_HOLD_MS * 1000LL;
}

bool pool_probe_holds(int up)
{
    int64_t at;
    return probe_in_flight(up, &at);
}

bool pool_probe_connected(int up)
{
    int64_t at;
    return probe_in_flight(up, &at) && atomic_load(&probe_connected_for[up]) == at;
}

static void watch_done(struct loop_deferred *d)
{
    struct probe_watch *w = (struct probe_watch *)(void *)((char *)d - offsetof(struct probe_watch, done));
    atomic_store(&watch_busy[w->up], 0);   /* after the batch: no event of this one is left */
}

static void on_probe_writable(struct loop_source *src, uint32_t events)
{
    (void)events;
    struct probe_watch *w = (struct probe_watch *)(void *)((char *)src - offsetof(struct probe_watch, src));
    union shim_sockaddr peer;
    socklen_t len = sizeof peer;
    int64_t at = w->started_us;
    if (real_getpeername(src->fd, &peer.sa, &len) == 0 && atomic_load(&probe_started_us[w->up]) == at) {
        atomic_store(&probe_connected_for[w->up], at);
        atomic_store(&probe_settled[w->up], 1);   /* the queue looks again */
        shim_debug("upstream %d: the probe's connect completed: its transfers go ahead", w->up);
    }
    loop_remove(src);
    fdtable_close_engine_fd(src->fd);
    loop_defer(&w->done, watch_done);
}

void pool_watch_probe(int up, int probe_fd)
{
    int idle = 0;
    if (!atomic_compare_exchange_strong(&watch_busy[up], &idle, 1))
        return;
    int fd = fdtable_raise(real_fcntl(probe_fd, F_DUPFD_CLOEXEC, NULL));
    if (fd >= 0 && fd < FDTABLE_MAX) {
        fdtable_mark_engine(fd);
        watches[up].up = up;
        watches[up].started_us = atomic_load(&probe_started_us[up]);
        if (watches[up].started_us && loop_add(&watches[up].src, fd, EPOLLOUT, on_probe_writable) == 0)
            return;
        fdtable_close_engine_fd(fd);
    } else if (fd >= 0) {
        real_close(fd);
    }
    atomic_store(&watch_busy[up], 0);
}

static bool has_pooled_connection(int up)
{
    return atomic_load_explicit(&shim_stats[up].pool_open, memory_order_relaxed)
               > atomic_load_explicit(&shim_stats[up].pool_gone, memory_order_relaxed)
           || atomic_load(&offered_count[up]) > 0;
}

static bool is_proven_locked(int up, const struct sockaddr *addr)
{
    for (int i = 0; i < proven[up].n; i++)
        if (same_address(addr, &proven[up].addr[i]))
            return true;
    return false;
}

/* Connects made for real now (a probe, and the connects alongside one) and when the
 * newest began: each connection will join the pool, so the queue counts them against the
 * cap (pool_connects_in_flight). */
static _Atomic int real_connects[RULES_MAX_UPSTREAMS];
static _Atomic int64_t real_connect_last_us[RULES_MAX_UPSTREAMS];
/* When a connect made for real last failed, or a Redis server connection was lost (0: a
 * connect succeeded since). Within POOL_DOWN_MEMORY_MS of it, the connects that come
 * while a probe runs connect for real too, whatever the cap: an upstream that has just refused is likely down, and a connect
 * diverted then would succeed where direct it is refused, and close a moment later -
 * a client that reconnects (ioredis, every 200 ms) would never see a refusal, reset its
 * retry count each time, and never fail its commands. */
static _Atomic int64_t refused_us[RULES_MAX_UPSTREAMS];
#define POOL_DOWN_MEMORY_MS 10000       /* (longer than a reconnecting client's backoff) */

enum pool_probe pool_begin_probe(int up, const struct sockaddr *addr, unsigned alongside_cap)
{
    int64_t seen = 0, now = clock_mono_us();
    enum pool_probe r = POOL_PROBE_HELD;
    /* under the lock, so that whoever loses the slot sees the winner's address */
    pthread_mutex_lock(&offered.lock);
    if (has_pooled_connection(up) && is_proven_locked(up, addr)) {
        /* A probe ended between the caller's look at the pool and here. Looked at before
         * the slot is taken, never after: a slot taken and given back at once was seen
         * taken by the engine's queue, which then held its waiters for a probe that no
         * longer ran and was told of no end (pool_end_probe's settle): until
         * pool_queue_timeout, under load (a thread preempted in between). */
        pthread_mutex_unlock(&offered.lock);
        return POOL_PROBE_SAME;
    }
    if (!atomic_compare_exchange_strong(&probe_started_us[up], &seen, now)) {
        /* a probe that was abandoned (its fd closed unasked) does not block the next one */
        if (now - seen < POOL_PROBE_HOLD_MS * 1000LL || !atomic_compare_exchange_strong(&probe_started_us[up], &seen, now)) {
            r = same_address(addr, &proven[up].probing) ? POOL_PROBE_SAME : POOL_PROBE_OTHER;
            /* A cold burst: while the probe runs, the connects that come meanwhile make
             * their own connections too, as they would without the shim, up to the cap;
             * each joins the pool when its app asks, and the burst's first requests go
             * out over them. Diverted at once instead, they would wait for the probe's
             * handshake and then for libcurl's own: two round trips where direct pays one. */
            long have = (long)atomic_load(&shim_stats[up].pool_open) + atomic_load(&offered_count[up])
                        + atomic_load(&real_connects[up]);
            int64_t refused_at = atomic_load(&refused_us[up]);
            bool just_refused = refused_at && now - refused_at < POOL_DOWN_MEMORY_MS * 1000LL;
            if (r == POOL_PROBE_SAME && (have < (long)alongside_cap || just_refused)
                && offered.n + atomic_load(&real_connects[up]) < OFFERED_MAX)
                r = POOL_PROBE_OTHER;
        }
    }
    if (r == POOL_PROBE_HELD)
        memcpy(&proven[up].probing, addr, addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in));
    if (r != POOL_PROBE_SAME) {
        atomic_fetch_add(&real_connects[up], 1);
        atomic_store(&real_connect_last_us[up], now);
    }
    pthread_mutex_unlock(&offered.lock);
    return r;
}

int64_t pool_connects_count_until_us(int up)
{
    return atomic_load(&real_connects[up]) > 0 ? atomic_load(&real_connect_last_us[up]) + POOL_PROBE_HOLD_MS * 1000LL
                                               : 0;
}

int pool_connects_in_flight(int up)
{
    int64_t until = pool_connects_count_until_us(up);
    /* (an app that never asks about its connect stops counting) */
    return until && clock_mono_us() <= until ? atomic_load(&real_connects[up]) : 0;
}

void pool_note_lost(int up)
{
    atomic_store(&refused_us[up], clock_mono_us());
}

void pool_end_probe(int up, int fd, const union shim_sockaddr *dest, bool held)
{
    atomic_store(&refused_us[up], fd >= 0 ? 0 : clock_mono_us());
    if (fd >= 0) {
        pthread_mutex_lock(&offered.lock);
        struct proven *p = &proven[up];
        if (!is_proven_locked(up, &dest->sa)) {
            p->addr[p->next] = *dest;
            p->next = (p->next + 1) % PROVEN_MAX;
            if (p->n < PROVEN_MAX)
                p->n++;
        }
        pthread_mutex_unlock(&offered.lock);
        pool_offer_connection(up, fd, dest);
    }
    int n = atomic_load(&real_connects[up]);
    while (n > 0 && !atomic_compare_exchange_weak(&real_connects[up], &n, n - 1))
        ;                              /* (never below 0: a forked child ends its parent's) */
    if (held)
        atomic_store(&probe_started_us[up], 0);
    atomic_store(&probe_settled[up], 1);
    loop_wake();                       /* the engine admits what waited for it */
}
/* An address as bytes and port, IPv4-mapped IPv6 as its IPv4 form: so they compare as one. */
struct plain_addr { uint8_t bytes[16]; size_t n; uint16_t port; };

static struct plain_addr plain(const union shim_sockaddr *a)
{
    struct plain_addr p = { .n = 4 };
    if (a->sa.sa_family == AF_INET) {
        memcpy(p.bytes, &a->in.sin_addr, 4);
        p.port = a->in.sin_port;
    } else if (IN6_IS_ADDR_V4MAPPED(&a->in6.sin6_addr)) {
        memcpy(p.bytes, a->in6.sin6_addr.s6_addr + 12, 4);
        p.port = a->in6.sin6_port;
    } else {
        memcpy(p.bytes, &a->in6.sin6_addr, 16);
        p.n = 16;
        p.port = a->in6.sin6_port;
    }
    return p;
}

static bool same_address(const struct sockaddr *a, const union shim_sockaddr *b)
{
    struct plain_addr x = plain((const union shim_sockaddr *)(const void *)a), y = plain(b);
    return x.n == y.n && x.port == y.port && !memcmp(x.bytes, y.bytes, x.n);
}

static void drop_offered_locked(int i)
{
    atomic_fetch_sub(&offered_count[offered.conns[i].upstream], 1);
    fdtable_close_engine_fd(offered.conns[i].fd);
    offered.conns[i] = offered.conns[--offered.n];
}

/* An offered connection to addr that is still fresh and open, made non-blocking, or -1. */
int pool_take_offered(int upstream, const struct sockaddr *addr)
{
    if (atomic_load(&offered_count[upstream]) == 0)
        return -1;
    int fd = -1;
    int64_t now = clock_mono_us();
    pthread_mutex_lock(&offered.lock);
    for (int i = 0; i < offered.n && fd < 0;) {
        struct offered *o = &offered.conns[i];
        if (now - o->at_us > OFFERED_MAX_AGE_US) {
            drop_offered_locked(i);
            continue;
        }
        char c;
        if (o->upstream == upstream && same_address(addr, &o->dest)
            && recv(o->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            fd = o->fd;                /* open, nothing unexpected on it */
            atomic_fetch_sub(&offered_count[upstream], 1);
            *o = offered.conns[--offered.n];
            break;
        }
        if (o->upstream == upstream && same_address(addr, &o->dest)) {
            drop_offered_locked(i);    /* closed by the upstream, or not quiet: not usable */
            continue;
        }
        i++;
    }
    pthread_mutex_unlock(&offered.lock);
    /* the app's socket, blocking if the app's was: the engine's loop must never wait on it */
    int fl = fd >= 0 ? real_fcntl(fd, F_GETFL, NULL) : 0;
    if (fd >= 0 && (fl < 0 || (!(fl & O_NONBLOCK) && real_fcntl(fd, F_SETFL, (void *)(long)(fl | O_NONBLOCK)) != 0))) {
        fdtable_close_engine_fd(fd);
        fd = -1;
    }
    return fd;
}

bool pool_has_live_connection(int upstream, const struct sockaddr *addr)
{
    if (!has_pooled_connection(upstream))
        return false;                  /* (a probe in flight: pool_begin_probe decides) */
    pthread_mutex_lock(&offered.lock);
    bool live = is_proven_locked(upstream, addr);
    pthread_mutex_unlock(&offered.lock);
    return live;
}

void pool_offer_connection(int upstream, int fd, const union shim_sockaddr *dest)
{
    fd = fdtable_raise(fd);            /* the pool's now: off the app's small numbers */
    fdtable_mark_engine(fd);
    int64_t now = clock_mono_us();
    pthread_mutex_lock(&offered.lock);
    for (int i = 0; i < offered.n;)
        if (now - offered.conns[i].at_us > OFFERED_MAX_AGE_US)
            drop_offered_locked(i);
        else
            i++;
    if (offered.n == OFFERED_MAX) {
        pthread_mutex_unlock(&offered.lock);
        fdtable_close_engine_fd(fd);
        return;
    }
    offered.conns[offered.n++] = (struct offered){ fd, upstream, *dest, now };
    atomic_fetch_add(&offered_count[upstream], 1);
    pthread_mutex_unlock(&offered.lock);
}


int64_t pool_probe_started_us(int up)
{
    return atomic_load(&probe_started_us[up]);
}

bool pool_probe_settled(int up)
{
    return atomic_load(&probe_settled[up]) && atomic_exchange(&probe_settled[up], 0);
}

void pool_forget(void)
{
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;   /* another thread may have held it */
    offered.lock = fresh;
    offered.n = 0;                      /* the fds went with the other engine fds */
    for (int i = 0; i < RULES_MAX_UPSTREAMS; i++) {
        atomic_store(&offered_count[i], 0);
        atomic_store(&probe_started_us[i], 0);
        atomic_store(&probe_settled[i], 0);
        atomic_store(&probe_connected_for[i], 0);
        atomic_store(&watch_busy[i], 0);   /* its dup went with the engine fds, its loop too */
        atomic_store(&real_connects[i], 0);
    }
}
