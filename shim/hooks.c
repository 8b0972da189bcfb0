/* hooks.c — owns interposition of a socket's life: socket (starting the record that
 * spares connect its questions to the kernel, kept by sockrecord.c), connect (diverting
 * matching connects into the engine, or connecting for real while the pool is cold),
 * epoll_ctl registrations made before connect, close, dup and fcntl (keeping the fd table
 * right, never letting the app close the engine's fds), socketpair on the engine's thread,
 * fork, and the library's constructor (setns and unshare are netns.c's). The rest of what the app asks of a diverted fd is hooks_io.c's. Everything
 * that is not a configured upstream, and every call made on the engine thread, goes
 * straight to the real functions (real.c). errno is preserved on every path that does
 * not fail. */
#include "hooks.h"
#include "config.h"
#include "engine.h"
#include "engine_thread.h"
#include "exited.h"
#include "fdtable.h"
#include "log.h"
#include "loop.h"
#include "netns.h"
#include "real.h"
#include "rules.h"
#include "sockrecord.h"
#include "stats.h"
#include "pool.h"
#include "fastpath.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#define SHIM_EXPORT __attribute__((visibility("default")))

/* Every diverted connection is the child's too from here on, and only this process's engine
 * holds its other end: that engine listens to each, so that what the child writes is
 * answered there (while this process lives). The child never answers inline on them: its
 * engine fds are closed, their numbers free for anything. */
static void share_diverted_with_child(void)
{
    if (shim_in_engine || !fdtable_base)
        return;
    int top = fdtable_diverted_top();
    for (int fd = 0; fd < top; fd++) {
        struct fd_entry *e = fdtable_if_diverted(fd);
        if (e && e->forks_at_divert == fdtable_forks())
            engine_need(e);
    }
}

/* A child started with no fork handler and no hook of ours before its exec (posix_spawn,
 * system, popen: glibc clones and execs inside) keeps every diverted fd that is not
 * close-on-exec, and any that posix_spawn's file actions dup: such connections are shared
 * with it as a fork shares them, and this process counts it as one. */
void hooks_share_with_spawned_child(bool dups_possible)
{
    if (shim_in_engine || !fdtable_base)
        return;
    int top = fdtable_diverted_top();
    bool inherited = dups_possible;
    for (int fd = 0; fd < top && !inherited; fd++) {
        int flags;
        inherited = fdtable_if_diverted(fd) && (flags = real_fcntl(fd, F_GETFD, NULL)) >= 0 && !(flags & FD_CLOEXEC);
    }
    if (!inherited)
        return;
    int saved = errno;
    share_diverted_with_child();
    atomic_fetch_add_explicit(&fdtable_fork_count, 1, memory_order_relaxed);
    errno = saved;
}

static void inherited_never_inline(void)
{
    int top = fdtable_base ? fdtable_diverted_top() : 0;
    for (int fd = 0; fd < top; fd++) {
        struct fd_entry *e = fdtable_if_diverted(fd);
        if (e)
            fdgate_shut_next(&e->gate);   /* (no other thread here to wait out) */
    }
}

static void atfork_prepare(void)
{
    share_diverted_with_child();
    if (config_test_fork_pause_ms())   /* (a test's: another thread's connect lands here) */
        usleep((useconds_t)config_test_fork_pause_ms() * 1000);
    engine_atfork_prepare();
    rules_atfork_prepare();            /* last: its holder never waits on another lock */
}
static void atfork_parent(void)
{
    rules_atfork_release();
    atomic_fetch_add_explicit(&fdtable_fork_count, 1, memory_order_relaxed);
    engine_atfork_parent();
}
static void atfork_child(void)
{
    atomic_fetch_add_explicit(&fdtable_fork_count, 1, memory_order_relaxed);
    fdtable_pid = getpid();
    inherited_never_inline();
    rules_atfork_release();
    config_atfork_child();
    engine_atfork_child();
}

__attribute__((constructor)) static void shim_constructor(void)
{
    config_capture_environment();
    real_bind();
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
    config_read_once();
}

/* ---- socket: the record that spares connect its questions to the kernel ---- */

/* A kept reference to an app end (kept_app_end's value: fd + 1, or 0) goes to the engine
 * to close, with the app's thread's other leftovers. */
static void bury_kept_app_end(int kept)
{
    if (kept && fdtable_bury(kept - 1) > 0)
        loop_wake();
}

/* The close hook's bookkeeping, for an fd number that is closing, or that the kernel
 * has just handed out again (libc closed the old one behind the hooks). */
