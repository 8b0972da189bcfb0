/* stats_server.c — owns the per-process stats socket: a Unix socket (directory 0700,
 * socket 0600, peers checked with SO_PEERCRED) speaking just enough HTTP/1.1 for
 * `GET /stats` (JSON), `GET /metrics` (Prometheus text) and `POST /purge`. It runs in the
 * engine's loop; clients are capped in number, request size and time. The socket
 * file is removed at exit, and on the default-fatal signals when the app left them at
 * their default disposition. */
#include "stats_server.h"
#include "clock.h"
#include "buf.h"
#include "exited.h"
#include "cache.h"
#include "fdtable.h"
#include "http.h"
#include "log.h"
#include "loop.h"
#include "real.h"
#include "stats.h"
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define STATS_MAX_CLIENTS   16
#define STATS_REQ_MAX       8192
#define STATS_OUT_MAX       (3 * 1024 * 1024)   /* under the CLI's 4 MiB; beyond it: 500 */
#define STATS_CLIENT_MS     5000

struct stats_client {
    struct loop_source src;
    struct loop_deferred reclaim;
    int fd;
    size_t in_len;
    char in[STATS_REQ_MAX];
    struct buf out;
    int64_t deadline_ms;
    struct stats_client *next;
};

static struct {
    struct loop_source listener;
    struct loop_timer tick;             /* armed while there are clients to time out */
    const struct shim_config *cfg;
    int fd;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    pid_t owner;
    int n_clients;
    struct stats_client *clients;
    int64_t started_ms;
    time_t started_unix;
} S = { .fd = -1 };

static _Atomic uint64_t refused_peers;
static void on_listener(struct loop_source *src, uint32_t ev);
static struct stats_client *orphaned_clients;   /* a forked child's inheritance */

static void unlink_socket(void)
{
    if (S.owner == getpid() && S.path[0])
        unlink(S.path);
}

static void on_fatal_signal(int sig)
{
    unlink_socket();
    signal(sig, SIG_DFL);
    raise(sig);                        /* delivered once this handler returns */
}

static void leave_record(void);

static void install_exit_cleanup(void)
{
    static bool installed;
    if (installed)
        return;
    installed = true;
    atexit(unlink_socket);
    atexit(leave_record);              /* runs first: the record is there before the socket goes */
    if (getpid() == 1)
        return;                        /* init (a container's entrypoint): the kernel drops these
                                        * signals unhandled; handled, they ended a blocking call
                                        * (EINTR) and took the socket of a process that lives on */
    static const int fatal[] = { SIGTERM, SIGINT, SIGHUP, SIGQUIT };
    for (size_t i = 0; i < sizeof fatal / sizeof fatal[0]; i++) {
        struct sigaction old;
        if (sigaction(fatal[i], NULL, &old) == 0 && old.sa_handler == SIG_DFL && !(old.sa_flags & SA_SIGINFO)) {
            struct sigaction sa;
            memset(&sa, 0, sizeof sa);
            sa.sa_handler = on_fatal_signal;
            sigemptyset(&sa.sa_mask);
            sigaction(fatal[i], &sa, NULL);
        }
    }
}

