/* loop_test.c — exercises shim/loop.c on its own, in one process, through its public
 * interface: timer order, cancel and re-arm (a cancelled timer never fires), a removed
 * source whose event is already queued in the batch is not dispatched, frees deferred to
 * the end of the batch, loop_move, a self re-arming 0 ms timer cannot starve I/O, a
 * heap of many timers with random cancels, and loop_wake from another thread hammering
 * it while the engine takes its wake-ups (the last one asked for is never lost); and one
 * rule of the gate (shim/fdgate.c) it links anyway: a hold that only looks (an exec's
 * hand-over) never takes the engine's gate, so the engine's hand-back cannot be lost. Prints
 * "N passed, N failed" and exits 0 only when every check passed. */
#include "../../shim/fdgate.h"
#include "../../shim/loop.h"
#include "check.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- timer order, cancel, re-arm ---- */
static char order[16];
static size_t n_order;
struct named_timer { struct loop_timer timer; char name; };
static struct named_timer t_a, t_b, t_c, t_cancelled, t_moved, t_canceller, t_victim;

static void record(struct loop_timer *t)
{
    const struct named_timer *n = (const struct named_timer *)(void *)t;
    if (n_order < sizeof order - 1)
        order[n_order++] = n->name;
}

static void cancel_victim(struct loop_timer *t)
{
    record(t);
    loop_timer_cancel(&t_victim.timer);   /* due now or soon: must never fire */
}

/* ---- sources ---- */
static int pair_x[2], pair_y[2], pair_m[2], pair_s[2];
static struct loop_source src_x, src_y, src_m, src_moved, src_s;
static int dispatched_x, dispatched_y, moved_old, moved_new, starving_io;
static int batch_handlers_after_defer;
static int deferred_ran, deferred_saw_later_handler;
static struct loop_deferred deferred;

static void drain(int fd)
{
    char b[64];
    while (recv(fd, b, sizeof b, MSG_DONTWAIT) > 0)
        ;
}

static void on_deferred(struct loop_deferred *d)
{
    (void)d;
    deferred_ran++;
    deferred_saw_later_handler = batch_handlers_after_defer;
}

/* x and y are readable in the same batch; whichever runs first removes the other. */
static void on_x(struct loop_source *s, uint32_t ev)
{
    (void)ev;
    dispatched_x++;
    drain(s->fd);
    if (!dispatched_y) {
        loop_remove(&src_y);
        loop_defer(&deferred, on_deferred);
    } else {
        batch_handlers_after_defer++;
    }
}

static void on_y(struct loop_source *s, uint32_t ev)
{
    (void)ev;
    dispatched_y++;
    drain(s->fd);
    if (!dispatched_x) {
        loop_remove(&src_x);
        loop_defer(&deferred, on_deferred);
    } else {
        batch_handlers_after_defer++;
    }
}

static void on_m_old(struct loop_source *s, uint32_t ev) { (void)ev; moved_old++; drain(s->fd); }
static void on_m_new(struct loop_source *s, uint32_t ev) { (void)ev; moved_new++; drain(s->fd); loop_remove(s); }
static void on_s(struct loop_source *s, uint32_t ev) { (void)ev; starving_io++; drain(s->fd); loop_remove(s); }

/* ---- a 0 ms timer re-arming itself ---- */
static struct loop_timer spinner;
static int spins;
static void on_spin(struct loop_timer *t)
{
    spins++;
    if (!starving_io && spins < 1000000)
        loop_timer_arm(t, 0, on_spin);
}

/* makes pair_s readable while the spinner spins */
static struct loop_timer writer;
static void on_writer(struct loop_timer *t)
{
    (void)t;
    if (write(pair_s[1], "s", 1) != 1)
        _exit(2);
}

/* ---- many timers ---- */
#define MANY 2000
static struct loop_timer many[MANY];
static bool many_cancelled[MANY];
static int many_fired, many_wrong, many_out_of_order;
static int64_t many_last_due;
static void on_many(struct loop_timer *t)
{
    size_t i = (size_t)(t - many);
    many_fired++;
    if (many_cancelled[i])
        many_wrong++;
    if (t->due_us < many_last_due)
        many_out_of_order++;
    many_last_due = t->due_us;
}

/* ---- wake-ups from another thread ----
 * The waker publishes a token and asks for a wake-up, as fast as it can, while the loop
 * takes them (after_dispatch records the token it finds). A wake-up asked for in the
 * instant the loop takes another must not be swallowed: then the last token would never
 * be seen, with no timer left to wake the loop. */
static _Atomic long wake_token, wake_seen, wake_rounds;

static void after_dispatch(void)
{
    long t = atomic_load(&wake_token);
    if (t != atomic_load(&wake_seen)) {
        atomic_store(&wake_seen, t);
        atomic_fetch_add(&wake_rounds, 1);
    }
}

static void *waker(void *arg)
{
    (void)arg;
    for (long i = 1; i <= 4000000 && atomic_load(&wake_rounds) < 20000; i++) {
        atomic_store(&wake_token, i);
        loop_wake();
    }
    long last = atomic_load(&wake_token) + 1;
    atomic_store(&wake_token, last);
    loop_wake();
    for (int i = 0; i < 2000 && atomic_load(&wake_seen) != last; i++)
        usleep(1000);                  /* 2 s at most: the loop has nothing else to wake it */
    check(atomic_load(&wake_seen) == last, "a wake-up asked for while the loop takes another is never lost");
    _exit(check_report());
}

