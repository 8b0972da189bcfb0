/* fdtable.c — owns the table of file descriptors the library cares about: app fds it
 * diverted (with the peer address and the options the app set) and the engine's own
 * fds (which the app may not close). Indexed by fd number, mmap'ed once, never freed,
 * never allocates afterwards: the close path uses it from any thread, even a signal
 * handler. Entries go stale when libc closes an fd behind our back, so a diverted
 * entry is trusted only while the fd's inode still matches. Also the fds the shim holds
 * only to be faster (the graveyard, the stash of socketpairs made ahead) and how it lets
 * them go when the app runs out of fds. */
#include "fdtable.h"
#include "clock.h"
#include "real.h"
#include "stats.h"
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/select.h>
#include <sys/stat.h>

struct fd_entry *fdtable_base;
_Atomic unsigned fdtable_fork_count;
_Atomic int fdtable_diverted_limit;
pid_t fdtable_pid;
#if defined(__x86_64__)
_Atomic unsigned fdtable_vforks;       /* counted by the vfork trampoline (hooks.c) */
#else
_Atomic unsigned fdtable_vforks = 1;   /* no trampoline here: every close that matters asks */
#endif
#define table fdtable_base
static _Atomic int engine_fd_limit;      /* one past the highest fd ever marked engine */

static pthread_once_t init_once = PTHREAD_ONCE_INIT;

/* the graveyard and the stash (below) */
static atomic_flag stash_lock;
static _Atomic int n_stash;
#define GRAVE_MAX  256
#define GRAVE_WAKE 128                 /* this many waiting: the engine closes them at once */
static atomic_flag grave_lock = ATOMIC_FLAG_INIT;
static int grave[GRAVE_MAX];
static _Atomic int n_grave;
static int fd_limit;                   /* RLIMIT_NOFILE when first asked (0: not yet) */


static void map_table(void)
{
    void *p = mmap(NULL, sizeof(struct fd_entry) * FDTABLE_MAX, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p != MAP_FAILED)
        table = p;
    fdtable_pid = getpid();
}

int fdtable_init(void)
{
    pthread_once(&init_once, map_table);
    return table ? 0 : -1;
}

struct fd_entry *fdtable_slot(int fd)
{
    if (!table || fd < 0 || fd >= FDTABLE_MAX)
        return NULL;
    return &table[fd];
}

static struct fd_entry *entry_of_kind(int fd, int kind)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (!e || atomic_load_explicit(&e->kind, memory_order_acquire) != kind)
        return NULL;
    struct stat st;
    if (real_fstat(fd, &st) != 0 || st.st_ino != e->ino || st.st_dev != e->dev) {
        atomic_store(&e->kind, FD_NONE);    /* libc closed it without telling us */
        return NULL;
    }
    return e;
}

struct fd_entry *fdtable_diverted(int fd)
{
    return entry_of_kind(fd, FD_DIVERTED);
}

static __thread int thread_last_divert = -1;

void fdtable_note_thread_divert(int fd) { thread_last_divert = fd; }

struct fd_entry *fdtable_diverted_by_this_thread(void)
{
    return thread_last_divert >= 0 ? fdtable_diverted(thread_last_divert) : NULL;
}

struct fd_entry *fdtable_probing(int fd)
{
    return entry_of_kind(fd, FD_PROBING);
}

void fdtable_mark_engine(int fd)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (e) {
        int limit = atomic_load(&engine_fd_limit);
        while (fd >= limit && !atomic_compare_exchange_weak(&engine_fd_limit, &limit, fd + 1))
            ;
        atomic_store(&e->n_epoll, 0);
        atomic_store(&e->connected_already, 0);
        atomic_store(&e->acks_at_once, 0);
        atomic_store_explicit(&e->kind, FD_ENGINE, memory_order_release);
    }
}

