/* redis_pool.c — owns the server connections of protocol = redis upstreams: per identity
 * (user, password, database, protocol) a few shared connections (pool_max_per_host of the upstream,
 * 4 by default) that carry the commands of many app connections, pipelined, each reply
 * routed back to the session that asked, in order (a FIFO of sessions per connection; a
 * session's commands in flight stay on one connection); connections lent to one session
 * (a transaction, WATCHed keys, a blocking command: at most redis_pinned_max at once) and
 * given back clean; connections of one session's own that relay bytes as they come
 * (direct); the setup of each new connection (AUTH, HELLO 3, SELECT, CLIENT SETNAME: its bytes
 * redis_wire.c's), whose replies
 * the shim reads itself and whose first success verifies the identity; and losing a
 * connection (the sessions with commands on it are told, nothing is sent again; identities
 * are redis_ident.c's). A cold
 * upstream's first connection is the one the app's own connect made (pool.c). Engine
 * thread only. */
#include "redis_pool.h"
#include "redis_wire.h"
#include "buf.h"
#include "redis_ident.h"
#include "redis_known.h"
#include "log.h"
#include "loop.h"
#include "pool.h"
#include "real.h"
#include "resp.h"
#include "ring.h"
#include "stats.h"
#include <errno.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define RCONN_INFLIGHT_MAX (8192 + 64) /* replies owed on one server connection: a session's 8 192 and the shim's own */
#define RCONN_OUT_MAX      (64u << 20) /* command bytes waiting to be written to one */
#define DIRECT_OUT_SOFT    (1u << 20)  /* a direct session stops reading its app beyond this */
#define PROBE_RETRY_MS     2           /* a cold upstream's probe is awaited this often */

enum rconn_state { RC_WAITING, RC_CONNECTING, RC_READY, RC_DEAD };

struct rconn {
    struct loop_source src;
    struct loop_deferred flush_later, reclaim;
    struct loop_timer timer;           /* the connect's deadline, or the cold upstream's probe */
    struct rconn *next;                /* the upstream's connections */
    struct rpool_ident *id;            /* a reference */
    int upstream;
    union shim_sockaddr dest;
    socklen_t dest_len;
    enum rconn_state state;
    bool flush_pending, throttled, shared, lent_counted;
    bool free_at_flush;                /* closed while a flush was pending: that flush frees it */
    struct buf out;
    /* commands queued while its setup (AUTH, SELECT, HELLO, a name) is unanswered: sent
     * once it is accepted. Pipelined behind a refused AUTH they ran as the default user
     * (a password changed on the server), behind a refused SELECT in database 0 */
    struct buf held;
    struct resp_stream replies;
    unsigned setup_left;               /* replies to its setup commands still to come */
    struct ring fifo;                  /* who each reply owed goes to (struct rpool_client *, NULL: no
                                        * one), oldest first */
    struct rpool_client *lent;         /* lent to this session alone (or its own, direct) */
    struct rpool_client *verifying;    /* the sessions waiting for its setup's verdict (a list
                                        * through next_verifying), newest first */
    bool raw;                          /* direct: bytes relayed as they come, after the setup */
    bool shut_when_sent;               /* direct: the app ended its side: so does this, once sent */
    bool shut_sent;                    /* ... and did: the server's close that follows is no loss */
    bool named;                        /* lent under a session's name (CLIENT SETNAME): unnamed when given back */
    bool retired;                      /* its login refused to new connections: closes once nothing is owed */
    /* logged in, and so for good whatever the server's password becomes (Redis keeps a
     * connection's login): one with a password once its setup is accepted; one without
     * unless the PING it sends first (login_probe, its reply to no one) was refused: never
     * logged in, the server judges each of its commands as a new connection's. Taken as
     * logged in until known. */
    bool logged_in, login_probe;
    unsigned drop_left;                /* direct: replies to the shim's own commands to drop before bytes flow */
    int pin_reason;
};

static struct {
    const struct shim_config *cfg;
    struct rconn *conns[RULES_MAX_UPSTREAMS];
    unsigned lent[RULES_MAX_UPSTREAMS];
    void (*server_lost)(int upstream, const struct rpool_ident *id);
} P;

void redis_pool_init(const struct shim_config *cfg, void (*server_lost)(int upstream, const struct rpool_ident *id))
{
    P.cfg = cfg;
    P.server_lost = server_lost;
}