static void forget_fd(int fd, struct fd_entry *e, bool still_open)
{
    void *unseen = NULL;
    int kind = atomic_load_explicit(&e->kind, memory_order_acquire);
    /* A vfork child closing its copy (CPython's subprocess closes fd by fd where the kernel
     * has no close_range): the entry, the connection and the epoll sets are its parent's,
     * which still holds the fd. (One getpid, on the closes that matter, in a process that
     * has vforked: the trampoline below counts its vforks.) */
    if ((kind == FD_DIVERTED || kind == FD_PROBING) && !shim_in_engine && fdtable_maybe_vfork_child())
        return;
    if (kind == FD_DIVERTED && !shim_in_engine) {
        unseen = fdtable_take_engine_conn(e);
    } else if (kind == FD_PROBING && !shim_in_engine) {
        /* a connect in progress the app gave up on (the loser of a happy-eyeballs race):
         * the upstream's transfers need not wait for it */
        atomic_store(&e->kind, FD_NONE);
        pool_end_probe(e->upstream, -1, &e->peer, e->probe_held);
    }
    /* a connection the engine never heard from: both ends go, before the fd number can
     * be reused by another connection */
    if (unseen)
        engine_drop_unseen(e, unseen);
    /* A kept second reference to the app's end (divert): the app's close will not be the
     * socket's last, so the registrations the kernel would drop with it are dropped here
     * (a stale event for a closed fd would reach the app); then the engine closes it. A
     * number closed behind the hooks and handed out again is another socket now: the
     * reference is closed at once instead, which drops them. */
    if (atomic_load_explicit(&e->kept_app_end, memory_order_relaxed) && still_open) {
        int n = atomic_load(&e->n_epoll);
        for (int i = 0; i < n && i < FD_MAX_EPOLL; i++)
            real_epoll_ctl(e->epoll[i].epfd, EPOLL_CTL_DEL, fd, NULL);
        atomic_store(&e->n_epoll, 0);
        bury_kept_app_end(atomic_exchange(&e->kept_app_end, 0));
    } else {
        fdtable_close_kept_app_end(e);
    }
    fdtable_clear(fd);
}

void hooks_share_connection(struct fd_entry *e)
{
    int saved = errno;
    fdgate_shut(&e->gate);
    engine_need(e);
    errno = saved;
}

void hooks_forget(int fd)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (e)
        forget_fd(fd, e, true);
}

SHIM_EXPORT int socket(int domain, int type, int protocol)
{
    real_bind();
    int fd = real_socket(domain, type, protocol);
    if (fd < 0 && errno == EMFILE && !shim_in_engine && fdtable_base && fdtable_release_spares() > 0)
        fd = real_socket(domain, type, protocol);   /* what the shim held only to be faster, freed */
    /* the table is mapped here, not only with the rules: a socket is made before the
     * first connect loads them; a process known to be inert keeps no record */
    if (fd < 0 || shim_in_engine || config_known_inert()
        || fdtable_init() != 0)
        return fd;
    struct fd_entry *e = fdtable_slot(fd);
    if (!e || atomic_load_explicit(&e->kind, memory_order_relaxed) == FD_ENGINE)
        return fd;
    int saved = errno;
    shim_hook_depth++;
    forget_fd(fd, e, false);
    shim_hook_depth--;
    sockrecord_made(e, domain, type, protocol);
    errno = saved;
    return fd;
}

/* The engine's libraries make socketpairs of their own (libcurl's multi wake-up, its
 * threaded resolver's): close-on-exec, off the app's small numbers and marked the
 * engine's, as every fd the engine makes, so a program the app starts never inherits them
 * (it did: two sockets in every child) and the app's close of their numbers is EBADF. The
 * app's own pass through untouched. */
SHIM_EXPORT int socketpair(int domain, int type, int protocol, int sv[2])
{
    if (!shim_in_engine)
        return real_socketpair(domain, type, protocol, sv);
    int rc = real_socketpair(domain, type | SOCK_CLOEXEC, protocol, sv);
    if (rc == 0)
        for (int i = 0; i < 2; i++) {
            sv[i] = fdtable_raise(sv[i]);
            fdtable_mark_engine(sv[i]);
        }
    return rc;
}

/* ---- connect and its helpers ---- */

/* Swaps the app's socket for our socketpair end under the same fd number. 0 when the
 * fd is now diverted; -1 when nothing changed and the caller should connect for real.
 * With kept_tcp, the app's socket is connected already: it is kept (a new fd number, in
 * *kept_tcp) for the pool, and the app's epoll registrations of it are moved over. */
