/* log.c — the library's only output: one-line messages to stderr, written with a
 * single write(2) so lines from several threads never interleave. Debug lines only
 * when HTTPSHIM_DEBUG is set. */
#include "log.h"
#include "real.h"
#include <stdarg.h>
#include <strings.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void vlog(const char *fmt, va_list ap)
{
    char line[1024];
    int n = snprintf(line, sizeof line, "httpshim[%d]: ", (int)getpid());
    if (n < 0)
        return;
    int m = vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    if (m < 0)
        return;
    size_t len = (size_t)n + (size_t)m;
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    line[len++] = '\n';
    ssize_t w = real_write(2, line, len);
    (void)w;
}

void shim_log(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}

static _Atomic int debug_enabled = -1;   /* -1: not decided at load: ask the environment now */

void shim_debug_enable(bool on)
{
    debug_enabled = on;
}

bool shim_debug_wanted(const char *value)
{
    static const char *const off[] = { "", "0", "no", "off", "false" };
    if (!value)
        return false;
    for (size_t i = 0; i < sizeof off / sizeof off[0]; i++)
        if (!strcasecmp(value, off[i]))
            return false;
    return true;
}

void shim_debug(const char *fmt, ...)
{
    if (debug_enabled < 0)
        debug_enabled = shim_debug_wanted(getenv("HTTPSHIM_DEBUG"));
    if (!debug_enabled)
        return;
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}