void fdtable_publish_diverted(int fd, const struct fdtable_divert *d)
{
    struct fd_entry *e = fdtable_slot(fd);
    e->dev = d->dev;
    e->ino = d->ino;
    e->peer = d->peer;
    e->peer_len = d->peer_len;
    e->upstream = d->upstream;
    e->forks_at_divert = fdtable_forks();
    e->pid_at_divert = fdtable_pid;
    e->engine_fd = d->engine_fd;
    e->engine_conn = d->engine_conn;
    atomic_store(&e->heard, FD_UNHEARD);
    atomic_store(&e->takes_one_more_write, 0);
    e->n_opts = 0;
    atomic_store(&e->n_epoll, d->n_epoll);
    atomic_store_explicit(&e->made, MADE_OTHER, memory_order_relaxed);   /* connected now */
    atomic_store_explicit(&e->kind, FD_DIVERTED, memory_order_release);
    fdtable_note_diverted(fd);
}

void fdtable_mark_upstream_socket(int fd, int upstream, bool connected_already)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (!e)
        return;
    if (connected_already)
        atomic_store(&e->connected_already, 1);
    e->upstream = upstream;            /* which gauge the close decrements */
    atomic_store(&e->acks_at_once, 1);
}

void fdtable_clear(int fd)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (e && (atomic_load_explicit(&e->kind, memory_order_relaxed) != FD_NONE
              || atomic_load_explicit(&e->n_epoll, memory_order_relaxed) != 0
              || atomic_load_explicit(&e->made, memory_order_relaxed) != MADE_UNKNOWN)) {
        atomic_store(&e->kind, FD_NONE);
        atomic_store_explicit(&e->made, MADE_UNKNOWN, memory_order_relaxed);
        atomic_store(&e->n_epoll, 0);
        atomic_store(&e->connected_already, 0);
        atomic_store(&e->acks_at_once, 0);
    }
    if (e && atomic_load_explicit(&e->peer_gone, memory_order_relaxed) && atomic_exchange(&e->peer_gone, 0))
        STAT_DEC(e->upstream, pool_gone);
    /* (a write the closed connection's end would have taken is not the next file's) */
    if (e && atomic_load_explicit(&e->takes_one_more_write, memory_order_relaxed))
        atomic_store(&e->takes_one_more_write, 0);
}

void fdtable_note_peer_gone(int fd)
{
    struct fd_entry *e = fdtable_slot(fd);
    if (e && atomic_load(&e->kind) == FD_ENGINE && e->upstream >= 0 && !atomic_exchange(&e->peer_gone, 1))
        STAT_INC(e->upstream, pool_gone);
}

bool fdtable_is_engine(int fd)
{
    struct fd_entry *e = fdtable_slot(fd);
    return e && atomic_load_explicit(&e->kind, memory_order_acquire) == FD_ENGINE;
}

void fdtable_copy(int from, int to)
{
    struct fd_entry *dst = fdtable_slot(to);
    if (!dst)
        return;
    struct fd_entry *made = fdtable_slot(from);
    struct fd_entry *src = fdtable_diverted(from);
    if (!src) {
        /* two fds on one socket: diverting one would leave the other on a socket that is
         * never connected, and a connection the app holds twice is never the pool's */
        if (made)
            atomic_store_explicit(&made->made, MADE_OTHER, memory_order_relaxed);
        fdtable_clear(to);
        atomic_store_explicit(&dst->made, MADE_OTHER, memory_order_relaxed);
        return;
    }
    /* two fds on one connection: no inline answers on either, so nothing can overtake */
    fdgate_shut(&src->gate);
    fdgate_shut_next(&dst->gate);
    atomic_store(&dst->kind, FD_NONE);
    atomic_store(&dst->takes_one_more_write, 0);   /* (the one write TCP takes is the original's) */
    dst->engine_fd = src->engine_fd;
    dst->engine_conn = NULL;           /* only the original's close may drop the connection */
    atomic_store(&dst->heard, FD_HEARD);
    dst->dev = src->dev;
    dst->ino = src->ino;
    dst->peer = src->peer;
    dst->peer_len = src->peer_len;
    dst->upstream = src->upstream;
    dst->n_opts = src->n_opts;
    memcpy(dst->opts, src->opts, sizeof dst->opts);
    atomic_store(&dst->n_epoll, 0);
    atomic_store_explicit(&dst->made, MADE_UNKNOWN, memory_order_relaxed);
    atomic_store_explicit(&dst->kind, FD_DIVERTED, memory_order_release);
    fdtable_note_diverted(to);
}