static int divert(int fd, int upstream, const struct sockaddr *addr, socklen_t len, const struct socket_facts *facts,
                  int *kept_tcp)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (!e || len > sizeof(union shim_sockaddr)
        || engine_ensure_started(config_loaded(), config_loaded()->upstreams[upstream].protocol == PROTO_HTTP) != 0)
        return -1;
    int sv[2];
    /* both ends non-blocking: the engine's end stays so, the app's gets the app's flags;
     * made ahead by the engine when it can (fdtable.c's stash) */
    dev_t pair_dev = 0;
    ino_t pair_ino = 0;
    int left = fdtable_take_pair(sv, &pair_dev, &pair_ino);
    if (left < 0) {
        if (real_socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) != 0)
            return -1;
        sv[1] = fdtable_raise(sv[1]);  /* (as the stash's: off the app's small numbers) */
    }
    if (left < 0 || left <= FDTABLE_STASH_WAKE)
        loop_wake();                   /* to make more (once until the engine runs) */
    if (sv[0] >= FDTABLE_MAX || sv[1] >= FDTABLE_MAX) {
        fdtable_close_engine_fd(sv[0]);
        fdtable_close_engine_fd(sv[1]);
        return -1;
    }
    sockrecord_carry_over(fd, sv[0], facts);
    int cloexec = facts->cloexec;
    if (cloexec < 0) {
        int fdflags = real_fcntl(fd, F_GETFD, NULL);
        cloexec = fdflags > 0 && (fdflags & FD_CLOEXEC);
    }
    union shim_sockaddr dest;
    memset(&dest, 0, sizeof dest);
    memcpy(&dest, addr, len);

    struct fd_epoll_reg regs[FD_MAX_EPOLL];
    int nregs = atomic_load(&e->n_epoll);
    if (nregs > FD_MAX_EPOLL)
        nregs = FD_MAX_EPOLL;
    memcpy(regs, e->epoll, sizeof regs);

    /* The app's TCP socket is kept on another number: for the pool when it is connected
     * already, else for the engine to close (a TCP socket's teardown costs microseconds
     * the app's connect need not wait for). */
    /* From here no close of the number completes (fdtable_close_begin). One that completed
     * since the connect began cleared the socket's record, and the number may be another
     * thread's file by now: it is not replaced (the connect fails as it would on what the
     * number is now). (A close still under way on the number may also be the one of an
     * earlier socket the number was, whose real close let the app's socket() have it.) */
    fdtable_divert_begin(e);
    int v, gone = 0;
    socklen_t vlen = sizeof v;
    if (atomic_load_explicit(&e->made, memory_order_relaxed) != MADE_TCP
        && (real_getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &v, &vlen) != 0 || v != IPPROTO_TCP))
        gone = errno == EBADF ? EBADF : ENOTSOCK;
    int tcp = gone ? -1 : fdtable_dup_high(fd);
    if (tcp < 0 && (kept_tcp || gone || errno == EBADF)) {
        fdtable_divert_end(e);
        fdtable_close_engine_fd(sv[0]);
        fdtable_close_engine_fd(sv[1]);
        if (gone)
            errno = gone;
        return -1;
    }
    fdtable_mark_engine(sv[1]);
    /* a new generation of the fd's gate: whatever an earlier connection on this fd number
     * still believes about it, it can no longer act on this one */
    uint64_t gen = fdgate_divert(&e->gate);
    void *conn = engine_adopt(sv[1], upstream, &dest, len, &e->gate, gen);
    if (!conn) {
        fdtable_divert_end(e);
        fdtable_clear(sv[1]);
        fdtable_close_engine_fd(sv[0]);
        fdtable_close_engine_fd(sv[1]);
        if (tcp >= 0)
            real_close(tcp);
        return -1;
    }
    /* The TCP socket lives on (tcp): its epoll registrations under this fd number would
     * too, reporting its events as the app's. They move to the new socket below. */
    for (int i = 0; tcp >= 0 && i < nregs; i++)
        real_epoll_ctl(regs[i].epfd, EPOLL_CTL_DEL, fd, NULL);
    atomic_store(&e->kind, FD_NONE);
    if (real_dup3(sv[0], fd, cloexec ? O_CLOEXEC : 0) < 0) {
        fdtable_divert_end(e);
        fdtable_close_engine_fd(sv[0]);
        engine_drop_unseen(e, conn);   /* the engine never heard of it */
        if (tcp >= 0)
            real_close(tcp);
        return -1;
    }
    if (kept_tcp) {
        *kept_tcp = tcp;
    } else if (tcp >= 0) {
        fdtable_mark_engine(tcp);
        if (fdtable_bury(tcp) > 0)
            loop_wake();
    }
    /* The pair's other reference to the app's end is kept while the engine does not hear the
     * connection (every hit answered inline): the app's close is then not the last, and the
     * socket's teardown (1 to 3 microseconds) goes to the engine with the engine's end. */
    bool keep = left >= 0 && fdtable_in_lower_half(sv[0]) && !fdtable_fd_pressure() && !(facts->file_flags & O_ASYNC)
                && !(facts->ask & MADE_SET_OWNER);   /* (signal-driven I/O: the kernel's close) */
    bury_kept_app_end(atomic_exchange(&e->kept_app_end, keep ? sv[0] + 1 : 0));   /* (a stale one) */
    if (!keep)
        fdtable_close_engine_fd(sv[0]);
    struct stat st;
    struct fdtable_divert d = { .dev = e->dev, .ino = e->ino, .peer = dest, .peer_len = len,
                                .upstream = upstream, .engine_fd = sv[1], .engine_conn = conn,
                                .n_epoll = keep ? nregs : 0 };   /* moved below; noted while the reference is kept */
    if (left >= 0) {                   /* dup3 kept the stashed end's inode */
        d.dev = pair_dev;
        d.ino = pair_ino;
    } else if (fstat(fd, &st) == 0) {
        d.dev = st.st_dev;
        d.ino = st.st_ino;
    }
    fdtable_publish_diverted(fd, &d);
    fdtable_note_thread_divert(fd);
    for (int i = 0; i < nregs; i++) {
        struct epoll_event ev = regs[i].ev;
        real_epoll_ctl(regs[i].epfd, EPOLL_CTL_ADD, fd, &ev);
    }
    fdtable_divert_end(e);    /* a close waiting on it closes the connection now */
    /* Every command of a Redis client goes through the engine, the first one a moment
     * from now: woken here, the engine is up (and, if commands have been coming close
     * together, polling: loop.c) by the time it arrives, instead of starting to wake then. */
    if (config_loaded()->upstreams[upstream].protocol == PROTO_REDIS)
        loop_wake();
    shim_debug("fd %d diverted to upstream %s:%u", fd, config_loaded()->upstreams[upstream].host,
               config_loaded()->upstreams[upstream].port);
    return 0;
}

