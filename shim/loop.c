/* loop.c — owns the engine's event loop: the epoll set, a wake-up eventfd, one timerfd
 * behind a min-heap of timers, and frees deferred to the end of the batch. Dispatch is
 * by the handler each registration carries: the loop has no list of kinds. */
#include "loop.h"
#include "clock.h"
#include "fdtable.h"
#include "log.h"
#include "real.h"
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define LOOP_BATCH 64
#define HEAP_INITIAL 64

static struct {
    int epfd;
    struct loop_source wake, tick;      /* the eventfd and the timerfd */
    void (*after_dispatch)(void);
    struct loop_timer **heap;           /* min-heap on due_us */
    size_t n_timers, heap_cap;
    int64_t programmed_us;              /* what the timerfd is set to; 0: nothing pending */
    struct loop_deferred *deferred;
    int64_t busy_poll_us;               /* loop_set_busy_poll */
    const char *cpu_pressure_path;
    bool stopping;                      /* loop_stop: loop_run returns after this batch */
} L = { .epfd = -1, .wake = { .fd = -1 }, .tick = { .fd = -1 } };


/* ---- file descriptors ---- */

static int ctl(int op, int fd, uint32_t events, struct loop_source *src)
{
    struct epoll_event ev = { .events = events, .data.ptr = src };
    return real_epoll_ctl(L.epfd, op, fd, &ev);
}

int loop_add(struct loop_source *src, int fd, uint32_t events, loop_io_fn on_io)
{
    src->on_io = on_io;
    src->fd = fd;
    src->events = events;
    src->active = true;                 /* before the kernel can report anything */
    if (ctl(EPOLL_CTL_ADD, fd, events, src) != 0) {
        src->active = false;
        return -1;
    }
    return 0;
}

int loop_watch(struct loop_source *src, uint32_t events)
{
    if (!src->active)
        return -1;
    if (events == src->events)
        return 0;
    src->events = events;
    return ctl(EPOLL_CTL_MOD, src->fd, events, src);
}

void loop_remove(struct loop_source *src)
{
    if (!src->active)
        return;
    src->active = false;
    real_epoll_ctl(L.epfd, EPOLL_CTL_DEL, src->fd, NULL);
}

int loop_move(struct loop_source *from, struct loop_source *to, uint32_t events, loop_io_fn on_io)
{
    if (!from->active)
        return -1;
    to->on_io = on_io;
    to->fd = from->fd;
    to->events = events;
    to->active = true;
    if (ctl(EPOLL_CTL_MOD, from->fd, events, to) != 0) {
        to->active = false;
        return -1;
    }
    from->active = false;
    return 0;
}

/* ---- timers: a binary min-heap; each timer knows its slot, so cancelling is O(log n) ---- */

static void heap_set(size_t i, struct loop_timer *t)
{
    L.heap[i] = t;
    t->slot = i + 1;
}

static void sift_up(size_t i)
{
    struct loop_timer *t = L.heap[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (L.heap[parent]->due_us <= t->due_us)
            break;
        heap_set(i, L.heap[parent]);
        i = parent;
    }
    heap_set(i, t);
}

static void sift_down(size_t i)
{
    struct loop_timer *t = L.heap[i];
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= L.n_timers)
            break;
        if (child + 1 < L.n_timers && L.heap[child + 1]->due_us < L.heap[child]->due_us)
            child++;
        if (L.heap[child]->due_us >= t->due_us)
            break;
        heap_set(i, L.heap[child]);
        i = child;
    }
    heap_set(i, t);
}

void loop_timer_cancel(struct loop_timer *t)
{
    if (!t->slot)
        return;
    size_t i = t->slot - 1;
    t->slot = 0;
    if (i >= L.n_timers || L.heap[i] != t)
        return;                         /* armed in the parent of this forked child */
    struct loop_timer *last = L.heap[--L.n_timers];
    if (i == L.n_timers)
        return;
    heap_set(i, last);
    sift_down(i);
    sift_up(last->slot - 1);
}

int loop_timer_arm(struct loop_timer *t, int64_t delay_ms, loop_timer_fn on_fire)
{
    loop_timer_cancel(t);
    if (L.n_timers == L.heap_cap) {
        size_t cap = L.heap_cap ? L.heap_cap * 2 : HEAP_INITIAL;
        struct loop_timer **h = realloc(L.heap, cap * sizeof *h);
        if (!h)
            return -1;
        L.heap = h;
        L.heap_cap = cap;
    }
    t->on_fire = on_fire;
    t->due_us = clock_mono_us() + (delay_ms > 0 ? delay_ms * 1000 : 0);
    heap_set(L.n_timers++, t);
    sift_up(L.n_timers - 1);
    return 0;
}

/* Fires every timer due now. A callback that re-arms for "now" waits for the next round
 * (at most as many firings as there were timers), so no timer can starve the loop. */