int stats_server_start(const struct shim_config *cfg)
{
    char path[512];
    if (rules_expand_socket_path(cfg->stats_socket, (int)getpid(), (unsigned)getuid(), path, sizeof path) != 0
        || strlen(path) >= sizeof S.path) {
        shim_log("stats socket path too long: %s (stats disabled)", path);
        return -1;
    }
    if (exited_prepare_dir(path) != 0) {
        shim_log("stats socket directory for %s is not usable: %s (stats disabled)", path, strerror(errno));
        return -1;
    }
    int fd = fdtable_raise(real_socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (fd < 0)
        return -1;
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    memcpy(sun.sun_path, path, strlen(path) + 1);
    unlink(path);                      /* a file with our pid in its name is a dead process's */
    if (real_bind_socket(fd, (struct sockaddr *)&sun, sizeof sun) != 0 || chmod(path, 0600) != 0 || listen(fd, 16) != 0) {
        shim_log("stats socket %s: %s (stats disabled)", path, strerror(errno));
        real_close(fd);
        return -1;
    }
    fdtable_mark_engine(fd);
    S.fd = fd;
    S.cfg = cfg;
    snprintf(S.path, sizeof S.path, "%s", path);
    S.owner = getpid();
    S.started_ms = clock_wall_ms();
    S.started_unix = time(NULL);
    if (loop_add(&S.listener, fd, EPOLLIN, on_listener) != 0) {
        unlink(path);
        fdtable_close_engine_fd(fd);
        S.fd = -1;
        return -1;
    }
    install_exit_cleanup();
    return 0;
}

void stats_server_atfork_child(void)
{
    /* the fds went with the other engine fds; the file is the parent's */
    if (S.clients) {
        struct stats_client *last = S.clients;
        while (last->next)
            last = last->next;
        last->next = orphaned_clients;
        orphaned_clients = S.clients;
    }
    S.clients = NULL;
    S.n_clients = 0;
    S.fd = -1;
    S.tick.slot = 0;
    S.path[0] = 0;
    atomic_store(&refused_peers, 0);
}

/* ---- rendering ---- */

struct out { struct buf b; bool full; };

static void appendf(struct out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void appendf(struct out *o, const char *fmt, ...)
{
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp || buf_append(&o->b, tmp, (size_t)n) != 0)
        o->full = true;
}

static uint64_t get(_Atomic uint64_t *v) { return atomic_load_explicit(v, memory_order_relaxed); }

/* A gauge kept by paired increments and decrements may be read mid-update: clamp. */
static uint64_t gauge(_Atomic uint64_t *v)
{
    uint64_t x = get(v);
    return x > (UINT64_MAX >> 1) ? 0 : x;
}

static void upstream_label(const struct upstream_rule *u, char *out, size_t n)
{
    snprintf(out, n, "%s", u->label);
}

struct counter_def { const char *name, *help; size_t offset; bool is_gauge; };

#define C(field, help) { #field, help, offsetof(struct upstream_stats, field), false }
#define G(field, help) { #field, help, offsetof(struct upstream_stats, field), true }
static const struct counter_def counters[] = {
    C(client_connections, "connections the app opened to this upstream that the shim took over"),
    C(requests, "HTTP requests the shim answered or relayed"),
    C(hits, "requests answered from the cache"),
    C(inline_hits, "hits answered on the app's own thread, without the engine (fastpath)"),
    C(misses, "cacheable requests not found in the cache"),
    C(stored, "responses stored in the cache"),
    C(evictions, "entries evicted to keep the memory tier under memory_max"),
    C(expired, "entries dropped because their TTL had passed"),
    C(invalidations, "unsafe requests (POST, PUT, DELETE, ...) whose success invalidated the stored GET answers of their URL"),
    C(invalidated, "entries those requests removed from the memory tier"),
    C(bytes_from_cache, "body bytes served from the cache"),
    C(coalesced, "requests that waited on another request's fetch of the same key and were served its response"),
    C(coalesce_timeouts, "requests that waited coalesce_timeout on another's fetch and then fetched on their own"),
    C(stale_while_revalidate, "requests answered from an entry past its TTL while it was refreshed in the background"),
    C(stale_if_error, "requests answered from an entry past its TTL because the upstream failed or answered 5xx"),
    C(refreshes, "background refreshes of stale entries sent upstream"),
    C(revalidated, "entries renewed by a 304 to the shim's conditional request"),
    C(not_modified, "conditional requests answered 304 from a fresh entry"),
    C(upstream_requests, "requests sent to the upstream"),
    C(upstream_conns_opened, "upstream connections opened"),
    C(upstream_conn_reuses, "upstream requests carried on an already open connection"),
    C(tunnels, "connections relayed as raw tunnels"),
    C(tunnels_tls, "connections tunnelled because they carry TLS the shim does not terminate"),
    C(tunnels_not_http, "connections tunnelled because their bytes are not HTTP/1.x"),
    C(tunnels_too_large, "connections tunnelled because a request head is larger than the shim holds"),
    C(tunnels_other, "connections tunnelled for an upgrade, CONNECT, a chunked request body or a body never finished"),
    C(tls_intercepted, "TLS connections from the app terminated by the shim (tls = intercept)"),
    C(tls_handshake_failures, "TLS connections from the app whose handshake with the shim failed"),
    C(tls_tunnel_not_configured, "TLS connections tunnelled because the upstream is tls = tunnel"),
    C(tls_tunnel_no_mark, "TLS connections tunnelled because the app's TLS does not trust the shim (no mark)"),
    C(tls_tunnel_client_cert, "TLS connections tunnelled because the app presents a client certificate"),
    C(tls_tunnel_unverified, "TLS connections tunnelled because the upstream did not verify as the app would verify it"),
    C(tls_tunnel_unreadable, "TLS connections tunnelled because their ClientHello could not be read"),
    C(tls_not_relayable, "intercepted connections whose request could not be relayed as HTTP (Upgrade, a chunked body, too many fields): ended as by a server that gave up, never tunnelled in plaintext"),
    C(tls_upstream_verify_failed, "HTTPS legs to the upstream whose certificate was refused (by libcurl, or as not what the app approved): the request was not sent"),
    C(queue_waits, "requests that waited in the pool queue for an upstream connection"),
    C(queue_timeouts, "requests given up after pool_queue_timeout in the pool queue (app connection closed)"),
    C(connect_refused, "app connects refused by the upstream while the pool was cold (ECONNREFUSED)"),
    C(connect_timeout, "app connects to the upstream that timed out while the pool was cold (ETIMEDOUT)"),
    C(connect_unreachable, "app connects that found no route to the upstream (EHOSTUNREACH, ENETUNREACH)"),
    C(connect_other, "app connects to the upstream that failed otherwise while the pool was cold"),
    C(connect_direct_fd_limit, "app connects left direct (not diverted): the app's fd was in the top quarter of its fd limit, where a diverted connection's second fd could make the app run out"),
    C(connect_direct_app_socket, "app connects left direct (not diverted): the app's socket was its own to keep, bound to a port or an address, steered by an option (SO_MARK, IP_TOS, SO_BINDTODEVICE, ...), held twice (a dup, a fork), not TCP, or made in another network namespace"),
    C(redis_commands, "protocol = redis: app commands carried over the shared server connections or a lent one"),
    C(redis_batches, "protocol = redis: writes to a server connection (commands of many app connections go out together)"),
    C(redis_server_opened, "protocol = redis: server connections opened by the shim"),
    C(redis_direct, "protocol = redis: app connections served over a connection of their own (RESP3, subscribe, monitor, client tracking/reply/no-evict, inline commands, the lent cap)"),
    C(redis_server_lost, "protocol = redis: server connections lost (the app connections with commands in flight on them were closed); a direct one the server ends as asked (QUIT, CLIENT KILL) is not counted"),
    C(redis_malformed, "protocol = redis: app connections closed for a stream that is not RESP commands"),
    C(redis_local_replies, "protocol = redis: commands answered by the shim itself (AUTH and SELECT of a known identity, CLIENT SETNAME/GETNAME, RESET, QUIT)"),
    C(redis_auth_early, "protocol = redis: AUTHs (and HELLO AUTHs) of a password the server had accepted before, answered at once and checked alongside the app's next commands (only reads go before the server's word)"),
    C(redis_auth_refused_late, "protocol = redis: such passwords the server then refused (changed or revoked since): the app connection was closed as a reset, nothing it asked answered"),
    G(redis_server_open, "protocol = redis: server connections open now"),
    G(redis_pinned_multi, "protocol = redis: server connections lent now to a MULTI transaction"),
    G(redis_pinned_watch, "protocol = redis: server connections lent now to WATCHed keys"),
    G(redis_pinned_blocking, "protocol = redis: server connections lent now to a blocking command"),
    G(memory_entries, "entries in the memory tier now"),
    G(memory_bytes, "bytes the memory tier holds now, everything counted"),
};
#undef C
#undef G

static uint64_t counter_value(int up, const struct counter_def *d)
{
    _Atomic uint64_t *v = (_Atomic uint64_t *)(void *)((char *)&shim_stats[up] + d->offset);
    return d->is_gauge ? gauge(v) : get(v);
}

static void pool_gauges(int up, uint64_t *idle, uint64_t *busy, uint64_t *waiting)
{
    uint64_t open = gauge(&shim_stats[up].pool_open);
    uint64_t connected = gauge(&shim_stats[up].in_flight_connected);
    *busy = connected < open ? connected : open;
    *idle = open - *busy;
    *waiting = gauge(&shim_stats[up].queue_waiting);     /* in the shim's FIFO, for a slot */
}

static void json_histogram(struct out *o, const char *name, _Atomic uint64_t *b, _Atomic uint64_t *sum_us)
{
    uint64_t cum = 0;
    appendf(o, "\"%s\":{\"buckets\":[", name);
    for (int i = 0; i <= STATS_LAT_BUCKETS; i++) {
        cum += get(&b[i]);
        if (i < STATS_LAT_BUCKETS)
            appendf(o, "%s[%g,%llu]", i ? "," : "", stats_lat_bounds_s[i], (unsigned long long)cum);
    }
    appendf(o, "],\"count\":%llu,\"sum\":%.6f}", (unsigned long long)cum, (double)get(sum_us) / 1e6);
}

static int get_int(_Atomic int *v) { return atomic_load_explicit(v, memory_order_relaxed); }

static const char *redis_mode_name(const struct shim_config *cfg)
{
    return cfg->redis_mode == REDIS_SENTINEL ? "sentinel" : cfg->redis_mode == REDIS_CLUSTER ? "cluster" : "single";
}

static void render_json(struct out *o, const struct shim_config *cfg, bool exited)
{
    char raw[256], comm[256 * 6 + 8], cmdline[256 * 6 + 8];
    size_t n = exited_read_self("comm", raw, sizeof raw);
    exited_json_escape(raw, n, comm, sizeof comm);
    n = exited_read_self("cmdline", raw, sizeof raw);
    exited_json_escape(raw, n, cmdline, sizeof cmdline);
    appendf(o, "{\"pid\":%d,\"comm\":\"%s\",\"cmdline\":\"%s\",\"started_unix\":%lld,\"exited\":%s,"
               "\"uptime_seconds\":%.3f,\"stats_refused\":%llu,",
            (int)getpid(), comm, cmdline, (long long)S.started_unix, exited ? "true" : "false",
            (double)(clock_wall_ms() - S.started_ms) / 1000, (unsigned long long)get(&refused_peers));
    struct loop_counters lc;
    loop_read_counters(&lc);
    appendf(o, "\"engine\":{\"busy_poll_us\":%lld,\"sleeps\":%llu,\"polls\":%llu,\"polls_paid\":%llu,"
               "\"poll_seconds\":%.6f},\"upstreams\":{",
            (long long)lc.busy_poll_us, (unsigned long long)lc.sleeps, (unsigned long long)lc.polls,
            (unsigned long long)lc.polls_paid, (double)lc.poll_us / 1e6);
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        int up = (int)i;
        char label[RULES_HOST_MAX + 16];
        upstream_label(&cfg->upstreams[i], label, sizeof label);
        appendf(o, "%s\"%s\":{", i ? "," : "", label);
        appendf(o, "\"queue_wait_max_seconds\":%.6f,\"rules\":[",
                (double)get(&shim_stats[up].queue_wait_max_us) / 1e6);
        const struct upstream_rule *u = &cfg->upstreams[i];
        for (size_t r = 0; r < u->n_cache_rules && r < RULES_MAX_CACHE_RULES; r++) {
            char rule[sizeof u->cache_rules[r].glob * 6 + 64], text[sizeof u->cache_rules[r].glob + 32];
            int tn = snprintf(text, sizeof text, "%s %s", u->cache_rules[r].method, u->cache_rules[r].glob);
            exited_json_escape(text, tn > 0 && (size_t)tn < sizeof text ? (size_t)tn : strlen(text), rule, sizeof rule);
            appendf(o, "%s{\"rule\":\"%s\",\"line\":%d,\"requests\":%llu,\"hits\":%llu}", r ? "," : "", rule,
                    u->cache_rules[r].line, (unsigned long long)get(&shim_rule_stats[up][r].requests),
                    (unsigned long long)get(&shim_rule_stats[up][r].hits));
        }
        appendf(o, "],");
        /* an exited process holds nothing now: its record's gauges are 0 (server connections
         * open, lent, the pool's), whoever reads them */
        for (size_t k = 0; k < sizeof counters / sizeof counters[0]; k++)
            appendf(o, "\"%s\":%llu,", counters[k].name,
                    exited && counters[k].is_gauge ? 0ULL : (unsigned long long)counter_value(up, &counters[k]));
        uint64_t idle = 0, busy = 0, waiting = 0;
        if (!exited)
            pool_gauges(up, &idle, &busy, &waiting);
        appendf(o, "\"pool_idle\":%llu,\"pool_busy\":%llu,\"pool_waiting\":%llu,", (unsigned long long)idle,
                (unsigned long long)busy, (unsigned long long)waiting);
        appendf(o, "\"not_stored\":{");
        for (int r = 1; r < NS__COUNT; r++)
            appendf(o, "%s\"%s\":%llu", r > 1 ? "," : "", cache_not_stored_names[r],
                    (unsigned long long)get(&shim_stats[up].not_stored[r]));
        appendf(o, "},\"errors\":{\"upstream\":%llu,\"app\":%llu,\"tunnel\":%llu},",
                (unsigned long long)get(&shim_stats[up].errors_upstream),
                (unsigned long long)get(&shim_stats[up].errors_app),
                (unsigned long long)get(&shim_stats[up].errors_tunnel));
        json_histogram(o, "hit_latency_seconds", shim_stats[up].hit_lat, &shim_stats[up].hit_lat_sum_us);
        appendf(o, ",");
        json_histogram(o, "miss_latency_seconds", shim_stats[up].miss_lat, &shim_stats[up].miss_lat_sum_us);
        appendf(o, ",");
        json_histogram(o, "queue_wait_seconds", shim_stats[up].queue_wait, &shim_stats[up].queue_wait_sum_us);
        appendf(o, "}");
    }
    appendf(o, "},\"redis\":{\"configured\":%d,\"connected\":%llu,\"hits\":%llu,\"misses\":%llu,\"errors\":%llu,"
               "\"timeouts\":%llu,\"reconnects\":%llu,\"corrupt\":%llu,\"unauthenticated\":%llu,\"bytes_read\":%llu,\"bytes_written\":%llu,"
               "\"sets\":%llu,\"deletes\":%llu,\"deletes_dropped\":%llu,\"locks\":%llu,\"lock_waits\":%llu,\"lock_polls\":%llu,\"lock_uncacheable\":%llu,", cfg->cache == CACHE_REDIS,
            (unsigned long long)get(&shim_redis.connected), (unsigned long long)get(&shim_redis.hits),
            (unsigned long long)get(&shim_redis.misses), (unsigned long long)get(&shim_redis.errors),
            (unsigned long long)get(&shim_redis.timeouts), (unsigned long long)get(&shim_redis.reconnects),
            (unsigned long long)get(&shim_redis.corrupt), (unsigned long long)get(&shim_redis.unauthenticated),
            (unsigned long long)get(&shim_redis.bytes_read),
            (unsigned long long)get(&shim_redis.bytes_written), (unsigned long long)get(&shim_redis.sets),
            (unsigned long long)get(&shim_redis.deletes), (unsigned long long)get(&shim_redis.deletes_dropped),
            (unsigned long long)get(&shim_redis.locks), (unsigned long long)get(&shim_redis.lock_waits),
            (unsigned long long)get(&shim_redis.lock_polls), (unsigned long long)get(&shim_redis.lock_uncacheable));
    char master[sizeof shim_redis.master * 6 + 8];
    exited_json_escape(shim_redis.master, strnlen(shim_redis.master, sizeof shim_redis.master), master, sizeof master);
    appendf(o, "\"mode\":\"%s\",\"master\":\"%s\"", cfg->cache != CACHE_REDIS ? "none"
                                                 : redis_mode_name(cfg), master);
    appendf(o, ",\"failovers\":%llu,\"sentinel_errors\":%llu,\"not_master\":%llu,\"redirects\":%llu,",
            (unsigned long long)get(&shim_redis.failovers), (unsigned long long)get(&shim_redis.sentinel_errors),
            (unsigned long long)get(&shim_redis.not_master), (unsigned long long)get(&shim_redis.redirects));
    appendf(o, "\"nodes\":[");
    int n_nodes = get_int(&shim_redis.n_nodes);
    for (int i = 0, shown = 0; i < n_nodes && i < (int)(sizeof shim_redis.nodes / sizeof shim_redis.nodes[0]); i++) {
        const struct redis_node_stats *st = &shim_redis.nodes[i];
        char addr[sizeof st->address * 6 + 8];
        size_t an = strnlen(st->address, sizeof st->address);
        if (!an)
            continue;
        exited_json_escape(st->address, an, addr, sizeof addr);
        appendf(o, "%s{\"address\":\"%s\",\"up\":%d,\"errors\":%llu}", shown++ ? "," : "", addr,
                atomic_load(&st->up), (unsigned long long)atomic_load(&st->errors));
    }
    appendf(o, "],");
    json_histogram(o, "latency_seconds", shim_redis.lat, &shim_redis.lat_sum_us);
    appendf(o, "}}\n");
}