/* ---- connecting for real while the pool is cold ----
 * With no live connection to the upstream in the pool, whether the upstream can be
 * reached is unknown: the app's own socket connects for real, so a refused, unreachable or
 * timed-out upstream fails the app's connect exactly as it would without the shim (errno,
 * SO_SNDTIMEO, EINPROGRESS and SO_ERROR for a non-blocking one). Once connected, the fd is
 * diverted and the connection itself goes to the pool, so the handshake is not wasted. */

static void count_connect_error(int up, int err)
{
    if (err == ECONNREFUSED)
        STAT_INC(up, connect_refused);
    else if (err == ETIMEDOUT)
        STAT_INC(up, connect_timeout);
    else if (err == EHOSTUNREACH || err == ENETUNREACH)
        STAT_INC(up, connect_unreachable);
    else
        STAT_INC(up, connect_other);
}

/* The real connection is up: divert the fd and give the connection to the pool. If the
 * divert fails the app simply keeps its real, connected socket. */
static void probe_connected(int fd, int up, const union shim_sockaddr *dest, socklen_t len, const struct socket_facts *f,
                            bool held)
{
    int tcp = -1;
    if (divert(fd, up, &dest->sa, len, f, &tcp) != 0)
        tcp = -1;
    pool_end_probe(up, tcp, dest, held);
}


/* A connect that may block, made inside the connect hook: with the hook depth at none
 * while it runs (nothing of the shim's is held across it), so that a jump out of it
 * (siglongjmp from an alarm's handler: a classic connect timeout) leaves none behind. */
static int real_connect_unheld(int fd, const struct sockaddr *addr, socklen_t len)
{
    int depth = shim_hook_depth;
    shim_hook_depth = 0;
    int rc = real_connect(fd, addr, len);
    shim_hook_depth = depth;
    return rc;
}