static unsigned pool_max(int up) { return rules_pool_max(P.cfg, &P.cfg->upstreams[up]); }

void redis_pool_forget(void)
{
    const struct shim_config *cfg = P.cfg;
    void (*server_lost)(int, const struct rpool_ident *) = P.server_lost;
    memset(&P, 0, sizeof P);           /* the parent's: their memory stays unreachable */
    P.cfg = cfg;
    P.server_lost = server_lost;
    redis_idents_forget();
    redis_known_forget_parents();
}

/* ---- connections ---- */

static void on_io(struct loop_source *src, uint32_t ev);
static void flush_now(struct loop_deferred *d);

static struct rconn *of_src(struct loop_source *src)
{
    return (struct rconn *)(void *)((char *)src - offsetof(struct rconn, src));
}

static void reclaim(struct loop_deferred *d)
{
    struct rconn *c = (struct rconn *)(void *)((char *)d - offsetof(struct rconn, reclaim));
    free(c);
}

static void watch(struct rconn *c)
{
    if (c->state == RC_DEAD || c->state == RC_WAITING)
        return;
    uint32_t ev = c->throttled ? EPOLLET : EPOLLIN;   /* (a reset while held back: heard once, not in a spin) */
    if (c->state == RC_CONNECTING || buf_len(&c->out))
        ev |= EPOLLOUT;
    loop_watch(&c->src, ev);
}

static void schedule_flush(struct rconn *c)
{
    if (!c->flush_pending && c->state == RC_READY) {
        c->flush_pending = true;
        loop_defer(&c->flush_later, flush_now);   /* the batch's commands go out together */
    }
}

static void unlink_conn(struct rconn *c)
{
    for (struct rconn **p = &P.conns[c->upstream]; *p; p = &(*p)->next)
        if (*p == c) {
            *p = c->next;
            return;
        }
}

/* c counted as lent (its pin reason's gauge too), or no more. */
static void count_lent(struct rconn *c, bool lent)
{
    int up = c->upstream, delta = lent ? 1 : -1;
    _Atomic uint64_t *g = c->pin_reason == RPOOL_PIN_MULTI ? &shim_stats[up].redis_pinned_multi
                        : c->pin_reason == RPOOL_PIN_WATCH ? &shim_stats[up].redis_pinned_watch
                                                           : &shim_stats[up].redis_pinned_blocking;
    atomic_fetch_add_explicit(g, (uint64_t)(int64_t)delta, memory_order_relaxed);
    P.lent[up] += delta;
    c->lent_counted = lent;
}

/* ---- the replies owed on a server connection, in order: whose each one is ---- */

static int fifo_push(struct rconn *c, struct rpool_client *cl) { return ring_push(&c->fifo, &cl); }
static struct rpool_client *fifo_front(struct rconn *c) { return c->fifo.count ? *(struct rpool_client **)ring_at(&c->fifo, 0) : NULL; }

static struct rpool_client *fifo_pop(struct rconn *c)
{
    struct rpool_client *cl = NULL;
    ring_pop(&c->fifo, &cl);
    return cl;
}

/* cl's replies still owed on c go to no one (NULL) when they come. */
static void fifo_forget(struct rconn *c, const struct rpool_client *cl)
{
    for (unsigned i = 0; i < c->fifo.count; i++) {
        struct rpool_client **owner = ring_at(&c->fifo, i);
        if (*owner == cl)
            *owner = NULL;
    }
}

/* The sessions waiting for c's verdict, taken off it: each is in no list any more. */
static struct rpool_client *take_verifying(struct rconn *c)
{
    struct rpool_client *list = c->verifying;
    c->verifying = NULL;
    for (struct rpool_client *v = list; v; v = v->next_verifying)
        v->verifying = NULL;
    return list;
}

/* A session whose connection (its lent one, or the one checking its identity) is gone. */
static void tell_lost(const struct rconn *c, struct rpool_client *t)
{
    if (t->conn == c)
        t->conn = NULL;
    t->inflight = 0;
    t->lent = t->raw = false;
    t->ops->lost(t);
}

static bool listed(const struct rpool_client *list, const struct rpool_client *cl)
{
    for (; list; list = list->next_verifying)
        if (list == cl)
            return true;
    return false;
}

