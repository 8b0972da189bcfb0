/* fdtable.h — the table of file descriptors the library cares about (fdtable.c): app
 * fds it diverted, with the peer address and the options the app set, and the engine's
 * own fds, which the app may not close. */
#ifndef HTTPSHIM_FDTABLE_H
#define HTTPSHIM_FDTABLE_H
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>
#include "fdgate.h"

union shim_sockaddr {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
};

/* FD_PROBING: the app's own socket connecting for real (a cold pool), diverted once it is up */
enum fd_kind { FD_NONE = 0, FD_DIVERTED = 1, FD_ENGINE = 2, FD_PROBING = 3 };

/* What the app's own socket() call made of an fd number, and what it set on it since
 * (the hooks see all of it), so that connect need not ask the kernel. MADE_UNKNOWN: not
 * seen being made (inherited, made behind the hooks, shared with a dup): connect asks. */
enum fd_made { MADE_UNKNOWN = 0, MADE_TCP = 1, MADE_OTHER = 2, MADE_CONNECTED = 3 };   /* (connected for real) */
enum { MADE_SET_OWNER = 1, MADE_SET_OPTS = 2 };   /* made_extras: copied at connect by asking */

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
    bool probe_held;                   /* FD_PROBING: it holds the upstream's transfers (pool.c) */
    _Atomic int connected_already;     /* FD_ENGINE: an adopted connection libcurl will connect() */
    _Atomic int acks_at_once;          /* FD_ENGINE: an upstream TCP connection libcurl sends on (hooks_io.c) */
    _Atomic int peer_gone;             /* FD_ENGINE: idle, and ended by the upstream (counted in pool_gone) */
    /* FD_DIVERTED, never heard by the engine: fd + 1 of a second reference to the app's end
     * of the socketpair (engine-marked), or 0. With it the app's close is not the last one:
     * the socket's teardown is the engine's, off the app's thread (hooks.c) */
    _Atomic int kept_app_end;
    int n_opts;
    struct fd_sockopt opts[FD_MAX_OPTS];
    _Atomic int n_epoll;               /* registrations made before connect */
    struct fd_epoll_reg epoll[FD_MAX_EPOLL];
    /* FD_DIVERTED: the engine's end of the socketpair, and who may write into it now
     * (fdgate.h): the engine, or an app thread answering a hit inline */
    int engine_fd;
    _Atomic uint64_t gate;
    /* FD_DIVERTED: the engine's connection, and whether the loop hears it yet. The pointer
     * is used only by whoever moves `heard` off FD_UNHEARD: an app thread registering the
     * connection, or the close that drops one the engine never heard from. */
    void *engine_conn;
    _Atomic int heard;
    /* FD_DIVERTED: an inline answer ended the connection and its engine end went: the app's
     * next write is taken and dropped, as TCP takes the first write after the server's
     * FIN (the one after gets EPIPE, as after the reset that write draws) */
    _Atomic int takes_one_more_write;
    void *owner;                       /* FD_ENGINE: the engine's object for it (engine thread) */
    unsigned forks_at_divert;          /* FD_DIVERTED: fdtable_forks() when it was diverted */
    pid_t pid_at_divert;               /* ... and by which process (a fork's child has a copy) */
    /* an app thread is replacing the fd's socket (hooks.c divert), and closes or dups onto
     * the number under way: each waits for the other (a close from another thread during
     * a connect, the "cancel by closing" pattern, let the divert's dup3 re-create a number
     * the app had closed, or replace the file another thread opened on it) */
    _Atomic int diverting, closing;
    _Atomic int connect_in_progress;   /* FD_DIVERTED: its connect said EINPROGRESS, and the next
                                        * connect says 0 (then EISCONN), as TCP's would */
    _Atomic int made;                  /* enum fd_made */
    unsigned made_forks;               /* fdtable_forks() at socket(): older, a forked process holds it too */
    int made_family;
    int made_flags;                    /* as F_GETFL would report them */
    bool made_cloexec;
    unsigned made_extras;
};