static void fire_due_timers(void)
{
    if (!L.n_timers)
        return;
    int64_t now = clock_mono_us();
    size_t budget = L.n_timers;
    while (L.n_timers && budget-- && L.heap[0]->due_us <= now) {
        struct loop_timer *t = L.heap[0];
        loop_timer_cancel(t);
        t->on_fire(t);
        if (L.after_dispatch)
            L.after_dispatch();
    }
}

/* Sets the timerfd for the earliest timer, only when that is sooner than what it is set
 * to: an early expiry costs one empty wake-up, a system call per re-arm would cost more. */
static void program_timerfd(void)
{
    if (!L.n_timers)
        return;
    int64_t due = L.heap[0]->due_us;
    if ((L.programmed_us && L.programmed_us <= due) || due <= clock_mono_us())
        return;                         /* (one due already: the loop does not wait) */
    due -= clock_offset_us();           /* the kernel's clock, without a test's advance */
    if (due < 1)
        due = 1;                        /* zero would disarm */
    struct itimerspec its = { .it_value = { .tv_sec = due / 1000000, .tv_nsec = (due % 1000000) * 1000 } };
    if (timerfd_settime(L.tick.fd, TFD_TIMER_ABSTIME, &its, NULL) == 0)
        L.programmed_us = L.heap[0]->due_us;
}

void loop_clock_moved(void)
{
    L.programmed_us = 0;                /* set the timerfd again, for the moved clock */
}

static void on_tick(struct loop_source *src, uint32_t events)
{
    (void)events;
    uint64_t expirations;
    ssize_t r = read(src->fd, &expirations, sizeof expirations);
    (void)r;
    L.programmed_us = 0;                /* fired: the due timers run at the end of the batch */
}

/* ---- wake-up and deferred work ---- */

/* A wake-up asked for and not yet taken: the eventfd is written once for any number of
 * asks (each an app thread's system call, and an interrupt of the engine's core). The
 * engine empties the eventfd first and clears the flag after, then looks at what it was
 * woken for (after_dispatch): an ask between the two leaves the eventfd readable, one
 * after them finds the flag clear and writes; cleared first, a write between the two
 * would be read away with the flag left set, and no ask would ever write again. Both
 * sides swap the flag (a full barrier), so the engine sees what an ask published. */
static atomic_bool wake_pending;

static void on_wake(struct loop_source *src, uint32_t events)
{
    (void)events;
    uint64_t v;
    ssize_t r = read(src->fd, &v, sizeof v);
    (void)r;
    atomic_exchange(&wake_pending, false);
}

void loop_wake(void)
{
    uint64_t one = 1;
    if (L.wake.fd >= 0 && !atomic_exchange(&wake_pending, true)) {
        ssize_t r = real_write(L.wake.fd, &one, sizeof one);
        (void)r;
    }
}

void loop_defer(struct loop_deferred *d, loop_deferred_fn run)
{
    d->run = run;
    d->next = L.deferred;
    L.deferred = d;
}

static void run_deferred(void)
{
    while (L.deferred) {
        struct loop_deferred *d = L.deferred;
        L.deferred = d->next;
        d->run(d);
    }
}

/* ---- the loop ---- */

