/* hooks.c — owns interposition: the exported libc symbols, loading the configuration
 * once, and diverting matching connects into the engine. Everything that is not a
 * configured upstream, and every call made on the engine thread, goes straight to the
 * real functions (real.c). errno is preserved on every path that does not fail. */
#include "hooks.h"
#include "clock.h"
#include "engine.h"
#include "exited.h"
#include "fdtable.h"
#include "log.h"
#include "real.h"
#include "rules.h"
#include "stats.h"
#include "pool.h"
#include "fastpath.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#define SHIM_EXPORT __attribute__((visibility("default")))

static pthread_once_t config_once = PTHREAD_ONCE_INIT;
static struct shim_config *config;   /* NULL: inert */
static _Atomic bool config_tried;    /* load_config ran: a NULL config is inert for good */

/* HTTPSHIM_CONF as it was when the library loaded: servers scrub their workers'
 * environment (clearenv, a whitelisting master) long before the first connect. */
static char conf_path[4096];
static enum { ENV_UNREAD, ENV_READ, ENV_TOO_LONG } conf_env;

static void capture_environment(void)
{
    const char *path = getenv("HTTPSHIM_CONF");
    size_t n = path ? strlen(path) : 0;
    if (n < sizeof conf_path) {
        memcpy(conf_path, path ? path : "", n + 1);
        conf_env = ENV_READ;
    } else {
        conf_env = ENV_TOO_LONG;
    }
    shim_debug_enable(getenv("HTTPSHIM_DEBUG") != NULL);
    clock_enable_test(getenv("HTTPSHIM_TEST_CLOCK") && !strcmp(getenv("HTTPSHIM_TEST_CLOCK"), "1"));
}

/* The rules are read and parsed in the constructor, with the privileges and the file
 * system the process starts with: a master that reads them as root, then drops to
 * `nobody` and forks its workers, hands the workers a parsed configuration (reading it
 * at their first connect, they would find it unreadable). What must wait for the first
 * connect waits: the fd table, name resolution, the engine. */
static pthread_once_t read_once = PTHREAD_ONCE_INIT;
static struct shim_config *parsed;    /* NULL: nothing to shim in this process */
static char inert_reason[sizeof conf_path + RULES_ERR_MAX];   /* why not, when it is an error */

static void read_config(void)
{
    if (conf_env == ENV_UNREAD)        /* a hook ran before the constructor */
        capture_environment();
    if (conf_env == ENV_TOO_LONG) {
        snprintf(inert_reason, sizeof inert_reason, "HTTPSHIM_CONF is longer than %zu bytes", sizeof conf_path - 1);
        return;
    }
    const char *path = conf_path[0] ? conf_path : "/etc/httpshim/rules.conf";
    struct shim_config *cfg = calloc(1, sizeof *cfg);
    if (!cfg) {
        snprintf(inert_reason, sizeof inert_reason, "%s: no memory to read it", path);
        return;
    }
    char err[RULES_ERR_MAX];
    if (rules_load(path, cfg, err) != 0) {
        int why = errno;
        if (err[0])
            snprintf(inert_reason, sizeof inert_reason, "%s", err);
        else if (why != ENOENT || conf_path[0])   /* only an unset default path is silent */
            snprintf(inert_reason, sizeof inert_reason, "%s: %s", path, strerror(why));
        rules_free(cfg);
        free(cfg);
        return;
    }
    parsed = cfg;
}

static void read_config_once(void) { pthread_once(&read_once, read_config); }

/* At the first use: one line on stderr and a record for `httpshim stats` when the rules
 * could not be read, else the parsed rules made live. */
static void load_config(void)
{
    read_config_once();
    if (!parsed) {
        if (inert_reason[0]) {
            char line[sizeof inert_reason + 64];
            int n = snprintf(line, sizeof line, "httpshim: %s (the shim is inert in this process)\n", inert_reason);
            ssize_t w = write(2, line, n > 0 && (size_t)n < sizeof line ? (size_t)n : strlen(line));
            (void)w;
            exited_write_inert(inert_reason);
        }
        return;
    }
    if (parsed->n_upstreams == 0 || fdtable_init() != 0)
        return;
    rules_resolve_all(parsed, real_getaddrinfo);
    config = parsed;
}

static void load_config_once(void)
{
    load_config();
    atomic_store(&config_tried, true);
}

static struct shim_config *config_get(void)
{
    if (shim_in_engine)
        return config;
    int saved = errno;
    real_bind();
    if (!real_bound())
        return NULL;                   /* a call from inside dlsym: stay out of the way */
    pthread_once(&config_once, load_config_once);
    errno = saved;
    return config;
}

