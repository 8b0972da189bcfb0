/* clock.c — owns time as the library reads it: one monotonic clock (timers, waits,
 * latencies, kept verdicts) and one wall clock (an entry's Age and expiry, the stored-at
 * of Redis values), and the offset a test may add to both (clock.h). Read from app
 * threads too (inline hits), so the offset is one relaxed atomic load. */
#include "clock.h"
#include <stdatomic.h>
#include <time.h>

static bool test_clock;
static _Atomic int64_t offset_us;

static int64_t read_us(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t clock_mono_us(void)
{
    return read_us(CLOCK_MONOTONIC) + atomic_load_explicit(&offset_us, memory_order_relaxed);
}

int64_t clock_wall_ms(void)
{
    return (read_us(CLOCK_REALTIME) + atomic_load_explicit(&offset_us, memory_order_relaxed)) / 1000;
}

void clock_enable_test(bool on) { test_clock = on; }
bool clock_test_enabled(void) { return test_clock; }

void clock_advance_ms(int64_t ms)
{
    if (test_clock && ms > 0)
        atomic_fetch_add_explicit(&offset_us, ms * 1000, memory_order_relaxed);
}

int64_t clock_offset_us(void) { return atomic_load_explicit(&offset_us, memory_order_relaxed); }