enum divert_result hooks_try_divert(int fd, const struct sockaddr *addr, socklen_t len, bool *nonblock,
                                     bool may_probe)
{
    if (shim_in_engine || !addr)
        return NOT_OURS;
    struct shim_config *cfg = config_get();
    if (!cfg)
        return NOT_OURS;
    /* connect again on a diverted fd (a non-blocking connect's second call, apr's): the
     * table is trusted as the write hooks trust it (every close libc makes of an app's
     * socket is interposed); an fd older than the last fork, which a child may have closed
     * and made again, is checked by its inode */
    struct fd_entry *already = fdtable_if_diverted(fd);
    if (already && (already->forks_at_divert == fdtable_forks() || fdtable_diverted(fd))) {
        if (atomic_exchange(&already->connect_in_progress, 0))
            return DIVERTED_AGAIN;     /* the connect in progress completed: 0, once */
        errno = EISCONN;
        return FAILED;
    }
    if (addr->sa_family != AF_INET && addr->sa_family != AF_INET6)
        return NOT_OURS;
    /* a link-local address with its interface (fe80::1%eth0): the pool dials addresses by
     * their text, which has no room for the interface */
    if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)
        && ((const struct sockaddr_in6 *)(const void *)addr)->sin6_scope_id)
        return NOT_OURS;
    int up = config_match_upstream(cfg, addr, len);
    if (up < 0 || len > sizeof(union shim_sockaddr))
        return NOT_OURS;
    struct socket_facts facts;
    bool connected = false;
    bool fresh = sockrecord_fresh_tcp(fd, addr->sa_family, &facts, &connected);
    if (!fresh || netns_thread_away()) {   /* (another namespace's address names another server) */
        if (!connected) {              /* (a connect again on a real connection is not one more) */
            STAT_INC(up, connect_direct_app_socket);
            shim_debug("fd %d: the app's socket is its own (bound, steered by an option, held twice, not TCP, "
                       "or of another network namespace): connected direct", fd);
        }
        return NOT_OURS;
    }
    if (fdtable_in_top_quarter(fd)) {  /* never the connect that runs the app out of fds */
        STAT_INC(up, connect_direct_fd_limit);
        shim_debug("fd %d: in the top quarter of the fd limit, connected direct", fd);
        return NOT_OURS;
    }
    *nonblock = (facts.file_flags & O_NONBLOCK) != 0;
    /* an upstream reached at another origin: the app's own address may not even answer */
    enum pool_probe probe = POOL_PROBE_SAME;
    if (may_probe && !cfg->upstreams[up].origin_https && !pool_has_live_connection(up, addr)
        && engine_ensure_started(config_loaded(), cfg->upstreams[up].protocol == PROTO_HTTP) == 0)
        probe = pool_begin_probe(up, addr, cfg->upstreams[up].protocol == PROTO_REDIS || !fdtable_in_lower_half(fd)
                                                ? 0 : rules_pool_max(cfg, &cfg->upstreams[up]));
    if (probe == POOL_PROBE_SAME)
        return divert(fd, up, addr, len, &facts, NULL) == 0 ? DIVERTED : NOT_OURS;
    /* an address not known to answer is connected for real, whether or not it is the one
     * probe that holds the upstream's transfers */
    bool held = probe == POOL_PROBE_HELD;
    union shim_sockaddr dest;
    memset(&dest, 0, sizeof dest);
    memcpy(&dest, addr, len);
    if (real_connect_unheld(fd, addr, len) == 0) {
        probe_connected(fd, up, &dest, len, &facts, held);
        return PROBE_CONNECTED;
    }
    int err = errno;
    if (err == EINPROGRESS) {
        struct fd_entry *e = fdtable_slot(fd);
        struct stat st;
        if (e && fstat(fd, &st) == 0) {      /* finished by getsockopt(SO_ERROR) or connect */
            e->dev = st.st_dev;
            e->ino = st.st_ino;
            e->peer = dest;
            e->peer_len = len;
            e->upstream = up;
            e->probe_file_flags = facts.file_flags;
            e->probe_held = held;
            atomic_store_explicit(&e->kind, FD_PROBING, memory_order_release);
            if (held)
                pool_watch_probe(up, fd);
        } else {
            pool_end_probe(up, -1, &dest, held);   /* cannot follow it: stop holding */
        }
        errno = EINPROGRESS;
        return PROBING;
    }
    count_connect_error(up, err);
    pool_end_probe(up, -1, &dest, held);
    errno = err;
    return FAILED;
}

/* A non-blocking probe the app asks about (SO_ERROR, or connect again): once connected,
 * divert; on an error, the app sees it and the fd is ours no more. */
