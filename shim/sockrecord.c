/* sockrecord.c — owns the record of what the app did to its socket before connect (made
 * by socket(), then its fcntl, ioctl, setsockopt and epoll_ctl calls, and a real connect), so that a
 * connect need not ask the kernel; the verdict whether a connect may divert it (a fresh
 * TCP socket the app neither bound, steered, connected nor holds twice); and what divert
 * carries over from it to the socketpair end, and back when an exec hands the connection
 * over. The hooks (hooks.c, hooks_io.c, hooks_exec.c) call in. */
#include "sockrecord.h"
#include "netns.h"
#include "real.h"
#include <fcntl.h>
#include <linux/sockios.h>
#include <sys/epoll.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/ioctl.h>

/* The socket-level options a Unix socket also honours: divert copies them to the
 * socketpair end, asking the kernel for their values when the app set any. */
static const int carried[] = { SO_RCVTIMEO, SO_SNDTIMEO, SO_PASSCRED };

static bool is_carried(int name)
{
#ifdef SO_RCVTIMEO_NEW
    if (name == SO_RCVTIMEO_NEW || name == SO_SNDTIMEO_NEW)
        return true;                   /* (the same timeouts, set in the 64-bit form) */
#endif
    for (size_t i = 0; i < sizeof carried / sizeof carried[0]; i++)
        if (carried[i] == name)
            return true;
    return false;
}

static struct fd_entry *made_tcp(int fd)
{
    struct fd_entry *e = fdtable_slot(fd);
    return e && atomic_load_explicit(&e->made, memory_order_relaxed) == MADE_TCP ? e : NULL;
}

/* The record socket() starts. A socket made in another network namespace is never a
 * candidate (netns.c). */
void sockrecord_made(struct fd_entry *e, int domain, int type, int protocol)
{
    bool tcp = (domain == AF_INET || domain == AF_INET6) && (type & 0xf) == SOCK_STREAM
               && (protocol == 0 || protocol == IPPROTO_TCP) && !netns_thread_away();
    e->made_family = domain;
    e->made_flags = O_RDWR | ((type & SOCK_NONBLOCK) ? O_NONBLOCK : 0);
    e->made_cloexec = (type & SOCK_CLOEXEC) != 0;
    e->made_extras = 0;
    e->made_forks = fdtable_forks();
    atomic_store_explicit(&e->made, tcp ? MADE_TCP : MADE_OTHER, memory_order_relaxed);
}

/* bind(): a socket bound to a source address or port connects for real (the pool's
 * connections have neither) */
void sockrecord_note_bound(int fd)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (e && atomic_load_explicit(&e->made, memory_order_relaxed) == MADE_TCP)
        atomic_store_explicit(&e->made, MADE_OTHER, memory_order_relaxed);
}

void sockrecord_note_unmovable(int fd)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (e && atomic_load_explicit(&e->made, memory_order_relaxed) != MADE_CONNECTED)
        atomic_store_explicit(&e->made, MADE_OTHER, memory_order_relaxed);
}

void sockrecord_note_connected(int fd)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (e && atomic_load_explicit(&e->made, memory_order_relaxed) != MADE_CONNECTED)
        atomic_store_explicit(&e->made, MADE_CONNECTED, memory_order_relaxed);
}

static void note_file_flag(int fd, int flag, bool on)
{
    struct fd_entry *e = made_tcp(fd);
    if (e)
        e->made_flags = on ? (e->made_flags | flag) : (e->made_flags & ~flag);
}

void sockrecord_note_fcntl(int fd, int cmd, void *arg)
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

void sockrecord_note_ioctl(int fd, unsigned long req, const void *arg)
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

/* Options that shape only the app's own end of a connection (its buffers, timeouts,
 * keep-alive, Nagle): a pooled connection may carry its requests without them. Any other
 * says which path, identity or treatment its packets get on the network (SO_MARK,
 * SO_BINDTODEVICE, SO_PRIORITY, IP_TOS, IP_TRANSPARENT, TCP_MD5SIG, TCP_CONGESTION, a
 * pacing rate, ...), which the pool's connections do not have: such a socket connects
 * for real. */
