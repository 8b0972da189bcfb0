/* real.c — owns the real libc functions behind every hook: bound once with
 * dlsym(RTLD_NEXT), never to the library's own symbols, with a raw-syscall fallback for
 * each while they are not bound. The rest of the library calls these, never the hooks. */
#include "real.h"
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

__thread int shim_in_engine __attribute__((tls_model("initial-exec")));
__thread int shim_hook_depth __attribute__((tls_model("initial-exec")));

/* Until vfork is bound (or if it cannot be): fork, which vfork may always be. */
static pid_t vfork_as_fork(void) { return fork(); }
void *real_vfork_fn = (void *)vfork_as_fork;

static struct {
    int (*socket)(int, int, int);
    int (*connect)(int, const struct sockaddr *, socklen_t);
    int (*bind)(int, const struct sockaddr *, socklen_t);
    ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    ssize_t (*write)(int, const void *, size_t);
    ssize_t (*send)(int, const void *, size_t, int);
    ssize_t (*sendmsg)(int, const struct msghdr *, int);
    ssize_t (*writev)(int, const struct iovec *, int);
    int (*getaddrinfo)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
    struct hostent *(*gethostbyname)(const char *);
    struct hostent *(*gethostbyname2)(const char *, int);
    int (*gethostbyname_r)(const char *, struct hostent *, char *, size_t, struct hostent **, int *);
    int (*gethostbyname2_r)(const char *, int, struct hostent *, char *, size_t, struct hostent **, int *);
    int (*getpeername)(int, struct sockaddr *, socklen_t *);
    int (*shutdown)(int, int);
    int (*getsockname)(int, struct sockaddr *, socklen_t *);
    int (*setsockopt)(int, int, int, const void *, socklen_t);
    int (*getsockopt)(int, int, int, void *, socklen_t *);
    int (*ioctl)(int, unsigned long, ...);
    int (*epoll_ctl)(int, int, int, struct epoll_event *);
    int (*close)(int);
    int (*close_range)(unsigned, unsigned, int);
    int (*fclose)(FILE *);
    int (*dup)(int);
    int (*dup2)(int, int);
    int (*dup3)(int, int, int);
    int (*fcntl)(int, int, ...);
    int (*fcntl64)(int, int, ...);
    int (*setns)(int, int);
    int (*unshare)(int);
    int (*execve)(const char *, char *const[], char *const[]);
    int (*execvpe)(const char *, char *const[], char *const[]);
    int (*fexecve)(int, char *const[], char *const[]);
    int (*execveat)(int, const char *, char *const[], char *const[], int);
    int (*posix_spawn)(pid_t *, const char *, const posix_spawn_file_actions_t *, const posix_spawnattr_t *,
                       char *const[], char *const[]);
    int (*posix_spawnp)(pid_t *, const char *, const posix_spawn_file_actions_t *, const posix_spawnattr_t *,
                        char *const[], char *const[]);
    int (*system)(const char *);
    FILE *(*popen)(const char *, const char *);
    int (*sendmmsg)(int, struct mmsghdr *, unsigned, int);
    ssize_t (*sendfile)(int, int, off_t *, size_t);
    ssize_t (*splice)(int, off_t *, int, off_t *, size_t, unsigned);
    ssize_t (*pwritev2)(int, const struct iovec *, int, off_t, int);
    FILE *(*fdopen)(int, const char *);
    int (*vdprintf)(int, const char *, va_list);
    int (*vdprintf_chk)(int, int, const char *, va_list);
} fn;

static pthread_once_t bind_once = PTHREAD_ONCE_INIT;
static _Atomic int bound;
/* dlsym may itself call a hooked function (sanitizer runtimes do): such a nested call
 * must not wait on the pthread_once it is inside of, so it uses the raw syscall. */
static __thread int binding __attribute__((tls_model("initial-exec")));

/* Whether p lies in this library's own image: RTLD_NEXT never returns one of our hooks
 * unless the library is loaded twice, and binding to ourselves would recurse forever. The
 * linker's own bounds of the image, not dladdr: dladdr of a libc address scans libc's
 * whole symbol table, and two per bound function cost every exec 0.4 ms. */
extern const char __ehdr_start[] __attribute__((visibility("hidden")));
extern const char _end[] __attribute__((visibility("hidden")));

