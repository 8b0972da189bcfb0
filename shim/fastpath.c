/* fastpath.c — owns the app side of every write on a diverted connection, and answering
 * a memory hit on the app's own thread: when the engine holds nothing for the connection
 * and one write carries exactly one whole GET or HEAD head that is a fresh memory hit, the
 * response is written straight into the engine's end of the socketpair (the bytes wait in
 * the kernel, so readiness stays exact and the engine never wakes), and the write returns
 * the request's length. Everything else is written for real, in order, through the gate
 * (fdtable.h) that keeps the engine and app threads from ever interleaving answers: every
 * app write holds the gate while it writes, and leaves it with the engine (its sequence
 * number bumped) after a real write, so the engine can only hand the connection back once
 * it has read everything the app wrote. A response the pair does not take whole has its
 * rest handed to the engine, which sends it before anything else. */
#include "fastpath.h"
#include "clock.h"
#include "cache.h"
#include "store.h"
#include "conn.h"
#include "http.h"
#include "loop.h"
#include "real.h"
#include "stats.h"
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>

#define INLINE_HEAD_MAX 4096           /* a longer request head goes the engine's way */
#define INLINE_KEY_MAX  2048           /* the same for a longer cache key */
#define INLINE_RESPONSE_HEAD_MAX 4096  /* a longer response head, too */

static void (*need_engine)(struct fd_entry *e);
static bool (*drop_unheard)(struct fd_entry *e, void *conn);

void fastpath_init(void (*need)(struct fd_entry *e), bool (*drop)(struct fd_entry *e, void *conn))
{
    need_engine = need;
    drop_unheard = drop;
}

/* An inline answer that said close was written whole: EOF after it, at once. One the
 * engine never heard from ends here too (its end goes to the engine to close, off the
 * app's thread, and the app's own close has nothing left to do); otherwise the engine
 * sees the EOF after the answer. */
static void end_after_answer(struct fd_entry *e)
{
    int engine_fd = e->engine_fd;
    real_shutdown(engine_fd, SHUT_WR);
    void *conn = e->engine_conn;
    if (conn && drop_unheard && drop_unheard(e, conn))
        fdtable_end_unheard(e);
}

static size_t iov_total(const struct iovec *iov, int iovcnt)
{
    size_t n = 0;
    for (int i = 0; i < iovcnt; i++)
        n += iov[i].iov_len;
    return n;
}

static pthread_mutex_t handoff_lock = PTHREAD_MUTEX_INITIALIZER;
static struct fastpath_handoff *handoffs;
static _Atomic int handoffs_pending;

static size_t gather(const struct iovec *iov, int iovcnt, char *out, size_t cap)
{
    size_t n = 0;
    for (int i = 0; i < iovcnt; i++) {
        if (iov[i].iov_len > cap - n)
            return (size_t)-1;
        memcpy(out + n, iov[i].iov_base, iov[i].iov_len);
        n += iov[i].iov_len;
    }
    return n;
}

/* The rest of an inline answer the pair did not take: the engine sends it first. */
static void hand_off(struct fd_entry *e, uint64_t held, const struct iovec *iov, int iovcnt, size_t skip,
                     bool close_after)
{
    size_t total = 0;
    for (int i = 0; i < iovcnt; i++)
        total += iov[i].iov_len;
    struct fastpath_handoff *h = malloc(sizeof *h + (total - skip));
    if (h) {
        h->engine_fd = e->engine_fd;
        h->gen = fdgate_gen(held);
        h->close_after = close_after;
        h->len = 0;
        for (int i = 0; i < iovcnt; i++) {
            const char *p = iov[i].iov_base;
            size_t n = iov[i].iov_len;
            if (skip >= n) {
                skip -= n;
                continue;
            }
            memcpy(h->data + h->len, p + skip, n - skip);
            h->len += n - skip;
            skip = 0;
        }
    }
    if (need_engine)
        need_engine(e);
    fdgate_app_wrote(&e->gate, held);  /* the engine owns the connection until it has sent the rest */
    if (!h) {
        real_shutdown(e->engine_fd, SHUT_WR);   /* no memory: an answer cut short, then EOF */
        return;
    }
    pthread_mutex_lock(&handoff_lock);
    h->next = handoffs;
    handoffs = h;
    atomic_store(&handoffs_pending, 1);
    pthread_mutex_unlock(&handoff_lock);
    loop_wake();
}

