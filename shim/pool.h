/* pool.h — connections the app's own connects made, and the one probe per upstream
 * (pool.c). Every function is safe from any thread. */
#ifndef HTTPSHIM_POOL_H
#define HTTPSHIM_POOL_H
#include <stdbool.h>
#include <stdint.h>
#include "fdtable.h"

/* A probe holds its upstream's transfers at most this long (a non-blocking app that
 * never asks SO_ERROR must not stall them). */
#define POOL_PROBE_HOLD_MS 1000

/* Whether the pool holds, or is about to hold, a connection to upstream at addr (an
 * address a real connect reached before, or the one the probe in flight dials). */
bool pool_has_live_connection(int upstream, const struct sockaddr *addr);
/* A connection the app's own connect made joins the pool (fd taken over). */
void pool_offer_connection(int upstream, int fd, const union shim_sockaddr *dest);
/* An offered connection to addr, still fresh and quiet, or -1. */
int pool_take_offered(int upstream, const struct sockaddr *addr);
/* Whether the caller's connect is to find out for real whether upstream can be reached at
 * addr: HELD, it does, and holds the upstream's transfers while it does; SAME, another
 * connect does so for this address (the caller waits on its outcome); OTHER, another
 * holds them for another address (the caller connects for real, without holding). */
enum pool_probe { POOL_PROBE_HELD, POOL_PROBE_SAME, POOL_PROBE_OTHER };
enum pool_probe pool_begin_probe(int upstream, const struct sockaddr *addr);
/* It found out: fd >= 0 is the connection it made (taken over), -1 a failure; held: what
 * pool_begin_probe said. */
void pool_end_probe(int upstream, int fd, const union shim_sockaddr *dest, bool held);
/* A probe is in flight for upstream (its first Redis connection waits for its connection). */
bool pool_probe_holds(int upstream);
/* The probe in flight has connected (the engine saw it: pool_watch_probe) and its
 * connection will join the pool once the app asks. */
bool pool_probe_owes_connection(int upstream);
/* The engine watches a duplicate of the probe's socket (fd, the app's), to let the held
 * transfers go as soon as it is connected. From the app's thread, right after its connect. */
void pool_watch_probe(int upstream, int fd);
int64_t pool_probe_started_us(int upstream);   /* 0: none */
bool pool_probe_settled(int upstream);          /* once per ended probe */
void pool_forget(void);                         /* forked child */
#endif