static bool is_ours(const void *p)
{
    return p && (const char *)p >= __ehdr_start && (const char *)p < _end;
}

#define BIND(name)                                                         \
    do {                                                                   \
        void *p = dlsym(RTLD_NEXT, #name);                                 \
        if (is_ours(p))                                                    \
            p = NULL;                                                      \
        memcpy(&fn.name, &p, sizeof p);                                    \
    } while (0)

static void bind_all(void)
{
    BIND(socket); BIND(connect); BIND(bind); BIND(sendto); BIND(write); BIND(send); BIND(sendmsg); BIND(writev); BIND(getaddrinfo); BIND(gethostbyname); BIND(gethostbyname2);
    BIND(gethostbyname_r); BIND(gethostbyname2_r); BIND(getpeername); BIND(getsockname); BIND(shutdown);
    BIND(setsockopt); BIND(getsockopt); BIND(ioctl); BIND(epoll_ctl); BIND(close);
    BIND(close_range); BIND(fclose); BIND(dup); BIND(dup2); BIND(dup3); BIND(fcntl); BIND(fcntl64);
    BIND(setns); BIND(unshare); BIND(execve); BIND(execvpe); BIND(fexecve); BIND(execveat);
    BIND(posix_spawn); BIND(posix_spawnp); BIND(system); BIND(popen);
    BIND(sendmmsg); BIND(sendfile); BIND(splice); BIND(pwritev2); BIND(fdopen); BIND(vdprintf);
    void *vf = dlsym(RTLD_NEXT, "vfork");
    if (vf && !is_ours(vf))
        real_vfork_fn = vf;
    void *chk = dlsym(RTLD_NEXT, "__vdprintf_chk");
    if (!is_ours(chk))
        memcpy(&fn.vdprintf_chk, &chk, sizeof chk);
    if (!fn.fcntl64)
        fn.fcntl64 = fn.fcntl;
    atomic_store(&bound, 1);
}

void real_bind(void)
{
    if (atomic_load_explicit(&bound, memory_order_acquire) || binding)
        return;
    binding = 1;
    pthread_once(&bind_once, bind_all);
    binding = 0;
}

bool real_bound(void)
{
    return atomic_load_explicit(&bound, memory_order_acquire) != 0;
}

int real_socket(int domain, int type, int protocol)
{
    return fn.socket ? fn.socket(domain, type, protocol) : (int)syscall(SYS_socket, domain, type, protocol);
}

int real_socketpair(int domain, int type, int protocol, int sv[2])
{
    return (int)syscall(SYS_socketpair, domain, type, protocol, sv);
}

int real_connect(int fd, const struct sockaddr *a, socklen_t l)
{
    return fn.connect ? fn.connect(fd, a, l) : (int)syscall(SYS_connect, fd, a, l);
}

int real_bind_socket(int fd, const struct sockaddr *a, socklen_t l)
{
    return fn.bind ? fn.bind(fd, a, l) : (int)syscall(SYS_bind, fd, a, l);
}

ssize_t real_sendto(int fd, const void *b, size_t n, int fl, const struct sockaddr *a, socklen_t l)
{
    return fn.sendto ? fn.sendto(fd, b, n, fl, a, l) : syscall(SYS_sendto, fd, b, n, fl, a, l);
}

ssize_t real_write(int fd, const void *b, size_t n)
{
    return fn.write ? fn.write(fd, b, n) : syscall(SYS_write, fd, b, n);
}

ssize_t real_send(int fd, const void *b, size_t n, int fl)
{
    return fn.send ? fn.send(fd, b, n, fl) : syscall(SYS_sendto, fd, b, n, fl, NULL, 0);
}

ssize_t real_sendmsg(int fd, const struct msghdr *m, int fl)
{
    return fn.sendmsg ? fn.sendmsg(fd, m, fl) : syscall(SYS_sendmsg, fd, m, fl);
}

ssize_t real_writev(int fd, const struct iovec *iov, int cnt)
{
    return fn.writev ? fn.writev(fd, iov, cnt) : syscall(SYS_writev, fd, iov, cnt);
}

/* Name resolution has no system call to fall back on: unbound, it fails as libc would
 * when its resolver is unavailable. */
int real_getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res)
{
    return fn.getaddrinfo ? fn.getaddrinfo(node, service, hints, res) : EAI_FAIL;
}

