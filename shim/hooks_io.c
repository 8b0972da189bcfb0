/* hooks_io.c — owns the interposed calls that use a socket rather than make or end it:
 * writes (on a diverted fd they pass the gate, and a memory hit may be answered on the
 * app's own thread: fastpath.c), name resolution (learning which addresses the app uses
 * for a listed host), and the face of a TCP socket a diverted fd shows (peer and local
 * address, socket options remembered, TCP_INFO, SIOCATMARK). Calls on fds the shim does
 * not hold, and on the engine thread, go straight to the real functions. */
#include "hooks.h"
#include "config.h"
#include "fastpath.h"
#include "fdtable.h"
#include "netns.h"
#include "real.h"
#include "rules.h"
#include "sockrecord.h"
#include <errno.h>
#include <linux/sockios.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <limits.h>
#include <string.h>
#include <sys/ioctl.h>
#include <stdio.h>
#include <sys/socket.h>

#define SHIM_EXPORT __attribute__((visibility("default")))

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
    size_t cnt = w->kind == CALL_SENDMSG ? w->msg->msg_iovlen : w->kind == CALL_WRITEV ? (size_t)w->iovcnt : 1;
    if (cnt > IOV_MAX)                 /* refused by the kernel, nothing written: never answered inline */
        return do_real_write(w);
    return fastpath_write(config_loaded(), fd, e, iov, (int)cnt, do_real_write, w);
}

/* A cold pool's probe the app never asked about (it waited for the socket to be writable
 * and writes, as wget2 and many event loops do, without SO_ERROR or a second connect):
 * its first write settles it, as that question would, so that a connection that is up is
 * diverted and its request heard by the engine; one still connecting, or refused, is
 * written for real and answers as direct (EAGAIN, the connect's error). */
static __attribute__((noinline)) struct fd_entry *settled_probe(int fd)
{
    struct fd_entry *probing = shim_in_engine ? NULL : fdtable_probing(fd);
    if (!probing)
        return NULL;
    int saved = errno, err = 0;
    socklen_t len = sizeof err;
    if (real_getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0)
        hooks_probe_settled(fd, probing, 0);
    errno = saved;
    return fdtable_if_diverted(fd);
}

/* The entry of a diverted fd a write goes to, settling a probe first. */
static inline struct fd_entry *written_to(int fd)
{
    struct fd_entry *t = fdtable_base;
    if (!t || (unsigned)fd >= FDTABLE_MAX)
        return NULL;
    int kind = atomic_load_explicit(&t[fd].kind, memory_order_relaxed);
    if (__builtin_expect(kind == FD_DIVERTED, 0))
        return &t[fd];
    return __builtin_expect(kind == FD_PROBING, 0) ? settled_probe(fd) : NULL;
}

SHIM_EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
    struct fd_entry *e = written_to(fd);
    if (__builtin_expect(!e || shim_in_engine, 1))
        return real_write(fd, buf, n);
    struct write_call w = { .fd = fd, .buf = buf, .n = n, .kind = CALL_WRITE };
    return diverted_write(fd, e, &w);
}

/* A TCP Fast Open send (sendto or sendmsg with MSG_FASTOPEN and an address: wget2 opens
 * every connection so) is a connect and a write in one call: the connect is the connect
 * hook's (diverted, or a cold pool's probe connected for real, whose refusal the app
 * sees here as it would direct), and the bytes then go as any write on the connection
 * goes, heard by the engine. A non-blocking probe still connecting answers EINPROGRESS,
 * as a fast-open connect without a cookie does: nothing was sent, the app sends again
 * once connected. */
enum fastopen { FASTOPEN_FAILED, FASTOPEN_DIRECT, FASTOPEN_CONNECTED };

static enum fastopen fastopen_connect(int fd, const struct sockaddr *addr, socklen_t len, struct fd_entry **diverted)
{
    bool nonblock = false;
    switch (hooks_try_divert(fd, addr, len, &nonblock, true)) {
    case FAILED:
    case PROBING:
        return FASTOPEN_FAILED;
    case NOT_OURS:
        sockrecord_note_connected(fd);            /* a fast-open send connects */
        return FASTOPEN_DIRECT;
    default:
        *diverted = fdtable_if_diverted(fd);
        return FASTOPEN_CONNECTED;
    }
}