int fdtable_engine_fd_limit(void)
{
    return atomic_load(&engine_fd_limit);
}

void fdtable_close_engine_fds(void)
{
    atomic_store(&n_grave, 0);         /* (a forked child: buried and stashed fds are engine */
    atomic_flag_clear(&grave_lock);    /* fds, closed below) */
    atomic_store(&n_stash, 0);
    atomic_flag_clear(&stash_lock);
    if (!table)
        return;
    int limit = atomic_load(&engine_fd_limit);
    for (int fd = 0; fd < limit; fd++)
        if (atomic_load_explicit(&table[fd].kind, memory_order_relaxed) == FD_ENGINE) {
            atomic_store(&table[fd].kind, FD_NONE);
            real_close(fd);
        }
    /* the parent's connections behind the child's diverted fds are gone with its engine
     * (and the kept references to their app ends were engine fds, closed above) */
    for (int fd = 0; fd < FDTABLE_MAX; fd++) {
        if (atomic_load_explicit(&table[fd].kept_app_end, memory_order_relaxed))
            atomic_store(&table[fd].kept_app_end, 0);   /* (a write only where needed: the table's */
                                                        /* untouched pages stay unallocated) */
        if (table[fd].engine_conn) {
            table[fd].engine_conn = NULL;
            atomic_store(&table[fd].heard, FD_HEARD);
            fdgate_shut(&table[fd].gate);   /* (no thread of the child holds it) */
        }
    }
}

void fdtable_close_kept_app_end(struct fd_entry *e)
{
    int kept = atomic_exchange(&e->kept_app_end, 0);
    if (kept) {
        atomic_store(&e->n_epoll, 0);  /* (noted only while it was kept) */
        fdtable_close_engine_fd(kept - 1);
    }
}

int fdtable_close_engine_fd(int fd)
{
    fdtable_clear(fd);
    return real_close(fd);
}

/* RLIMIT_NOFILE (at most FDTABLE_MAX), read once, when first asked */
static int process_fd_limit(void)
{
    if (!fd_limit) {
        struct rlimit rl;
        fd_limit = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)FDTABLE_MAX ? (int)rl.rlim_cur
                                                                                           : FDTABLE_MAX;
    }
    return fd_limit;
}

bool fdtable_in_lower_half(int fd)
{
    return fd < process_fd_limit() / 2;
}

bool fdtable_in_top_quarter(int fd)
{
    int limit = process_fd_limit();
    return fd >= limit - limit / 4;
}

/* ---- the graveyard: closes the app's thread hands to the engine ----
 * Closing a socket costs microseconds (a TCP socket's teardown 3 to 4, a Unix socket's 1
 * to 2 on the machines measured): the sockets a diverted connection leaves behind (the
 * app's TCP socket swapped out at connect, the engine's end of a connection answered
 * inline) are handed to the engine, which closes them in batches, off the app's latency:
 * the first fd buried wakes it, and it closes what has gathered 10 ms later (at once when
 * GRAVE_WAKE have), a slice at a time with the loop's I/O between slices (128 closes in
 * one go would hold a request that came in meanwhile half a millisecond). Bounded: GRAVE_MAX fds, and only fds below half the process's fd
 * limit, so the app never runs out of fds for the shim's sake; a full graveyard, a lock
 * held (even by a thread this signal handler interrupted) or a high fd is closed by the
 * caller. */
int fdtable_bury(int fd)
{
    if (!fdtable_in_lower_half(fd) || atomic_flag_test_and_set_explicit(&grave_lock, memory_order_acquire)) {
        fdtable_close_engine_fd(fd);
        return -1;
    }
    int n = atomic_load_explicit(&n_grave, memory_order_relaxed);
    if (n == GRAVE_MAX) {
        atomic_flag_clear_explicit(&grave_lock, memory_order_release);
        fdtable_close_engine_fd(fd);
        return -1;
    }
    grave[n++] = fd;
    atomic_store_explicit(&n_grave, n, memory_order_relaxed);
    atomic_flag_clear_explicit(&grave_lock, memory_order_release);
    return n == 1 || n == GRAVE_WAKE;
}

