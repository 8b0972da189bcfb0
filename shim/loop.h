/* loop.h — the engine's event loop (loop.c), in the manner of Redis's ae.c: file
 * descriptors and timers register with a handler of their own, and the loop knows
 * nothing of what they are. One thread runs it; registrations may be added from any
 * thread, everything else happens on the loop's thread.
 *
 * Lifetimes: an event for a source may already be queued in the batch being dispatched
 * when the source is removed; the loop drops it, as long as the memory of the source is
 * still there. So memory that holds a source is freed through loop_defer(), which runs
 * after the current batch. A cancelled timer can be freed at once. */
#ifndef HTTPSHIM_LOOP_H
#define HTTPSHIM_LOOP_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct loop_source;
typedef void (*loop_io_fn)(struct loop_source *src, uint32_t events);
struct loop_source {
    loop_io_fn on_io;
    int fd;
    uint32_t events;                /* what epoll watches now */
    bool active;                    /* registered; once false, nothing more is dispatched */
};

/* Registers fd for `events` (EPOLLIN, EPOLLOUT...). Safe from any thread. 0, or -1. */
int loop_add(struct loop_source *src, int fd, uint32_t events, loop_io_fn on_io);
/* How long the loop polls for events after a batch when they have been coming close
 * together (0: it always sleeps in epoll_wait), and where it reads whether the CPUs have
 * time to spare (the kernel's /proc/pressure/cpu); see loop_run. */
void loop_set_busy_poll(int64_t micros, const char *cpu_pressure_path);
/* What the loop did: sleeps in epoll_wait, polls started after a batch, those that caught
 * an event, and the time spent polling (microseconds); and the configured window. */
struct loop_counters { uint64_t sleeps, polls, polls_paid, poll_us; int64_t busy_poll_us; };
void loop_read_counters(struct loop_counters *out);
/* Changes what src waits for; no system call when nothing changes. */
int loop_watch(struct loop_source *src, uint32_t events);
/* Leaves the epoll set (explicitly: close() alone does not while a forked child holds a
 * copy of the fd). Events already queued for src are not dispatched. Idempotent. */
void loop_remove(struct loop_source *src);
/* Hands the fd registered by `from` to `to`, with one epoll_ctl and no window in which
 * it is unwatched; `from` is then removed. */
int loop_move(struct loop_source *from, struct loop_source *to, uint32_t events, loop_io_fn on_io);

struct loop_timer;
typedef void (*loop_timer_fn)(struct loop_timer *timer);
struct loop_timer {
    loop_timer_fn on_fire;
    int64_t due_us;                 /* CLOCK_MONOTONIC */
    size_t slot;                    /* place in the heap + 1; 0 when not armed */
};

/* (Re)arms the timer to fire once, delay_ms from now (0: after the current batch). A
 * timer fires at most once per arming. -1 when the heap cannot grow (not armed then). */
int loop_timer_arm(struct loop_timer *timer, int64_t delay_ms, loop_timer_fn on_fire);
/* A cancelled timer never fires; cancelling one that is not armed does nothing. */
void loop_timer_cancel(struct loop_timer *timer);
static inline bool loop_timer_armed(const struct loop_timer *timer) { return timer->slot != 0; }

struct loop_deferred;
typedef void (*loop_deferred_fn)(struct loop_deferred *deferred);
struct loop_deferred { struct loop_deferred *next; loop_deferred_fn run; };
/* Runs `run` once the current batch of events has been dispatched (frees go here). */
void loop_defer(struct loop_deferred *deferred, loop_deferred_fn run);

/* Creates the epoll set, the wake-up eventfd and the timerfd behind every timer.
 * after_dispatch (may be NULL) runs after every handler and timer callback. */
int loop_init(void (*after_dispatch)(void));
/* Dispatches until epoll fails; on the loop's own thread. */
void loop_run(void);
/* Makes the loop go round once (from any thread). */
void loop_wake(void);
/* loop_run returns once the batch under way is done (the engine's thread then ends). */
void loop_stop(void);
/* Forked child: the loop's fds went with the other engine fds; start from nothing. */
void loop_forget(void);
/* The test clock moved forward (clock.h): the timers due by now fire at the end of this
 * batch, and the timerfd is set again. */
void loop_clock_moved(void);
#endif
