/* shim.h — what the library's subsystems say to each other: the real libc functions
 * (hooks.c), the diverted-fd table (fdtable.c), the engine (engine.c, upstream.c,
 * tunnel.c) and logging (log.c). Nothing here is exported from the .so. */
#ifndef HTTPSHIM_SHIM_H
#define HTTPSHIM_SHIM_H
#include <netdb.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include "rules.h"

/* ---- real functions, bound once with dlsym(RTLD_NEXT) ---- */
struct real_fns {
    int (*connect)(int, const struct sockaddr *, socklen_t);
    ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    int (*getaddrinfo)(const char *, const char *, const struct addrinfo *, struct addrinfo **);
    struct hostent *(*gethostbyname)(const char *);
    struct hostent *(*gethostbyname2)(const char *, int);
    int (*gethostbyname_r)(const char *, struct hostent *, char *, size_t, struct hostent **, int *);
    int (*gethostbyname2_r)(const char *, int, struct hostent *, char *, size_t, struct hostent **, int *);
    int (*getpeername)(int, struct sockaddr *, socklen_t *);
    int (*getsockname)(int, struct sockaddr *, socklen_t *);
    int (*setsockopt)(int, int, int, const void *, socklen_t);
    int (*getsockopt)(int, int, int, void *, socklen_t *);
    int (*ioctl)(int, unsigned long, ...);
    int (*epoll_ctl)(int, int, int, struct epoll_event *);
    int (*close)(int);
    int (*close_range)(unsigned, unsigned, int);
    int (*dup)(int);
    int (*dup2)(int, int);
    int (*dup3)(int, int, int);
    int (*fcntl)(int, int, ...);
    int (*fcntl64)(int, int, ...);
};
extern struct real_fns shim_real;
void shim_bind_real(void);
int shim_real_close(int fd);           /* safe before binding, never allocates */

/* Set on the engine thread: every hook passes its calls straight through. */
extern __thread int shim_in_engine __attribute__((tls_model("initial-exec")));

/* ---- configuration, loaded once per process on first use ---- */
struct shim_config *shim_config_get(void);   /* NULL when inert */

/* ---- the diverted-fd table (fdtable.c) ---- */
enum fd_kind { FD_NONE = 0, FD_DIVERTED = 1, FD_ENGINE = 2 };

#define FD_MAX_OPTS 12
#define FD_MAX_EPOLL 2

union shim_sockaddr {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
};

struct fd_sockopt { int level, name, value; };
struct fd_epoll_reg { int epfd; struct epoll_event ev; };

struct fd_entry {
    _Atomic int kind;                  /* enum fd_kind, written last on publish */
    dev_t dev;
    ino_t ino;                         /* of the app's socketpair end: stale if it differs */
    union shim_sockaddr peer;          /* exactly as the app passed it to connect */
    socklen_t peer_len;
    int upstream;
    int n_opts;
    struct fd_sockopt opts[FD_MAX_OPTS];
    _Atomic int n_epoll;               /* registrations made before connect */
    struct fd_epoll_reg epoll[FD_MAX_EPOLL];
};

#define FDTABLE_MAX 65536              /* fds at or above this are never diverted */

int fdtable_init(void);                /* mmap the table; 0 on success */
struct fd_entry *fdtable_slot(int fd); /* NULL if no table or out of range */
/* The entry if fd is diverted and the entry is not stale (inode check), else NULL. */
struct fd_entry *fdtable_diverted(int fd);
void fdtable_mark_engine(int fd);
void fdtable_clear(int fd);
void fdtable_copy(int from, int to);   /* dup bookkeeping */
bool fdtable_is_engine(int fd);
void fdtable_close_engine_fds(void);
int fdtable_engine_fd_limit(void);   /* no engine fd at or above this */   /* forked child: drop the parent's engine fds */

/* ---- engine (engine.c) ---- */
struct conn;
/* Starts the engine thread if needed (once per process, again after fork). */
int engine_ensure_started(void);
/* Hands the engine its end (already non-blocking) of a new diverted connection. */
int engine_adopt(int engine_fd, int upstream, const union shim_sockaddr *dest, socklen_t dest_len);
void engine_atfork_prepare(void);
void engine_atfork_parent(void);
void engine_atfork_child(void);

/* ---- log.c ---- */
void shim_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void shim_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#endif