int fdtable_graveyard(void)
{
    int n = atomic_load_explicit(&n_grave, memory_order_relaxed);
    return n >= GRAVE_WAKE ? 2 : n > 0;
}

int fdtable_drain_graveyard(int max)
{
    if (!atomic_load_explicit(&n_grave, memory_order_relaxed)
        || atomic_flag_test_and_set_explicit(&grave_lock, memory_order_acquire))
        return atomic_load_explicit(&n_grave, memory_order_relaxed);   /* an app thread is burying: next time */
    int fds[GRAVE_MAX], n = atomic_load_explicit(&n_grave, memory_order_relaxed);
    int take = n < max ? n : max;
    memcpy(fds, grave + (n - take), (size_t)take * sizeof fds[0]);
    atomic_store_explicit(&n_grave, n - take, memory_order_relaxed);
    atomic_flag_clear_explicit(&grave_lock, memory_order_release);
    for (int i = 0; i < take; i++)
        fdtable_close_engine_fd(fds[i]);
    return n - take;
}

/* ---- the stash: socketpairs made ahead by the engine ----
 * Making a socketpair costs microseconds (5 on the machines measured) that a diverted
 * connect would pay on the app's thread: the engine keeps a few made ahead, and a
 * connect takes one; once a quarter are gone the engine is woken to refill, so that a
 * burst of connects between two of its runs does not find it empty. Bounded (STASH_MAX
 * pairs, and no more than a sixteenth of the fd limit in fds, only below half of it: under
 * a limit of 128, 32 pairs would hold half of the app's fds); empty, the connect makes its
 * own. */
#define STASH_MAX 32                   /* a client's burst of connects between two engine runs */
static atomic_flag stash_lock = ATOMIC_FLAG_INIT;
static int stash[STASH_MAX][2];
/* each pair's app end as fstat saw it: a diverted fd's stale checks need its inode, and
 * the engine asks for it here, off the app's thread */
static struct { dev_t dev; ino_t ino; } stash_app_end[STASH_MAX];
static _Atomic int n_stash;

int fdtable_take_pair(int sv[2], dev_t *dev, ino_t *ino)
{
    if (!atomic_load_explicit(&n_stash, memory_order_relaxed)
        || atomic_flag_test_and_set_explicit(&stash_lock, memory_order_acquire))
        return -1;
    int n = atomic_load_explicit(&n_stash, memory_order_relaxed);
    if (n > 0) {
        sv[0] = stash[n - 1][0];
        sv[1] = stash[n - 1][1];
        *dev = stash_app_end[n - 1].dev;
        *ino = stash_app_end[n - 1].ino;
        atomic_store_explicit(&n_stash, n - 1, memory_order_relaxed);
    }
    atomic_flag_clear_explicit(&stash_lock, memory_order_release);
    if (n <= 0)
        return -1;
    return n - 1;
}

static int stash_cap(void)
{
    int pairs = process_fd_limit() / 32;
    return pairs < STASH_MAX ? pairs : STASH_MAX;
}

bool fdtable_stash_short(void)
{
    return atomic_load_explicit(&n_stash, memory_order_relaxed) < stash_cap();
}

