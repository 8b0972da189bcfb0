/* engine_thread.h — the engine thread (engine_thread.c): started once per process, reset
 * in a forked child. */
#ifndef HTTPSHIM_ENGINE_THREAD_H
#define HTTPSHIM_ENGINE_THREAD_H
#include "rules.h"
#include <stdbool.h>

/* Starts the engine thread if needed (once per process, again after fork), with HTTP's
 * part (libcurl) when http says a connection needs it: 0 running, -1 it could not start
 * (connections go direct). */
int engine_ensure_started(const struct shim_config *cfg, bool http);
void engine_atfork_prepare(void);
void engine_atfork_parent(void);
void engine_atfork_child(void);
/* The process's main thread is leaving by pthread_exit (hooks_thread.c): the engine's
 * thread ends once no app thread is left, so that the process ends as it would. */
void engine_main_thread_left(void);
#endif