/* At exit: the process's final counters stay beside its socket for `httpshim stats`. */
static void leave_record(void)
{
    if (S.owner != getpid() || !S.path[0] || !S.cfg)
        return;
    struct out o = { .b = { .cap = STATS_OUT_MAX } };
    render_json(&o, S.cfg, true);
    if (!o.full)
        exited_write(S.path, EXITED_SUFFIX, buf_head(&o.b), buf_len(&o.b));
    buf_free(&o.b);
    exited_list(S.cfg->stats_socket, (unsigned)getuid(), EXITED_SUFFIX, NULL, 0);   /* prune: count and age */
}

static void prom_histogram(struct out *o, const char *label, const char *name, const char *help,
                           _Atomic uint64_t *b, _Atomic uint64_t *sum_us, bool header)
{
    if (header)
        appendf(o, "# HELP httpshim_%s %s\n# TYPE httpshim_%s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i <= STATS_LAT_BUCKETS; i++) {
        cum += get(&b[i]);
        if (i < STATS_LAT_BUCKETS)
            appendf(o, "httpshim_%s_bucket{upstream=\"%s\",le=\"%g\"} %llu\n", name, label, stats_lat_bounds_s[i],
                    (unsigned long long)cum);
        else
            appendf(o, "httpshim_%s_bucket{upstream=\"%s\",le=\"+Inf\"} %llu\n", name, label, (unsigned long long)cum);
    }
    appendf(o, "httpshim_%s_sum{upstream=\"%s\"} %.6f\n", name, label, (double)get(sum_us) / 1e6);
    appendf(o, "httpshim_%s_count{upstream=\"%s\"} %llu\n", name, label, (unsigned long long)cum);
}

