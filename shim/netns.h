/* netns.h — which network namespace the shim's connections live in (netns.c): the
 * process's own, where the engine dials and the rules' addresses mean what they say, and
 * whether the calling thread has entered another one. */
#ifndef HTTPSHIM_NETNS_H
#define HTTPSHIM_NETNS_H
#include <stdbool.h>

/* Before a setns or unshare that may change the calling thread's network namespace:
 * the first one notes the process's own. */
void netns_before_switch(void);
/* After a setns or unshare (its result rc; net: it may have changed the calling thread's
 * network namespace): once it succeeded, the thread is away unless it is back in the
 * process's own. Returns rc, errno kept. */
int netns_after_switch(int rc, bool net);
/* Whether the calling thread is in another network namespace (one lookup of a
 * thread-local: every connect and socket asks). */
bool netns_thread_away(void);
/* Whether any thread has ever been away: a socket made out of the hooks' sight may then
 * belong to another namespace. */
bool netns_ever_away(void);
/* A child forked by a thread that is away stays away: what it inherits (the memory tier,
 * the addresses the pool knows) and the Redis tier it would share are the home
 * namespace's, so it runs unshimmed. */
#endif
