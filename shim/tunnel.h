/* tunnel.h — raw relays between a diverted connection and its real upstream (tunnel.c). */
#ifndef HTTPSHIM_TUNNEL_H
#define HTTPSHIM_TUNNEL_H
#include <stdbool.h>
#include "buf.h"
#include "fdtable.h"
#include "loop.h"

/* Takes over the app's socketpair end (registered as app_src, which is moved to the
 * tunnel) and the bytes already read from it (`to_upstream`) or owed to it (`to_app`):
 * their buffers now belong to the tunnel. Connects to dest and relays both ways until
 * both sides are done, then closes both fds. -1: nothing was taken over. */
int tunnel_start(struct loop_source *app_src, int upstream, const union shim_sockaddr *dest, socklen_t dest_len,
                 struct buf *to_upstream, struct buf *to_app, bool app_eof);
void tunnel_forget(void);                    /* forked child */
#endif