struct hostent *real_gethostbyname(const char *name)
{
    return fn.gethostbyname ? fn.gethostbyname(name) : NULL;
}

struct hostent *real_gethostbyname2(const char *name, int af)
{
    return fn.gethostbyname2 ? fn.gethostbyname2(name, af) : NULL;
}

int real_gethostbyname_r(const char *name, struct hostent *ret, char *buf, size_t buflen, struct hostent **result,
                         int *h_errnop)
{
    return fn.gethostbyname_r ? fn.gethostbyname_r(name, ret, buf, buflen, result, h_errnop) : ENOSYS;
}

int real_gethostbyname2_r(const char *name, int af, struct hostent *ret, char *buf, size_t buflen,
                          struct hostent **result, int *h_errnop)
{
    return fn.gethostbyname2_r ? fn.gethostbyname2_r(name, af, ret, buf, buflen, result, h_errnop) : ENOSYS;
}

int real_getpeername(int fd, struct sockaddr *a, socklen_t *l)
{
    return fn.getpeername ? fn.getpeername(fd, a, l) : (int)syscall(SYS_getpeername, fd, a, l);
}

int real_shutdown(int fd, int how)
{
    return fn.shutdown ? fn.shutdown(fd, how) : (int)syscall(SYS_shutdown, fd, how);
}

int real_getsockname(int fd, struct sockaddr *a, socklen_t *l)
{
    return fn.getsockname ? fn.getsockname(fd, a, l) : (int)syscall(SYS_getsockname, fd, a, l);
}

int real_setsockopt(int fd, int lv, int nm, const void *v, socklen_t l)
{
    return fn.setsockopt ? fn.setsockopt(fd, lv, nm, v, l) : (int)syscall(SYS_setsockopt, fd, lv, nm, v, l);
}

int real_getsockopt(int fd, int lv, int nm, void *v, socklen_t *l)
{
    return fn.getsockopt ? fn.getsockopt(fd, lv, nm, v, l) : (int)syscall(SYS_getsockopt, fd, lv, nm, v, l);
}

int real_ioctl(int fd, unsigned long req, void *arg)
{
    return fn.ioctl ? fn.ioctl(fd, req, arg) : (int)syscall(SYS_ioctl, fd, req, arg);
}

int real_epoll_ctl(int ep, int op, int fd, struct epoll_event *ev)
{
    return fn.epoll_ctl ? fn.epoll_ctl(ep, op, fd, ev) : (int)syscall(SYS_epoll_ctl, ep, op, fd, ev);
}

int real_close(int fd)
{
    return fn.close ? fn.close(fd) : (int)syscall(SYS_close, fd);
}

int real_fclose(FILE *f)
{
    /* before binding (a hook reached from inside dlsym) there is no stdio to speak of:
     * the stream is not closed, rather than closed by a guess */
    return fn.fclose ? fn.fclose(f) : EOF;
}

int real_close_range(unsigned first, unsigned last, int flags)
{
    return fn.close_range ? fn.close_range(first, last, flags) : (int)syscall(SYS_close_range, first, last, flags);
}

int real_dup(int fd)
{
    return fn.dup ? fn.dup(fd) : (int)syscall(SYS_dup, fd);
}

int real_dup2(int fd, int nfd)
{
    return fn.dup2 ? fn.dup2(fd, nfd) : (int)syscall(SYS_dup2, fd, nfd);
}

int real_dup3(int fd, int nfd, int fl)
{
    return fn.dup3 ? fn.dup3(fd, nfd, fl) : (int)syscall(SYS_dup3, fd, nfd, fl);
}

int real_fcntl(int fd, int cmd, void *arg)
{
    return fn.fcntl ? fn.fcntl(fd, cmd, arg) : (int)syscall(SYS_fcntl, fd, cmd, arg);
}

int real_fcntl64(int fd, int cmd, void *arg)
{
    return fn.fcntl64 ? fn.fcntl64(fd, cmd, arg) : (int)syscall(SYS_fcntl, fd, cmd, arg);
}