struct shim_config *hooks_config(void) { return config_get(); }

static void atfork_prepare(void) { engine_atfork_prepare(); }
static void atfork_parent(void)
{
    atomic_fetch_add_explicit(&fdtable_fork_count, 1, memory_order_relaxed);
    engine_atfork_parent();
}
static void atfork_child(void) { engine_atfork_child(); }

__attribute__((constructor)) static void shim_constructor(void)
{
    capture_environment();
    real_bind();
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
    read_config_once();
}

/* ---- socket: the record that spares connect its questions to the kernel ---- */

static struct fd_entry *made_tcp(int fd)
{
    struct fd_entry *e = fdtable_slot(fd);
    return e && atomic_load_explicit(&e->made, memory_order_relaxed) == MADE_TCP ? e : NULL;
}

/* A real connect (or its attempt): never a fresh socket again. */
static void note_connected(int fd)
{
    struct fd_entry *e = made_tcp(fd);
    if (e)
        atomic_store_explicit(&e->made, MADE_OTHER, memory_order_relaxed);
}

/* The close hook's bookkeeping, for an fd number that is closing, or that the kernel
 * has just handed out again (libc closed the old one behind the hooks). */
static void forget_fd(int fd, struct fd_entry *e)
{
    void *unseen = NULL;
    int kind = atomic_load_explicit(&e->kind, memory_order_acquire);
    if (kind == FD_DIVERTED && !shim_in_engine) {
        unseen = e->engine_conn;
        e->engine_conn = NULL;
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
    fdtable_clear(fd);
}

SHIM_EXPORT int socket(int domain, int type, int protocol)
{
    real_bind();
    int fd = real_socket(domain, type, protocol);
    /* the table is mapped here, not only with the rules: a socket is made before the
     * first connect loads them; a process known to be inert keeps no record */
    if (fd < 0 || shim_in_engine || (atomic_load_explicit(&config_tried, memory_order_relaxed) && !config)
        || fdtable_init() != 0)
        return fd;
    struct fd_entry *e = fdtable_slot(fd);
    if (!e || atomic_load_explicit(&e->kind, memory_order_relaxed) == FD_ENGINE)
        return fd;
    int saved = errno;
    forget_fd(fd, e);
    bool tcp = (domain == AF_INET || domain == AF_INET6) && (type & 0xf) == SOCK_STREAM
               && (protocol == 0 || protocol == IPPROTO_TCP);
    e->made_family = domain;
    e->made_flags = O_RDWR | ((type & SOCK_NONBLOCK) ? O_NONBLOCK : 0);
    e->made_cloexec = (type & SOCK_CLOEXEC) != 0;
    e->made_extras = 0;
    atomic_store_explicit(&e->made, tcp ? MADE_TCP : MADE_OTHER, memory_order_relaxed);
    errno = saved;
    return fd;
}

/* What fcntl, ioctl and setsockopt change that divert would otherwise ask about. */
static void note_file_flag(int fd, int flag, bool on)
{
    struct fd_entry *e = made_tcp(fd);
    if (e)
        e->made_flags = on ? (e->made_flags | flag) : (e->made_flags & ~flag);
}

static void note_fcntl(int fd, int cmd, void *arg)
{
    struct fd_entry *e = made_tcp(fd);
    if (!e)
        return;
    if (cmd == F_SETFL)
        e->made_flags = O_RDWR | ((int)(long)arg & (O_NONBLOCK | O_ASYNC | O_APPEND | O_NOATIME));
    else if (cmd == F_SETFD)
        e->made_cloexec = ((int)(long)arg & FD_CLOEXEC) != 0;
    else if (cmd == F_SETOWN || cmd == F_SETOWN_EX || cmd == F_SETSIG)
        e->made_extras |= MADE_SET_OWNER;
}

static void note_ioctl(int fd, unsigned long req, const void *arg)
{
    int on = 0;
    if ((req == FIONBIO || req == FIOASYNC) && arg)
        memcpy(&on, arg, sizeof on);
    if (req == FIONBIO)
        note_file_flag(fd, O_NONBLOCK, on != 0);
    else if (req == FIOASYNC)
        note_file_flag(fd, O_ASYNC, on != 0);
    else if (req == FIOCLEX || req == FIONCLEX) {
        struct fd_entry *e = made_tcp(fd);
        if (e)
            e->made_cloexec = req == FIOCLEX;
    } else if (req == FIOSETOWN || req == SIOCSPGRP) {
        struct fd_entry *e = made_tcp(fd);
        if (e)
            e->made_extras |= MADE_SET_OWNER;
    }
}

static void note_sockopt(int fd, int level, int name)
{
    struct fd_entry *e = level == SOL_SOCKET ? made_tcp(fd) : NULL;
    if (e && (name == SO_RCVTIMEO || name == SO_SNDTIMEO || name == SO_PASSCRED || name == SO_PRIORITY
#ifdef SO_RCVTIMEO_NEW
              || name == SO_RCVTIMEO_NEW || name == SO_SNDTIMEO_NEW
#endif
              ))
        e->made_extras |= MADE_SET_OPTS;
}

/* ---- connect and its helpers ---- */

/* What divert needs to know of the app's socket to make the socketpair end behave like
 * it: its file flags, close-on-exec (-1: ask), and whether an owner, a signal or options
 * were set on it (ask for those, and copy them). */
struct socket_facts { int file_flags; int cloexec; unsigned ask; };

/* What the hooks saw the app do to its socket since socket(), if they saw it all. */
static bool facts_from_record(const struct fd_entry *e, int family, struct socket_facts *f)
{
    if (atomic_load_explicit(&e->made, memory_order_relaxed) != MADE_TCP || e->made_family != family)
        return false;
    *f = (struct socket_facts){ e->made_flags, e->made_cloexec, e->made_extras };
    return true;
}

/* A TCP socket the app created and has neither bound nor connected, and what divert
 * must carry over from it. Every syscall here is paid by each connect the rules match,
 * on the app's thread: a socket the hooks saw made costs one (getsockname: not bound,
 * and still a socket of that family, whatever happened to the fd number behind the
 * hooks); one made out of their sight costs four. (IPPROTO_TCP implies SOCK_STREAM.) */
static bool is_fresh_tcp(int fd, int family, struct socket_facts *f)
{
    struct fd_entry *e = fdtable_slot(fd);
    int made = e ? atomic_load_explicit(&e->made, memory_order_relaxed) : MADE_UNKNOWN;
    if (made == MADE_OTHER)
        return false;
    bool known = made == MADE_TCP && facts_from_record(e, family, f);
    int v;
    socklen_t len = sizeof v;
    if (!known) {
        if (made == MADE_TCP)
            return false;              /* a TCP socket of the other family */
        if (real_getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &v, &len) || v != family)
            return false;
        len = sizeof v;
        if (real_getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &v, &len) || v != IPPROTO_TCP)
            return false;
    }
    union shim_sockaddr local;
    len = sizeof local;
    if (real_getsockname(fd, &local.sa, &len) || local.sa.sa_family != family) {
        if (e)
            atomic_store_explicit(&e->made, MADE_UNKNOWN, memory_order_relaxed);
        return false;
    }
    if ((family == AF_INET && local.in.sin_port) || (family == AF_INET6 && local.in6.sin6_port))
        return false;
    if (known)
        return true;
    *f = (struct socket_facts){ real_fcntl(fd, F_GETFL, NULL), -1, MADE_SET_OWNER | MADE_SET_OPTS };
    return f->file_flags >= 0;
}

