/* clock.h — the library's one clock (clock.c): monotonic time for timers, waits and
 * latencies, and wall time for what leaves the process (Age, Redis values). Both move
 * together when a test advances the clock. */
#ifndef HTTPSHIM_CLOCK_H
#define HTTPSHIM_CLOCK_H
#include <stdbool.h>
#include <stdint.h>

int64_t clock_mono_us(void);
static inline int64_t clock_mono_ms(void) { return clock_mono_us() / 1000; }
int64_t clock_wall_ms(void);

/* The test clock: with HTTPSHIM_TEST_CLOCK=1 in the environment the library was loaded
 * with, the stats socket's POST /test/clock?advance_ms=N moves both clocks forward, so a
 * test of a TTL or a stale window does not wait on the wall. Off otherwise. */
void clock_enable_test(bool on);
bool clock_test_enabled(void);
void clock_advance_ms(int64_t ms);
int64_t clock_offset_us(void);         /* what the test clock added: kernel timers subtract it */
#endif
