/* hooks_exec.c — owns what a diverted connection becomes when the process execs: the
 * exec family is interposed, and a diverted fd the new program inherits (no close-on-exec)
 * is turned into a real TCP connection to the address the app dialled, when it is quiet,
 * since the socketpair's other end dies with this image's engine thread. Such a handover
 * is what the new program would have had direct: a kept-alive connection to its upstream
 * with nothing in flight (bash's `exec 3<>/dev/tcp/...` then `exec prog`, ucspi-tcp's
 * tcpclient). A connection in the middle of an exchange, tunnelled, intercepted or of a
 * Redis session (whose AUTH and SELECT live in the engine) stays as it is. The handover
 * makes only async-signal-safe calls, as execve itself is; the table forgets the fds
 * handed over only if the exec fails and this image goes on. A vfork child hands over its
 * own copy and leaves the parent's. Also what starts a child that runs no hook before its
 * exec (posix_spawn, system, popen): what it inherits is shared with it as on a fork. */
#include "config.h"
#include "fdgate.h"
#include "fdtable.h"
#include "hooks.h"
#include "log.h"
#include "netns.h"
#include "real.h"
#include "sockrecord.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <sys/socket.h>
#include <unistd.h>

#define SHIM_EXPORT __attribute__((visibility("default")))
#define HANDOVER_CONNECT_MS 3000       /* an exec waits at most this long per connection */
#define HANDOVER_SETTLE_MS 200         /* and this long in all for exchanges to settle */
#define HANDOVER_MAX 64                /* connections handed over per exec; the rest stay */

/* What an exec handed over, for the table to forget if the exec fails. Until then the
 * handover makes only async-signal-safe calls (execve is one, and a signal handler may
 * exec): system calls and atomics, no lock, no allocation. */
struct handover { int n; int fds[HANDOVER_MAX]; };

extern char **environ;

/* Nothing in either direction: the app has read every byte the engine wrote, the engine
 * every byte the app wrote (the app end's send queue is empty), and neither side has
 * half-closed. engine_fd < 0: a vfork child's, which may have closed the engine's end
 * (its half-close is then not seen). */
static bool quiet(int fd, int engine_fd)
{
    struct pollfd p[2] = { { .fd = fd, .events = POLLIN | POLLRDHUP }, { .fd = engine_fd, .events = POLLRDHUP } };
    int unsent = 0;
    return poll(p, 2, 0) == 0 && real_ioctl(fd, SIOCOUTQ, &unsent) == 0 && unsent == 0;
}

/* A blocking connect to where the app connected, bounded: a new TCP socket, or -1. */
static int connect_again(const struct fd_entry *e)
{
    int s = real_socket(e->peer.sa.sa_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, IPPROTO_TCP);
    if (s < 0)
        return -1;
    if (real_connect(s, &e->peer.sa, e->peer_len) == 0)
        return s;
    int err = errno;
    if (err == EINPROGRESS) {
        struct pollfd p = { .fd = s, .events = POLLOUT };
        socklen_t len = sizeof err;
        if (poll(&p, 1, HANDOVER_CONNECT_MS) == 1 && real_getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &len) == 0
            && err == 0)
            return s;
    }
    real_close(s);
    return -1;
}

/* Holds the gate of a connection the engine holds nothing for, with nothing unread either
 * way. An exchange whose last bytes the app has read is over, but the engine gives the
 * connection back only after its write: an app that execs the moment it has its answer
 * waits for that (until *settle_ms runs out: a request still in flight stays in flight).
 * The gate is taken only from IDLE: a hold of the engine's gate given back unwritten would
 * undo the engine's hand-back that raced it, and nothing would make the engine try again. */
static bool hold_quiet(int fd, struct fd_entry *e, uint64_t *held, int *settle_ms, bool vfork_child)
{
    for (;;) {
        int took = fdgate_app_hold_idle(&e->gate, held);
        if (took < 0)
            return false;              /* tunnelled, TLS, shared with a dup or a child */
        bool still = quiet(fd, vfork_child ? -1 : e->engine_fd);
        if (took && still)
            return true;
        if (took)
            fdgate_app_release(&e->gate, *held, false);
        if (!still || *settle_ms <= 0)
            return false;
        (*settle_ms)--;
        poll(NULL, 0, 1);
    }
}

/* In a vfork child the table is the parent's, and so is the connection: the new program
 * gets a connection of its own on its copy of the fd, the parent keeps its, and the table
 * stays as it is (vfork_child). */
static bool hand_over(int fd, struct fd_entry *e, int *settle_ms, struct handover *h, bool vfork_child)
{
    const struct shim_config *cfg = config_loaded();
    if (!cfg || e->upstream < 0 || (size_t)e->upstream >= cfg->n_upstreams
        || cfg->upstreams[e->upstream].protocol == PROTO_REDIS || e->forks_at_divert != fdtable_forks())
        return false;
    int fdflags = real_fcntl(fd, F_GETFD, NULL);
    struct stat st;
    if (fdflags < 0 || (fdflags & FD_CLOEXEC))
        return false;                  /* gone with the exec: nothing to hand over */
    if (real_fstat(fd, &st) != 0 || st.st_ino != e->ino || st.st_dev != e->dev)
        return false;                  /* the number is another file's here (a vfork child's dup2) */
    uint64_t held;
    if (!hold_quiet(fd, e, &held, settle_ms, vfork_child)) {
        shim_debug("fd %d: inherited by the exec'd program in the middle of an exchange, a tunnel or TLS: it "
                   "ends with this image", fd);
        return false;
    }
    int tcp = connect_again(e);
    if (tcp < 0) {
        fdgate_app_release(&e->gate, held, false);
        shim_debug("fd %d: inherited by the exec'd program, its upstream not reached again: it ends with this "
                   "image", fd);
        return false;
    }
    sockrecord_carry_back(fd, tcp, e);
    /* never inline again on the old connection, unless it stays the parent's */
    fdgate_app_release(&e->gate, held, !vfork_child);
    bool done = real_dup3(tcp, fd, 0) == 0;
    if (done && !vfork_child)
        h->fds[h->n++] = fd;
    if (done)
        shim_debug("fd %d: handed over to the exec'd program as a connection of its own", fd);
    real_close(tcp);
    return done;
}