static void render_prometheus(struct out *o, const struct shim_config *cfg)
{
    char labels[RULES_MAX_UPSTREAMS][RULES_HOST_MAX + 16];
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        upstream_label(&cfg->upstreams[i], labels[i], sizeof labels[i]);
    for (size_t k = 0; k < sizeof counters / sizeof counters[0]; k++) {
        const struct counter_def *d = &counters[k];
        const char *suffix = d->is_gauge ? "" : "_total";
        appendf(o, "# HELP httpshim_%s%s %s\n# TYPE httpshim_%s%s %s\n", d->name, suffix, d->help, d->name, suffix,
                d->is_gauge ? "gauge" : "counter");
        for (size_t i = 0; i < cfg->n_upstreams; i++)
            appendf(o, "httpshim_%s%s{upstream=\"%s\"} %llu\n", d->name, suffix, labels[i],
                    (unsigned long long)counter_value((int)i, d));
    }
    static const char *const pool_names[3] = { "idle", "busy", "waiting" };
    appendf(o, "# HELP httpshim_pool_connections upstream connections now, by state (waiting: requests queued for one)\n"
               "# TYPE httpshim_pool_connections gauge\n");
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        uint64_t v[3];
        pool_gauges((int)i, &v[0], &v[1], &v[2]);
        for (int s = 0; s < 3; s++)
            appendf(o, "httpshim_pool_connections{upstream=\"%s\",state=\"%s\"} %llu\n", labels[i], pool_names[s],
                    (unsigned long long)v[s]);
    }
    appendf(o, "# HELP httpshim_not_stored_total responses not stored, by reason\n# TYPE httpshim_not_stored_total counter\n");
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        for (int r = 1; r < NS__COUNT; r++)
            appendf(o, "httpshim_not_stored_total{upstream=\"%s\",reason=\"%s\"} %llu\n", labels[i],
                    cache_not_stored_names[r], (unsigned long long)get(&shim_stats[i].not_stored[r]));
    appendf(o, "# HELP httpshim_errors_total failed exchanges, by kind\n# TYPE httpshim_errors_total counter\n");
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        appendf(o, "httpshim_errors_total{upstream=\"%s\",kind=\"upstream\"} %llu\n", labels[i],
                (unsigned long long)get(&shim_stats[i].errors_upstream));
        appendf(o, "httpshim_errors_total{upstream=\"%s\",kind=\"app\"} %llu\n", labels[i],
                (unsigned long long)get(&shim_stats[i].errors_app));
        appendf(o, "httpshim_errors_total{upstream=\"%s\",kind=\"tunnel\"} %llu\n", labels[i],
                (unsigned long long)get(&shim_stats[i].errors_tunnel));
    }
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        prom_histogram(o, labels[i], "hit_latency_seconds", "time to answer a request from the cache",
                       shim_stats[i].hit_lat, &shim_stats[i].hit_lat_sum_us, i == 0);
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        prom_histogram(o, labels[i], "miss_latency_seconds", "time to answer a request through the upstream",
                       shim_stats[i].miss_lat, &shim_stats[i].miss_lat_sum_us, i == 0);
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        prom_histogram(o, labels[i], "queue_wait_seconds", "time a request waited in the pool queue for a connection",
                       shim_stats[i].queue_wait, &shim_stats[i].queue_wait_sum_us, i == 0);
    static const struct { const char *name, *help; size_t off; } redis_counters[] = {
        { "hits", "lookups Redis answered with a valid entry", offsetof(struct redis_counters, hits) },
        { "misses", "lookups Redis answered without one", offsetof(struct redis_counters, misses) },
        { "errors", "Redis errors, failed connects and dropped connections", offsetof(struct redis_counters, errors) },
        { "timeouts", "lookups given up after redis_timeout", offsetof(struct redis_counters, timeouts) },
        { "reconnects", "reconnect attempts", offsetof(struct redis_counters, reconnects) },
        { "corrupt", "values that failed to decode: deleted, never served", offsetof(struct redis_counters, corrupt) },
        { "unauthenticated", "values not signed with redis_secret_file's secret: deleted, never served",
          offsetof(struct redis_counters, unauthenticated) },
        { "bytes_read", "value bytes read from Redis", offsetof(struct redis_counters, bytes_read) },
        { "bytes_written", "value bytes written to Redis", offsetof(struct redis_counters, bytes_written) },
        { "sets", "entries written to Redis", offsetof(struct redis_counters, sets) },
        { "deletes", "entries deleted from Redis because an unsafe request to their URL succeeded",
          offsetof(struct redis_counters, deletes) },
        { "deletes_dropped", "such deletes that could not be sent or kept for later (the entries expire by their TTL)",
          offsetof(struct redis_counters, deletes_dropped) },
        { "locks", "fetch locks asked of Redis (one process fetches a key, the others wait)",
          offsetof(struct redis_counters, locks) },
        { "lock_waits", "misses that found another process fetching the key and waited for its entry",
          offsetof(struct redis_counters, lock_waits) },
        { "lock_polls", "polls of Redis for an entry another process was fetching", offsetof(struct redis_counters, lock_polls) },
        { "lock_uncacheable", "misses whose lock said another process's answer for the key could not be stored: fetched at once",
          offsetof(struct redis_counters, lock_uncacheable) },
        { "failovers", "behind Sentinel: switches to another master", offsetof(struct redis_counters, failovers) },
        { "sentinel_errors", "behind Sentinel: sentinels that could not be reached or named no master",
          offsetof(struct redis_counters, sentinel_errors) },
        { "not_master", "behind Sentinel: masters that turned out not to be (ROLE, READONLY, MASTERDOWN)",
          offsetof(struct redis_counters, not_master) },
        { "redirects", "a cluster's MOVED and ASK replies (the slot map followed)", offsetof(struct redis_counters, redirects) },
    };
    for (size_t k = 0; k < sizeof redis_counters / sizeof redis_counters[0]; k++)
        appendf(o, "# HELP httpshim_redis_%s_total %s\n# TYPE httpshim_redis_%s_total counter\nhttpshim_redis_%s_total %llu\n",
                redis_counters[k].name, redis_counters[k].help, redis_counters[k].name, redis_counters[k].name,
                (unsigned long long)get((_Atomic uint64_t *)(void *)((char *)&shim_redis + redis_counters[k].off)));
    if (cfg->cache == CACHE_REDIS) {
        appendf(o, "# HELP httpshim_redis_node_up each server of the Redis tier: 1 while in use\n"
                   "# TYPE httpshim_redis_node_up gauge\n");
        int n_nodes = get_int(&shim_redis.n_nodes);
        for (int i = 0; i < n_nodes && i < (int)(sizeof shim_redis.nodes / sizeof shim_redis.nodes[0]); i++)
            if (shim_redis.nodes[i].address[0])
                appendf(o, "httpshim_redis_node_up{address=\"%s\"} %d\n", shim_redis.nodes[i].address,
                        atomic_load(&shim_redis.nodes[i].up));
        appendf(o, "# HELP httpshim_redis_node_errors_total errors, failed connects and dropped connections, by server\n"
                   "# TYPE httpshim_redis_node_errors_total counter\n");
        for (int i = 0; i < n_nodes && i < (int)(sizeof shim_redis.nodes / sizeof shim_redis.nodes[0]); i++)
            if (shim_redis.nodes[i].address[0])
                appendf(o, "httpshim_redis_node_errors_total{address=\"%s\"} %llu\n", shim_redis.nodes[i].address,
                        (unsigned long long)atomic_load(&shim_redis.nodes[i].errors));
        char master[sizeof shim_redis.master * 6 + 8];
        exited_json_escape(shim_redis.master, strnlen(shim_redis.master, sizeof shim_redis.master), master,
                           sizeof master);
        appendf(o, "# HELP httpshim_redis_master the Redis tier's server in use (1), by mode and address\n"
                   "# TYPE httpshim_redis_master gauge\nhttpshim_redis_master{mode=\"%s\",address=\"%s\"} %d\n",
                redis_mode_name(cfg), master,
                (int)get(&shim_redis.connected) ? 1 : 0);
    }
    appendf(o, "# HELP httpshim_queue_wait_max_seconds the longest a request waited in the pool queue\n"
               "# TYPE httpshim_queue_wait_max_seconds gauge\n");
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        appendf(o, "httpshim_queue_wait_max_seconds{upstream=\"%s\"} %.6f\n", labels[i],
                (double)get(&shim_stats[i].queue_wait_max_us) / 1e6);
    static const char *const rule_fields[2] = { "requests", "hits" };
    for (int f = 0; f < 2; f++) {
        appendf(o, "# HELP httpshim_rule_%s_total %s, per cache rule\n# TYPE httpshim_rule_%s_total counter\n",
                rule_fields[f], f ? "requests answered from the cache" : "requests the rule matched", rule_fields[f]);
        for (size_t i = 0; i < cfg->n_upstreams; i++) {
            const struct upstream_rule *u = &cfg->upstreams[i];
            for (size_t r = 0; r < u->n_cache_rules && r < RULES_MAX_CACHE_RULES; r++) {
                char text[sizeof u->cache_rules[r].glob + 32], rule[sizeof text * 2];
                snprintf(text, sizeof text, "%s %s", u->cache_rules[r].method, u->cache_rules[r].glob);
                size_t k = 0;
                for (const char *p = text; *p && k + 3 < sizeof rule; p++) {   /* a label value's escapes */
                    if (*p == '"' || *p == '\\')
                        rule[k++] = '\\';
                    rule[k++] = *p == '\n' ? ' ' : *p;
                }
                rule[k] = 0;
                const struct rule_stats *rs = &shim_rule_stats[i][r];
                appendf(o, "httpshim_rule_%s_total{upstream=\"%s\",rule=\"%s\"} %llu\n", rule_fields[f], labels[i], rule,
                        (unsigned long long)get((_Atomic uint64_t *)(f ? &rs->hits : &rs->requests)));
            }
        }
    }
    uint64_t cum = 0;
    appendf(o, "# HELP httpshim_redis_latency_seconds time from a Redis lookup's GET to its answer\n"
               "# TYPE httpshim_redis_latency_seconds histogram\n");
    for (int i = 0; i <= STATS_LAT_BUCKETS; i++) {
        cum += get(&shim_redis.lat[i]);
        if (i < STATS_LAT_BUCKETS)
            appendf(o, "httpshim_redis_latency_seconds_bucket{le=\"%g\"} %llu\n", stats_lat_bounds_s[i],
                    (unsigned long long)cum);
    }
    appendf(o, "httpshim_redis_latency_seconds_bucket{le=\"+Inf\"} %llu\nhttpshim_redis_latency_seconds_sum %.6f\n"
               "httpshim_redis_latency_seconds_count %llu\n", (unsigned long long)cum,
            (double)get(&shim_redis.lat_sum_us) / 1e6, (unsigned long long)cum);
    appendf(o, "# HELP httpshim_redis_connected 1 while the Redis connection is up\n# TYPE httpshim_redis_connected gauge\n"
               "httpshim_redis_connected %llu\n", (unsigned long long)get(&shim_redis.connected));
    struct loop_counters lc;
    loop_read_counters(&lc);
    appendf(o, "# HELP httpshim_engine_sleeps_total times the engine's loop slept in epoll_wait\n"
               "# TYPE httpshim_engine_sleeps_total counter\nhttpshim_engine_sleeps_total %llu\n"
               "# HELP httpshim_engine_polls_total times the engine polled after a batch instead of sleeping (busy_poll)\n"
               "# TYPE httpshim_engine_polls_total counter\nhttpshim_engine_polls_total %llu\n"
               "# HELP httpshim_engine_polls_paid_total polls that caught an event a sleep would have waited for\n"
               "# TYPE httpshim_engine_polls_paid_total counter\nhttpshim_engine_polls_paid_total %llu\n"
               "# HELP httpshim_engine_poll_seconds_total time the engine spent polling\n"
               "# TYPE httpshim_engine_poll_seconds_total counter\nhttpshim_engine_poll_seconds_total %.6f\n",
            (unsigned long long)lc.sleeps, (unsigned long long)lc.polls, (unsigned long long)lc.polls_paid,
            (double)lc.poll_us / 1e6);
    appendf(o, "# HELP httpshim_stats_refused_total stats socket peers refused (other uid, or too many)\n"
               "# TYPE httpshim_stats_refused_total counter\nhttpshim_stats_refused_total %llu\n",
            (unsigned long long)get(&refused_peers));
}