struct fastpath_handoff *fastpath_take_handoffs(void)
{
    if (!atomic_load_explicit(&handoffs_pending, memory_order_relaxed))
        return NULL;
    pthread_mutex_lock(&handoff_lock);
    struct fastpath_handoff *h = handoffs;
    handoffs = NULL;
    atomic_store(&handoffs_pending, 0);
    pthread_mutex_unlock(&handoff_lock);
    return h;
}

void fastpath_forget(void)
{
    handoffs = NULL;                   /* a forked child: its parent's connections */
    atomic_store(&handoffs_pending, 0);
}

/* One whole GET or HEAD head that is a fresh memory hit, answered into the pair. -1 when
 * it is not (nothing written). */
static ssize_t answer_inline(const struct shim_config *cfg, int fd, struct fd_entry *e, uint64_t held, const char *p,
                             size_t n)
{
    int64_t started = clock_mono_us();
    struct http_request req;
    if (http_parse_request(p, n, &req) != HTTP_PARSE_DONE || req.head_len != n || req.content_length > 0
        || req.chunked || req.upgrade || req.expect_continue
        || !(http_method_is(&req, "GET") || http_method_is(&req, "HEAD")))
        return -1;
    /* An fd libc closed behind the hooks left the socketpair end with no peer: the send
     * below fails (EPIPE) and nothing is answered. Only a forked child could still hold
     * the peer, so an fd older than the last fork is checked by its inode first. */
    struct stat st;
    if (e->forks_at_divert != fdtable_forks()
        && (fstat(fd, &st) != 0 || st.st_ino != e->ino || st.st_dev != e->dev))
        return -1;
    int up = e->upstream;
    const struct upstream_rule *u = &cfg->upstreams[up];
    const struct cache_rule *rule = cfg->cache != CACHE_OFF ? cache_rule_for(u, &req) : NULL;
    char key[INLINE_KEY_MAX];
    size_t key_len = rule ? cache_key(u, rule, &req, false, key, sizeof key) : 0;   /* (plaintext: TLS never comes here) */
    int64_t now = clock_wall_ms();
    struct cache_entry *ent = key_len ? store_fresh_hit(&req, key, key_len, now) : NULL;
    if (!ent)
        return -1;                     /* a miss, another variant, or stale: the engine decides */
    bool not_modified = cache_entry_not_modified(ent, &req), head_only = http_method_is(&req, "HEAD");
    char head[INLINE_RESPONSE_HEAD_MAX];
    size_t hn = cache_entry_head(ent, req.minor_version, req.keep_alive, not_modified, now, head, sizeof head);
    if (!hn) {
        cache_entry_release(ent);
        return -1;
    }
    size_t body = head_only || not_modified ? 0 : ent->body_len;
    struct iovec iov[2] = { { head, hn }, { (void *)ent->body, body } };
    struct msghdr msg = { .msg_iov = iov, .msg_iovlen = body ? 2 : 1 };
    /* a body that fits behind the head goes in one flat send: a fifth of a microsecond
     * less than sendmsg's two-part message, on every hit of a small object */
    bool flat = body && body <= sizeof head - hn;
    if (flat)
        memcpy(head + hn, ent->body, body);
    ssize_t w;
    do
        w = flat ? real_send(e->engine_fd, head, hn + body, MSG_DONTWAIT | MSG_NOSIGNAL)
                 : real_sendmsg(e->engine_fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (w < 0 && errno == EINTR);
    if (w <= 0) {                      /* full, or gone: the request goes the engine's way */
        cache_entry_release(ent);
        return -1;
    }
    STAT_INC(up, requests);
    STAT_INC(up, hits);
    STAT_RULE(up, (int)(rule - u->cache_rules), requests);
    STAT_RULE(up, (int)(rule - u->cache_rules), hits);
    STAT_INC(up, inline_hits);
    if (not_modified)
        STAT_INC(up, not_modified);
    STAT_ADD(up, bytes_from_cache, body);
    if ((size_t)w < hn + body) {
        hand_off(e, held, iov, body ? 2 : 1, (size_t)w, !req.keep_alive);
    } else {
        fdgate_app_release(&e->gate, held, !req.keep_alive);
        if (!req.keep_alive)
            end_after_answer(e);       /* the answer said close: EOF after it */
    }
    cache_entry_release(ent);
    stats_observe_latency(up, true, clock_mono_us() - started);
    return (ssize_t)n;
}

/* The app's write, which may block (a full socket, an app that reads its answers late):
 * with the hook depth at none while it runs, as real_connect_unheld (hooks.c), so that a
 * jump out of it (an alarm's siglongjmp) leaves none behind. */
static ssize_t real_unheld(fastpath_real_write real, void *real_arg)
{
    int depth = shim_hook_depth;
    shim_hook_depth = 0;
    ssize_t r = real(real_arg);
    shim_hook_depth = depth;
    return r;
}

static ssize_t write_counted(const struct shim_config *cfg, int fd, struct fd_entry *e, const struct iovec *iov,
                             int iovcnt, fastpath_real_write real, void *real_arg, bool may_inline)
{
    uint64_t held;
    bool idle;
    if (!fdgate_app_hold(&e->gate, &held, &idle)) {
        /* (a C client reusing a kept-alive connection the server had just ended was killed
         * by SIGPIPE here, where direct its write succeeds and its read says EOF) */
        if (iovcnt > 0 && fdtable_next_write_taken(e))
            return (ssize_t)iov_total(iov, iovcnt);
        if (need_engine)
            need_engine(e);
        return real_unheld(real, real_arg);
    }
    if (idle && may_inline && cfg && cfg->fastpath && iovcnt > 0) {
        char flat[INLINE_HEAD_MAX];
        const char *p = iov[0].iov_base;
        size_t n = iov[0].iov_len;
        if (iovcnt > 1) {
            n = gather(iov, iovcnt, flat, sizeof flat);
            p = flat;
        }
        if (n != (size_t)-1 && n >= 16 && n <= INLINE_HEAD_MAX && (p[0] == 'G' || p[0] == 'H')) {
            ssize_t r = answer_inline(cfg, fd, e, held, p, n);
            if (r >= 0)
                return r;
        }
    }
    int saved;
    if (need_engine)
        need_engine(e);                /* before the bytes: the engine must hear them */
    /* the engine owns what is written, from before the write: a write larger than the
     * socket takes blocks until the engine reads, and the engine must be free to answer
     * meanwhile (an app that reads the answers on another thread waits for them to write
     * the rest: with the gate held through the write, neither side moved) */
    fdgate_app_wrote(&e->gate, held);
    ssize_t r = real_unheld(real, real_arg);
    saved = errno;
    fdgate_app_wrote_more(&e->gate, held);
    errno = saved;
    return r;
}

ssize_t fastpath_write(const struct shim_config *cfg, int fd, struct fd_entry *e, const struct iovec *iov, int iovcnt,
                       fastpath_real_write real, void *real_arg)
{
    /* (a signal handler's write inside a hook is never answered inline: real.h) */
    bool may_inline = shim_hook_depth == 0;
    shim_hook_depth++;
    ssize_t r = write_counted(cfg, fd, e, iov, iovcnt, real, real_arg, may_inline);
    shim_hook_depth--;
    return r;
}