/* Every session with a reply owed on c, lent it or waiting on its setup hears it is gone (nothing is sent again). */
static void conn_close(struct rconn *c, bool lost)
{
    if (c->state == RC_DEAD)
        return;
    int upstream = c->upstream;
    const struct rpool_ident *id = c->id;   /* (compared, never used: a reference put below) */
    bool was_open = c->state != RC_WAITING;
    c->state = RC_DEAD;
    if (lost) {
        redis_known_forget(c->upstream);   /* (the server may come back as another) */
        /* and with other passwords: an identity is checked again before it is answered for */
        redis_idents_unverify(c->upstream);
        STAT_INC(c->upstream, redis_server_lost);
        pool_note_lost(c->upstream);
        shim_debug("redis upstream %d: a server connection was lost", c->upstream);
    }
    struct rpool_client *lent = c->lent, *waiting = take_verifying(c);
    c->lent = NULL;
    for (unsigned i = 0; i < c->fifo.count; i++) {
        struct rpool_client *cl = *(struct rpool_client **)ring_at(&c->fifo, i);
        if (!cl)
            continue;
        fifo_forget(c, cl);
        if (cl == lent || listed(waiting, cl))
            continue;
        cl->conn = NULL;
        cl->inflight = 0;
        cl->ops->lost(cl);
    }
    if (lent)
        tell_lost(c, lent);
    for (struct rpool_client *t = waiting, *next; t; t = next) {
        next = t->next_verifying;
        if (t != lent)
            tell_lost(c, t);
    }
    if (c->lent_counted)
        count_lent(c, false);
    if (c->shared)
        c->id->n_shared--;
    unlink_conn(c);
    loop_timer_cancel(&c->timer);
    if (was_open) {
        loop_remove(&c->src);
        fdtable_close_engine_fd(c->src.fd);
        STAT_DEC(c->upstream, redis_server_open);
        STAT_DEC(c->upstream, pool_open);
    }
    resp_stream_free(&c->replies);
    buf_free(&c->out);
    buf_free(&c->held);
    ring_free(&c->fifo);
    rpool_ident_put(c->id);
    /* the deferred list runs newest first: a flush still pending from this turn runs after
     * a reclaim deferred now, in freed memory; it frees the connection itself instead */
    if (c->flush_pending)
        c->free_at_flush = true;
    else
        loop_defer(&c->reclaim, reclaim);
    if (lost && P.server_lost)
        P.server_lost(upstream, id);   /* (the sessions' word: the commands they hold) */
}

static void on_connect_timeout(struct loop_timer *t);
static void on_probe_wait(struct loop_timer *t);