/* ---- purge ---- */

struct purge_match { int upstream; char glob[512]; };

static bool purge_matches(const struct cache_entry *e, void *arg)
{
    const struct purge_match *m = arg;
    if (m->upstream >= 0 && e->upstream != m->upstream)
        return false;
    const char *p = memmem(e->key, e->key_len, "://", 3);
    if (!p)
        return false;
    const char *end = e->key + e->key_len;
    p = memchr(p + 3, '/', (size_t)(end - p - 3));
    if (!p)
        return false;
    char path[4096];
    size_t n = 0;
    while (p + n < end && p[n] != '?' && p[n] != '\n' && n < sizeof path - 1)
        n++;
    memcpy(path, p, n);
    path[n] = 0;
    return fnmatch(m->glob, path, 0) == 0;
}

static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* The value of query parameter `name`, percent-decoded into out; false if absent. */
static bool query_param(struct http_slice target, const char *name, char *out, size_t cap)
{
    const char *q = memchr(target.p, '?', target.n);
    if (!q)
        return false;
    const char *end = target.p + target.n;
    size_t nl = strlen(name);
    for (const char *p = q + 1; p < end;) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *stop = amp ? amp : end;
        if ((size_t)(stop - p) > nl && !memcmp(p, name, nl) && p[nl] == '=') {
            size_t n = 0;
            for (const char *s = p + nl + 1; s < stop && n + 1 < cap; s++) {
                if (*s == '%' && stop - s > 2 && hexval(s[1]) >= 0 && hexval(s[2]) >= 0) {
                    out[n++] = (char)(hexval(s[1]) * 16 + hexval(s[2]));
                    s += 2;
                } else {
                    out[n++] = *s == '+' ? ' ' : *s;
                }
            }
            out[n] = 0;
            return true;
        }
        p = stop + 1;
    }
    return false;
}