/* libcurl's send on an upstream connection (the engine's thread): what comes back is then
 * acknowledged at once. A kept-alive connection is in the kernel's interactive mode after
 * each send, which delays the ACK of what arrives up to 40 ms for a reply to carry it; an
 * upstream that writes its head and its body in two sends (Python's http.server) holds the
 * body under Nagle until that ACK: 40 ms on every pooled response, where the app's own new
 * connection, which acknowledges its first segments at once, paid 0.4 ms. Leaving that mode
 * after the send lets the read that empties the socket acknowledge (the kernel's "pushed"
 * small segment). */
static ssize_t engine_send(int fd, const void *buf, size_t n, int flags)
{
    ssize_t r = real_send(fd, buf, n, flags);
    struct fd_entry *e = r > 0 ? fdtable_slot(fd) : NULL;
    if (e && fdtable_acks_at_once(e)) {
        static const int one = 1;
        real_setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
    }
    return r;
}

SHIM_EXPORT ssize_t send(int fd, const void *buf, size_t n, int flags)
{
    if (__builtin_expect(shim_in_engine, 0))
        return engine_send(fd, buf, n, flags);
    struct fd_entry *e = written_to(fd);
    if (__builtin_expect(!e, 1) || (flags & (MSG_OOB | MSG_FASTOPEN)))
        return real_send(fd, buf, n, flags);
    struct write_call w = { .fd = fd, .buf = buf, .n = n, .flags = flags, .kind = CALL_SEND };
    return diverted_write(fd, e, &w);
}

/* A diverted fd handed to another process (SCM_RIGHTS): what that process writes must be
 * heard by this process's engine, which holds the other end, and neither answers inline on
 * it again (as for a forked child, hooks.c). */
static void note_passed_fds(const struct msghdr *msg)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR((struct msghdr *)msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS || c->cmsg_len < CMSG_LEN(0))
            continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < n; i++) {
            int passed;
            memcpy(&passed, CMSG_DATA(c) + i * sizeof(int), sizeof passed);
            struct fd_entry *e = fdtable_if_diverted(passed);
            if (e)
                hooks_share_connection(e);
        }
    }
}

SHIM_EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    struct fd_entry *e = written_to(fd);
    if (__builtin_expect(msg && msg->msg_controllen != 0, 0) && !shim_in_engine && fdtable_base)
        note_passed_fds(msg);
    if (__builtin_expect((flags & MSG_FASTOPEN) && msg && msg->msg_name && !msg->msg_controllen, 0) && !shim_in_engine) {
        int saved = errno;
        switch (fastopen_connect(fd, msg->msg_name, msg->msg_namelen, &e)) {
        case FASTOPEN_FAILED:
            return -1;
        case FASTOPEN_DIRECT:
            errno = saved;
            return real_sendmsg(fd, msg, flags);
        default:
            break;
        }
        errno = saved;
        struct msghdr connected = *msg;
        connected.msg_name = NULL;
        connected.msg_namelen = 0;
        if (!e)
            return real_sendmsg(fd, &connected, flags & ~MSG_FASTOPEN);
        struct write_call w = { .fd = fd, .msg = &connected, .flags = flags & ~MSG_FASTOPEN, .kind = CALL_SENDMSG };
        return diverted_write(fd, e, &w);
    }
    if (__builtin_expect(!e || shim_in_engine, 1) || !msg || msg->msg_controllen
        || (flags & (MSG_OOB | MSG_FASTOPEN)))
        return real_sendmsg(fd, msg, flags);
    struct msghdr connected;
    if (msg->msg_name) {               /* a connected TCP socket ignores the address */
        connected = *msg;
        connected.msg_name = NULL;
        connected.msg_namelen = 0;
        msg = &connected;
    }
    struct write_call w = { .fd = fd, .msg = msg, .flags = flags, .kind = CALL_SENDMSG };
    return diverted_write(fd, e, &w);
}

SHIM_EXPORT ssize_t writev(int fd, const struct iovec *iov, int iovcnt)
{
    struct fd_entry *e = written_to(fd);
    if (__builtin_expect(!e || shim_in_engine, 1) || iovcnt <= 0)
        return real_writev(fd, iov, iovcnt);
    struct write_call w = { .fd = fd, .iov = iov, .iovcnt = iovcnt, .kind = CALL_WRITEV };
    return diverted_write(fd, e, &w);
}

