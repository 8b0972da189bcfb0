/* fdgate.c — owns the gate protocol between the engine and the app threads on a diverted
 * connection (fdgate.h has the word, its states and every transition). Lock-free: each
 * transition is a compare-and-swap; a side that finds the other holding the gate yields,
 * a bounded number of times. */
#include "fdgate.h"
#include <sched.h>

#define SPINS 100000

uint64_t fdgate_divert(_Atomic uint64_t *gate)
{
    uint64_t gen = fdgate_gen(atomic_load(gate)) + 1;
    atomic_store(gate, fdgate_make(gen, 0, FDGATE_IDLE));
    return gen;
}

/* To OFF, at generation gen only unless any_gen. */
static void shut(_Atomic uint64_t *gate, bool any_gen, uint64_t gen)
{
    uint64_t g = atomic_load_explicit(gate, memory_order_acquire);
    for (int spins = 0; spins < SPINS && (any_gen || fdgate_gen(g) == gen); spins++) {
        if (fdgate_state(g) == FDGATE_APP) {   /* an answer is being written: microseconds */
            sched_yield();
            g = atomic_load_explicit(gate, memory_order_acquire);
            continue;
        }
        if (atomic_compare_exchange_weak(gate, &g, fdgate_make(fdgate_gen(g), fdgate_seq(g), FDGATE_OFF)))
            return;
    }
}

void fdgate_shut(_Atomic uint64_t *gate) { shut(gate, true, 0); }

void fdgate_shut_next(_Atomic uint64_t *gate)
{
    atomic_store(gate, fdgate_make(fdgate_gen(atomic_load(gate)) + 1, 0, FDGATE_OFF));
}

bool fdgate_app_hold(_Atomic uint64_t *gate, uint64_t *held, bool *was_idle)
{
    uint64_t g = atomic_load_explicit(gate, memory_order_acquire);
    for (int spins = 0; spins < SPINS / 10; spins++) {
        enum fdgate_state s = fdgate_state(g);
        if (s == FDGATE_OFF)
            return false;
        if (s == FDGATE_APP) {         /* another app thread is writing: let it finish */
            sched_yield();
            g = atomic_load_explicit(gate, memory_order_acquire);
            continue;
        }
        if (atomic_compare_exchange_weak(gate, &g, fdgate_make(fdgate_gen(g), fdgate_seq(g), FDGATE_APP))) {
            *held = g;
            *was_idle = s == FDGATE_IDLE;
            return true;
        }
    }
    return false;
}

int fdgate_app_hold_idle(_Atomic uint64_t *gate, uint64_t *held)
{
    uint64_t g = atomic_load_explicit(gate, memory_order_acquire);
    for (int spins = 0; spins < SPINS / 10; spins++) {
        enum fdgate_state s = fdgate_state(g);
        if (s == FDGATE_OFF)
            return -1;
        if (s != FDGATE_IDLE)
            return 0;
        if (atomic_compare_exchange_weak(gate, &g, fdgate_make(fdgate_gen(g), fdgate_seq(g), FDGATE_APP))) {
            *held = g;
            return 1;
        }
    }
    return 0;
}

void fdgate_app_wrote(_Atomic uint64_t *gate, uint64_t held)
{
    /* with its sequence bumped, a hand-back the engine decided on before it read these
     * bytes cannot succeed */
    atomic_store_explicit(gate, fdgate_make(fdgate_gen(held), fdgate_seq(held) + 1, FDGATE_ENGINE),
                          memory_order_release);
}

void fdgate_app_wrote_more(_Atomic uint64_t *gate, uint64_t held)
{
    uint64_t g = atomic_load_explicit(gate, memory_order_acquire);
    for (int spins = 0; spins < SPINS / 10 && fdgate_gen(g) == fdgate_gen(held); spins++) {
        enum fdgate_state s = fdgate_state(g);
        if (s == FDGATE_OFF)
            return;
        if (s == FDGATE_APP) {         /* another app thread writes: it hands over to the engine */
            sched_yield();
            g = atomic_load_explicit(gate, memory_order_acquire);
            continue;
        }
        if (atomic_compare_exchange_weak(gate, &g, fdgate_make(fdgate_gen(g), fdgate_seq(g) + 1, FDGATE_ENGINE)))
            return;
    }
}

void fdgate_app_release(_Atomic uint64_t *gate, uint64_t held, bool closing)
{
    atomic_store_explicit(gate, closing ? fdgate_make(fdgate_gen(held), fdgate_seq(held), FDGATE_OFF) : held,
                          memory_order_release);
}

void fdgate_engine_init(struct fdgate_engine *g, _Atomic uint64_t *gate, uint64_t gen)
{
    g->gate = gate;
    g->gen = gen;
    g->seen = 0;
}

bool fdgate_engine_live(const struct fdgate_engine *g, uint64_t gen) { return g->gate && g->gen == gen; }

bool fdgate_engine_take(struct fdgate_engine *g)
{
    if (!g->gate)
        return true;
    uint64_t w = atomic_load_explicit(g->gate, memory_order_acquire);
    for (int tries = 0; tries < 64; tries++) {
        if (fdgate_gen(w) != g->gen)
            return true;               /* the app's fd has moved on: nothing to share */
        enum fdgate_state s = fdgate_state(w);
        if (s == FDGATE_ENGINE || s == FDGATE_OFF)
            return true;
        if (s == FDGATE_APP)
            return false;
        if (atomic_compare_exchange_weak(g->gate, &w, fdgate_make(g->gen, fdgate_seq(w), FDGATE_ENGINE)))
            return true;
    }
    return false;
}

uint64_t fdgate_engine_before_read(struct fdgate_engine *g)
{
    g->seen = 0;                       /* known only once a read finds nothing more */
    return g->gate ? atomic_load_explicit(g->gate, memory_order_acquire) : 0;
}

void fdgate_engine_read_all(struct fdgate_engine *g, uint64_t before) { g->seen = before; }

void fdgate_engine_release(struct fdgate_engine *g)
{
    if (!g->gate || !g->seen || fdgate_state(g->seen) != FDGATE_ENGINE)
        return;
    uint64_t w = g->seen;
    atomic_compare_exchange_strong(g->gate, &w, fdgate_make(g->gen, fdgate_seq(w), FDGATE_IDLE));
    g->seen = 0;
}

void fdgate_engine_shut(struct fdgate_engine *g)
{
    if (g->gate)
        shut(g->gate, false, g->gen);
    g->gate = NULL;
}