static int respond_purge(struct out *o, const struct shim_config *cfg, struct http_slice target)
{
    struct purge_match m = { .upstream = -1 };
    char up[RULES_HOST_MAX + 16];
    if (!query_param(target, "glob", m.glob, sizeof m.glob) || !m.glob[0])
        snprintf(m.glob, sizeof m.glob, "*");
    if (query_param(target, "upstream", up, sizeof up) && up[0]) {
        for (size_t i = 0; i < cfg->n_upstreams; i++) {
            char label[RULES_HOST_MAX + 16];
            upstream_label(&cfg->upstreams[i], label, sizeof label);
            if (!strcasecmp(label, up))
                m.upstream = (int)i;
        }
        if (m.upstream < 0) {
            appendf(o, "{\"pid\":%d,\"purged\":0,\"error\":\"no such upstream\"}\n", (int)getpid());
            return 0;
        }
    }
    size_t n = memcache_purge(purge_matches, &m);
    appendf(o, "{\"pid\":%d,\"purged\":%zu}\n", (int)getpid(), n);
    return 0;
}

/* ---- clients ---- */

static void reclaim_client(struct loop_deferred *d)
{
    struct stats_client *cl = (struct stats_client *)((char *)d - offsetof(struct stats_client, reclaim));
    buf_free(&cl->out);
    free(cl);
}

