/* log.h — the library's one-line messages to stderr (log.c). */
#ifndef HTTPSHIM_LOG_H
#define HTTPSHIM_LOG_H
void shim_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void shim_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#endif