void hooks_probe_settled(int fd, struct fd_entry *e, int err)
{
    if (err) {
        count_connect_error(e->upstream, err);
        pool_end_probe(e->upstream, -1, &e->peer, e->probe_held);
        fdtable_clear(fd);
        return;
    }
    union shim_sockaddr peer;
    socklen_t plen = sizeof peer;
    if (real_getpeername(fd, &peer.sa, &plen) != 0)
        return;                        /* still connecting */
    union shim_sockaddr dest = e->peer;
    if (atomic_load_explicit(&e->made, memory_order_relaxed) == MADE_OTHER) {
        /* dup'ed while it connected: the app holds the connection twice, it stays the app's */
        pool_end_probe(e->upstream, -1, &dest, e->probe_held);
        fdtable_clear(fd);
        atomic_store_explicit(&e->made, MADE_CONNECTED, memory_order_relaxed);
        return;
    }
    atomic_store(&e->kind, FD_NONE);   /* its epoll registrations stay: divert moves them */
    struct socket_facts facts;
    if (!sockrecord_facts(e, dest.sa.sa_family, &facts))
        facts = (struct socket_facts){ e->probe_file_flags, -1, MADE_SET_OWNER | MADE_SET_OPTS };
    probe_connected(fd, e->upstream, &dest, e->peer_len, &facts, e->probe_held);
    /* a non-blocking probe's connect said EINPROGRESS: its next connect says 0, as TCP's
     * would (the connect-again path that settled it clears this: it said 0 itself) */
    struct fd_entry *d = fdtable_if_diverted(fd);
    if (d)
        atomic_store(&d->connect_in_progress, (facts.file_flags & O_NONBLOCK) != 0);
}

/* Whether a bind names nothing: the wildcard address and port 0, which connect would
 * have chosen the same way (Tcl's `socket` binds every client socket so). */
static bool binds_nothing(const struct sockaddr *addr, socklen_t len)
{
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)addr;
        return in->sin_port == 0 && in->sin_addr.s_addr == htonl(INADDR_ANY);
    }
    if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)addr;
        return in6->sin6_port == 0 && IN6_IS_ADDR_UNSPECIFIED(&in6->sin6_addr);
    }
    return false;
}

/* A socket bound to a source address or port is the app's to connect (sockrecord.c). */
SHIM_EXPORT int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    real_bind();
    int rc = real_bind_socket(fd, addr, len);
    if (rc == 0 && !shim_in_engine && !binds_nothing(addr, len))
        sockrecord_note_bound(fd);
    return rc;
}

static int connect_hooked(int fd, const struct sockaddr *addr, socklen_t len)
{
    int saved = errno;
    if (shim_in_engine) {
        struct fd_entry *e = fdtable_slot(fd);
        if (e && fdtable_connected_already(e))
            return 0;                  /* an app-made connection joining the pool (upstream.c) */
        return real_connect(fd, addr, len);
    }
    bool nonblock = false;
    struct fd_entry *probing = shim_in_engine ? NULL : fdtable_probing(fd);
    if (probing) {                     /* connect again on a connect in progress */
        int rc = real_connect_unheld(fd, addr, len);
        int err = errno;
        if (rc == 0 || err == EISCONN) {
            hooks_probe_settled(fd, probing, 0);
            struct fd_entry *d = fdtable_if_diverted(fd);
            if (d)
                atomic_store(&d->connect_in_progress, 0);
        }
        else if (err != EALREADY && err != EINPROGRESS)
            hooks_probe_settled(fd, probing, err);
        errno = err;
        return rc;
    }
    switch (hooks_try_divert(fd, addr, len, &nonblock, true)) {
    case FAILED:
    case PROBING:
        return -1;
    case NOT_OURS:
        sockrecord_note_connected(fd);
        errno = saved;
        return real_connect_unheld(fd, addr, len);
    case PROBE_CONNECTED:
        errno = saved;
        return 0;
    case DIVERTED_AGAIN:
        errno = saved;
        return 0;
    case DIVERTED:
        break;
    }
    struct fd_entry *e = fdtable_if_diverted(fd);
    if (e)
        atomic_store(&e->connect_in_progress, nonblock);
    if (nonblock) {                    /* what a real non-blocking TCP connect says */
        errno = EINPROGRESS;
        return -1;
    }
    errno = saved;
    return 0;
}

SHIM_EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    real_bind();
    if (shim_hook_depth && !shim_in_engine) {
        sockrecord_note_connected(fd);  /* (from a signal handler inside a hook: for real) */
        return real_connect(fd, addr, len);
    }
    shim_hook_depth++;
    int rc = connect_hooked(fd, addr, len);
    shim_hook_depth--;
    return rc;
}

/* ---- epoll: registrations made before connect must survive the fd swap ---- */