static void client_close(struct stats_client *cl)
{
    struct stats_client **pp = &S.clients;
    while (*pp && *pp != cl)
        pp = &(*pp)->next;
    if (*pp)
        *pp = cl->next;
    S.n_clients--;
    loop_remove(&cl->src);
    fdtable_close_engine_fd(cl->fd);
    loop_defer(&cl->reclaim, reclaim_client);
}

static void client_respond(struct stats_client *cl, int status, const char *reason, const char *type, struct out *body)
{
    char head[256];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
                     status, reason, type, buf_len(&body->b));
    cl->out.cap = STATS_OUT_MAX + sizeof head;
    if (buf_append(&cl->out, head, (size_t)n) != 0 || buf_append(&cl->out, buf_head(&body->b), buf_len(&body->b)) != 0) {
        client_close(cl);
        return;
    }
    loop_watch(&cl->src, EPOLLOUT);
}

/* The test clock (HTTPSHIM_TEST_CLOCK=1 only): POST /test/clock?advance_ms=N. */
static void respond_test_clock(struct out *body, struct http_slice target)
{
    const char *q = memchr(target.p, '?', target.n);
    static const char name[] = "advance_ms=";
    long long ms = 0;
    if (q && (size_t)(target.p + target.n - q) > sizeof name && !memcmp(q + 1, name, sizeof name - 1)) {
        char num[24];
        size_t n = (size_t)(target.p + target.n - (q + sizeof name));
        if (n < sizeof num) {
            memcpy(num, q + sizeof name, n);
            num[n] = 0;
            ms = strtoll(num, NULL, 10);
        }
    }
    clock_advance_ms(ms);
    loop_clock_moved();
    appendf(body, "{\"advanced_ms\":%lld,\"offset_ms\":%lld}", ms > 0 ? ms : 0, (long long)(clock_offset_us() / 1000));
}