static bool option_shapes_only_this_end(int level, int name)
{
    static const int sol_socket[] = {
        SO_KEEPALIVE, SO_RCVBUF, SO_SNDBUF, SO_RCVBUFFORCE, SO_SNDBUFFORCE, SO_RCVTIMEO, SO_SNDTIMEO,
#ifdef SO_RCVTIMEO_NEW
        SO_RCVTIMEO_NEW, SO_SNDTIMEO_NEW,
#endif
        SO_REUSEADDR, SO_REUSEPORT, SO_LINGER, SO_PASSCRED, SO_OOBINLINE, SO_RCVLOWAT, SO_SNDLOWAT,
        SO_TIMESTAMP, SO_TIMESTAMPNS, SO_ZEROCOPY, SO_BUSY_POLL, SO_INCOMING_CPU,
    };
    static const int ipproto_tcp[] = {
        TCP_NODELAY, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT, TCP_USER_TIMEOUT, TCP_QUICKACK, TCP_CORK,
        TCP_FASTOPEN_CONNECT, TCP_SYNCNT, TCP_LINGER2, TCP_NOTSENT_LOWAT,
    };
    const int *list = NULL;
    size_t n = 0;
    if (level == SOL_SOCKET) {
        list = sol_socket;
        n = sizeof sol_socket / sizeof sol_socket[0];
    } else if (level == IPPROTO_TCP) {
        list = ipproto_tcp;
        n = sizeof ipproto_tcp / sizeof ipproto_tcp[0];
    } else if (level == IPPROTO_IPV6) {
        return name == IPV6_V6ONLY || name == IPV6_RECVERR;
    } else if (level == IPPROTO_IP) {
        return name == IP_RECVERR || name == IP_BIND_ADDRESS_NO_PORT;
    }
    for (size_t i = 0; i < n; i++)
        if (list[i] == name)
            return true;
    return false;
}

void sockrecord_note_sockopt(int fd, int level, int name)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (!e)
        return;
    if (!option_shapes_only_this_end(level, name)) {
        atomic_store_explicit(&e->made, MADE_OTHER, memory_order_relaxed);   /* never diverted */
        return;
    }
    if (level == SOL_SOCKET && made_tcp(fd) && is_carried(name))
        e->made_extras |= MADE_SET_OPTS;
}

/* What the hooks saw the app do to its socket since socket(), if they saw it all. */
bool sockrecord_facts(const struct fd_entry *e, int family, struct socket_facts *f)
{
    if (atomic_load_explicit(&e->made, memory_order_relaxed) != MADE_TCP || e->made_family != family
        || e->made_forks != fdtable_forks())
        return false;
    *f = (struct socket_facts){ e->made_flags, e->made_cloexec, e->made_extras };
    return true;
}

/* A TCP socket the app created and has neither bound nor connected, and what divert
 * must carry over from it. Every syscall here is paid by each connect the rules match,
 * on the app's thread: a socket the hooks saw made, and saw all that was done to it since
 * (bind included), costs none, as the write hooks trust the table; one made out of their
 * sight costs five (its family, protocol, the options that steer it, and getsockname: not
 * bound). (IPPROTO_TCP implies SOCK_STREAM.) */
