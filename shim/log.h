/* log.h — the library's one-line messages to stderr (log.c). */
#ifndef HTTPSHIM_LOG_H
#define HTTPSHIM_LOG_H
#include <stdbool.h>
void shim_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Debug lines on or off; the constructor decides it from HTTPSHIM_DEBUG at load time. */
void shim_debug_enable(bool on);
/* HTTPSHIM_DEBUG's value asks for them: set, and not empty, 0, no, off or false. */
bool shim_debug_wanted(const char *value);
void shim_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#endif
