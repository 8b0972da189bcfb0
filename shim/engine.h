/* engine.h — the engine (engine.c), as the hooks see it. */
#ifndef HTTPSHIM_ENGINE_H
#define HTTPSHIM_ENGINE_H
#include "fdtable.h"
#include "rules.h"

/* Starts the engine thread if needed (once per process, again after fork). */
int engine_ensure_started(const struct shim_config *cfg);
/* Hands the engine its end (already non-blocking) of a new diverted connection. */
/* Takes over a diverted connection's engine end; gate is the app fd's (fdtable.h), at
 * its generation gate_gen. */
int engine_adopt(int engine_fd, int upstream, const union shim_sockaddr *dest, socklen_t dest_len,
                 _Atomic uint64_t *gate, uint64_t gate_gen);
void engine_atfork_prepare(void);
void engine_atfork_parent(void);
void engine_atfork_child(void);
#endif