/* Writes the fast path never answers (several messages at once, bytes from a file or a
 * pipe, an offset write): through the gate all the same, so that nothing answered inline
 * can overtake the request they carry. */
struct other_write { int fd, in, n, flags; struct mmsghdr *msgs; off_t *off_in, *off_out, off; size_t len;
                     const struct iovec *iov; int kind; };
enum { OTHER_SENDMMSG, OTHER_SENDFILE, OTHER_SPLICE, OTHER_PWRITEV2 };

static ssize_t do_other_write(void *arg)
{
    const struct other_write *w = arg;
    switch (w->kind) {
    case OTHER_SENDMMSG: return real_sendmmsg(w->fd, w->msgs, (unsigned)w->n, w->flags);
    case OTHER_SENDFILE: return real_sendfile(w->fd, w->in, w->off_in, w->len);
    case OTHER_SPLICE: return real_splice(w->in, w->off_in, w->fd, w->off_out, w->len, (unsigned)w->flags);
    default: return real_pwritev2(w->fd, w->iov, w->n, w->off, w->flags);
    }
}

static struct fd_entry *gated(int fd)
{
    real_bind();
    return shim_in_engine ? NULL : fdtable_if_diverted(fd);
}

SHIM_EXPORT int sendmmsg(int fd, struct mmsghdr *msgs, unsigned n, int flags)
{
    struct fd_entry *e = gated(fd);
    for (unsigned i = 0; msgs && i < n && !shim_in_engine && fdtable_base; i++)
        if (msgs[i].msg_hdr.msg_controllen)
            note_passed_fds(&msgs[i].msg_hdr);
    struct other_write w = { .fd = fd, .msgs = msgs, .n = (int)n, .flags = flags, .kind = OTHER_SENDMMSG };
    return (int)(e && n <= INT32_MAX ? fastpath_write(config_loaded(), fd, e, NULL, 0, do_other_write, &w)
                                     : do_other_write(&w));
}

SHIM_EXPORT ssize_t sendfile(int out, int in, off_t *off, size_t n)
{
    struct fd_entry *e = gated(out);
    struct other_write w = { .fd = out, .in = in, .off_in = off, .len = n, .kind = OTHER_SENDFILE };
    return e ? fastpath_write(config_loaded(), out, e, NULL, 0, do_other_write, &w) : do_other_write(&w);
}

SHIM_EXPORT ssize_t sendfile64(int out, int in, off_t *off, size_t n) { return sendfile(out, in, off, n); }

SHIM_EXPORT ssize_t splice(int in, off_t *off_in, int out, off_t *off_out, size_t n, unsigned flags)
{
    struct fd_entry *e = gated(out);
    struct other_write w = { .fd = out, .in = in, .off_in = off_in, .off_out = off_out, .len = n, .flags = (int)flags,
                             .kind = OTHER_SPLICE };
    return e ? fastpath_write(config_loaded(), out, e, NULL, 0, do_other_write, &w) : do_other_write(&w);
}

SHIM_EXPORT ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
    struct fd_entry *e = gated(fd);
    struct other_write w = { .fd = fd, .iov = iov, .n = cnt, .off = off, .flags = flags, .kind = OTHER_PWRITEV2 };
    return e ? fastpath_write(config_loaded(), fd, e, NULL, 0, do_other_write, &w) : do_other_write(&w);
}

SHIM_EXPORT ssize_t pwritev64v2(int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
    return pwritev2(fd, iov, cnt, off, flags);
}

/* glibc's own writers, which write from within libc where no hook sees them: a FILE made on
 * a diverted fd, and dprintf. The engine must hear the connection (the app's end may see
 * no hooked call at all, and an unheard request is never answered), and a FILE's writes
 * may come at any time, so that connection is never answered inline again: nothing can
 * overtake them. A dprintf passes the gate as any write. */
