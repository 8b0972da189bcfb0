/* real.h — the libc functions the library interposes, bound once (real.c). Every call
 * the library makes that must not come back through its own hooks goes through these:
 * real_connect() & co. use the bound function, or the raw system call while binding has
 * not happened yet (a hook reached from inside dlsym, a sanitizer runtime, the close
 * path before the constructor). */
#ifndef HTTPSHIM_REAL_H
#define HTTPSHIM_REAL_H
#include <netdb.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdbool.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>

/* Set on the engine thread: every hook passes its calls straight to these. */
extern __thread int shim_in_engine __attribute__((tls_model("initial-exec")));
/* How many hooks that take the shim's locks this app thread is inside: more than none only
 * when a signal handler interrupted one (POSIX lets a handler connect, write and close).
 * What the handler asks then goes as without the shim where it can (a connect connects for
 * real, a write is never answered inline), so it never waits on a lock the thread it
 * interrupted holds. */
extern __thread int shim_hook_depth __attribute__((tls_model("initial-exec")));

/* Binds every function once (pthread_once); a nested call from inside dlsym returns at
 * once and is served by the raw system calls. */
void real_bind(void);
bool real_bound(void);

int real_socket(int domain, int type, int protocol);
int real_socketpair(int domain, int type, int protocol, int sv[2]);
int real_connect(int fd, const struct sockaddr *addr, socklen_t len);
int real_bind_socket(int fd, const struct sockaddr *addr, socklen_t len);   /* bind(2) */
/* where the vfork trampoline (hooks.c) jumps: libc's vfork once bound */
extern void *real_vfork_fn __attribute__((visibility("hidden")));
ssize_t real_sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr, socklen_t len);
ssize_t real_write(int fd, const void *buf, size_t n);
ssize_t real_send(int fd, const void *buf, size_t n, int flags);
ssize_t real_sendmsg(int fd, const struct msghdr *msg, int flags);
ssize_t real_writev(int fd, const struct iovec *iov, int iovcnt);
int real_getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res);
struct hostent *real_gethostbyname(const char *name);
struct hostent *real_gethostbyname2(const char *name, int af);
int real_gethostbyname_r(const char *name, struct hostent *ret, char *buf, size_t buflen, struct hostent **result,
                         int *h_errnop);
int real_gethostbyname2_r(const char *name, int af, struct hostent *ret, char *buf, size_t buflen,
                          struct hostent **result, int *h_errnop);
int real_getpeername(int fd, struct sockaddr *addr, socklen_t *len);
int real_shutdown(int fd, int how);
int real_getsockname(int fd, struct sockaddr *addr, socklen_t *len);
int real_setsockopt(int fd, int level, int name, const void *val, socklen_t len);
int real_getsockopt(int fd, int level, int name, void *val, socklen_t *len);
int real_ioctl(int fd, unsigned long req, void *arg);
int real_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev);
int real_close(int fd);                /* never allocates, never calls dlsym */
int real_close_range(unsigned first, unsigned last, int flags);
int real_fclose(FILE *f);
int real_dup(int fd);
int real_dup2(int fd, int nfd);
int real_dup3(int fd, int nfd, int flags);
int real_fcntl(int fd, int cmd, void *arg);
int real_fcntl64(int fd, int cmd, void *arg);
int real_setns(int fd, int nstype);
/* fstat by its own system call: a fifth less than libc's fstatat(fd, "", AT_EMPTY_PATH),
 * on every look at a diverted fd (fdtable.c) */
int real_fstat(int fd, struct stat *st);
int real_unshare(int flags);
int real_execve(const char *path, char *const argv[], char *const envp[]);
int real_sendmmsg(int fd, struct mmsghdr *v, unsigned n, int flags);
FILE *real_fdopen(int fd, const char *mode);
/* vdprintf, or __vdprintf_chk with its flag when flag >= 0 */
int real_vdprintf(int fd, int flag, const char *fmt, va_list ap);
ssize_t real_sendfile(int out, int in, off_t *off, size_t n);
ssize_t real_splice(int in, off_t *off_in, int out, off_t *off_out, size_t n, unsigned flags);
ssize_t real_pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags);
int real_execvpe(const char *file, char *const argv[], char *const envp[]);
int real_fexecve(int fd, char *const argv[], char *const envp[]);
int real_execveat(int dirfd, const char *path, char *const argv[], char *const envp[], int flags);
/* posix_spawn, or posix_spawnp when search */
int real_posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *actions,
                     const posix_spawnattr_t *attr, char *const argv[], char *const envp[], bool search);
int real_system(const char *command);
FILE *real_popen(const char *command, const char *mode);
#endif