bool sockrecord_fresh_tcp(int fd, int family, struct socket_facts *f, bool *connected)
{
    struct fd_entry *e = fdtable_slot(fd);
    int made = e ? atomic_load_explicit(&e->made, memory_order_relaxed) : MADE_UNKNOWN;
    *connected = made == MADE_CONNECTED;
    if (made == MADE_OTHER || made == MADE_CONNECTED)
        return false;
    if (made == MADE_TCP && sockrecord_facts(e, family, f))
        return true;
    int v;
    socklen_t len = sizeof v;
    if (made == MADE_TCP || netns_ever_away())
        return false;                  /* of the other family, or older than a fork; of a
                                        * namespace not known */
    if (real_getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &v, &len) || v != family)
        return false;
    len = sizeof v;
    if (real_getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &v, &len) || v != IPPROTO_TCP)
        return false;
    /* the options that choose a path or a treatment (option_shapes_only_this_end), as
     * far as the kernel tells them: a mark, a priority, a TOS, a device */
    static const int asked[][2] = { { SOL_SOCKET, SO_MARK }, { SOL_SOCKET, SO_PRIORITY },
                                    { IPPROTO_IP, IP_TOS }, { IPPROTO_IPV6, IPV6_TCLASS } };
    for (size_t i = 0; i < sizeof asked / sizeof asked[0]; i++) {
        if (asked[i][0] == (family == AF_INET ? IPPROTO_IPV6 : IPPROTO_IP))
            continue;
        len = sizeof v;
        if (real_getsockopt(fd, asked[i][0], asked[i][1], &v, &len) || v != 0)
            return false;
    }
    char dev[IFNAMSIZ];
    len = sizeof dev;
    if (real_getsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, dev, &len) || (len > 0 && dev[0]))
        return false;
    union shim_sockaddr local;
    len = sizeof local;
    if (real_getsockname(fd, &local.sa, &len) || local.sa.sa_family != family) {
        if (e)
            atomic_store_explicit(&e->made, MADE_UNKNOWN, memory_order_relaxed);
        return false;
    }
    /* bound: to a port, or to a source address (a port left to connect by
     * IP_BIND_ADDRESS_NO_PORT, as curl --interface does) */
    if (family == AF_INET && (local.in.sin_port || local.in.sin_addr.s_addr != htonl(INADDR_ANY)))
        return false;
    if (family == AF_INET6 && (local.in6.sin6_port || !IN6_IS_ADDR_UNSPECIFIED(&local.in6.sin6_addr)))
        return false;
    *f = (struct socket_facts){ real_fcntl(fd, F_GETFL, NULL), -1, MADE_SET_OWNER | MADE_SET_OPTS };
    return f->file_flags >= 0;
}

/* What the app set on its TCP socket that a Unix socket also honours, copied to `to`
 * (made non-blocking). What the record does not know is asked of the kernel; options
 * still at their default (zero) are not copied. */
/* The socket-level options of `names` set on `from` to other than their default (zero),
 * set so on `to`. */
static void copy_set_options(int from, int to, const int *names, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char val[32];
        socklen_t len = sizeof val;
        if (real_getsockopt(from, SOL_SOCKET, names[i], val, &len) != 0)
            continue;
        bool is_default = true;
        for (socklen_t k = 0; k < len; k++)
            is_default = is_default && val[k] == 0;
        if (!is_default)
            real_setsockopt(to, SOL_SOCKET, names[i], val, len);
    }
}

void sockrecord_carry_over(int from, int to, const struct socket_facts *f)
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
    if (f->ask & MADE_SET_OPTS)
        copy_set_options(from, to, carried, sizeof carried / sizeof carried[0]);
}

/* The way back, when the connection leaves the shim (an exec hands it over: hooks_exec.c):
 * the file flags, the socket-level options the app set on the socketpair end (they went to
 * it as they are), and the TCP and IP ones its diverted fd kept for it. */
void sockrecord_carry_back(int from, int to, const struct fd_entry *e)
{
    int fl = real_fcntl(from, F_GETFL, NULL);
    if (fl >= 0)
        real_fcntl(to, F_SETFL, (void *)(long)(fl & (O_NONBLOCK | O_ASYNC | O_APPEND)));
    static const int sol_socket[] = { SO_KEEPALIVE, SO_RCVTIMEO, SO_SNDTIMEO, SO_LINGER, SO_OOBINLINE };
    copy_set_options(from, to, sol_socket, sizeof sol_socket / sizeof sol_socket[0]);
    for (int i = 0; i < e->n_opts && i < FD_MAX_OPTS; i++)
        real_setsockopt(to, e->opts[i].level, e->opts[i].name, &e->opts[i].value, sizeof e->opts[i].value);
}

bool sockrecord_note_epoll(struct fd_entry *e, int epfd, int op, const struct epoll_event *event)
{
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
        if (at < 0)
            return false;
        e->epoll[at].epfd = epfd;
        e->epoll[at].ev = *event;
        atomic_store(&e->n_epoll, n);
    }
    return true;
}