/* FD_DIVERTED: whether the engine's loop hears the connection yet */
enum { FD_UNHEARD = 0, FD_HEARD = 1, FD_DROPPED = 2 };

#define FDTABLE_MAX 65536              /* fds at or above this are never diverted */

int fdtable_init(void);                /* mmap the table once; 0 when it is there */
extern struct fd_entry *fdtable_base __attribute__((visibility("hidden")));
/* The hooks' first question about every write: one load and a compare. */
static inline struct fd_entry *fdtable_if_diverted(int fd)
{
    struct fd_entry *t = fdtable_base;
    if (!t || (unsigned)fd >= FDTABLE_MAX
        || atomic_load_explicit(&t[fd].kind, memory_order_relaxed) != FD_DIVERTED)
        return NULL;
    return &t[fd];
}
struct fd_entry *fdtable_slot(int fd); /* NULL if no table or out of range */
/* Forks this process took part in so far, as parent or as child: an fd older than the
 * last one is held by another process too (a diverted fd's socketpair end then does not go
 * away when libc closes the fd behind the hooks; a socket not yet connected is not the
 * shim's to divert). */
extern _Atomic unsigned fdtable_fork_count __attribute__((visibility("hidden")));
static inline unsigned fdtable_forks(void) { return atomic_load_explicit(&fdtable_fork_count, memory_order_relaxed); }
/* The process the table describes (its pid, set when the table is made and in a forked
 * child). A child made by vfork shares the table's memory but not its fds: the hooks that
 * change the table leave it alone there (one getpid, where they are rare). */
extern pid_t fdtable_pid __attribute__((visibility("hidden")));
static inline bool fdtable_in_vfork_child(void) { return fdtable_base && getpid() != fdtable_pid; }
/* vforks this process has made through the interposed vfork (hooks.c): until the first,
 * no close need ask whether it runs in a vfork child */
extern _Atomic unsigned fdtable_vforks __attribute__((visibility("hidden")));
static inline bool fdtable_maybe_vfork_child(void)
{
    return atomic_load_explicit(&fdtable_vforks, memory_order_relaxed) && fdtable_in_vfork_child();
}
/* One past the highest fd number ever diverted (or copied from one that was). */
extern _Atomic int fdtable_diverted_limit __attribute__((visibility("hidden")));
static inline int fdtable_diverted_top(void) { return atomic_load_explicit(&fdtable_diverted_limit, memory_order_relaxed); }
static inline void fdtable_note_diverted(int fd)
{
    int top = fdtable_diverted_top();
    while (fd >= top && !atomic_compare_exchange_weak(&fdtable_diverted_limit, &top, fd + 1))
        ;
}
/* The entry if fd is diverted and the entry is not stale (inode check), else NULL. */
struct fd_entry *fdtable_diverted(int fd);
/* The connection the calling thread diverted last (hooks.c notes it), if still diverted:
 * what a TLS hello made on that thread through a BIO of the app's own is most likely for. */
void fdtable_note_thread_divert(int fd);
struct fd_entry *fdtable_diverted_by_this_thread(void);
/* The same for an fd whose real connect is in progress (FD_PROBING). */
struct fd_entry *fdtable_probing(int fd);
void fdtable_mark_engine(int fd);
/* fd, or a duplicate of it above the small numbers (fd closed then), for an engine fd
 * that lives long: the app's dup2 to a number of its choosing finds it free. */
int fdtable_raise(int fd);
/* A close-on-exec duplicate of fd off the app's small numbers (at the same floor as
 * fdtable_raise), or the lowest free number when there is none up there; -1 on error. */
int fdtable_dup_high(int fd);
/* The engine writes through an app's fd number only between fdtable_touch(fd) and
 * fdtable_untouch(), having found the entry still the connection's after the touch; the
 * hooks that close or replace an app's fd clear its entry first, then wait here: so the
 * number is never the app's next file while the engine writes through it. */