static struct loop_timer finish;
static void on_finish(struct loop_timer *t)
{
    (void)t;
    order[n_order] = 0;
    check(strcmp(order, "bca!m") == 0, "timers fire in due order, cancelled never, re-armed once at its new time");
    check(dispatched_x + dispatched_y == 1, "a source removed in its batch is not dispatched");
    check(deferred_ran == 1 && deferred_saw_later_handler == 0, "deferred work runs once, after the batch");
    check(moved_old == 0 && moved_new == 1, "loop_move hands the fd's events to the new source");
    check(starving_io == 1 && spins > 1, "a 0 ms timer re-arming itself does not starve I/O");
    check(many_wrong == 0, "none of the cancelled timers of the heap fired");
    check(many_fired == MANY / 2, "every timer of the heap that was not cancelled fired");
    check(many_out_of_order == 0, "the heap fires in due order");
    check(!loop_timer_armed(&t_cancelled.timer) && !loop_timer_armed(&t_victim.timer), "cancelled timers are not armed");
    /* no timer is armed from here on: only the waker's wake-ups run the loop */
    pthread_t tid;
    if (pthread_create(&tid, NULL, waker, NULL) != 0) {
        check(0, "the waker thread starts");
        _exit(check_report());
    }
}

/* The engine read everything and holds the gate; an exec's hand-over asks meanwhile: it must
 * leave the word alone, so that the engine's ENGINE -> IDLE still succeeds and the next ask
 * takes it. (With fdgate_app_hold and a release, the hand-back racing it was undone.) */
static void gate_hold_idle(void)
{
    _Atomic uint64_t gate;
    atomic_init(&gate, 0);
    struct fdgate_engine eng;
    fdgate_engine_init(&eng, &gate, fdgate_divert(&gate));
    bool ok = fdgate_engine_take(&eng);
    fdgate_engine_read_all(&eng, fdgate_engine_before_read(&eng));
    uint64_t before = atomic_load(&gate), held = 0;
    ok = ok && fdgate_app_hold_idle(&gate, &held) == 0 && atomic_load(&gate) == before;
    fdgate_engine_release(&eng);
    ok = ok && fdgate_state(atomic_load(&gate)) == FDGATE_IDLE && fdgate_app_hold_idle(&gate, &held) == 1
         && fdgate_state(atomic_load(&gate)) == FDGATE_APP;
    fdgate_app_release(&gate, held, false);
    ok = ok && fdgate_state(atomic_load(&gate)) == FDGATE_IDLE;
    fdgate_shut(&gate);
    ok = ok && fdgate_app_hold_idle(&gate, &held) == -1;
    check(ok, "a hold that only looks never takes the engine's gate, and its hand-back then succeeds");
}

int main(void)
{
    gate_hold_idle();
    if (loop_init(after_dispatch) != 0) {
        perror("loop_init");
        return 2;
    }
    t_a.name = 'a'; t_b.name = 'b'; t_c.name = 'c'; t_cancelled.name = 'X'; t_moved.name = 'm';
    t_canceller.name = '!'; t_victim.name = 'V';
    loop_timer_arm(&t_a.timer, 60, record);
    loop_timer_arm(&t_b.timer, 20, record);
    loop_timer_arm(&t_c.timer, 40, record);
    loop_timer_arm(&t_cancelled.timer, 30, record);
    loop_timer_cancel(&t_cancelled.timer);
    loop_timer_cancel(&t_cancelled.timer);          /* twice: harmless */
    loop_timer_arm(&t_moved.timer, 10, record);
    loop_timer_arm(&t_moved.timer, 100, record);     /* re-armed: fires once, last */
    loop_timer_arm(&t_canceller.timer, 80, cancel_victim);
    loop_timer_arm(&t_victim.timer, 81, record);

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, pair_x) || socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, pair_y)
        || socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, pair_m) || socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, pair_s))
        return 2;
    /* both readable before the loop first waits: one batch */
    if (write(pair_x[1], "x", 1) != 1 || write(pair_y[1], "y", 1) != 1)
        return 2;
    loop_add(&src_x, pair_x[0], EPOLLIN, on_x);
    loop_add(&src_y, pair_y[0], EPOLLIN, on_y);
    loop_add(&src_m, pair_m[0], EPOLLIN, on_m_old);
    check(loop_move(&src_m, &src_moved, EPOLLIN, on_m_new) == 0 && !src_m.active, "loop_move succeeds");
    if (write(pair_m[1], "m", 1) != 1)
        return 2;

    loop_timer_arm(&spinner, 0, on_spin);
    loop_add(&src_s, pair_s[0], EPOLLIN, on_s);
    loop_timer_arm(&writer, 5, on_writer);

    srand(7);
    for (int i = 0; i < MANY; i++)
        loop_timer_arm(&many[i], rand() % 50, on_many);
    for (int i = 0; i < MANY; i += 2) {
        many_cancelled[i] = true;
        loop_timer_cancel(&many[i]);
    }
    loop_timer_arm(&finish, 300, on_finish);
    loop_run();
    printf("loop_run returned\n0 passed, 1 failed\n");
    return 1;
}