/* The exec failed and this image goes on: the fds handed over are real connections now,
 * and the engine's side of each goes as on a close. Keeps errno. */
static void after_failed_exec(const struct handover *h)
{
    int saved = errno;
    for (int i = 0; i < h->n; i++)
        hooks_forget(h->fds[i]);
    errno = saved;
}

/* Before any exec: every inherited diverted fd that can be handed over is. Keeps errno. */
static void before_exec(struct handover *h)
{
    h->n = 0;
    real_bind();
    if (shim_in_engine || !fdtable_base || netns_thread_away())
        return;
    int saved = errno;
    bool vfork_child = fdtable_in_vfork_child();
    int top = fdtable_diverted_top(), settle_ms = HANDOVER_SETTLE_MS;
    for (int fd = 0, handed = 0; fd < top && handed < HANDOVER_MAX; fd++) {
        struct fd_entry *e = fdtable_if_diverted(fd);
        if (e && hand_over(fd, e, &settle_ms, h, vfork_child))
            handed++;
    }
    errno = saved;
}

/* Each exec hands over what it can, and takes it back into the table if it fails. */
#define EXEC_WITH_HANDOVER(call)                                        \
    do {                                                                \
        struct handover h;                                              \
        before_exec(&h);                                                \
        int rc = (call);                                                \
        after_failed_exec(&h);                                          \
        return rc;                                                      \
    } while (0)

SHIM_EXPORT int execve(const char *path, char *const argv[], char *const envp[])
{
    EXEC_WITH_HANDOVER(real_execve(path, argv, envp));
}

SHIM_EXPORT int execvpe(const char *file, char *const argv[], char *const envp[])
{
    EXEC_WITH_HANDOVER(real_execvpe(file, argv, envp));
}

SHIM_EXPORT int fexecve(int fd, char *const argv[], char *const envp[])
{
    EXEC_WITH_HANDOVER(real_fexecve(fd, argv, envp));
}

SHIM_EXPORT int execveat(int dirfd, const char *path, char *const argv[], char *const envp[], int flags)
{
    EXEC_WITH_HANDOVER(real_execveat(dirfd, path, argv, envp, flags));
}

/* A child these start runs no hook of ours before glibc's own exec: what it inherits is
 * shared with it as with a forked child (hooks.c), served by this process's engine. */
SHIM_EXPORT int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *actions,
                            const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
    real_bind();
    hooks_share_with_spawned_child(actions != NULL);
    return real_posix_spawn(pid, path, actions, attr, argv, envp, false);
}

SHIM_EXPORT int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *actions,
                             const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
    real_bind();
    hooks_share_with_spawned_child(actions != NULL);
    return real_posix_spawn(pid, file, actions, attr, argv, envp, true);
}

SHIM_EXPORT int system(const char *command)
{
    real_bind();
    if (command)
        hooks_share_with_spawned_child(false);
    return real_system(command);
}

SHIM_EXPORT FILE *popen(const char *command, const char *mode)
{
    real_bind();
    hooks_share_with_spawned_child(false);
    return real_popen(command, mode);
}

SHIM_EXPORT int execv(const char *path, char *const argv[]) { return execve(path, argv, environ); }
SHIM_EXPORT int execvp(const char *file, char *const argv[]) { return execvpe(file, argv, environ); }

/* The list forms: their arguments gathered on the stack, as glibc does. */
#define ARGS_MAX 65536

static size_t count_args(va_list ap)
{
    va_list c;
    va_copy(c, ap);
    size_t n = 1;                      /* (arg0) */
    while (n <= ARGS_MAX && va_arg(c, char *))
        n++;
    va_end(c);
    return n;
}

static void fill_args(char **argv, const char *arg0, va_list *ap, size_t n)
{
    argv[0] = (char *)arg0;
    for (size_t i = 1; i < n; i++)
        argv[i] = va_arg(*ap, char *);
    argv[n] = NULL;
    (void)va_arg(*ap, char *);         /* the NULL that ended them */
}

#define LIST_FORM(first, argv, n, ap)                                   \
    va_list ap;                                                         \
    va_start(ap, first);                                                \
    size_t n = count_args(ap);                                          \
    if (n > ARGS_MAX) {                                                 \
        va_end(ap);                                                     \
        errno = E2BIG;                                                  \
        return -1;                                                      \
    }                                                                   \
    char *argv[n + 1];                                                  \
    fill_args(argv, first, &ap, n)

SHIM_EXPORT int execl(const char *path, const char *arg, ...)
{
    LIST_FORM(arg, argv, n, ap);
    va_end(ap);
    return execv(path, argv);
}

SHIM_EXPORT int execlp(const char *file, const char *arg, ...)
{
    LIST_FORM(arg, argv, n, ap);
    va_end(ap);
    return execvp(file, argv);
}

SHIM_EXPORT int execle(const char *path, const char *arg, ...)
{
    LIST_FORM(arg, argv, n, ap);
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return execve(path, argv, envp);
}
