/* engine.h — the engine (engine.c), as the hooks see it. */
#ifndef HTTPSHIM_ENGINE_H
#define HTTPSHIM_ENGINE_H
#include "fdtable.h"
#include "rules.h"
#include <stdbool.h>

/* Starts the engine thread if needed (once per process, again after fork). */
int engine_ensure_started(const struct shim_config *cfg);
/* Hands the engine its end (already non-blocking) of a new diverted connection. */
/* Takes over a diverted connection's engine end; gate is the app fd's (fdtable.h), at
 * its generation gate_gen. The connection is heard only once engine_need is called (the
 * app's first real write). Returns it, or NULL. */
void *engine_adopt(int engine_fd, int upstream, const union shim_sockaddr *dest, socklen_t dest_len,
                   _Atomic uint64_t *gate, uint64_t gate_gen);
void engine_need(struct fd_entry *e);
/* The app closes its end (e, whose connection was conn) of a connection the engine never
 * heard from: the engine's end is closed and the connection freed here (true); false: the
 * engine owns its ending. */
bool engine_drop_unseen(struct fd_entry *e, void *conn);
void engine_atfork_prepare(void);
void engine_atfork_parent(void);
void engine_atfork_child(void);
#endif
