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

/* Whether the pool holds a connection to upstream and addr is an address a real connect
 * reached before. */
bool pool_has_live_connection(int upstream, const struct sockaddr *addr);
/* A connection the app's own connect made joins the pool (fd taken over). */
void pool_offer_connection(int upstream, int fd, const union shim_sockaddr *dest);
/* An offered connection to addr, still fresh and quiet, made non-blocking, or -1. */
int pool_take_offered(int upstream, const struct sockaddr *addr);
/* Whether the caller's connect is to find out for real whether upstream can be reached at
 * addr: HELD, it does, and holds the upstream's transfers while it does; SAME, another
 * connect does so for this address (the caller waits on its outcome); OTHER, the caller
 * connects for real without holding: another holds them for another address, or, while
 * the probe runs, the pool (open, offered and connecting) is under alongside_cap (0: never). */
enum pool_probe { POOL_PROBE_HELD, POOL_PROBE_SAME, POOL_PROBE_OTHER };
enum pool_probe pool_begin_probe(int upstream, const struct sockaddr *addr, unsigned alongside_cap);
/* Connects made for real (HELD or OTHER) not yet ended, begun within POOL_PROBE_HOLD_MS of
 * the newest: their connections are on their way to the pool. */
int pool_connects_in_flight(int upstream);
int64_t pool_connects_count_until_us(int upstream);   /* when they stop counting; 0: none */
/* It found out: fd >= 0 is the connection it made (taken over), -1 a failure; held: what
 * pool_begin_probe said. Once for every HELD or OTHER. */
void pool_end_probe(int upstream, int fd, const union shim_sockaddr *dest, bool held);
/* A connection to upstream was lost (the server may be down): for a few seconds,
 * connects that come while a probe runs are made for real, so that each is refused as
 * direct if it is. */
void pool_note_lost(int upstream);
/* A probe is in flight for upstream (its first Redis connection waits for its connection). */
bool pool_probe_holds(int upstream);
/* The probe in flight has connected (the engine saw it: pool_watch_probe). */
bool pool_probe_connected(int upstream);
/* The engine watches a duplicate of the probe's socket (fd, the app's), to let the held
 * transfers go as soon as it is connected. From the app's thread, right after its connect. */
void pool_watch_probe(int upstream, int fd);
int64_t pool_probe_started_us(int upstream);   /* 0: none */
bool pool_probe_settled(int upstream);          /* once per ended probe */
void pool_forget(void);                         /* forked child */
#endif
