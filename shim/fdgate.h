/* fdgate.h — the gate of a diverted connection (fdgate.c): the library's one protocol
 * between threads on a connection. The app's fd and the engine's end of its socketpair
 * carry one byte stream each way; two writers of answers (the engine, and an app thread
 * answering a memory hit inline) must never interleave, and an inline answer must never
 * overtake a request the engine has not answered yet. One 64-bit word per diverted fd
 * (fd_entry.gate) holds:
 *   generation  bumped at every divert of the fd number: an old connection's engine
 *               state can never act on a new connection's gate;
 *   sequence    bumped by every real write of the app's: the engine hands the connection
 *               back only if it has read everything the app wrote;
 *   holder      IDLE (the engine holds nothing: an inline answer may go), ENGINE (the
 *               engine has bytes or an exchange: everything goes its way), APP (an app
 *               thread is writing, inline or for real), OFF (never inline again).
 * Transitions:
 *   divert           -> IDLE, new generation                   fdgate_divert (hooks)
 *   app, any write   IDLE|ENGINE -> APP                        fdgate_app_hold
 *   app, real write  APP -> ENGINE, sequence + 1, before the   fdgate_app_wrote
 *                    write (the engine answers while a large
 *                    write blocks: a full-duplex app's replies
 *                    are what unblocks it), and sequence + 1
 *                    again after it                             fdgate_app_wrote_more
 *   app, inline hit  APP -> IDLE (or OFF: the answer closes)   fdgate_app_release
 *   app, settled?    IDLE -> APP only, never taken from ENGINE  fdgate_app_hold_idle
 *                    (an exec's hand-over: a hold released
 *                    without a write would undo the engine's
 *                    ENGINE -> IDLE that raced it, for ever)
 *   engine, writes   IDLE -> ENGINE (waits while APP)          fdgate_engine_take
 *   engine, idle     ENGINE -> IDLE, only if the sequence is   fdgate_engine_release
 *                    the one it saw when it read all the bytes
 *   tunnel, TLS, dup -> OFF                                    fdgate_shut / fdgate_engine_shut
 * Every spin is bounded and yields: the other side holds the gate for microseconds. */
#ifndef HTTPSHIM_FDGATE_H
#define HTTPSHIM_FDGATE_H
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

enum fdgate_state {
    FDGATE_IDLE = 0,
    FDGATE_ENGINE = 1,
    FDGATE_APP = 2,
    FDGATE_OFF = 3,
};
static inline uint64_t fdgate_make(uint64_t gen, uint64_t seq, enum fdgate_state s)
{
    return (gen << 32) | ((seq & 0x3fffffffu) << 2) | (uint64_t)s;
}
static inline uint64_t fdgate_gen(uint64_t g) { return g >> 32; }
static inline uint64_t fdgate_seq(uint64_t g) { return (g >> 2) & 0x3fffffffu; }
static inline enum fdgate_state fdgate_state(uint64_t g) { return (enum fdgate_state)(g & 3); }

/* The fd is diverted anew: IDLE at a new generation, which is returned. */
uint64_t fdgate_divert(_Atomic uint64_t *gate);
/* Never inline again on this gate (a dup of the fd, a forked child's copy): OFF, keeping
 * the generation; waits out an app thread that holds it. */
void fdgate_shut(_Atomic uint64_t *gate);
/* The same at the next generation (the fd number's old gate is done with). */
void fdgate_shut_next(_Atomic uint64_t *gate);

/* ---- the app threads' side ---- */
/* Holds the gate for this thread: *held is the word it took it from; *was_idle: an inline
 * answer may be written. False: the gate is OFF (or stayed held): just write for real. */
bool fdgate_app_hold(_Atomic uint64_t *gate, uint64_t *held, bool *was_idle);
/* Holds the gate only if the engine holds nothing (IDLE -> APP): 1 held, 0 the engine or
 * another app thread holds it (the word untouched: wait and ask again), -1 OFF. For a
 * hold that may be released with nothing written. */
int fdgate_app_hold_idle(_Atomic uint64_t *gate, uint64_t *held);
/* After a real write (or a hand-off of an answer's rest): the engine owns what follows. */
void fdgate_app_wrote(_Atomic uint64_t *gate, uint64_t held);
/* After the real write itself: the sequence bumped again (IDLE back to ENGINE), so the
 * engine hands the connection back only once it has read what the write put in. */
void fdgate_app_wrote_more(_Atomic uint64_t *gate, uint64_t held);
/* After an inline answer written whole: IDLE again, or OFF when the answer closes. */
void fdgate_app_release(_Atomic uint64_t *gate, uint64_t held, bool closing);

/* ---- the engine's side: one per connection ---- */
struct fdgate_engine {
    _Atomic uint64_t *gate;         /* NULL: no app fd behind it (nothing to share) */
    uint64_t gen;
    uint64_t seen;                  /* the word when the app's bytes were last read to the end; 0 unknown */
};
void fdgate_engine_init(struct fdgate_engine *g, _Atomic uint64_t *gate, uint64_t gen);
bool fdgate_engine_live(const struct fdgate_engine *g, uint64_t gen);
/* May the engine write to the app now? False while an app thread holds the gate: try
 * again in a moment. */
bool fdgate_engine_take(struct fdgate_engine *g);
/* Before a read of the app's bytes: the word to pass to fdgate_engine_read_all if the read
 * finds nothing more. */
uint64_t fdgate_engine_before_read(struct fdgate_engine *g);
void fdgate_engine_read_all(struct fdgate_engine *g, uint64_t before);
/* The engine holds nothing for the connection: inline answers may go ahead, unless the app
 * wrote after the engine last read everything. */
void fdgate_engine_release(struct fdgate_engine *g);
/* Never inline again (the connection becomes a tunnel or TLS, or goes away). */
void fdgate_engine_shut(struct fdgate_engine *g);
#endif