void fdtable_touch(int fd);
void fdtable_untouch(void);
void fdtable_wait_untouched(int first, int last);
/* The app's dup2/dup3 targets fd, an engine fd: one the engine can let go of at once (a
 * spare socketpair's end, a connection's spare reference to the app's end) is let go of
 * (not closed: the dup closes it); true then. */
bool fdtable_give_to_app(int fd);
void fdtable_clear(int fd);
/* A connect diverting fd on one thread and a close (or a dup onto the number) on another
 * (a watchdog cancelling the connect): the divert either sees the close coming and gives
 * up before it touches the number, or finishes first and the close then closes the
 * connection (each side sets its flag, then reads the other's: seq_cst, so at least one
 * sees the other). divert_begin waits out a close under way (an earlier socket's, whose
 * close let socket() hand the number out again, too); close_begin waits out a divert,
 * and is false (nothing to end) where no divert can be. */
void fdtable_divert_begin(struct fd_entry *e);
void fdtable_divert_end(struct fd_entry *e);
bool fdtable_close_begin(struct fd_entry *e);
void fdtable_close_end(struct fd_entry *e);
void fdtable_copy(int from, int to);   /* dup bookkeeping */
/* An idle pooled connection (an engine fd) the upstream ended: counted out of the live
 * ones until it is closed (fdtable_clear). */
void fdtable_note_peer_gone(int fd);
bool fdtable_is_engine(int fd);
/* fd is below half the process's fd limit: the fds the shim holds beside the app's stay
 * there, so the app never runs short of fds on the shim's account. */
bool fdtable_in_lower_half(int fd);
/* fd is in the top quarter of the fd limit: the app holds most of what it may, and a
 * diverted connection holds two fds (the app's end and the engine's) where a direct one
 * holds one, so such a connect is left direct. */
bool fdtable_in_top_quarter(int fd);
/* The app's socket() found no fd left: the socketpairs made ahead, the graveyard and the
 * spare references to inline-answered connections are closed now, and none is kept for a
 * second (fdtable_fd_pressure). How many fds were freed. */
int fdtable_release_spares(void);
bool fdtable_fd_pressure(void);
int fdtable_engine_fd_limit(void);     /* no engine fd at or above this */
/* Closes the kept second reference to a diverted fd's app end, if any, from this thread:
 * the app's close is then the socket's last again, with the kernel's semantics. */
void fdtable_close_kept_app_end(struct fd_entry *e);
void fdtable_close_engine_fds(void);   /* forked child: drop the parent's engine fds */
/* Closes an engine fd of the library's own: out of the table, then closed for real. */
int fdtable_close_engine_fd(int fd);
/* From an app thread: the engine closes this engine fd later, in a batch (0; 1: wake it,
 * it does not know yet); -1: closed here and now (full, busy, or a high fd). */
int fdtable_bury(int fd);
/* The engine: whether fds wait (1), enough to close them now (2), or none (0). */
int fdtable_graveyard(void);
/* The engine: close up to max of what was buried; how many are left. */
int fdtable_drain_graveyard(int max);
/* A socketpair made ahead by the engine (non-blocking, close-on-exec; sv[1] an engine fd),
 * with the device and inode of its app end sv[0]: how many are left, or -1 (none: make one). */
