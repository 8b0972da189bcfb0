/* check.h — the unit programs' one way of counting checks: check() each one, then
 * check_report() prints "N passed, N failed" (what tests/test_loop.py reads) and gives
 * the exit status, 0 only when every check passed. */
#ifndef HTTPSHIM_UNIT_CHECK_H
#define HTTPSHIM_UNIT_CHECK_H
#include <stdio.h>

static int passed, failed;

static void check(int ok, const char *what)
{
    if (ok)
        passed++;
    else {
        failed++;
        printf("FAILED: %s\n", what);
    }
}

static int check_report(void)
{
    printf("%d passed, %d failed\n", passed, failed);
    fflush(stdout);
    return failed ? 1 : 0;
}
#endif
