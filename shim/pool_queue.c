/* pool_queue.c — owns the pool under load (DESIGN: "The pool under load"): per upstream,
 * the slots in use (at most pool_max_per_host, in use + idle being libcurl's business) and
 * the requests waiting for one, oldest first, each at most pool_queue_timeout; the connect
 * probe of a cold upstream holds its queue (pool.c). A FIFO of its own because libcurl's
 * pending list does not promise its order (a waiter could watch newer requests go
 * ahead); libcurl's per-host cap stays as a backstop. Also how many connections libcurl
 * keeps: the busiest the pool has been in the last one to two seconds, plus pool_idle_max
 * per upstream. Engine thread only. */
#include "pool_queue.h"
#include "clock.h"
#include "log.h"
#include "loop.h"
#include "pool.h"
#include "stats.h"
#include <stddef.h>
#include <string.h>

struct queue {
    unsigned in_use;
    struct pool_slot *head, *tail;
    struct loop_timer timeout;      /* the oldest waiter's pool_queue_timeout */
    bool pump;                      /* a slot came free: admit waiters after this event */
};
static struct queue queues[RULES_MAX_UPSTREAMS];
static unsigned in_use_total;
static unsigned peak_now, peak_before;  /* in use at most, this second and the one before */
static struct loop_timer peak_timer;
static const struct shim_config *cfg;
static const struct pool_queue_ops *ops;

static void limit_idle(void);

void pool_queue_init(const struct shim_config *config, const struct pool_queue_ops *o)
{
    cfg = config;
    ops = o;
    limit_idle();
}

void pool_queue_forget(void)
{
    memset(queues, 0, sizeof queues);   /* the waiters were the parent's */
    in_use_total = peak_now = peak_before = 0;
    peak_timer.slot = 0;
}

/* libcurl counts busy connections in its cache too, and closes the oldest idle one when a
 * connection comes back to a full cache. Room for the busy ones alone would churn under
 * load (a burst of completions leaves many idle for an instant, they are closed, and the
 * next requests connect again), so the room is the busiest the pool has been in the last
 * one to two seconds, plus pool_idle_max per upstream: idle connections beyond that are
 * closed once the load has gone down. */
static void limit_idle(void)
{
    unsigned busy = peak_now > peak_before ? peak_now : peak_before;
    if (in_use_total > busy)
        busy = in_use_total;
    long keep = (long)busy + (long)cfg->pool_idle_max * (long)cfg->n_upstreams;
    ops->keep_connections(keep > 0 ? keep : 1L);
}

static void on_peak_second(struct loop_timer *timer)
{
    peak_before = peak_now;
    peak_now = in_use_total;
    limit_idle();
    if (peak_before || in_use_total)
        loop_timer_arm(timer, 1000, on_peak_second);
}

/* A probe in flight holds the upstream's transfers until its handshake is seen complete
 * (pool.c). The connects made for real meanwhile (the probe, those alongside it) bring
 * connections that join the pool once their apps ask: they count against the cap, so the
 * transfers let go never make libcurl dial past it (under a cap of 1 they wait for the
 * probe's connection). */
static bool probe_holds_queue(int upstream)
{
    return pool_probe_holds(upstream) && !pool_probe_connected(upstream);
}

/* The process ran out of fds for an upstream socket (EMFILE, ENFILE): until a second has
 * passed without that, no more transfers run at once than were running then, so that a
 * waiter is sent on a connection another leaves idle instead of needing a socket of its
 * own (the app near its fd limit: each diverted connection costs the engine fds). */
static unsigned fd_ceiling;
static int64_t fd_short_until_us, fd_hold_until_us;
#define FD_SHORT_HOLD_US 20000         /* none running to wait for: tried again this much later */

void pool_queue_fd_short(void)
{
    int64_t now = clock_mono_us();
    fd_ceiling = in_use_total > 1 ? in_use_total - 1 : 1;   /* (the one that ran short still counts) */
    fd_short_until_us = now + 1000000;
    if (in_use_total <= 1)             /* no connection to come free: not again at once (no spin) */
        fd_hold_until_us = now + FD_SHORT_HOLD_US;
}

static bool fd_room(void)
{
    int64_t now = fd_ceiling ? clock_mono_us() : 0;
    if (fd_ceiling && now >= fd_short_until_us)
        fd_ceiling = 0;
    return !fd_ceiling || (in_use_total < fd_ceiling && now >= fd_hold_until_us);
}

static unsigned queue_cap(int upstream)
{
    if (!fd_room())
        return 0;
    unsigned cap = rules_pool_max(cfg, &cfg->upstreams[upstream]);
    unsigned coming = (unsigned)pool_connects_in_flight(upstream);
    return coming < cap ? cap - coming : 0;
}

static int admit(struct pool_slot *s)
{
    if (ops->admit(s) != 0)
        return -1;
    s->admitted = true;
    queues[s->upstream].in_use++;
    in_use_total++;
    if (in_use_total > peak_now)
        peak_now = in_use_total;
    if (!loop_timer_armed(&peak_timer))
        loop_timer_arm(&peak_timer, 1000, on_peak_second);
    limit_idle();
    if (s->queued_us)
        stats_observe_queue_wait(s->upstream, clock_mono_us() - s->queued_us);
    return 0;
}

