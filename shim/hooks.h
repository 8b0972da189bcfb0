/* hooks.h — what hooks.c (a socket's life) shares with hooks_io.c (its use). */
#ifndef HTTPSHIM_HOOKS_H
#define HTTPSHIM_HOOKS_H
#include <stdbool.h>
#include <sys/socket.h>
#include "fdtable.h"

/* DIVERTED_AGAIN: a second connect on a diverted fd whose first said EINPROGRESS (0) */
enum divert_result { NOT_OURS, DIVERTED, DIVERTED_AGAIN, FAILED, PROBE_CONNECTED, PROBING };
/* A connect (or a fast-open send) to addr on fd: diverted, connecting for real while the
 * pool is cold, or none of the shim's business. */
enum divert_result hooks_try_divert(int fd, const struct sockaddr *addr, socklen_t len, bool *nonblock,
                                    bool is_connect);
/* The real connect of a cold pool's probe finished with err (from SO_ERROR). */
void hooks_probe_settled(int fd, struct fd_entry *e, int err);
/* The close hook's bookkeeping for fd, which stays open: the table forgets it, and the
 * engine's side of a diverted connection goes as on a close (hooks_exec.c replaces it). */
void hooks_forget(int fd);
/* A diverted connection has a writer past the hooks (a stdio stream, another process, a
 * vfork child): the engine listens to it from now on, and it is never answered inline
 * again, so nothing can overtake what that writer sends. Keeps errno. */
void hooks_share_connection(struct fd_entry *e);
/* Before a child is started with no fork handler (posix_spawn, system, popen): the diverted
 * connections it can inherit are shared with it as with a forked child (dups_possible: it
 * may also dup a close-on-exec one, posix_spawn's file actions). Keeps errno. */
void hooks_share_with_spawned_child(bool dups_possible);
#endif