int loop_init(void (*after_dispatch)(void))
{
    L.after_dispatch = after_dispatch;
    L.epfd = fdtable_raise(epoll_create1(EPOLL_CLOEXEC));
    int wakefd = fdtable_raise(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    int tickfd = fdtable_raise(timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
    if (L.epfd >= 0)
        fdtable_mark_engine(L.epfd);
    if (wakefd >= 0)
        fdtable_mark_engine(wakefd);
    if (tickfd >= 0)
        fdtable_mark_engine(tickfd);
    if (L.epfd < 0 || wakefd < 0 || tickfd < 0 || loop_add(&L.wake, wakefd, EPOLLIN, on_wake) != 0
        || loop_add(&L.tick, tickfd, EPOLLIN, on_tick) != 0)
        return -1;
    return 0;
}

void loop_set_busy_poll(int64_t micros, const char *cpu_pressure_path)
{
    L.busy_poll_us = micros > 0 ? micros : 0;
    L.cpu_pressure_path = cpu_pressure_path;
}

/* Busy polling: on these machines a thread asleep in epoll_wait takes tens of
 * microseconds to run again once woken (an idle virtual CPU halts and exits to the
 * host; an interrupt brings it back), and a request through the engine pays that twice
 * (the app's bytes, the upstream's or Redis's answer), where the app without the shim
 * pays it once. So after a batch the loop may poll (epoll_wait with no wait, yielding
 * the CPU between polls to any thread that wants it) for up to busy_poll_us before it
 * sleeps. It polls while it has credit: a batch with I/O that came within the window of
 * the one before (whether the loop polled or slept for it) earns one, up to
 * POLL_CREDIT_MAX; a poll that runs out spends one. So each wasted poll was paid for by
 * an event that came soon, and quiet or far-apart traffic never polls. A batch of the
 * wake-up alone (stash and graveyard chores, a Redis client's connect announced) may
 * start a poll but earns nothing, and one of the tick timer alone counts for nothing. */
#define POLL_CREDIT_MAX 8

/* What the loop did, for the stats (read from any thread: relaxed counters). */
static struct {
    _Atomic uint64_t sleeps, polls, polls_paid, poll_us;
} counted;
#define COUNT(field, n) atomic_fetch_add_explicit(&counted.field, (n), memory_order_relaxed)

void loop_read_counters(struct loop_counters *out)
{
    out->sleeps = atomic_load_explicit(&counted.sleeps, memory_order_relaxed);
    out->polls = atomic_load_explicit(&counted.polls, memory_order_relaxed);
    out->polls_paid = atomic_load_explicit(&counted.polls_paid, memory_order_relaxed);
    out->poll_us = atomic_load_explicit(&counted.poll_us, memory_order_relaxed);
    out->busy_poll_us = L.busy_poll_us;
}

/* Polling takes a CPU that another thread or process may be waiting for: the loop polls
 * only while the kernel's CPU pressure (/proc/pressure/cpu, "some avg10": the share of
 * the last 10 s in which some task waited for a CPU) is under POLL_MAX_CPU_PRESSURE
 * percent, read at most every 100 ms. (Measured: 4 test processes at a time on 2 CPUs put
 * it at 25-30 %, and polling engines cost that suite 18 % of its time.) Without pressure
 * information the loop polls. */
#define POLL_MAX_CPU_PRESSURE 10.0

static bool cpu_to_spare(int64_t now)
{
    static int64_t checked;
    static bool spare = true;
    if (checked && now - checked < 100000)
        return spare;
    checked = now;
    int fd = L.cpu_pressure_path ? open(L.cpu_pressure_path, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0)
        return spare = true;
    char buf[256];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    real_close(fd);
    buf[n > 0 ? n : 0] = 0;
    const char *avg = strstr(buf, "some avg10=");
    spare = !avg || strtod(avg + strlen("some avg10="), NULL) < POLL_MAX_CPU_PRESSURE;
    return spare;
}

void loop_run(void)
{
    struct epoll_event evs[LOOP_BATCH];
    int64_t batch_end = 0;             /* when the last batch with work ended */
    int credit = 0;
    bool poll = false;
    while (!L.stopping) {
        /* a timer due already (a 0 ms one: "after this batch") is run after a look at the
         * I/O, without the timerfd */
        bool timer_due = L.n_timers && L.heap[0]->due_us <= clock_mono_us();
        if (!poll && !timer_due)
            COUNT(sleeps, 1);
        int n = epoll_wait(L.epfd, evs, LOOP_BATCH, poll || timer_due ? 0 : -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            shim_log("engine: epoll_wait failed: %s", strerror(errno));
            return;
        }
        if (n == 0 && !timer_due) {
            int64_t now = clock_mono_us();
            if (poll && now - batch_end < L.busy_poll_us) {
                sched_yield();
            } else {
                if (poll)
                    COUNT(poll_us, (uint64_t)(now - batch_end));
                poll = false;
                if (credit > 0)
                    credit--;
            }
            continue;
        }
        bool work = false, io = false;
        for (int i = 0; i < n; i++) {
            work = work || evs[i].data.ptr != &L.tick;
            io = io || (evs[i].data.ptr != &L.tick && evs[i].data.ptr != &L.wake);
        }
        if (poll && work) {                /* the poll caught what a sleep would have waited for */
            COUNT(polls_paid, 1);
            COUNT(poll_us, (uint64_t)(clock_mono_us() - batch_end));
        }
        if (io && L.busy_poll_us && batch_end && clock_mono_us() - batch_end <= L.busy_poll_us
            && credit < POLL_CREDIT_MAX)
            credit++;
        for (int i = 0; i < n; i++) {
            struct loop_source *src = evs[i].data.ptr;
            if (!src->active)
                continue;              /* removed earlier in this batch */
            src->on_io(src, evs[i].events);
            if (L.after_dispatch)
                L.after_dispatch();
        }
        fire_due_timers();
        run_deferred();
        program_timerfd();
        if (work) {
            batch_end = clock_mono_us();
            poll = credit > 0 && cpu_to_spare(batch_end);
            if (poll)
                COUNT(polls, 1);
        }
    }
}

void loop_stop(void) { L.stopping = true; }

void loop_forget(void)
{
    /* The timers and deferred work named the parent's objects: the child never runs
     * them. Only plain stores here (async-signal-safe). */
    L.epfd = L.wake.fd = L.tick.fd = -1;
    L.stopping = false;
    atomic_store(&wake_pending, false);
    L.wake.active = L.tick.active = false;
    L.n_timers = 0;
    L.programmed_us = 0;
    L.deferred = NULL;
}
