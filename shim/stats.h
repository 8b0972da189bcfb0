/* stats.h — the library's counters (stats.c). Lock-free: relaxed atomic adds from the
 * engine thread (and later from app threads), read by the stats socket. */
#ifndef HTTPSHIM_STATS_H
#define HTTPSHIM_STATS_H
#include <stdatomic.h>
#include <stdint.h>
#include "cache.h"
#include "rules.h"

#define STATS_LAT_BUCKETS 16           /* 10us .. 10s, then +Inf */

struct upstream_stats {
    _Atomic uint64_t client_connections, requests, hits, misses, stored, bytes_from_cache;
    _Atomic uint64_t not_stored[NS__COUNT];
    _Atomic uint64_t upstream_requests, upstream_conns_opened, upstream_conn_reuses, tunnels;
    /* why connections were tunnelled: TLS the shim does not terminate, bytes that are not
     * HTTP, a head too large to hold, an upgrade / CONNECT / chunked request body / a body
     * the app never finished */
    _Atomic uint64_t tunnels_tls, tunnels_not_http, tunnels_too_large, tunnels_other;
    _Atomic uint64_t errors_upstream, errors_app, errors_tunnel;
    /* TLS the app encrypts itself: terminated by the shim, or tunnelled, and why */
    _Atomic uint64_t tls_intercepted, tls_handshake_failures, tls_tunnel_not_configured, tls_tunnel_no_mark;
    _Atomic uint64_t tls_tunnel_client_cert, tls_tunnel_unverified, tls_tunnel_unreadable;
    _Atomic uint64_t tls_upstream_verify_failed;   /* an HTTPS leg's certificate refused: not sent */
    _Atomic uint64_t tls_not_relayable;            /* intercepted, not relayable as HTTP: ended, never tunnelled */
    _Atomic uint64_t evictions, expired;
    /* RFC 9111 4.4: unsafe requests whose success invalidated their target, and the
     * entries (variants, credentials, bodies of it) they removed from the memory tier */
    _Atomic uint64_t invalidations, invalidated;
    /* coalescing: requests served from another request's fetch, and waits given up */
    _Atomic uint64_t coalesced, coalesce_timeouts;
    /* stale serving and revalidation */
    _Atomic uint64_t stale_while_revalidate, stale_if_error, refreshes, revalidated, not_modified;
    _Atomic uint64_t inline_hits;      /* hits answered on the app's own thread */
    /* protocol = redis: commands carried, the writes they went out in, server connections
     * opened (gauge: open), app connections served direct, lost server connections, app
     * connections closed for a malformed stream, and connections lent now, by reason */
    _Atomic uint64_t redis_commands, redis_batches, redis_server_opened, redis_server_open;
    _Atomic uint64_t redis_direct, redis_server_lost, redis_malformed, redis_local_replies;
    _Atomic uint64_t redis_pinned_multi, redis_pinned_watch, redis_pinned_blocking;
    _Atomic uint64_t redis_auth_early, redis_auth_refused_late;
    /* gauges: adjusted up and down (unsigned wrap-around arithmetic) */
    _Atomic uint64_t memory_entries, memory_bytes;
    _Atomic uint64_t pool_open, in_flight, in_flight_connected, queue_waiting;
    /* of pool_open, idle connections the upstream has ended that libcurl has not closed
     * yet (it finds out only when it next tries one): not live (pool.c). Not shown. */
    _Atomic uint64_t pool_gone;
    /* the pool queue: requests that had to wait for a connection, and those given up on */
    _Atomic uint64_t queue_waits, queue_timeouts;
    /* the app's connects that failed while the pool was cold, by errno */
    _Atomic uint64_t connect_refused, connect_timeout, connect_unreachable, connect_other;
    /* connects left direct: the app's fds near its limit (a diverted one holds two); the
     * app's socket its own (bound, steered, held twice, another network namespace) */
    _Atomic uint64_t connect_direct_fd_limit, connect_direct_app_socket;
    _Atomic uint64_t queue_wait[STATS_LAT_BUCKETS + 1], queue_wait_sum_us, queue_wait_max_us;
    _Atomic uint64_t hit_lat[STATS_LAT_BUCKETS + 1], miss_lat[STATS_LAT_BUCKETS + 1];
    _Atomic uint64_t hit_lat_sum_us, miss_lat_sum_us;
};

extern struct upstream_stats shim_stats[RULES_MAX_UPSTREAMS];

struct redis_counters {
    _Atomic uint64_t connected, hits, misses, errors, timeouts, reconnects, corrupt, unauthenticated;
    _Atomic uint64_t bytes_read, bytes_written, sets;
    _Atomic uint64_t deletes, deletes_dropped;   /* entries an unsafe request invalidated */
    /* cross-process coalescing: lock attempts, and polls of an entry another process fetches */
    _Atomic uint64_t locks, lock_waits, lock_polls, lock_uncacheable;
    _Atomic uint64_t lat[STATS_LAT_BUCKETS + 1], lat_sum_us;   /* lookups, ask to answer */
    /* behind Sentinel: masters the sentinels switched to, their failures, masters that
     * turned out not to be (ROLE, READONLY, MASTERDOWN) */
    _Atomic uint64_t failovers, sentinel_errors, not_master;
    _Atomic uint64_t redirects;        /* a cluster's MOVED and ASK replies */
    /* each server of the tier (redis_nodes.c's table): its address, up or not, its errors */
    struct redis_node_stats { char address[280]; _Atomic int up; _Atomic uint64_t errors; } nodes[32];
    _Atomic int n_nodes;
    char master[300];                  /* "host:port" in use (engine thread writes, stats read) */
};
extern struct redis_counters shim_redis;
extern const double stats_lat_bounds_s[STATS_LAT_BUCKETS];

/* Per cache rule of each upstream: the requests it matched and those answered from the
 * cache (which rule pays off, which never hits). */
struct rule_stats { _Atomic uint64_t requests, hits; };
extern struct rule_stats shim_rule_stats[RULES_MAX_UPSTREAMS][RULES_MAX_CACHE_RULES];
#define STAT_RULE(up, rule, field) \
    atomic_fetch_add_explicit(&shim_rule_stats[(up)][(rule)].field, 1, memory_order_relaxed)

#define STAT_ADD(up, field, n) atomic_fetch_add_explicit(&shim_stats[(up)].field, (n), memory_order_relaxed)
#define STAT_INC(up, field) STAT_ADD(up, field, 1)
#define STAT_DEC(up, field) STAT_ADD(up, field, (uint64_t)-1)

void stats_observe_latency(int upstream, bool hit, int64_t micros);
void stats_observe_queue_wait(int upstream, int64_t micros);
void stats_observe_redis(int64_t micros);
void stats_reset(void);                /* forked child: counters start from zero */
#endif