SHIM_EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event)
{
    real_bind();
    int rc = real_epoll_ctl(epfd, op, fd, event);
    if (rc != 0 || shim_in_engine || !config_get())
        return rc;
    struct fd_entry *e = fdtable_slot(fd);
    int kind = e ? atomic_load_explicit(&e->kind, memory_order_relaxed) : FD_ENGINE;
    if (kind == FD_DIVERTED && atomic_load_explicit(&e->kept_app_end, memory_order_relaxed)) {
        /* the app's close will not be the socket's last: its registrations are noted, for
         * the close to remove them as the kernel would have (forget_fd) */
        if (!sockrecord_note_epoll(e, epfd, op, event))
            fdtable_close_kept_app_end(e);   /* more epoll sets than noted: the kernel's close, then */
        return rc;
    }
    if (kind != FD_NONE && kind != FD_PROBING)
        return rc;                     /* diverted already: nothing to replay */
    /* a registration in more epoll sets than are noted would stay on the app's own socket
     * when divert puts the socketpair end in its place: that set would never report the
     * connection (and the pooled socket's events would reach it, with the app's data) */
    if (!sockrecord_note_epoll(e, epfd, op, event))
        sockrecord_note_unmovable(fd);
    return rc;
}

/* ---- close and dup: keep the table right, never let the app close engine fds ---- */

static int close_entry(int fd, struct fd_entry *e)
{
    if (e) {
        if (atomic_load_explicit(&e->kind, memory_order_acquire) == FD_ENGINE && !shim_in_engine) {
            errno = EBADF;
            return -1;
        }
        if (atomic_load_explicit(&e->kind, memory_order_acquire) == FD_DIVERTED && !fdtable_maybe_vfork_child()) {
            forget_fd(fd, e, true);
            fdtable_clear(fd);         /* then no engine write through this number starts */
            fdtable_wait_untouched(fd, fd);
        } else {
            forget_fd(fd, e, true);
        }
    }
    int depth = shim_hook_depth;       /* (as real_connect_unheld) */
    shim_hook_depth = 0;
    int rc = real_close(fd);
    shim_hook_depth = depth;
    return rc;
}

SHIM_EXPORT int close(int fd)
{
    struct fd_entry *e = fdtable_slot(fd);
    shim_hook_depth++;
    bool met = e && !shim_in_engine && fdtable_close_begin(e);   /* (a divert of the number under way) */
    int rc = close_entry(fd, e);
    if (met)
        fdtable_close_end(e);
    shim_hook_depth--;
    return rc;
}

SHIM_EXPORT int close_range(unsigned first, unsigned last, int flags)
{
    real_bind();
    unsigned limit = (unsigned)fdtable_engine_fd_limit();
    /* (a vfork child, CPython's subprocess closing what the new program must not inherit:
     * the parent's table is not its to change) */
    if (shim_in_engine || first >= limit || !fdtable_slot(0) || fdtable_in_vfork_child())
        return real_close_range(first, last, flags);
    unsigned start = first;
    for (unsigned fd = first; fd < limit && fd <= last; fd++) {
        if (!fdtable_is_engine((int)fd)) {
            if (!(flags & CLOSE_RANGE_CLOEXEC)) {
                struct fd_entry *d = fdtable_if_diverted((int)fd);
                if (d)
                    engine_need(d);    /* so that the engine sees it close */
                fdtable_clear((int)fd);
            }
            continue;
        }
        if (fd > start && real_close_range(start, fd - 1, flags) != 0)
            return -1;
        start = fd + 1;
    }
    if (!(flags & CLOSE_RANGE_CLOEXEC))
        fdtable_wait_untouched((int)first, last > INT32_MAX ? INT32_MAX : (int)last);
    if (start > last || start == 0)
        return 0;
    return real_close_range(start, last, flags);
}

/* glibc's closefrom closes through its own close_range, behind the hook above: the same
 * care for the engine's fds and the table. */
SHIM_EXPORT void closefrom(int lowfd)
{
    if (lowfd < 0)
        lowfd = 0;
    if (close_range((unsigned)lowfd, ~0U, 0) == 0)
        return;
    /* no close_range (an old kernel): one by one; the close hook refuses the engine's */
    struct rlimit rl;
    int top = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 65536 ? (int)rl.rlim_cur : 65536;
    for (int fd = lowfd; fd < top; fd++)
        close(fd);
}

/* A stream over a socket (fdopen) is closed by libc's own close, behind the hook: the fd's
 * entry goes first, as close() would see to it. */
SHIM_EXPORT int fclose(FILE *f)
{
    real_bind();
    int fd = f && !shim_in_engine ? fileno(f) : -1;
    struct fd_entry *e = fd >= 0 ? fdtable_slot(fd) : NULL;
    if (e && atomic_load_explicit(&e->kind, memory_order_acquire) != FD_ENGINE)
        forget_fd(fd, e, true);
    return real_fclose(f);
}

/* An app that half-closes after its request (an HTTP/1.0 habit, `nc -N`) waits for the
 * server to see the EOF and close: the engine must hear a connection it left to inline
 * answers, or that wait never ends. */
