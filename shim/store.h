/* store.h — the cache side of a request (store.c): store_open() answers hit, wait or
 * fetch for the engine, store_fresh_hit() answers the same question for the app's own
 * thread, and a fetch's writer stores what the upstream answers. */
#ifndef HTTPSHIM_STORE_H
#define HTTPSHIM_STORE_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "buf.h"
#include "cache.h"
#include "conn.h"
#include "flight.h"
#include "http.h"
#include "loop.h"
#include "rules.h"
#include "upstream.h"

struct redis_ticket;
struct store_writer;

enum store_answer {
    STORE_HIT,                      /* serve *hit (a reference): fresh, or stale and allowed */
    STORE_WAIT,                     /* waiting on Redis, another request's fetch, or another
                                     * process's (the key's lock): ready() is called, then
                                     * store_open again */
    STORE_FETCH,                    /* go upstream, with *writer (NULL: nothing to store or fall back on) */
};

/* One request's cache side, embedded in the engine's connection; one request at a time.
 * Only `ready` is the engine's; the rest is store.c's. */
struct store_request {
    void (*ready)(struct store_request *r);   /* a wait ended (never from inside libcurl) */
    int upstream;
    struct redis_ticket *redis_ticket;         /* a Redis lookup of the key, or of its variant */
    bool redis_done;                           /* Redis was asked (or cannot be) */
    bool redis_marker;                         /* it answered a Vary marker: ask for the variant */
    struct flight_waiter waiter;               /* waiting on another request's fetch */
    bool flight_checked;                       /* ... and did: fetch */
    bool no_store;                             /* its own fetch stores nothing (it gave up waiting) */
    /* the key's Redis lock: the flight it leads while it asks, or polls for the entry of the
     * process that holds it */
    struct flight *lead;
    struct redis_ticket *lock_ticket;
    struct loop_timer poll_timer;
    unsigned polls;
    int64_t lock_deadline_us;
    bool lock_checked;
    char *poll_key;                            /* the key locked and polled for (a copy) */
    size_t poll_key_len;
    char *poll_variant;                        /* the variant polled for, behind a marker */
    size_t poll_variant_len;
    const struct app_side *app;                /* whose `in` holds the request while it polls */
    /* what a wait found, served at the next store_open */
    struct cache_entry *found;
    bool found_by_flight, found_stale_ok;
    /* the stale entry the fetch revalidates (with its validators) and, within
     * stale_if_error, falls back on (a reference) */
    struct cache_entry *cached;
    bool stale_on_error;
    struct store_writer *writer;               /* the fetch's, while both live */
};

/* What the engine knows of the request when it asks. */
struct store_query {
    int upstream;
    const struct cache_rule *rule;
    const struct http_request *req;            /* parsed from the bytes at the front of app->in */
    const char *body;                          /* its body, whole (body_len bytes; none: 0) */
    size_t body_len;
    const char *key;
    size_t key_len;
    bool storable;                             /* GET (or a method its rule names), whole body */
    const struct app_side *app;                /* for a background refresh: where, and its TLS */
};

void store_init(const struct shim_config *cfg);
void store_request_init(struct store_request *r, int upstream, void (*ready)(struct store_request *r));
enum store_answer store_open(struct store_request *r, const struct store_query *q, struct cache_entry **hit,
                             struct store_writer **writer);
/* The sink the writer's fetch reports through (upstream.h), or NULL for no writer. */
struct upstream_sink *store_writer_sink(struct store_writer *w);
/* The fetch ended without relaying a response: true when the request is to be answered from
 * the cache instead (the entry a 304 renewed, or a stale one within stale_if_error), which
 * the next store_open serves. how is the exchange's end (conn.h). */
bool store_after_fetch(struct store_request *r, enum exchange_end how);
/* The request is over (answered, failed, or its connection gone): every wait cancelled,
 * every reference dropped, ready for the next request. */
void store_request_done(struct store_request *r);

/* For a request of an unsafe method (POST, PUT, DELETE, PATCH, ...) that a rule does not
 * cache: the sink that invalidates the stored GET answers of its target once the upstream
 * answers without an error (RFC 9111 4.4), or NULL when there is nothing to invalidate. It
 * frees itself at its end. */
struct upstream_sink *store_invalidation_sink(int upstream, const struct http_request *req, bool https);
/* The same at once, for such a request whose answer the shim will not read (a tunnel). */
void store_invalidate_now(int upstream, const struct http_request *req, bool https);
/* For a request the parser refuses, relayed as bytes (a server may take a bare LF, a folded
 * line, 101 fields): what its request line names is made stale all the same (its method,
 * target and first Host line, read leniently; a safe method's: nothing). */
void store_invalidate_unread(int upstream, const char *head, size_t len, bool https);

/* For the app's own thread: a fresh memory hit for this request (a reference), or NULL;
 * resolves Vary like store_open, never waits, never fetches. */
struct cache_entry *store_fresh_hit(const struct http_request *req, const char *key, size_t key_len, int64_t now_ms);
#endif