/* What the app set on its TCP socket that a Unix socket also honours, copied to `to`
 * (made non-blocking). What the record does not know is asked of the kernel; options
 * still at their default (zero) are not copied. */
static void carry_over(int from, int to, const struct socket_facts *f)
{
    int fl = f->file_flags & (O_NONBLOCK | O_ASYNC | O_APPEND | O_NOATIME);
    if (fl != O_NONBLOCK)
        real_fcntl(to, F_SETFL, (void *)(long)fl);
    if (f->ask & MADE_SET_OWNER) {
        struct f_owner_ex owner;
        if (real_fcntl(from, F_GETOWN_EX, &owner) == 0 && owner.pid)
            real_fcntl(to, F_SETOWN_EX, &owner);
        int sig = real_fcntl(from, F_GETSIG, NULL);
        if (sig > 0)
            real_fcntl(to, F_SETSIG, (void *)(long)sig);
    }
    static const int opts[] = { SO_RCVTIMEO, SO_SNDTIMEO, SO_PASSCRED, SO_PRIORITY };
    for (size_t i = 0; (f->ask & MADE_SET_OPTS) && i < sizeof opts / sizeof opts[0]; i++) {
        char val[32];
        socklen_t len = sizeof val;
        if (real_getsockopt(from, SOL_SOCKET, opts[i], val, &len) != 0)
            continue;
        bool is_default = true;
        for (socklen_t k = 0; k < len; k++)
            is_default = is_default && val[k] == 0;
        if (!is_default)
            real_setsockopt(to, SOL_SOCKET, opts[i], val, len);
    }
}