static void unqueue(struct pool_slot *s)
{
    struct queue *q = &queues[s->upstream];
    if (s->prev)
        s->prev->next = s->next;
    else
        q->head = s->next;
    if (s->next)
        s->next->prev = s->prev;
    else
        q->tail = s->prev;
    s->next = s->prev = NULL;
    STAT_DEC(s->upstream, queue_waiting);
}

static void on_queue_timeout(struct loop_timer *timer);

static void arm_queue_timeout(struct queue *q)
{
    if (!q->head) {
        loop_timer_cancel(&q->timeout);
        return;
    }
    int64_t now = clock_mono_us();
    int64_t due_ms = (q->head->queued_us - now) / 1000 + cfg->pool_queue_timeout_ms;
    int64_t probe = pool_probe_started_us((int)(q - queues));
    if (probe) {                       /* look again when the probe stops holding the queue */
        int64_t hold_ms = (probe - now) / 1000 + POOL_PROBE_HOLD_MS + 1;
        if (hold_ms < due_ms)
            due_ms = hold_ms;
    }
    int64_t counted = pool_connects_count_until_us((int)(q - queues));
    if (counted && (counted - now) / 1000 + 1 < due_ms)
        due_ms = (counted - now) / 1000 + 1;   /* and when the connects in flight stop counting */
    if (fd_ceiling && fd_hold_until_us > now && (fd_hold_until_us - now) / 1000 + 1 < due_ms)
        due_ms = (fd_hold_until_us - now) / 1000 + 1;   /* and when a hold for fds ends */
    /* Held with a slot free (by a probe, or by connects in flight), the queue is looked at
     * again within POOL_PROBE_HOLD_MS whatever it was told: those holds end by themselves
     * by then, and an end that the app threads' signals (pool_end_probe's settle) failed
     * to bring must cost the waiters that second, never pool_queue_timeout. */
    if (q->in_use < rules_pool_max(cfg, &cfg->upstreams[q - queues]) && due_ms > POOL_PROBE_HOLD_MS + 1)
        due_ms = POOL_PROBE_HOLD_MS + 1;
    loop_timer_arm(&q->timeout, due_ms > 0 ? due_ms : 0, on_queue_timeout);
}

int pool_queue_enter(struct pool_slot *s, int upstream, int fd)
{
    s->upstream = upstream;
    s->fd = fd;
    struct queue *q = &queues[upstream];
    if (q->in_use < queue_cap(upstream) && !q->head && !probe_holds_queue(upstream))
        return admit(s);
    s->queued_us = clock_mono_us();    /* behind every earlier waiter */
    shim_debug("fd %d: waits for an upstream connection (%u of %u in use, %d connects in flight, %s)", fd, q->in_use,
               rules_pool_max(cfg, &cfg->upstreams[upstream]), pool_connects_in_flight(upstream),
               q->head ? "behind others" : probe_holds_queue(upstream) ? "a connect probe holds the queue" : "no slot");
    s->prev = q->tail;
    if (q->tail)
        q->tail->next = s;
    else
        q->head = s;
    q->tail = s;
    STAT_INC(upstream, queue_waiting);
    STAT_INC(upstream, queue_waits);
    if (q->head == s)
        arm_queue_timeout(q);
    return 0;
}

void pool_queue_leave(struct pool_slot *s)
{
    if (s->queued_us && !s->admitted) {
        unqueue(s);
        s->queued_us = 0;
    }
    if (s->admitted) {
        struct queue *q = &queues[s->upstream];
        q->in_use--;
        in_use_total--;
        q->pump = q->head != NULL;
        for (size_t up = 0; fd_ceiling && up < cfg->n_upstreams; up++)
            queues[up].pump |= queues[up].head != NULL;   /* (the room is the process's) */
        s->admitted = false;
        limit_idle();
    }
}

static void on_queue_timeout(struct loop_timer *timer)
{
    struct queue *q = (struct queue *)(void *)((char *)timer - offsetof(struct queue, timeout));
    int64_t oldest_allowed = clock_mono_us() - cfg->pool_queue_timeout_ms * 1000;
    for (int n = 0; q->head && q->head->queued_us <= oldest_allowed && n < 100000; n++) {
        struct pool_slot *s = q->head;
        STAT_INC(s->upstream, queue_timeouts);
        shim_debug("fd %d: waited pool_queue_timeout for an upstream connection: closed", s->fd);
        unqueue(s);
        s->queued_us = 0;
        ops->fail(s);
    }
    q->pump = q->head != NULL;         /* a probe may have stopped holding it */
    arm_queue_timeout(q);
}

void pool_queue_pump(void)
{
    for (size_t up = 0; up < cfg->n_upstreams; up++) {
        struct queue *q = &queues[up];
        if (pool_probe_settled((int)up))
            q->pump = true;
        if (!q->pump || probe_holds_queue((int)up))
            continue;
        q->pump = false;
        while (q->head && q->in_use < queue_cap((int)up)) {
            struct pool_slot *s = q->head;
            unqueue(s);
            if (admit(s) != 0) {
                s->queued_us = 0;
                ops->fail(s);
            }
        }
        arm_queue_timeout(q);
    }
}