static void client_request(struct stats_client *cl)
{
    static struct http_request req;
    enum http_parse_result r = http_parse_request(cl->in, cl->in_len, &req);
    if (r == HTTP_PARSE_INCOMPLETE && cl->in_len < sizeof cl->in)
        return;
    struct out body = { .b = { .cap = STATS_OUT_MAX } };
    const struct shim_config *cfg = S.cfg;
    if (r != HTTP_PARSE_DONE) {
        appendf(&body, "bad request\n");
        client_respond(cl, 400, "Bad Request", "text/plain", &body);
        buf_free(&body.b);
        return;
    }
    struct http_slice path = req.target;
    const char *q = memchr(path.p, '?', path.n);
    if (q)
        path.n = (size_t)(q - path.p);
    int status = 200;
    const char *reason = "OK", *type = "application/json";
    if (http_slice_ieq(path, "/stats") && (http_method_is(&req, "GET") || http_method_is(&req, "HEAD"))) {
        render_json(&body, cfg, false);
    } else if (http_slice_ieq(path, "/metrics") && (http_method_is(&req, "GET") || http_method_is(&req, "HEAD"))) {
        render_prometheus(&body, cfg);
        type = "text/plain; version=0.0.4; charset=utf-8";
    } else if (http_slice_ieq(path, "/purge") && http_method_is(&req, "POST")) {
        respond_purge(&body, cfg, req.target);
    } else if (http_slice_ieq(path, "/test/clock") && http_method_is(&req, "POST") && clock_test_enabled()) {
        respond_test_clock(&body, req.target);
    } else {
        status = 404;
        reason = "Not Found";
        type = "text/plain";
        appendf(&body, "try GET /stats, GET /metrics or POST /purge?upstream=HOST:PORT&glob=GLOB\n");
    }
    if (body.full) {
        buf_consume(&body.b, buf_len(&body.b));
        status = 500;
        reason = "Internal Server Error";
        type = "text/plain";
    }
    client_respond(cl, status, reason, type, &body);
    buf_free(&body.b);
}

/* A peer's slowness is measured on the real clock: a test advancing the library's clock
 * (POST /test/clock) must not time out the very client that asked, before its answer. */
static int64_t real_ms(void)
{
    return clock_mono_ms() - clock_offset_us() / 1000;
}

/* Once a second while there are clients: the slow or silent ones never hold the engine. */
static void on_tick(struct loop_timer *timer)
{
    (void)timer;
    int64_t now = real_ms();
    struct stats_client *cl = S.clients;
    while (cl) {
        struct stats_client *next = cl->next;
        if (now > cl->deadline_ms)
            client_close(cl);
        cl = next;
    }
    if (S.clients)
        loop_timer_arm(&S.tick, 1000, on_tick);
}

static void on_client(struct loop_source *src, uint32_t ev)
{
    struct stats_client *cl = (struct stats_client *)(void *)src;
    if (ev & EPOLLERR) {
        client_close(cl);
        return;
    }
    if (buf_len(&cl->out) == 0 && (ev & (EPOLLIN | EPOLLHUP))) {
        ssize_t n = recv(cl->fd, cl->in + cl->in_len, sizeof cl->in - cl->in_len, MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            client_close(cl);
            return;
        }
        if (n > 0) {
            cl->in_len += (size_t)n;
            client_request(cl);
        }
        return;
    }
    if (buf_len(&cl->out)) {
        ssize_t n = real_send(cl->fd, buf_head(&cl->out), buf_len(&cl->out), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0)
            buf_consume(&cl->out, (size_t)n);
        if ((n < 0 && errno != EAGAIN && errno != EINTR) || buf_len(&cl->out) == 0)
            client_close(cl);
    }
}

static void on_listener(struct loop_source *src, uint32_t ev)
{
    (void)src;
    (void)ev;
    for (int i = 0; i < 16; i++) {
        int fd = accept4(S.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        struct ucred cred;
        socklen_t len = sizeof cred;
        bool allowed = real_getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0
                       && (cred.uid == getuid() || cred.uid == 0);
        struct stats_client *cl = allowed && S.n_clients < STATS_MAX_CLIENTS ? calloc(1, sizeof *cl) : NULL;
        if (!cl) {
            /* a busy socket says so: closed without a word, the CLI left this process out
             * of its sums as if it had never been there */
            static const char busy[] = "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                       "Content-Length: 41\r\nConnection: close\r\n\r\n"
                                       "{\"error\":\"busy: too many stats clients\"}\n";
            if (allowed)
                (void)!real_send(fd, busy, sizeof busy - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
            atomic_fetch_add(&refused_peers, 1);
            real_close(fd);
            continue;
        }
        cl->fd = fd;
        cl->deadline_ms = real_ms() + STATS_CLIENT_MS;
        fdtable_mark_engine(fd);
        if (loop_add(&cl->src, fd, EPOLLIN, on_client) != 0) {
            fdtable_close_engine_fd(fd);
            free(cl);
            continue;
        }
        cl->next = S.clients;
        S.clients = cl;
        S.n_clients++;
        if (!loop_timer_armed(&S.tick))
            loop_timer_arm(&S.tick, 1000, on_tick);
    }
}