/* Swaps the app's socket for our socketpair end under the same fd number. 0 when the
 * fd is now diverted; -1 when nothing changed and the caller should connect for real.
 * With kept_tcp, the app's socket is connected already: it is kept (a new fd number, in
 * *kept_tcp) for the pool, and the app's epoll registrations of it are moved over. */
static int divert(int fd, int upstream, const struct sockaddr *addr, socklen_t len, const struct socket_facts *facts,
                  int *kept_tcp)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (!e || len > sizeof(union shim_sockaddr) || engine_ensure_started(config) != 0)
        return -1;
    int sv[2];
    /* both ends non-blocking: the engine's end stays so, the app's gets the app's flags */
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) != 0)
        return -1;
    if (sv[0] >= FDTABLE_MAX || sv[1] >= FDTABLE_MAX) {
        real_close(sv[0]);
        real_close(sv[1]);
        return -1;
    }
    carry_over(fd, sv[0], facts);
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

    int tcp = -1;
    if (kept_tcp && (tcp = real_fcntl(fd, F_DUPFD_CLOEXEC, NULL)) < 0) {
        real_close(sv[0]);
        real_close(sv[1]);
        return -1;
    }
    fdtable_mark_engine(sv[1]);
    /* a new generation of the fd's gate: whatever an earlier connection on this fd number
     * still believes about it, it can no longer act on this one */
    uint64_t gen = fdgate_divert(&e->gate);
    e->engine_fd = sv[1];
    void *conn = engine_adopt(sv[1], upstream, &dest, len, &e->gate, gen);
    if (!conn) {
        fdtable_clear(sv[1]);
        real_close(sv[0]);
        real_close(sv[1]);
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
        real_close(sv[0]);
        engine_drop_unseen(e, conn);   /* the engine never heard of it */
        if (tcp >= 0)
            real_close(tcp);
        return -1;
    }
    if (kept_tcp)
        *kept_tcp = tcp;
    real_close(sv[0]);
    struct stat st;
    if (fstat(fd, &st) == 0) {
        e->dev = st.st_dev;
        e->ino = st.st_ino;
    }
    e->peer = dest;
    e->peer_len = len;
    e->upstream = upstream;
    e->forks_at_divert = fdtable_forks();
    e->engine_conn = conn;
    atomic_store(&e->heard, FD_UNHEARD);
    e->n_opts = 0;
    atomic_store(&e->n_epoll, 0);
    atomic_store_explicit(&e->made, MADE_OTHER, memory_order_relaxed);   /* connected now */
    atomic_store_explicit(&e->kind, FD_DIVERTED, memory_order_release);
    for (int i = 0; i < nregs; i++) {
        struct epoll_event ev = regs[i].ev;
        real_epoll_ctl(regs[i].epfd, EPOLL_CTL_ADD, fd, &ev);
    }
    shim_debug("fd %d diverted to upstream %s:%u", fd, config->upstreams[upstream].host,
               config->upstreams[upstream].port);
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

enum divert_result { NOT_OURS, DIVERTED, FAILED, PROBE_CONNECTED, PROBING };

