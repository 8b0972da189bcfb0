/* conn.h — the engine's per-connection state, shared by engine.c (the app side and the
 * state machine), upstream.c (libcurl transfers) and tunnel.c (raw relays). Only the
 * engine thread touches a conn once it has been adopted. */
#ifndef HTTPSHIM_CONN_H
#define HTTPSHIM_CONN_H
#include "shim.h"
#include "http.h"
#include "cache.h"
#include "stats.h"

/* Every epoll registration's data.ptr points at a struct starting with this tag. */
enum ev_kind { EV_DEAD = 0, EV_APP, EV_TUNNEL_UP, EV_CURL, EV_TIMER, EV_WAKE, EV_TICK, EV_STATS, EV_REDIS, EV_REDIS_TIMER };
struct ev_tag { int kind; struct ev_tag *next_dead; };

/* Caps. A request head beyond HEAD_MAX, or head + body beyond IN_CAP, is not parsed
 * but relayed as a raw tunnel; a response head beyond RESP_HEAD_MAX fails the exchange. */
#define HEAD_MAX        (64 * 1024)
#define IN_CAP          (128 * 1024)
#define OUT_SOFT        (64 * 1024)
#define RESP_HEAD_MAX   (64 * 1024)
#define OUT_CAP         (OUT_SOFT + RESP_HEAD_MAX + 1024)
/* Small on purpose: most exchanges are a few hundred bytes each way, and per-connection
 * buffers of 16 KiB made the engine's malloc arena grow and trim (madvise + TLB
 * shootdowns) on every burst of connections. Bigger ones grow by doubling. */
#define BUF_INITIAL     1024

/* A bounded byte queue: bytes live in data[start, end); it grows up to cap, then
 * callers must stop producing (backpressure). */
struct buf { char *data; size_t start, end, size, cap; };

static inline size_t buf_len(const struct buf *b) { return b->end - b->start; }
static inline char *buf_head(const struct buf *b) { return b->data + b->start; }
static inline void buf_consume(struct buf *b, size_t n)
{
    b->start += n;
    if (b->start == b->end)
        b->start = b->end = 0;
}
/* Makes room for `want` more bytes at the end (compacting, then growing up to cap).
 * Returns the free bytes at the end afterwards, which may be less than want. */
size_t buf_make_room(struct buf *b, size_t want);
int buf_append(struct buf *b, const void *p, size_t n);   /* 0, or -1 if over cap */
void buf_free(struct buf *b);

enum conn_state {
    CS_HTTP,            /* reading requests; at most one exchange in flight */
    CS_UPSTREAM,        /* an exchange is in flight through libcurl */
    CS_HIT,             /* streaming a cached entry to the app */
    CS_REDIS,           /* waiting (at most redis_timeout) for a Redis lookup */
    CS_TUNNEL,          /* raw relay to a real upstream socket */
};

struct transfer;
struct tunnel;

struct conn {
    struct ev_tag tag;
    int fd;                         /* the engine's end of the socketpair */
    int upstream;                   /* index into the config's upstreams */
    union shim_sockaddr dest;
    socklen_t dest_len;
    enum conn_state state;
    struct buf in, out;
    uint32_t events;                /* what epoll watches now */
    bool app_eof;                   /* the app shut down its write side */
    bool app_gone;                  /* the app closed: nothing more can be delivered */
    bool closing;                   /* close once `out` has drained */
    bool dead;
    /* the request being answered (its bytes stay at the front of `in`) */
    size_t req_total;               /* head + body bytes */
    int req_minor;
    bool req_keep_alive, req_is_head, continue_sent;
    int64_t req_started_us;
    uint64_t body_left;             /* streamed body bytes not yet handed to libcurl */
    struct cache_entry *hit;        /* CS_HIT: the entry being sent, a reference held */
    size_t hit_off, hit_len;        /* body bytes sent so far, and to send */
    bool hit_must_close;
    struct redis_ticket *redis_ticket;   /* CS_REDIS */
    bool redis_checked;             /* this request already asked Redis */
    struct cache_entry *redis_hit;  /* what Redis answered, served even if memory is full */
    struct transfer *xfer;
    struct tunnel *tun;
    struct conn *next, *prev;       /* all live conns, under the engine lock */
    struct conn *next_dead;
};

/* engine.c */
void conn_close(struct conn *c);
int conn_flush(struct conn *c);              /* -1 when the app is gone */
void conn_update_events(struct conn *c);      /* may close the conn */
void conn_watch_app(struct conn *c);          /* only adjusts epoll interest: safe in callbacks */
void conn_process(struct conn *c);
void conn_exchange_done(struct conn *c, bool ok, bool must_close);
int engine_watch(int fd, uint32_t events, void *tag, bool add);
void engine_unwatch(int fd);
/* Frees a tagged object after the current epoll batch: events for it may still be queued. */
void engine_free_later(struct ev_tag *tag);
const struct shim_config *engine_config(void);
int engine_timer_arm(long timeout_ms);      /* -1 disarms */

/* upstream.c */
int upstream_init(const struct shim_config *cfg);
void upstream_forget(void);                  /* forked child: abandon the parent's state */
/* Starts the exchange; with a store rule and key, a cacheable response is stored.
 * body_len (size_t)-1: the body streams from conn->in, conn->body_left bytes of it. */
int upstream_start(struct conn *c, const struct http_request *req, const char *body, size_t body_len,
                   const struct cache_rule *store_rule, const char *key, size_t key_len);
void upstream_abort(struct conn *c);
void upstream_resume(struct conn *c);        /* `out` drained: unpause a paused transfer */
void upstream_body_arrived(struct conn *c);  /* more streamed body in `in`: unpause sending */
void upstream_on_socket(void *tag, uint32_t events);
void upstream_on_timer(void);
void upstream_reap(void);                    /* collect finished transfers */

/* stats_server.c */
int stats_server_start(const struct shim_config *cfg);
void stats_server_atfork_child(void);
void stats_on_event(void *tag, uint32_t events);
void stats_tick(void);                       /* once a second: time out slow clients */

/* cache_redis.c */
struct redis_ticket;
int redis_init(const struct shim_config *cfg);
void redis_forget(void);
bool redis_lookup(struct conn *c, const char *key, size_t key_len);   /* false: go upstream */
void redis_cancel(struct conn *c);
void redis_store(const struct cache_entry *e, int64_t ttl_ms);
/* A transfer that may end in redis_store() began (+1) or ended (-1); see flush_at_exit. */
void redis_write_owed(int delta);
void redis_on_event(const void *tag, uint32_t events);
/* engine.c: the lookup ended (e: a reference to the entry found, or NULL) */
void redis_lookup_done(struct conn *c, struct cache_entry *e);

/* tunnel.c */
int tunnel_start(struct conn *c);
void tunnel_pump(struct conn *c);
void tunnel_on_upstream(void *tag, uint32_t events);
void tunnel_free(struct conn *c);
#endif
