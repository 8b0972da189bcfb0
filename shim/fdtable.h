/* fdtable.h — the table of file descriptors the library cares about (fdtable.c): app
 * fds it diverted, with the peer address and the options the app set, and the engine's
 * own fds, which the app may not close. */
#ifndef HTTPSHIM_FDTABLE_H
#define HTTPSHIM_FDTABLE_H
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>

union shim_sockaddr {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
};

/* FD_PROBING: the app's own socket connecting for real (a cold pool), diverted once it is up */
enum fd_kind { FD_NONE = 0, FD_DIVERTED = 1, FD_ENGINE = 2, FD_PROBING = 3 };

#define FD_MAX_OPTS 12
#define FD_MAX_EPOLL 2

struct fd_sockopt { int level, name, value; };
struct fd_epoll_reg { int epfd; struct epoll_event ev; };

struct fd_entry {
    _Atomic int kind;                  /* enum fd_kind, written last on publish */
    dev_t dev;
    ino_t ino;                         /* of the app's socketpair end: stale if it differs */
    union shim_sockaddr peer;          /* exactly as the app passed it to connect */
    socklen_t peer_len;
    int upstream;
    int probe_file_flags;              /* FD_PROBING: the app's file flags at connect */
    _Atomic int connected_already;     /* FD_ENGINE: an adopted connection libcurl will connect() */
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
/* The same for an fd whose real connect is in progress (FD_PROBING). */
struct fd_entry *fdtable_probing(int fd);
void fdtable_mark_engine(int fd);
void fdtable_clear(int fd);
void fdtable_copy(int from, int to);   /* dup bookkeeping */
bool fdtable_is_engine(int fd);
int fdtable_engine_fd_limit(void);     /* no engine fd at or above this */
void fdtable_close_engine_fds(void);   /* forked child: drop the parent's engine fds */
/* Closes an engine fd of the library's own: out of the table, then closed for real. */
int fdtable_close_engine_fd(int fd);
#endif