static enum divert_result try_divert(int fd, const struct sockaddr *addr, socklen_t len, bool *nonblock,
                                     bool may_probe)
{
    if (shim_in_engine || !addr)
        return NOT_OURS;
    struct shim_config *cfg = config_get();
    if (!cfg)
        return NOT_OURS;
    if (fdtable_diverted(fd)) {
        errno = EISCONN;
        return FAILED;
    }
    if (addr->sa_family != AF_INET && addr->sa_family != AF_INET6)
        return NOT_OURS;
    int up = rules_match_addr(cfg, addr, len);
    struct socket_facts facts;
    if (up < 0 || len > sizeof(union shim_sockaddr) || !is_fresh_tcp(fd, addr->sa_family, &facts))
        return NOT_OURS;
    *nonblock = (facts.file_flags & O_NONBLOCK) != 0;
    /* an upstream reached at another origin: the app's own address may not even answer */
    enum pool_probe probe = POOL_PROBE_SAME;
    if (may_probe && !cfg->upstreams[up].origin_https && !pool_has_live_connection(up, addr)
        && engine_ensure_started(config) == 0)
        probe = pool_begin_probe(up, addr);
    if (probe == POOL_PROBE_SAME)
        return divert(fd, up, addr, len, &facts, NULL) == 0 ? DIVERTED : NOT_OURS;
    /* an address not known to answer is connected for real, whether or not it is the one
     * probe that holds the upstream's transfers */
    bool held = probe == POOL_PROBE_HELD;
    union shim_sockaddr dest;
    memset(&dest, 0, sizeof dest);
    memcpy(&dest, addr, len);
    if (real_connect(fd, addr, len) == 0) {
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
static void probe_settled(int fd, struct fd_entry *e, int err)
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
    atomic_store(&e->kind, FD_NONE);   /* its epoll registrations stay: divert moves them */
    struct socket_facts facts;
    if (!facts_from_record(e, dest.sa.sa_family, &facts))
        facts = (struct socket_facts){ e->probe_file_flags, -1, MADE_SET_OWNER | MADE_SET_OPTS };
    probe_connected(fd, e->upstream, &dest, e->peer_len, &facts, e->probe_held);
}

SHIM_EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    real_bind();
    int saved = errno;
    if (shim_in_engine) {
        struct fd_entry *e = fdtable_slot(fd);
        if (e && atomic_load(&e->connected_already) && atomic_exchange(&e->connected_already, 0))
            return 0;                  /* an app-made connection joining the pool (upstream.c) */
        return real_connect(fd, addr, len);
    }
    bool nonblock = false;
    struct fd_entry *probing = shim_in_engine ? NULL : fdtable_probing(fd);
    if (probing) {                     /* connect again on a connect in progress */
        int rc = real_connect(fd, addr, len);
        int err = errno;
        if (rc == 0 || err == EISCONN)
            probe_settled(fd, probing, 0);
        else if (err != EALREADY && err != EINPROGRESS)
            probe_settled(fd, probing, err);
        errno = err;
        return rc;
    }
    switch (try_divert(fd, addr, len, &nonblock, true)) {
    case FAILED:
    case PROBING:
        return -1;
    case NOT_OURS:
        note_connected(fd);
        errno = saved;
        return real_connect(fd, addr, len);
    case PROBE_CONNECTED:
        errno = saved;
        return 0;
    case DIVERTED:
        break;
    }
    if (nonblock) {                    /* what a real non-blocking TCP connect says */
        errno = EINPROGRESS;
        return -1;
    }
    errno = saved;
    return 0;
}

/* ---- writes: on a diverted fd they pass the gate, and a hit may be answered inline ---- */

struct write_call { int fd; const void *buf; size_t n; int flags; const struct msghdr *msg; const struct iovec *iov;
                    int iovcnt; int kind; };
enum { CALL_WRITE, CALL_SEND, CALL_SENDMSG, CALL_WRITEV };

static ssize_t do_real_write(void *arg)
{
    const struct write_call *w = arg;
    switch (w->kind) {
    case CALL_SEND: return real_send(w->fd, w->buf, w->n, w->flags);
    case CALL_SENDMSG: return real_sendmsg(w->fd, w->msg, w->flags);
    case CALL_WRITEV: return real_writev(w->fd, w->iov, w->iovcnt);
    default: return real_write(w->fd, w->buf, w->n);
    }
}

static ssize_t diverted_write(int fd, struct fd_entry *e, struct write_call *w)
{
    struct iovec one = { (void *)w->buf, w->n };
    const struct iovec *iov = w->kind == CALL_SENDMSG ? w->msg->msg_iov : w->kind == CALL_WRITEV ? w->iov : &one;
    int cnt = w->kind == CALL_SENDMSG ? (int)w->msg->msg_iovlen : w->kind == CALL_WRITEV ? w->iovcnt : 1;
    return fastpath_write(config, fd, e, iov, cnt, do_real_write, w);
}

SHIM_EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
    struct fd_entry *e = fdtable_if_diverted(fd);
    if (__builtin_expect(!e || shim_in_engine, 1))
        return real_write(fd, buf, n);
    struct write_call w = { .fd = fd, .buf = buf, .n = n, .kind = CALL_WRITE };
    return diverted_write(fd, e, &w);
}

SHIM_EXPORT ssize_t send(int fd, const void *buf, size_t n, int flags)
{
    struct fd_entry *e = fdtable_if_diverted(fd);
    if (__builtin_expect(!e || shim_in_engine, 1) || (flags & (MSG_OOB | MSG_FASTOPEN)))
        return real_send(fd, buf, n, flags);
    struct write_call w = { .fd = fd, .buf = buf, .n = n, .flags = flags, .kind = CALL_SEND };
    return diverted_write(fd, e, &w);
}