void fdtable_refill_stash(void)
{
    if (fdtable_fd_pressure())
        return;                        /* the app ran out of fds a moment ago */
    int cap = stash_cap();
    for (int i = 0; i < cap && atomic_load_explicit(&n_stash, memory_order_relaxed) < cap; i++) {
        int sv[2];
        struct stat app_end;
        if (real_socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) != 0)
            return;
        sv[1] = fdtable_raise(sv[1]);  /* the engine's end lives as long as its connection */
        sv[0] = fdtable_raise(sv[0]);  /* and the app's, until a connect takes it, is not on
                                        * a number the app is owed: a daemon that closed its
                                        * stderr found it a stashed pair's, and what it wrote
                                        * there went upstream in another connection's request */
        if (!fdtable_in_lower_half(sv[1]) || sv[1] >= FDTABLE_MAX || fstat(sv[0], &app_end) != 0) {
            real_close(sv[0]);         /* the app's fds come first */
            real_close(sv[1]);
            return;
        }
        fdtable_mark_engine(sv[0]);
        fdtable_mark_engine(sv[1]);
        while (atomic_flag_test_and_set_explicit(&stash_lock, memory_order_acquire))
            ;                          /* (an app thread holds it for a few instructions) */
        int n = atomic_load_explicit(&n_stash, memory_order_relaxed);
        bool room = n < cap;
        if (room) {
            stash[n][0] = sv[0];
            stash[n][1] = sv[1];
            stash_app_end[n].dev = app_end.st_dev;
            stash_app_end[n].ino = app_end.st_ino;
            atomic_store_explicit(&n_stash, n + 1, memory_order_relaxed);
        }
        atomic_flag_clear_explicit(&stash_lock, memory_order_release);
        if (!room) {
            fdtable_close_engine_fd(sv[0]);
            fdtable_close_engine_fd(sv[1]);
            return;
        }
    }
}

/* ---- running out of fds ----
 * When the app's socket() finds the fd limit reached, what the shim holds only to be
 * faster is let go, and held back for a second: the socketpairs made ahead, the fds
 * waiting in the graveyard, and the spare references to app ends of connections answered
 * inline (the app's close is then the kernel's last again, as when the engine hears the
 * connection). */
static _Atomic int64_t fd_pressure_until_us;

bool fdtable_fd_pressure(void)
{
    int64_t until = atomic_load_explicit(&fd_pressure_until_us, memory_order_relaxed);
    return until && clock_mono_us() < until;
}

/* Long-lived fds of the engine's are moved up to this number (a quarter of the fd limit,
 * 256 at most): the small numbers are the app's to choose for a dup2 (a shell's
 * `exec 4>file`), and the app's own socket() calls take the lowest free ones anyway.
 * Where the limit leaves room, above FD_SETSIZE: an app with hundreds of files open that
 * waits with select() must get the numbers under 1024 it gets direct, not ones the
 * engine's pushed past what select() can watch (glibc aborts on those). */
static int raise_floor(void)
{
    int limit = process_fd_limit(), quarter = limit / 4;
    if (limit >= 4 * FD_SETSIZE)
        return FD_SETSIZE;
    return quarter < 256 ? quarter : 256;
}

static _Atomic int touching;           /* fd + 1 the engine writes through now, or 0 */

void fdtable_touch(int fd)
{
    atomic_store(&touching, fd + 1);   /* (seq_cst: before the entry is looked at) */
}

void fdtable_untouch(void)
{
    atomic_store(&touching, 0);
}

void fdtable_wait_untouched(int first, int last)
{
    for (int spins = 0; spins < 1000000; spins++) {   /* (one non-blocking send at most) */
        int t = atomic_load(&touching);
        if (!t || t - 1 < first || t - 1 > last)
            return;
        sched_yield();
    }
}

/* A close-on-exec duplicate of fd at the floor or above, or -1. */
static int dup_above_floor(int fd)
{
    int high = real_fcntl(fd, F_DUPFD_CLOEXEC, (void *)(intptr_t)raise_floor());
    if (high >= 0 && (!fdtable_in_lower_half(high) || high >= FDTABLE_MAX)) {
        real_close(high);
        return -1;
    }
    return high;
}

int fdtable_raise(int fd)
{
    if (fd < 0 || fd >= raise_floor())
        return fd;
    int high = dup_above_floor(fd);
    if (high < 0)
        return fd;
    real_close(fd);
    return high;
}

int fdtable_dup_high(int fd)
{
    int high = dup_above_floor(fd);
    return high >= 0 ? high : real_fcntl(fd, F_DUPFD_CLOEXEC, NULL);
}