SHIM_EXPORT FILE *fdopen(int fd, const char *mode)
{
    real_bind();
    FILE *f = real_fdopen(fd, mode);
    struct fd_entry *e = f && !shim_in_engine ? fdtable_if_diverted(fd) : NULL;
    if (e)
        hooks_share_connection(e);
    return f;
}

struct printf_call { int fd, flag; const char *fmt; va_list *ap; };

static ssize_t do_vdprintf(void *arg)
{
    struct printf_call *p = arg;
    return real_vdprintf(p->fd, p->flag, p->fmt, *p->ap);
}

static int gated_vdprintf(int fd, int flag, const char *fmt, va_list ap)
{
    struct fd_entry *e = gated(fd);
    va_list copy;
    va_copy(copy, ap);
    struct printf_call p = { fd, flag, fmt, &copy };
    int rc = (int)(e ? fastpath_write(config_loaded(), fd, e, NULL, 0, do_vdprintf, &p) : do_vdprintf(&p));
    va_end(copy);
    return rc;
}

SHIM_EXPORT int vdprintf(int fd, const char *fmt, va_list ap) { return gated_vdprintf(fd, -1, fmt, ap); }

SHIM_EXPORT int __vdprintf_chk(int fd, int flag, const char *fmt, va_list ap)
{
    return gated_vdprintf(fd, flag < 0 ? 0 : flag, fmt, ap);
}

SHIM_EXPORT int dprintf(int fd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = gated_vdprintf(fd, -1, fmt, ap);
    va_end(ap);
    return rc;
}

SHIM_EXPORT int __dprintf_chk(int fd, int flag, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = gated_vdprintf(fd, flag < 0 ? 0 : flag, fmt, ap);
    va_end(ap);
    return rc;
}

SHIM_EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr, socklen_t len)
{
    real_bind();
    if (!(flags & (MSG_OOB | MSG_FASTOPEN)) && !shim_in_engine) {
        /* a send on a connected TCP socket, whose address (if any) TCP ignores */
        struct fd_entry *e = written_to(fd);
        if (e) {
            struct write_call w = { .fd = fd, .buf = buf, .n = n, .flags = flags, .kind = CALL_SEND };
            return diverted_write(fd, e, &w);
        }
    }
    if (!(flags & MSG_FASTOPEN) || shim_in_engine)
        return real_sendto(fd, buf, n, flags, addr, len);
    int saved = errno;
    struct fd_entry *e = NULL;
    switch (fastopen_connect(fd, addr, len, &e)) {
    case FASTOPEN_FAILED:
        return -1;
    case FASTOPEN_DIRECT:
        errno = saved;
        return real_sendto(fd, buf, n, flags, addr, len);
    default:
        break;
    }
    errno = saved;
    if (!e)                            /* connected for real, and kept so */
        return real_send(fd, buf, n, flags & ~MSG_FASTOPEN);
    struct write_call w = { .fd = fd, .buf = buf, .n = n, .flags = flags & ~MSG_FASTOPEN, .kind = CALL_SEND };
    return diverted_write(fd, e, &w);
}

/* ---- name resolution: learn which addresses the app uses for a listed host ---- */