SHIM_EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    struct fd_entry *e = fdtable_if_diverted(fd);
    if (__builtin_expect(!e || shim_in_engine, 1) || !msg || msg->msg_name || msg->msg_controllen
        || (flags & (MSG_OOB | MSG_FASTOPEN)))
        return real_sendmsg(fd, msg, flags);
    struct write_call w = { .fd = fd, .msg = msg, .flags = flags, .kind = CALL_SENDMSG };
    return diverted_write(fd, e, &w);
}

SHIM_EXPORT ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    struct fd_entry *e = fdtable_if_diverted(fd);
    if (__builtin_expect(!e || shim_in_engine, 1) || iovcnt <= 0)
        return real_writev(fd, iov, iovcnt);
    struct write_call w = { .fd = fd, .iov = iov, .iovcnt = iovcnt, .kind = CALL_WRITEV };
    return diverted_write(fd, e, &w);
}

SHIM_EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr, socklen_t len)
{
    real_bind();
    if (!addr && !(flags & (MSG_OOB | MSG_FASTOPEN)) && !shim_in_engine) {   /* a connected send */
        struct fd_entry *e = fdtable_if_diverted(fd);
        if (e) {
            struct write_call w = { .fd = fd, .buf = buf, .n = n, .flags = flags, .kind = CALL_SEND };
            return diverted_write(fd, e, &w);
        }
    }
    if (!(flags & MSG_FASTOPEN) || shim_in_engine)
        return real_sendto(fd, buf, n, flags, addr, len);
    int saved = errno;
    bool nonblock = false;
    enum divert_result r = try_divert(fd, addr, len, &nonblock, false);
    if (r == FAILED)
        return -1;
    errno = saved;
    if (r == NOT_OURS) {
        note_connected(fd);            /* a fast-open send connects */
        return real_sendto(fd, buf, n, flags, addr, len);
    }
    return real_sendto(fd, buf, n, flags & ~MSG_FASTOPEN, NULL, 0);
}

/* ---- name resolution: learn which addresses the app uses for a listed host ---- */

SHIM_EXPORT int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res)
{
    real_bind();
    int rc = real_getaddrinfo(node, service, hints, res);
    if (rc != 0 || !node || shim_in_engine)
        return rc;
    int saved = errno;
    struct shim_config *cfg = config_get();
    if (cfg && rules_name_is_listed(cfg, node))
        for (const struct addrinfo *ai = *res; ai; ai = ai->ai_next) {
            if (ai->ai_family == AF_INET)
                rules_learn(cfg, node, AF_INET, &((const struct sockaddr_in *)(const void *)ai->ai_addr)->sin_addr);
            else if (ai->ai_family == AF_INET6)
                rules_learn(cfg, node, AF_INET6, &((const struct sockaddr_in6 *)(const void *)ai->ai_addr)->sin6_addr);
        }
    errno = saved;
    return rc;
}

static void learn_hostent(const char *name, const struct hostent *h)
{
    if (!h || !name || shim_in_engine)
        return;
    int saved = errno;
    struct shim_config *cfg = config_get();
    if (cfg && rules_name_is_listed(cfg, name) && (h->h_addrtype == AF_INET || h->h_addrtype == AF_INET6))
        for (char **a = h->h_addr_list; a && *a; a++)
            rules_learn(cfg, name, h->h_addrtype, *a);
    errno = saved;
}

SHIM_EXPORT struct hostent *gethostbyname(const char *name)
{
    real_bind();
    struct hostent *h = real_gethostbyname(name);
    learn_hostent(name, h);
    return h;
}

SHIM_EXPORT struct hostent *gethostbyname2(const char *name, int af)
{
    real_bind();
    struct hostent *h = real_gethostbyname2(name, af);
    learn_hostent(name, h);
    return h;
}

SHIM_EXPORT int gethostbyname_r(const char *name, struct hostent *ret, char *buf, size_t buflen, struct hostent **result,
                    int *h_errnop)
{
    real_bind();
    int rc = real_gethostbyname_r(name, ret, buf, buflen, result, h_errnop);
    if (rc == 0 && result)
        learn_hostent(name, *result);
    return rc;
}

SHIM_EXPORT int gethostbyname2_r(const char *name, int af, struct hostent *ret, char *buf, size_t buflen,
                     struct hostent **result, int *h_errnop)
{
    real_bind();
    int rc = real_gethostbyname2_r(name, af, ret, buf, buflen, result, h_errnop);
    if (rc == 0 && result)
        learn_hostent(name, *result);
    return rc;
}

/* ---- a diverted fd answers as the TCP socket the app believes it has ---- */