SHIM_EXPORT int shutdown(int fd, int how)
{
    real_bind();
    int rc = real_shutdown(fd, how);
    struct fd_entry *e = rc == 0 && how != SHUT_RD && !shim_in_engine ? fdtable_if_diverted(fd) : NULL;
    if (e) {
        int saved = errno;
        engine_need(e);
        errno = saved;
    }
    return rc;
}

/* A diverted connection on two fds: the engine must hear from it (a close of one would
 * otherwise drop what the other still uses). */
static void copy_entry(int fd, int nfd)
{
    struct fd_entry *e = fdtable_if_diverted(fd);
    if (e)
        engine_need(e);
    fdtable_copy(fd, nfd);
}

SHIM_EXPORT int dup(int fd)
{
    real_bind();
    int nfd = real_dup(fd);
    shim_hook_depth++;
    if (nfd >= 0 && !shim_in_engine)
        copy_entry(fd, nfd);
    shim_hook_depth--;
    return nfd;
}

/* vfork cannot be wrapped by a C function (the child returns through the wrapper's frame,
 * and the parent then returns through what the child left of it): a two-instruction
 * trampoline counts it and jumps on, so that the closes above know when a vfork child may
 * be the caller. */
#if defined(__x86_64__)
__asm__(".text\n"
        ".globl vfork\n"
        ".type vfork, @function\n"
        "vfork:\n"
        "    endbr64\n"                  /* (an indirect branch's landing pad under CET; else a nop) */
        "    lock incl fdtable_vforks(%rip)\n"
        "    jmp *real_vfork_fn(%rip)\n"
        ".size vfork, .-vfork\n");
#endif

static int dup_onto_entry(int fd, int nfd, int flags, bool is_dup3);

static int dup_onto(int fd, int nfd, int flags, bool is_dup3)
{
    real_bind();
    if (!shim_in_engine && fd != nfd && fdtable_maybe_vfork_child()) {
        /* a vfork child: the fds are its own, the table and the stash its parent's, left
         * as they are; a connection it makes its stdin or stdout is served by the parent's
         * engine from now on */
        int rc = is_dup3 ? real_dup3(fd, nfd, flags) : real_dup2(fd, nfd);
        struct fd_entry *src = rc < 0 ? NULL : fdtable_if_diverted(fd);
        if (src)
            hooks_share_connection(src);
        return rc;
    }
    if (!shim_in_engine && fdtable_is_engine(nfd) && !fdtable_give_to_app(nfd)) {
        errno = EBADF;                 /* the engine's own (its loop, a connection's end) */
        return -1;
    }
    /* a connection on nfd that the dup closes: the engine must hear it end, and no write
     * of the engine's through that number may start (fdtable_touch) */
    struct fd_entry *target = shim_in_engine || fd == nfd ? NULL : fdtable_slot(nfd);
    bool met = target && fdtable_close_begin(target);
    int rc = dup_onto_entry(fd, nfd, flags, is_dup3);
    if (met)
        fdtable_close_end(target);
    return rc;
}

static int dup_onto_entry(int fd, int nfd, int flags, bool is_dup3)
{
    struct fd_entry *old = shim_in_engine || fd == nfd ? NULL : fdtable_if_diverted(nfd);
    if (old) {
        engine_need(old);
        fdtable_clear(nfd);            /* (copied again below when the dup is one of ours) */
        fdtable_wait_untouched(nfd, nfd);
    }
    int rc = is_dup3 ? real_dup3(fd, nfd, flags) : real_dup2(fd, nfd);
    if (rc < 0 || shim_in_engine || fd == nfd)
        return rc;
    copy_entry(fd, nfd);
    return rc;
}

static int dup_onto_counted(int fd, int nfd, int flags, bool three)
{
    shim_hook_depth++;
    int rc = dup_onto(fd, nfd, flags, three);
    shim_hook_depth--;
    return rc;
}

SHIM_EXPORT int dup2(int fd, int nfd) { return dup_onto_counted(fd, nfd, 0, false); }
SHIM_EXPORT int dup3(int fd, int nfd, int flags) { return dup_onto_counted(fd, nfd, flags, true); }

static int after_fcntl(int rc, int fd, int cmd, void *arg)
{
    if (rc < 0 || shim_in_engine)
        return rc;
    if (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)
        copy_entry(fd, rc);
    else
        sockrecord_note_fcntl(fd, cmd, arg);
    return rc;
}

SHIM_EXPORT int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    real_bind();
    return after_fcntl(real_fcntl(fd, cmd, arg), fd, cmd, arg);
}

SHIM_EXPORT int fcntl64(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    real_bind();
    return after_fcntl(real_fcntl64(fd, cmd, arg), fd, cmd, arg);
}