int real_setns(int fd, int nstype)
{
    return fn.setns ? fn.setns(fd, nstype) : (int)syscall(SYS_setns, fd, nstype);
}

int real_unshare(int flags)
{
    return fn.unshare ? fn.unshare(flags) : (int)syscall(SYS_unshare, flags);
}

int real_fstat(int fd, struct stat *st)
{
#ifdef SYS_fstat
    return (int)syscall(SYS_fstat, fd, st);   /* libc's fstat is fstatat(fd, "", AT_EMPTY_PATH) */
#else
    return fstat(fd, st);
#endif
}

/* The exec family: always bound (hooks_exec.c binds first); execve and execveat fall back
 * to the system call, the path search of execvpe has no such fallback. */
int real_execve(const char *path, char *const argv[], char *const envp[])
{
    return fn.execve ? fn.execve(path, argv, envp) : (int)syscall(SYS_execve, path, argv, envp);
}

int real_execvpe(const char *file, char *const argv[], char *const envp[])
{
    if (!fn.execvpe) {
        errno = ENOSYS;
        return -1;
    }
    return fn.execvpe(file, argv, envp);
}

int real_fexecve(int fd, char *const argv[], char *const envp[])
{
    if (!fn.fexecve)
        return (int)syscall(SYS_execveat, fd, "", argv, envp, AT_EMPTY_PATH);
    return fn.fexecve(fd, argv, envp);
}

int real_execveat(int dirfd, const char *path, char *const argv[], char *const envp[], int flags)
{
    return fn.execveat ? fn.execveat(dirfd, path, argv, envp, flags)
                       : (int)syscall(SYS_execveat, dirfd, path, argv, envp, flags);
}

/* What starts a child with no fork handler and no hook of ours before its exec: bound
 * like the rest, with no fallback (they report ENOSYS, as posix_spawn would). */
int real_posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *actions,
                     const posix_spawnattr_t *attr, char *const argv[], char *const envp[], bool search)
{
    int (*f)(pid_t *, const char *, const posix_spawn_file_actions_t *, const posix_spawnattr_t *, char *const[],
             char *const[]) = search ? fn.posix_spawnp : fn.posix_spawn;
    return f ? f(pid, path, actions, attr, argv, envp) : ENOSYS;
}

int real_system(const char *command)
{
    if (!fn.system) {
        errno = ENOSYS;
        return -1;
    }
    return fn.system(command);
}

FILE *real_popen(const char *command, const char *mode)
{
    if (!fn.popen) {
        errno = ENOSYS;
        return NULL;
    }
    return fn.popen(command, mode);
}

/* Writes the fast path never answers inline, gated all the same (hooks_io.c). */
int real_sendmmsg(int fd, struct mmsghdr *v, unsigned n, int flags)
{
    return fn.sendmmsg ? fn.sendmmsg(fd, v, n, flags) : (int)syscall(SYS_sendmmsg, fd, v, n, flags);
}

ssize_t real_sendfile(int out, int in, off_t *off, size_t n)
{
    return fn.sendfile ? fn.sendfile(out, in, off, n) : syscall(SYS_sendfile, out, in, off, n);
}

ssize_t real_splice(int in, off_t *off_in, int out, off_t *off_out, size_t n, unsigned flags)
{
    return fn.splice ? fn.splice(in, off_in, out, off_out, n, flags) : syscall(SYS_splice, in, off_in, out, off_out, n, flags);
}

ssize_t real_pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
    if (fn.pwritev2)
        return fn.pwritev2(fd, iov, cnt, off, flags);
    errno = ENOSYS;                    /* (the system call splits the offset: glibc's to do) */
    return -1;
}

/* glibc's own writers: no system-call fallback (bound before any app call reaches them) */
FILE *real_fdopen(int fd, const char *mode)
{
    real_bind();
    if (!fn.fdopen) {
        errno = ENOSYS;
        return NULL;
    }
    return fn.fdopen(fd, mode);
}

int real_vdprintf(int fd, int flag, const char *fmt, va_list ap)
{
    if (flag >= 0 && fn.vdprintf_chk)
        return fn.vdprintf_chk(fd, flag, fmt, ap);
    if (!fn.vdprintf) {
        errno = ENOSYS;
        return -1;
    }
    return fn.vdprintf(fd, fmt, ap);
}