static int copy_addr(const union shim_sockaddr *a, socklen_t alen, struct sockaddr *out, socklen_t *len)
{
    if (!out || !len) {
        errno = EFAULT;
        return -1;
    }
    memcpy(out, a, *len < alen ? *len : alen);
    *len = alen;
    return 0;
}

SHIM_EXPORT int getpeername(int fd, struct sockaddr *addr, socklen_t *len)
{
    real_bind();
    const struct fd_entry *e = shim_in_engine ? NULL : fdtable_diverted(fd);
    if (!e)
        return real_getpeername(fd, addr, len);
    return copy_addr(&e->peer, e->peer_len, addr, len);
}

SHIM_EXPORT int getsockname(int fd, struct sockaddr *addr, socklen_t *len)
{
    real_bind();
    const struct fd_entry *e = shim_in_engine ? NULL : fdtable_diverted(fd);
    if (!e)
        return real_getsockname(fd, addr, len);
    /* There is no local TCP endpoint: report the loopback address of the peer's family
     * (or the unspecified one) and a stable port derived from the fd. */
    union shim_sockaddr local;
    memset(&local, 0, sizeof local);
    uint16_t port = htons((uint16_t)(40000 + fd % 20000));
    if (e->peer.sa.sa_family == AF_INET) {
        local.in.sin_family = AF_INET;
        local.in.sin_port = port;
        if ((ntohl(e->peer.in.sin_addr.s_addr) >> 24) == 127)
            local.in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        return copy_addr(&local, sizeof local.in, addr, len);
    }
    local.in6.sin6_family = AF_INET6;
    local.in6.sin6_port = port;
    if (IN6_IS_ADDR_LOOPBACK(&e->peer.in6.sin6_addr))
        local.in6.sin6_addr = in6addr_loopback;
    return copy_addr(&local, sizeof local.in6, addr, len);
}

static struct fd_sockopt *find_opt(struct fd_entry *e, int level, int name, bool create)
{
    for (int i = 0; i < e->n_opts; i++)
        if (e->opts[i].level == level && e->opts[i].name == name)
            return &e->opts[i];
    if (!create || e->n_opts == FD_MAX_OPTS)
        return NULL;
    struct fd_sockopt *o = &e->opts[e->n_opts++];
    o->level = level;
    o->name = name;
    o->value = 0;
    return o;
}

SHIM_EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    real_bind();
    struct fd_entry *e = shim_in_engine ? NULL : fdtable_diverted(fd);
    if (!e) {
        int rc = real_setsockopt(fd, level, name, val, len);
        if (rc == 0 && !shim_in_engine)
            note_sockopt(fd, level, name);
        return rc;
    }
    int saved = errno;
    if (level == SOL_SOCKET) {
        if (real_setsockopt(fd, level, name, val, len) == 0)
            return 0;
        if (errno != EOPNOTSUPP && errno != ENOPROTOOPT)
            return -1;
    } else if (level != IPPROTO_TCP && level != IPPROTO_IP && level != IPPROTO_IPV6) {
        return real_setsockopt(fd, level, name, val, len);
    }
    struct fd_sockopt *o = find_opt(e, level, name, true);
    if (o && val && len >= sizeof(int))
        memcpy(&o->value, val, sizeof(int));
    errno = saved;
    return 0;
}