bool fdtable_give_to_app(int fd)
{
    bool given = false;
    int other = -1;
    while (atomic_flag_test_and_set_explicit(&stash_lock, memory_order_acquire))
        ;
    int n = atomic_load_explicit(&n_stash, memory_order_relaxed);
    for (int i = 0; i < n && !given; i++)
        if (stash[i][0] == fd || stash[i][1] == fd) {
            other = stash[i][0] == fd ? stash[i][1] : stash[i][0];
            stash[i][0] = stash[n - 1][0];
            stash[i][1] = stash[n - 1][1];
            stash_app_end[i] = stash_app_end[n - 1];
            atomic_store_explicit(&n_stash, n - 1, memory_order_relaxed);
            given = true;
        }
    atomic_flag_clear_explicit(&stash_lock, memory_order_release);
    if (given) {
        fdtable_clear(fd);             /* (the app's dup2 closes it) */
        fdtable_close_engine_fd(other);
        return true;
    }
    /* a spare reference to the app's end of a connection answered inline: the connection's
     * own fd number stays, the spare goes (as it does once the engine hears the connection) */
    int limit = process_fd_limit();
    for (int i = 0; i < limit && table && i < FDTABLE_MAX; i++) {
        int want = fd + 1;
        if (atomic_load_explicit(&table[i].kind, memory_order_relaxed) == FD_DIVERTED
            && atomic_compare_exchange_strong(&table[i].kept_app_end, &want, 0)) {
            atomic_store(&table[i].n_epoll, 0);
            fdtable_clear(fd);
            return true;
        }
    }
    return false;
}

int fdtable_release_spares(void)
{
    atomic_store_explicit(&fd_pressure_until_us, clock_mono_us() + 1000000, memory_order_relaxed);
    int released = 0;
    if (!atomic_flag_test_and_set_explicit(&stash_lock, memory_order_acquire)) {
        int pairs[STASH_MAX][2];
        int n = atomic_load_explicit(&n_stash, memory_order_relaxed);
        memcpy(pairs, stash, (size_t)n * sizeof pairs[0]);
        atomic_store_explicit(&n_stash, 0, memory_order_relaxed);
        atomic_flag_clear_explicit(&stash_lock, memory_order_release);
        for (int i = 0; i < n; i++) {
            fdtable_close_engine_fd(pairs[i][0]);
            fdtable_close_engine_fd(pairs[i][1]);
            released += 2;
        }
    }
    int buried = atomic_load_explicit(&n_grave, memory_order_relaxed);
    int left = fdtable_drain_graveyard(GRAVE_MAX);
    released += buried > left ? buried - left : 0;
    for (int fd = 0, limit = process_fd_limit(); fd < limit; fd++) {
        struct fd_entry *e = fdtable_if_diverted(fd);
        if (e && atomic_load_explicit(&e->kept_app_end, memory_order_relaxed)) {
            fdtable_close_kept_app_end(e);
            released++;
        }
    }
    return released;
}

/* ---- a divert and a close of the same number, on two threads ---- */

#define DIVERT_WAIT_SPINS 20000        /* yields: a divert takes microseconds; a few ms at most */

void fdtable_divert_begin(struct fd_entry *e)
{
    for (int spins = 0; spins < DIVERT_WAIT_SPINS; spins++) {
        atomic_store(&e->diverting, 1);
        if (!atomic_load(&e->closing))
            return;
        atomic_store(&e->diverting, 0);   /* backing off, so that a close waiting for it goes on */
        sched_yield();
    }
    atomic_store(&e->diverting, 1);    /* (a close that never ends: the record decides) */
}

void fdtable_divert_end(struct fd_entry *e) { atomic_store(&e->diverting, 0); }

bool fdtable_close_begin(struct fd_entry *e)
{
    /* only a fresh TCP socket (or a real connect in progress) is ever diverted: a close
     * that blocks (SO_LINGER, a slow file) leaves no mark for a forked child to inherit
     * but on such a socket, and even that one is waited on a few ms at most */
    if (atomic_load_explicit(&e->made, memory_order_relaxed) != MADE_TCP
        && atomic_load_explicit(&e->kind, memory_order_relaxed) != FD_PROBING && !atomic_load(&e->diverting))
        return false;
    atomic_fetch_add(&e->closing, 1);
    for (int spins = 0; spins < DIVERT_WAIT_SPINS && atomic_load(&e->diverting); spins++)
        sched_yield();
    return true;
}

void fdtable_close_end(struct fd_entry *e) { atomic_fetch_sub(&e->closing, 1); }