SHIM_EXPORT int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res)
{
    real_bind();
    int rc = real_getaddrinfo(node, service, hints, res);
    if (rc != 0 || !node || shim_in_engine || netns_thread_away())
        return rc;   /* (another namespace's answer names other servers) */
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
    if (!h || !name || shim_in_engine || netns_thread_away())
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
    if ((int)*len < 0) {               /* (the kernel reads the length as an int) */
        errno = EINVAL;
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
    /* There is no local TCP endpoint: the address is the one the kernel's route to the peer
     * would give a connection (loopback for a loopback peer; else a UDP socket connected
     * there says it, no packet sent; the unspecified one if it cannot), and the port a
     * stable one derived from the fd. */
    union shim_sockaddr local;
    memset(&local, 0, sizeof local);
    local.sa.sa_family = e->peer.sa.sa_family;
    socklen_t local_len = e->peer.sa.sa_family == AF_INET ? sizeof local.in : sizeof local.in6;
    if (e->peer.sa.sa_family == AF_INET && (ntohl(e->peer.in.sin_addr.s_addr) >> 24) == 127) {
        local.in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    } else if (e->peer.sa.sa_family == AF_INET6 && IN6_IS_ADDR_LOOPBACK(&e->peer.in6.sin6_addr)) {
        local.in6.sin6_addr = in6addr_loopback;
    } else {
        int route = real_socket(e->peer.sa.sa_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (route < 0 || real_connect(route, &e->peer.sa, e->peer_len) != 0
            || real_getsockname(route, &local.sa, &local_len) != 0 || local.sa.sa_family != e->peer.sa.sa_family) {
            memset(&local, 0, sizeof local);
            local.sa.sa_family = e->peer.sa.sa_family;
        }
        if (route >= 0)
            real_close(route);
    }
    uint16_t port = htons((uint16_t)(40000 + fd % 20000));
    if (e->peer.sa.sa_family == AF_INET) {
        local.in.sin_port = port;
        return copy_addr(&local, sizeof local.in, addr, len);
    }
    local.in6.sin6_port = port;
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

/* A TCP option the kernel reads as an int, given fewer bytes than one. */
static bool tcp_int_short(int level, int name, socklen_t len)
{
    static const int ints[] = { TCP_NODELAY, TCP_MAXSEG, TCP_CORK, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT,
                                TCP_SYNCNT, TCP_LINGER2, TCP_DEFER_ACCEPT, TCP_WINDOW_CLAMP, TCP_QUICKACK,
                                TCP_USER_TIMEOUT, TCP_NOTSENT_LOWAT, TCP_FASTOPEN, TCP_FASTOPEN_CONNECT };
    if (level != IPPROTO_TCP || len >= sizeof(int))
        return false;
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (ints[i] == name)
            return true;
    return false;
}

SHIM_EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    real_bind();
    struct fd_entry *e = shim_in_engine ? NULL : fdtable_diverted(fd);
    if (!e) {
        int rc = real_setsockopt(fd, level, name, val, len);
        if (rc == 0 && !shim_in_engine)
            sockrecord_note_sockopt(fd, level, name);
        return rc;
    }
    int saved = errno;
    if ((level == IPPROTO_TCP || level == IPPROTO_IP || level == IPPROTO_IPV6) && ((!val && len) || tcp_int_short(level, name, len))) {
        errno = !val && len ? EFAULT : EINVAL;   /* (as the kernel checks them) */
        return -1;
    }
    if (level == SOL_SOCKET) {
        if (real_setsockopt(fd, level, name, val, len) == 0)
            return 0;
        if (errno != EOPNOTSUPP && errno != ENOPROTOOPT)
            return -1;
    } else if (level != IPPROTO_TCP && level != IPPROTO_IP && level != IPPROTO_IPV6) {
        return real_setsockopt(fd, level, name, val, len);
    }
    /* an int is kept, to read back; anything else (TCP_CONGESTION's name) is taken and
     * reads as the kernel's default */
    struct fd_sockopt *o = val && len == sizeof(int) ? find_opt(e, level, name, true) : NULL;
    if (o)
        memcpy(&o->value, val, sizeof(int));
    errno = saved;
    return 0;
}

/* An option the app never set on its diverted socket: what the kernel says for a new TCP
 * socket of that family (the system's keep-alive times, its TTL, its congestion control;
 * 536 for TCP_MAXSEG, the MSS before a path is known), asked of a socket made for the
 * question, not 0. */
static int kernel_default(int family, int level, int name, void *val, socklen_t *len, int saved)
{
    int probe = real_socket(family, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP);
    if (probe < 0) {                   /* (out of fds: 0, never an errno getsockopt cannot give) */
        int zero = 0;
        memcpy(val, &zero, *len < sizeof zero ? *len : sizeof zero);
        *len = *len < sizeof zero ? *len : sizeof zero;
        errno = saved;
        return 0;
    }
    int rc = real_getsockopt(probe, level, name, val, len);
    int err = errno;
    real_close(probe);
    errno = rc == 0 ? saved : err;
    return rc;
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
            hooks_probe_settled(fd, probing, err);
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
    if (e && (!val || !len)) {
        errno = EFAULT;
        return -1;
    }
    if (!e)
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
        if (!o)
            return kernel_default(e->peer.sa.sa_family, level, name, val, len, saved);
        v = o->value;
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
        sockrecord_note_ioctl(fd, req, arg);
    return rc;
}