int fdtable_take_pair(int sv[2], dev_t *dev, ino_t *ino);
#define FDTABLE_STASH_WAKE 24          /* a take that leaves this many or fewer wakes the engine */
bool fdtable_stash_short(void);       /* not full: the engine makes more whenever it runs */
void fdtable_refill_stash(void);       /* the engine */
/* ---- a diverted record between threads ----
 * The record's fields that more than one thread writes change only through what follows
 * (and the gate, fdgate.h); every other field is written by the thread that owns the
 * number at that moment (the app thread in a hook, or the engine for its own fds).
 * - publish: the connect hook fills a diverted record and publishes it, kind last with
 *   release (fdtable_publish_diverted); readers load kind first.
 * - heard: moves once off FD_UNHEARD, by compare-and-swap. To FD_HEARD by the app thread
 *   whose write needs the engine (fdtable_claim_heard), or to FD_DROPPED by the close or
 *   the inline answer that ends a connection the engine never heard (fdtable_claim_dropped).
 *   Only the winner uses engine_conn; the close takes it out of the record first
 *   (fdtable_take_engine_conn), and an ended inline answer clears it with the engine's end
 *   (fdtable_end_unheard).
 * - takes_one_more_write: set once an answer ended the connection (an inline answer, or a
 *   lingered end: fdtable_end_unheard, fdtable_take_next_write), taken by the app's next
 *   write (fdtable_next_write_taken).
 * - connected_already, acks_at_once: the engine's marks on an upstream socket libcurl is
 *   handed, read by the hooks on the engine's own calls (fdtable_mark_upstream_socket,
 *   fdtable_connected_already, fdtable_acks_at_once).
 * - owner: the engine's object for its end of a connection (fdtable_set_owner...). */
struct fdtable_divert {
    dev_t dev;
    ino_t ino;
    union shim_sockaddr peer;
    socklen_t peer_len;
    int upstream;
    int engine_fd;
    void *engine_conn;
    int n_epoll;                       /* registrations noted, while a reference is kept */
};
void fdtable_publish_diverted(int fd, const struct fdtable_divert *d);
static inline bool fdtable_unheard(struct fd_entry *e)
{
    return atomic_load_explicit(&e->heard, memory_order_acquire) == FD_UNHEARD;
}
static inline bool fdtable_claim_heard(struct fd_entry *e)
{
    int want = FD_UNHEARD;
    return atomic_compare_exchange_strong(&e->heard, &want, FD_HEARD);
}
static inline bool fdtable_claim_dropped(struct fd_entry *e)
{
    int want = FD_UNHEARD;
    return atomic_compare_exchange_strong(&e->heard, &want, FD_DROPPED);
}
static inline void *fdtable_take_engine_conn(struct fd_entry *e)
{
    void *conn = e->engine_conn;
    e->engine_conn = NULL;
    return conn;
}
/* the inline answer that ended a connection the engine never heard dropped it: its end
 * is gone, and the app's next write is taken as TCP takes the first after a FIN */
static inline void fdtable_end_unheard(struct fd_entry *e)
{
    e->engine_conn = NULL;
    e->engine_fd = -1;
    atomic_store(&e->takes_one_more_write, 1);
}
static inline void fdtable_take_next_write(struct fd_entry *e) { atomic_store(&e->takes_one_more_write, 1); }
static inline bool fdtable_next_write_taken(struct fd_entry *e)
{
    return atomic_load_explicit(&e->takes_one_more_write, memory_order_relaxed)   /* (a plain load for every other write) */
           && atomic_exchange(&e->takes_one_more_write, 0);
}
/* an upstream socket libcurl sends on (acks at once: hooks_io.c), and whether it is a
 * connection the app's own connect made, which libcurl will connect() again */
void fdtable_mark_upstream_socket(int fd, int upstream, bool connected_already);
static inline bool fdtable_connected_already(struct fd_entry *e)
{
    return atomic_load(&e->connected_already) && atomic_exchange(&e->connected_already, 0);
}
static inline bool fdtable_acks_at_once(const struct fd_entry *e)
{
    return atomic_load_explicit(&e->acks_at_once, memory_order_relaxed) != 0;
}
/* The engine's object for an engine fd (a connection's end of its socketpair): set and
 * read by the engine; let go of by whoever ends that connection (the engine, or the app
 * thread that drops one the engine never heard, which the engine never looked up). */
static inline void fdtable_set_owner(int fd, void *owner)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (e)
        e->owner = owner;
}
static inline void *fdtable_owner(int fd)
{
    struct fd_entry *e = fdtable_slot(fd);
    return e && atomic_load(&e->kind) == FD_ENGINE ? e->owner : NULL;
}
static inline void fdtable_release_owner(int fd, const void *owner)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (e && e->owner == owner)
        e->owner = NULL;
}
#endif
