/* engine.h — the engine's connections (engine.c), as the hooks and the engine thread
 * (engine_thread.c) see them. */
#ifndef HTTPSHIM_ENGINE_H
#define HTTPSHIM_ENGINE_H
#include "fdtable.h"
#include "rules.h"
#include <stdbool.h>

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

/* For the engine thread (engine_thread.c). The configuration the connections follow: */
void engine_conns_init(const struct shim_config *cfg);
/* After each dispatch: the rests of inline answers the app's pair did not take go out first. */
void engine_take_handoffs(void);
/* Around fork: the conn list held still; in the child, the parent's conns kept
 * reachable (never used, never freed: the parent owns what they point to). */
void engine_conns_lock(void);
void engine_conns_unlock(void);
void engine_conns_forget(void);
#endif