SHIM_EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    real_bind();
    struct fd_entry *probing = shim_in_engine || level != SOL_SOCKET || name != SO_ERROR ? NULL : fdtable_probing(fd);
    if (probing) {
        int rc = real_getsockopt(fd, level, name, val, len);
        if (rc == 0 && len && *len >= sizeof(int)) {
            int saved = errno, err;
            memcpy(&err, val, sizeof err);
            probe_settled(fd, probing, err);
            errno = saved;
        }
        return rc;
    }
    /* a socket-level option the socketpair end answers itself needs no stale check: the
     * answer is the fd's own either way (SO_ERROR after a non-blocking connect, mostly) */
    if (level == SOL_SOCKET && name != SO_DOMAIN && name != SO_PROTOCOL && !shim_in_engine && fdtable_if_diverted(fd)) {
        int saved = errno;
        if (real_getsockopt(fd, level, name, val, len) == 0)
            return 0;
        if (errno != EOPNOTSUPP && errno != ENOPROTOOPT)
            return -1;
        errno = saved;
    }
    struct fd_entry *e = shim_in_engine ? NULL : fdtable_diverted(fd);
    if (!e || !val || !len)
        return real_getsockopt(fd, level, name, val, len);
    int saved = errno;
    int v;
    if (level == SOL_SOCKET) {
        if (name == SO_DOMAIN)
            v = e->peer.sa.sa_family;
        else if (name == SO_PROTOCOL)
            v = IPPROTO_TCP;
        else {
            const struct fd_sockopt *o = find_opt(e, level, name, false);
            if (!o) {
                errno = ENOPROTOOPT;
                return -1;
            }
            v = o->value;
        }
    } else if (level == IPPROTO_TCP && name == TCP_INFO) {
        struct tcp_info info;
        memset(&info, 0, sizeof info);
        info.tcpi_state = TCP_ESTABLISHED;
        memcpy(val, &info, *len < sizeof info ? *len : sizeof info);
        *len = *len < sizeof info ? *len : sizeof info;
        errno = saved;
        return 0;
    } else if (level == IPPROTO_TCP || level == IPPROTO_IP || level == IPPROTO_IPV6) {
        const struct fd_sockopt *o = find_opt(e, level, name, false);
        v = o ? o->value : 0;
    } else {
        return real_getsockopt(fd, level, name, val, len);
    }
    memcpy(val, &v, *len < sizeof v ? *len : sizeof v);
    *len = *len < sizeof v ? *len : sizeof v;
    errno = saved;
    return 0;
}

SHIM_EXPORT int ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    real_bind();
    if (req == SIOCATMARK && !shim_in_engine && arg && fdtable_diverted(fd)) {
        *(int *)arg = 0;               /* no urgent data ever arrives on the relay */
        return 0;
    }
    int rc = real_ioctl(fd, req, arg);
    if (rc == 0 && !shim_in_engine)
        note_ioctl(fd, req, arg);
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
    if (kind != FD_NONE && kind != FD_PROBING)
        return rc;                     /* diverted already: nothing to replay */
    int n = atomic_load(&e->n_epoll);
    int at = -1;
    for (int i = 0; i < n && i < FD_MAX_EPOLL; i++)
        if (e->epoll[i].epfd == epfd)
            at = i;
    if (op == EPOLL_CTL_DEL) {
        if (at >= 0) {
            e->epoll[at] = e->epoll[n - 1];
            atomic_store(&e->n_epoll, n - 1);
        }
    } else if (event) {
        if (at < 0 && n < FD_MAX_EPOLL)
            at = n++;
        if (at >= 0) {
            e->epoll[at].epfd = epfd;
            e->epoll[at].ev = *event;
            atomic_store(&e->n_epoll, n);
        }
    }
    return rc;
}

/* ---- close and dup: keep the table right, never let the app close engine fds ---- */

SHIM_EXPORT int close(int fd)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (e) {
        if (atomic_load_explicit(&e->kind, memory_order_acquire) == FD_ENGINE && !shim_in_engine) {
            errno = EBADF;
            return -1;
        }
        forget_fd(fd, e);
    }
    return real_close(fd);
}

SHIM_EXPORT int close_range(unsigned first, unsigned last, int flags)
{
    real_bind();
    unsigned limit = (unsigned)fdtable_engine_fd_limit();
    if (shim_in_engine || first >= limit || !fdtable_slot(0)) {
        return real_close_range(first, last, flags);
    }
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
        forget_fd(fd, e);
    return real_fclose(f);
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
    if (nfd >= 0 && !shim_in_engine)
        copy_entry(fd, nfd);
    return nfd;
}

static int dup_onto(int fd, int nfd, int flags, bool is_dup3)
{
    real_bind();
    if (!shim_in_engine && fdtable_is_engine(nfd)) {
        errno = EBADF;
        return -1;
    }
    /* a connection on nfd that the dup closes: the engine must hear it end */
    struct fd_entry *old = shim_in_engine || fd == nfd ? NULL : fdtable_if_diverted(nfd);
    if (old)
        engine_need(old);
    int rc = is_dup3 ? real_dup3(fd, nfd, flags) : real_dup2(fd, nfd);
    if (rc >= 0 && !shim_in_engine && fd != nfd)
        copy_entry(fd, nfd);
    return rc;
}

SHIM_EXPORT int dup2(int fd, int nfd) { return dup_onto(fd, nfd, 0, false); }
SHIM_EXPORT int dup3(int fd, int nfd, int flags) { return dup_onto(fd, nfd, flags, true); }

static int after_fcntl(int rc, int fd, int cmd, void *arg)
{
    if (rc < 0 || shim_in_engine)
        return rc;
    if (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)
        copy_entry(fd, rc);
    else
        note_fcntl(fd, cmd, arg);
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
