/* flight.h — one upstream fetch per cache key inside the process (flight.c). */
#ifndef HTTPSHIM_FLIGHT_H
#define HTTPSHIM_FLIGHT_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "cache.h"
#include "loop.h"
#include "rules.h"

#define FLIGHT_MAX_WAITERS 1024        /* per key; more requests fetch on their own */

enum flight_outcome {
    FLIGHT_SERVED,                     /* the fetch stored an entry: serve it */
    FLIGHT_RELEASED,                   /* nothing to serve (not storable, failed): fetch */
    FLIGHT_TIMED_OUT,                  /* waited coalesce_timeout: fetch, do not store */
    FLIGHT_FAILED,                     /* the fetch failed or got a 5xx: fetch, or serve stale */
};

struct flight;
struct flight_waiter {
    /* e: a reference for the waiter when SERVED, else NULL. Never called from inside a
     * libcurl callback: a waiter may start a transfer of its own. */
    void (*done)(struct flight_waiter *w, enum flight_outcome how, struct cache_entry *e);
    struct flight *flight;             /* NULL when not waiting */
    int64_t deadline_us;
    struct flight_waiter *prev, *next;
};

void flight_init(const struct shim_config *cfg);
void flight_forget(void);              /* forked child: the parent's flights are not ours */
struct flight *flight_find(const char *key, size_t key_len);
/* A new flight for key (none may exist), led by the caller's fetch. NULL: no memory. */
struct flight *flight_begin(const char *key, size_t key_len);
/* False when the flight has FLIGHT_MAX_WAITERS already. */
bool flight_join(struct flight *f, struct flight_waiter *w);
void flight_leave(struct flight_waiter *w);     /* the waiter went away; done is not called */
bool flight_has_waiters(const struct flight *f);
const char *flight_key(const struct flight *f, size_t *len);
/* The leader's fetch ended: with e (borrowed) every waiter is served; with NULL they are
 * released. The flight leaves the table now and is freed once its waiters have heard. */
void flight_land(struct flight *f, struct cache_entry *e);
void flight_fail(struct flight *f);    /* landed with nothing: the upstream failed */
/* The target of these keys was written to (RFC 9111 4.4): their flights leave the table,
 * so that a request from now on fetches anew instead of joining a fetch begun before the
 * write (what those fetches got is not stored either: store.c). */
void flight_invalidate(const char *target, size_t target_len);

/* Across processes: the token the flight's Redis lock is taken with, and that it was
 * taken (landing lets go of it, after the entry is written). */
const char *flight_lock_token(struct flight *f);
void flight_lock_taken(struct flight *f);

/* Hit-for-miss: a key whose response was not storable skips the waiting for
 * uncacheable_ttl, so the next burst for it goes upstream at once. */
void flight_mark_uncacheable(const char *key, size_t key_len);
bool flight_is_uncacheable(const char *key, size_t key_len);
#endif
