/* resolver.h — host names to addresses off the app's and the engine's threads (resolver.c). */
#ifndef HTTPSHIM_RESOLVER_H
#define HTTPSHIM_RESOLVER_H
#include <stddef.h>

/* host's address as a numeric string in addr (an IP literal is its own): 0.
 * RESOLVER_PENDING: its first answer is being asked for on a thread of its own (try again
 * shortly). -1: it did not resolve the last time it was asked (it is asked again every
 * second in the background), or it cannot be kept. Never blocks on the network. */
#define RESOLVER_PENDING 1
int resolver_lookup(const char *host, char *addr, size_t cap);
/* A detached thread running run(arg), with the app's signals blocked (they stay with the
 * app's threads) and a small stack: 0, or -1 when none could be made. */
int resolver_spawn(void *(*run)(void *), void *arg);
/* A forked child: resolutions the parent's threads had under way are asked again. */
void resolver_forget(void);
#endif
