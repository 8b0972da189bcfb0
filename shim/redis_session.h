/* redis_session.h — an app's connection to a protocol = redis upstream (redis_session.c). */
#ifndef HTTPSHIM_REDIS_SESSION_H
#define HTTPSHIM_REDIS_SESSION_H
#include <stdbool.h>
#include "buf.h"
#include "fdtable.h"
#include "loop.h"
#include "rules.h"

void redis_session_init(const struct shim_config *cfg);
void redis_session_forget(void);       /* forked child */
/* Takes over the engine's end of a diverted connection (app_src's fd, registered with the
 * loop) and the bytes already read from it (in): its commands are carried by the upstream's
 * pool (redis_pool.c). 0, or -1 (nothing taken over). */
int redis_session_start(struct loop_source *app_src, int upstream, const union shim_sockaddr *dest,
                        socklen_t dest_len, struct buf *in, bool app_eof);
#endif