/* Opens the socket: the app's probe's connection when one is there, else a new one. */
static void conn_dial(struct rconn *c)
{
    int up = c->upstream;
    if (pool_probe_holds(up) && !P.conns[up]->next && P.conns[up] == c) {
        loop_timer_arm(&c->timer, PROBE_RETRY_MS, on_probe_wait);   /* the app's connect will have one */
        return;
    }
    int fd = pool_take_offered(up, &c->dest.sa);
    bool connected = fd >= 0;
    if (fd < 0) {
        fd = fdtable_raise(real_socket(c->dest.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
        if (fd >= 0)
            fdtable_mark_engine(fd);
        if (fd >= 0 && real_connect(fd, &c->dest.sa, c->dest_len) == 0)
            connected = true;
        else if (fd >= 0 && errno != EINPROGRESS) {
            fdtable_close_engine_fd(fd);
            fd = -1;
        }
    }
    if (fd < 0 || loop_add(&c->src, fd, EPOLLIN | EPOLLOUT, on_io) != 0) {
        if (fd >= 0)
            fdtable_close_engine_fd(fd);
        conn_close(c, true);
        return;
    }
    int one = 1;
    real_setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    STAT_INC(up, redis_server_opened);
    STAT_INC(up, upstream_conns_opened);
    STAT_INC(up, redis_server_open);
    STAT_INC(up, pool_open);
    c->state = connected ? RC_READY : RC_CONNECTING;
    if (connected)
        schedule_flush(c);
    else
        loop_timer_arm(&c->timer, P.cfg->upstream_timeout_ms, on_connect_timeout);
    watch(c);
}

static void on_probe_wait(struct loop_timer *t)
{
    conn_dial((struct rconn *)(void *)((char *)t - offsetof(struct rconn, timer)));
}

static void on_connect_timeout(struct loop_timer *t)
{
    conn_close((struct rconn *)(void *)((char *)t - offsetof(struct rconn, timer)), true);
}

static struct rconn *conn_open(struct rpool_client *cl, struct rpool_ident *id, const char *name, size_t name_len,
                               bool direct)
{
    struct rconn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->upstream = cl->upstream;
    c->dest = cl->dest;
    c->dest_len = cl->dest_len;
    c->id = rpool_ident_ref(id);
    c->out.cap = RCONN_OUT_MAX;
    c->held.cap = RCONN_OUT_MAX;
    c->fifo = RING_INIT(struct rpool_client *, RCONN_INFLIGHT_MAX);
    c->state = RC_WAITING;
    c->logged_in = true;
    const char *ping[1] = { "PING" };
    size_t ping_len[1] = { 4 };
    int setup = redis_wire_setup(&c->out, id, name, name_len);
    c->setup_left = setup > 0 ? (unsigned)setup : 0;
    if (resp_stream_init(&c->replies, false) != 0 || setup < 0
        || (!id->has_pass && !direct && (redis_wire_command(&c->out, 1, ping, ping_len) != 0 || fifo_push(c, NULL) != 0))) {
        resp_stream_free(&c->replies);
        buf_free(&c->out);
        rpool_ident_put(c->id);
        ring_free(&c->fifo);
        free(c);
        return NULL;
    }
    c->login_probe = !id->has_pass && !direct;   /* (a direct one's bytes are the app's alone: SCRIPT DEBUG
                                                     * refuses to start behind a reply not yet sent) */
    c->next = P.conns[c->upstream];
    P.conns[c->upstream] = c;
    conn_dial(c);
    return c->state == RC_DEAD ? NULL : c;
}

/* Writes what waits for the server; -1 when the connection is gone. A direct session that
 * stopped reading its app for want of room here is told when there is room again. */
static int send_out(struct rconn *c)
{
    bool was_full = buf_len(&c->out) > DIRECT_OUT_SOFT;
    if (buf_send(&c->out, c->src.fd) != 0) {
        conn_close(c, true);
        return -1;
    }
    if (c->shut_when_sent && !buf_len(&c->out) && !buf_len(&c->held)) {
        c->shut_when_sent = false;
        c->shut_sent = true;
        real_shutdown(c->src.fd, SHUT_WR);
    }
    if (was_full && c->raw && c->lent && buf_len(&c->out) <= DIRECT_OUT_SOFT)
        c->lent->ops->drained(c->lent);
    return c->state == RC_DEAD ? -1 : 0;
}

static void flush_now(struct loop_deferred *d)
{
    struct rconn *c = (struct rconn *)(void *)((char *)d - offsetof(struct rconn, flush_later));
    c->flush_pending = false;
    if (c->free_at_flush) {            /* closed since it was scheduled (conn_close) */
        free(c);
        return;
    }
    if (c->state != RC_READY || !buf_len(&c->out))
        return;
    STAT_INC(c->upstream, redis_batches);
    if (send_out(c) == 0)
        watch(c);
}

/* A setup reply: an error ends the connection (its verifying session hears the error);
 * the last success verifies its identity. */
static void setup_reply(struct rconn *c, const char *p, size_t n, int type)
{
    c->setup_left--;
    if (type == REDIS_REPLY_ERROR) {
        shim_debug("redis upstream %d: a new connection's setup was refused: %.*s", c->upstream,
                   (int)(n > 2 ? n - 2 : n), p);
        struct rpool_client *v = take_verifying(c);
        if (!v) {
            conn_close(c, true);       /* (its identity was good a moment ago) */
            return;
        }
        char err[512];                 /* (a longer error is cut, still a whole error line) */
        bool cut = n > sizeof err;
        size_t k = cut ? sizeof err : n;
        memcpy(err, p, k);
        if (cut)
            memcpy(err + k - 2, "\r\n", 2);
        conn_close(c, false);
        for (struct rpool_client *next; v; v = next) {
            next = v->next_verifying;
            v->ops->verified(v, false, err, k);
        }
        return;
    }
    if (c->setup_left)
        return;
    if (buf_len(&c->held)) {           /* accepted: what waited for it goes now */
        if (buf_append(&c->out, buf_head(&c->held), buf_len(&c->held)) != 0) {
            conn_close(c, true);
            return;
        }
        buf_free(&c->held);
        c->held.cap = RCONN_OUT_MAX;
        schedule_flush(c);
    }
    redis_ident_accepted(c->id);
    struct rpool_client *v = take_verifying(c);
    if (v && !c->lent && !c->shared) {
        if (c->id->n_shared < pool_max(c->upstream)) {
            c->shared = true;          /* it stays, for the identity's commands */
            c->id->n_shared++;
        } else {
            conn_close(c, false);      /* (enough are shared) */
        }
    }
    for (struct rpool_client *next; v; v = next) {
        next = v->next_verifying;
        v->ops->verified(v, true, NULL, 0);
    }
}

/* Whatever the stream holds goes to the direct session as it came. */
static void pass_raw(struct rconn *c)
{
    struct rpool_client *cl = c->lent;
    size_t n = buf_len(&c->replies.raw);
    if (!cl || !n)
        return;
    /* the reader's copy is dropped with it: from now on bytes bypass the framing */
    char *p = buf_head(&c->replies.raw);
    cl->ops->raw(cl, p, n);
    if (c->state != RC_DEAD) {
        resp_stream_free(&c->replies);
        resp_stream_init(&c->replies, false);
    }
}

/* A value too large to hold whole goes on to its owner as it comes (whose slow app holds
 * back this connection's reading: what is behind it comes after it anyway). */
static void pass_part(struct rconn *c, struct resp_item *it)
{
    const char *p = buf_head(&c->replies.raw);
    size_t n = it->raw_len;
    resp_item_done(&c->replies, it);
    struct rpool_client *cl = c->drop_left ? NULL : fifo_front(c);
    if (c->setup_left)
        conn_close(c, true);           /* (none of the shim's own commands is answered so) */
    else if (cl)
        cl->ops->raw(cl, p, n);
}

static void take_replies(struct rconn *c)
{
    struct resp_item it;
    for (int rounds = 0; rounds < 100000 && c->state != RC_DEAD; rounds++) {
        if (c->raw && !c->setup_left && !c->drop_left) {
            pass_raw(c);
            return;
        }
        enum resp_next r = resp_stream_next(&c->replies, &it);
        if (r == RESP_MORE)
            return;
        if (r == RESP_PART && !it.last) {
            pass_part(c, &it);
            continue;
        }
        if (r != RESP_ITEM && r != RESP_PART) {
            shim_debug("redis upstream %d: a reply the shim cannot frame (%s)", c->upstream,
                       r == RESP_TOO_LARGE ? "too large" : "not RESP");
            conn_close(c, true);
            return;
        }
        /* Taken off the stream before anyone hears of it: a session that hears may lend
         * itself this connection and take it direct, which hands on what the stream still
         * holds, and that must start after this reply. (The bytes stay where they are:
         * consuming moves only the stream's start.) */
        const char *p = buf_head(&c->replies.raw);
        size_t n = it.raw_len;
        int type = it.type;
        resp_item_done(&c->replies, &it);
        if (r == RESP_PART && c->throttled && !c->lent)
            c->throttled = false, watch(c);   /* (the value in parts its owner held it back for has ended) */
        if (type == RESP_REPLY_PUSH) {
            /* out of band, and no session here asked for any (subscriptions and tracking
             * have connections of their own): a reply to no one, dropped */
            shim_debug("redis upstream %d: a RESP3 push on a shared connection, dropped", c->upstream);
            continue;
        }
        if (c->setup_left) {
            setup_reply(c, p, n, type);
            continue;
        }
        if (c->drop_left) {
            c->drop_left--;            /* (the session's name, set when it was lent) */
            continue;
        }
        struct rpool_client *cl = fifo_pop(c);
        if (!cl && c->login_probe) {   /* (the first of the shim's own, pushed at open) */
            c->login_probe = false;
            c->logged_in = type != REDIS_REPLY_ERROR;
        }
        if (cl) {
            cl->inflight--;
            if (!cl->inflight && !cl->lent && cl->conn == c)
                cl->conn = NULL;       /* free to go to another connection now */
            cl->ops->reply(cl, p, n);
        }
        if (c->retired && !c->fifo.count && !c->lent && c->state != RC_DEAD) {
            conn_close(c, false);      /* its login is refused now: nothing more on it */
            return;
        }
    }
}

static void on_io(struct loop_source *src, uint32_t ev)
{
    struct rconn *c = of_src(src);
    if (c->state == RC_CONNECTING && (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        int err = 0;
        socklen_t len = sizeof err;
        if (real_getsockopt(src->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err) {
            conn_close(c, true);
            return;
        }
        loop_timer_cancel(&c->timer);
        c->state = RC_READY;
        schedule_flush(c);
    }
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        char chunk[16384];
        for (int rounds = 0; rounds < 16 && c->state != RC_DEAD && !c->throttled; rounds++) {
            ssize_t n = recv(src->fd, chunk, sizeof chunk, MSG_DONTWAIT);
            if (n > 0) {
                if (c->raw && !c->setup_left && !c->drop_left && c->lent && !buf_len(&c->replies.raw)) {
                    c->lent->ops->raw(c->lent, chunk, (size_t)n);
                    continue;
                }
                if (resp_stream_feed(&c->replies, chunk, (size_t)n) != 0) {
                    conn_close(c, true);
                    return;
                }
                take_replies(c);
                continue;
            }
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                /* the server went away, or reset; not when it ends as asked: after the
                 * app's end passed on, or a direct connection's own (QUIT, CLIENT KILL) */
                conn_close(c, !(n == 0 && (c->shut_sent || c->raw)));
                return;
            }
            break;
        }
    }
    if (c->state == RC_DEAD)
        return;
    if ((ev & EPOLLOUT) && c->state == RC_READY && buf_len(&c->out) && send_out(c) != 0)
        return;
    watch(c);
}

/* ---- what sessions ask ---- */

/* A shared connection of id's for a session with no reply owed: the least loaded, or a new
 * one while the identity has fewer than pool_max and every one has replies owed. */
static struct rconn *pick_shared(struct rpool_client *cl, struct rpool_ident *id)
{
    struct rconn *best = NULL;
    for (struct rconn *c = P.conns[cl->upstream]; c; c = c->next)
        if (c->id == id && c->shared && !c->lent && c->state != RC_DEAD
            && (!best || c->fifo.count < best->fifo.count))
            best = c;
    if ((!best || best->fifo.count > 0) && id->n_shared < pool_max(cl->upstream)) {
        struct rconn *c = conn_open(cl, id, NULL, 0, false);
        if (c) {
            c->shared = true;
            id->n_shared++;
            return c;
        }
    }
    return best;
}

/* Where what is written to c goes: behind its setup (held until the server has accepted
 * every setup command, so nothing runs as an identity the server refused, and in the order
 * it was written, whether framed commands or a direct session's bytes), or out. */
static struct buf *behind_setup(struct rconn *c)
{
    return c->setup_left || buf_len(&c->held) ? &c->held : &c->out;
}

static int queue_command(struct rconn *c, struct rpool_client *cl, const char *cmd, size_t n, bool apps)
{
    struct buf *b = behind_setup(c);
    size_t mark = b->end;
    if (buf_append(b, cmd, n) != 0)
        return -1;
    if (fifo_push(c, cl) != 0) {
        b->end = mark;
        return -1;
    }
    if (cl) {
        cl->inflight++;
        cl->conn = c;
    }
    if (apps)
        STAT_INC(c->upstream, redis_commands);
    schedule_flush(c);
    return 0;
}

int rpool_send(struct rpool_client *cl, struct rpool_ident *id, const char *cmd, size_t n)
{
    struct rconn *c = cl->lent || cl->inflight ? cl->conn : pick_shared(cl, id);
    if (!c || c->state == RC_DEAD)
        return -1;
    return queue_command(c, cl, cmd, n, true);
}

int rpool_send_beside(struct rpool_client *cl, const struct rpool_client *beside, struct rpool_ident *id,
                      const char *cmd, size_t n)
{
    struct rconn *c = beside->conn;
    if (cl->lent || cl->inflight || !c || c->id != id || !c->shared || c->lent || c->state == RC_DEAD)
        return rpool_send(cl, id, cmd, n);
    return queue_command(c, cl, cmd, n, true);
}

/* (a connection whose PING has not been answered yet was opened a round trip ago: its
 * login is the server's of that moment, as for an app's connection opened then) */
bool rpool_login_needs_check(int upstream, const struct rpool_ident *id)
{
    for (const struct rconn *c = P.conns[upstream]; c; c = c->next)
        if (c->state != RC_DEAD && c->logged_in && !c->login_probe && !c->raw && (c->shared || c->lent)
            && redis_ident_same_login(c->id, id))
            return true;
    return false;
}

int rpool_check_password(struct rpool_client *cl, struct rpool_ident *id, bool urgent)
{
    /* (on a connection logged in as the same user with the same password: an AUTH changes
     * neither its database nor its protocol, and a refused one leaves its login as it was;
     * an idle one first, then id's own, which the app's next commands are less likely to
     * need) */
    struct rconn *best = NULL;
    for (struct rconn *c = P.conns[cl->upstream]; c; c = c->next)
        if (redis_ident_same_login(c->id, id) && c->shared && !c->lent && c->state == RC_READY && !c->setup_left
            && (!best || (!c->fifo.count && best->fifo.count)
                || (!c->fifo.count == !best->fifo.count
                    && ((c->id == id) > (best->id == id)
                        || ((c->id == id) == (best->id == id) && c->fifo.count < best->fifo.count)))))
            best = c;
    if (!best || cl->lent || cl->inflight)
        return -2;
    /* every one of them busy, for a command that must not wait behind them (a long
     * script's EVAL holds one, and the SCRIPT KILL that would end it): a new connection of
     * id, as a command would open one, the check behind its setup (which logs in anew).
     * (Not for any command: a new connection takes a round trip more, in which a password
     * changed on the server refuses what direct would have accepted a moment before.) */
    if (urgent && best->fifo.count && id->n_shared < pool_max(cl->upstream)) {
        struct rconn *c = conn_open(cl, id, NULL, 0, false);
        if (c) {
            c->shared = true;
            id->n_shared++;
            best = c;
        }
    }
    struct buf auth = { .cap = RCONN_OUT_MAX };
    int rc = (id->has_pass ? redis_wire_auth(&auth, id) : redis_wire_default_check(&auth)) != 0
                 ? -1 : queue_command(best, cl, buf_head(&auth), buf_len(&auth), false);
    if (rc == 0)
        best->logged_in = true;        /* (an accepted AUTH logs it in; a refused one retires it) */
    buf_free(&auth);
    return rc;
}

void rpool_retire_login(const struct rpool_ident *id)
{
    for (struct rconn *c = P.conns[id->upstream], *next; c; c = next) {
        next = c->next;
        if (c->state == RC_DEAD || c->raw || !redis_ident_same_login(c->id, id))
            continue;
        c->retired = true;             /* (a lent one closes when it is given back) */
        if (!c->shared || c->lent)
            continue;
        c->shared = false;
        c->id->n_shared--;
        if (!c->fifo.count)
            conn_close(c, false);
    }
}

int rpool_verify(struct rpool_client *cl, struct rpool_ident *id)
{
    struct rconn *c = P.conns[cl->upstream];
    while (c && !(c->id == id && c->verifying && c->state != RC_DEAD))
        c = c->next;
    if (!c && !(c = conn_open(cl, id, NULL, 0, false)))
        return -1;
    cl->next_verifying = c->verifying;
    c->verifying = cl;
    cl->verifying = c;
    return 0;
}

/* CLIENT SETNAME on c, its reply read and dropped. -1: c is closed (nothing half sent). */
static int quiet_setname(struct rconn *c, const char *name, size_t name_len)
{
    if (redis_wire_setname(&c->out, name, name_len) != 0 || fifo_push(c, NULL) != 0) {
        conn_close(c, false);
        return -1;
    }
    schedule_flush(c);
    return 0;
}

int rpool_lend(struct rpool_client *cl, struct rpool_ident *id, enum rpool_pin why, const char *name, size_t name_len)
{
    int up = cl->upstream;
    if (P.lent[up] >= P.cfg->upstreams[up].redis_pinned_max)
        return -1;
    struct rconn *c = NULL;
    for (struct rconn *s = P.conns[up]; s; s = s->next)
        if (s->id == id && s->shared && !s->lent && !s->fifo.count && s->state != RC_DEAD && !s->setup_left) {
            c = s;                     /* an idle shared one: lent, and taken out of the shared */
            c->shared = false;
            id->n_shared--;
            if (name_len && quiet_setname(c, name, name_len) != 0)
                return -1;
            break;
        }
    if (!c && !(c = conn_open(cl, id, name, name_len, false)))
        return -1;
    /* (named as the session is, so that what the server says of its connection inside a
     * transaction, or once the session goes direct on it, is the session's) */
    c->named = name_len > 0;
    c->lent = cl;
    c->pin_reason = (int)why;
    count_lent(c, true);
    cl->conn = c;
    cl->lent = true;
    cl->pin_reason = (int)why;
    return 0;
}

void rpool_give_back(struct rpool_client *cl, bool clean)
{
    struct rconn *c = cl->lent ? cl->conn : NULL;
    cl->lent = false;
    if (!cl->inflight)
        cl->conn = NULL;
    if (!c || c->state == RC_DEAD)
        return;
    c->lent = NULL;
    if (c->lent_counted)
        count_lent(c, false);
    /* (state the shim cannot undo, the app's end passed on (the server closes it), its
     * login refused now, or enough are shared) */
    if (!clean || c->raw || c->shut_when_sent || c->shut_sent || c->fifo.count || c->retired
        || c->id->n_shared >= pool_max(c->upstream)) {
        conn_close(c, false);
        return;
    }
    if (c->named) {
        c->named = false;
        if (quiet_setname(c, "", 0) != 0)
            return;
    }
    c->shared = true;
    c->id->n_shared++;
}

int rpool_go_direct(struct rpool_client *cl, struct rpool_ident *id, const char *name, size_t name_len)
{
    struct rconn *c = cl->lent ? cl->conn : NULL;
    if (c && c->lent_counted)          /* a lent one is its own now: no longer counted as lent */
        count_lent(c, false);
    if (!c) {
        if (cl->inflight || !(c = conn_open(cl, id, name, name_len, true)))
            return -1;
        c->lent = cl;
        cl->conn = c;
        cl->lent = true;
    }
    c->raw = true;
    cl->raw = true;
    STAT_INC(cl->upstream, redis_direct);
    /* replies owed on it are bytes like any other now, but for those to the shim's own
     * commands (they come first on a lent connection); what the stream held goes first */
    unsigned quiet = 0;
    while (quiet < c->fifo.count && !*(struct rpool_client **)ring_at(&c->fifo, quiet))
        quiet++;
    c->drop_left = quiet;
    ring_clear(&c->fifo);
    cl->inflight = 0;
    if (!c->setup_left && !c->drop_left)
        pass_raw(c);
    return 0;
}

int rpool_direct_write(struct rpool_client *cl, const char *p, size_t n)
{
    struct rconn *c = cl->conn;
    if (!c || c->state == RC_DEAD || buf_append(behind_setup(c), p, n) != 0)
        return -1;
    schedule_flush(c);
    return 0;
}

void rpool_app_eof(struct rpool_client *cl)
{
    struct rconn *c = cl->raw || cl->lent ? cl->conn : NULL;
    if (!c || c->state == RC_DEAD)
        return;
    c->shut_when_sent = true;
    if (!buf_len(&c->out) && !buf_len(&c->held) && c->state == RC_READY) {
        c->shut_when_sent = false;
        c->shut_sent = true;
        real_shutdown(c->src.fd, SHUT_WR);
    }
}

bool rpool_direct_full(const struct rpool_client *cl)
{
    return cl->conn && buf_len(&cl->conn->out) + buf_len(&cl->conn->held) > DIRECT_OUT_SOFT;
}

void rpool_client_gone(struct rpool_client *cl)
{
    struct rconn *v = cl->verifying;
    if (v) {
        struct rpool_client **at = &v->verifying;
        while (*at && *at != cl)
            at = &(*at)->next_verifying;
        if (*at)
            *at = cl->next_verifying;
        cl->verifying = NULL;
        if (!v->verifying && !v->shared && !v->lent)
            conn_close(v, false);      /* no one waits for its verdict any more */
    }
    struct rconn *c = cl->conn;
    if (!c)
        return;
    if (c->throttled && !cl->lent && c->replies.part_left && fifo_front(c) == cl)
        c->throttled = false, watch(c);   /* (held back for the value it was reading in parts) */
    fifo_forget(c, cl);                /* its replies: read and dropped */
    bool lent = cl->lent;
    cl->conn = NULL;
    cl->inflight = 0;
    cl->lent = false;
    if (lent && c->state != RC_DEAD) {
        c->lent = NULL;                /* a lent connection's state is unknown now: closed */
        conn_close(c, false);
    }
}

void rpool_throttle(struct rpool_client *cl, bool stop)
{
    struct rconn *c = cl->conn;
    if (c && c->state != RC_DEAD && c->throttled != stop) {
        c->throttled = stop;
        watch(c);
        if (!stop)
            take_replies(c);
    }
}
