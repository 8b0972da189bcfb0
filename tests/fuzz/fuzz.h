/* fuzz.h — what the fuzz harnesses share: the libFuzzer entry point they define, and
 * FUZZ_CHECK, which reports a broken invariant and aborts (libFuzzer, and the replay
 * driver under ASan, turn the abort into a report with the input that caused it). */
#ifndef HTTPSHIM_FUZZ_H
#define HTTPSHIM_FUZZ_H
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static inline void fuzz_fail(const char *what, const char *file, int line)
{
    fprintf(stderr, "%s:%d: invariant broken: %s\n", file, line, what);
    fflush(stderr);
    abort();
}

#define FUZZ_CHECK(cond) do { if (!(cond)) fuzz_fail(#cond, __FILE__, __LINE__); } while (0)

/* Whether [p, p+n) lies inside [base, base+len), compared as addresses. */
static inline int fuzz_inside(const void *base, size_t len, const void *p, size_t n)
{
    uintptr_t b = (uintptr_t)base, q = (uintptr_t)p;
    return q >= b && q - b <= len && n <= len - (q - b);
}

#endif
