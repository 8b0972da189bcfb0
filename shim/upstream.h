/* upstream.h — exchanges with the upstream through libcurl's multi interface, and the
 * pool of kept-alive connections it keeps (upstream.c). */
#ifndef HTTPSHIM_UPSTREAM_H
#define HTTPSHIM_UPSTREAM_H
#include "conn.h"
#include "http.h"
#include "rules.h"

struct transfer;

/* Whoever watches a transfer's response for the cache (store.c's writer) hears it through
 * these callbacks, in this order: validators (while the request is built), then per
 * response head begin, its end-to-end header lines, head_done; the body's bytes; end,
 * exactly once, when the transfer is over. upstream.c calls no cache code. */
struct upstream_sink;
enum sink_verdict {
    SINK_RELAY,                     /* relay the response */
    SINK_ABSORB,                    /* a 304 to the sink's validators: relay nothing, end ABSORBED */
    SINK_FAIL,                      /* fail the exchange now, before anything reaches the app */
};
enum sink_unstorable { SINK_HAD_TRAILERS, SINK_FOLDED, SINK_HOP_FIELDS };
enum sink_end {
    SINK_WHOLE,                     /* the response arrived whole (libcurl: done, no error) */
    SINK_FAILED,                    /* the upstream failed, or the response was cut short */
    SINK_DROPPED,                   /* given up on this side (the app went away and no one
                                     * else wanted the response, or it waited too long for a
                                     * connection): nothing to say about the upstream */
};
struct upstream_sink_ops {
    /* the conditional headers to send instead of the app's own (n = 0: none) */
    void (*validators)(struct upstream_sink *s, struct http_slice *etag, struct http_slice *last_modified);
    void (*begin)(struct upstream_sink *s, int status, struct http_slice reason);
    /* one header line of the final head (hop-by-hop and framing headers are not reported) */
    void (*header)(struct upstream_sink *s, struct http_slice name, struct http_slice value, struct http_slice line);
    enum sink_verdict (*head_done)(struct upstream_sink *s, int64_t content_length, bool chunked,
                                   enum http_framing_verdict framing);
    void (*body)(struct upstream_sink *s, const char *p, size_t n);
    /* the response cannot be stored whole: it carries trailer fields (relayed to the app
     * when it can take them, which a stored entry could not give again), or a folded header
     * line (relayed unfolded; what header() reported of it was its first part) */
    void (*unstorable)(struct upstream_sink *s, enum sink_unstorable why);
    /* whether the response is still wanted once the app has gone */
    bool (*wanted)(struct upstream_sink *s);
    void (*end)(struct upstream_sink *s, enum sink_end how);
};
struct upstream_sink { const struct upstream_sink_ops *ops; };

int upstream_init(const struct shim_config *cfg);
void upstream_forget(void);                  /* forked child: abandon the parent's state */
/* Starts the exchange for app's request. body_len (size_t)-1: the body streams from
 * app->in, app->body_left bytes of it. The transfer reports through app->ops until it ends
 * or is aborted, and through sink (may be NULL; ended even when starting fails). NULL:
 * failed. */
struct transfer *upstream_start(struct app_side *app, const struct http_request *req, const char *body,
                                size_t body_len, struct upstream_sink *sink);
void upstream_abort(struct transfer *t);
/* A request of no app connection's (a background refresh): app's request, with its body,
 * to the same place (its destination, its TLS leg), whose response only the sink hears.
 * False: not started (the sink has ended). */
bool upstream_refresh(const struct app_side *app, const struct http_request *req, const char *body, size_t body_len,
                      struct upstream_sink *sink);
/* The request is in the transfer's hands and no answer has begun: an app that leaves now
 * need not stop it (what comes back is dropped). */
bool upstream_awaiting_answer(const struct transfer *t);
/* The app's connection is going: the transfer is aborted, unless its sink still wants the
 * response, for whom it goes on alone. Either way the app side is never touched again. */
void upstream_app_gone(struct transfer *t);
void upstream_resume(struct transfer *t);        /* `out` drained: unpause a paused transfer */
bool upstream_paused(const struct transfer *t);  /* waiting for `out` to drain (upstream_resume) */
void upstream_body_arrived(struct transfer *t);  /* more streamed body in `in`: unpause sending */
void upstream_reap(void);                        /* collect finished transfers */

/* A TLS handshake with the upstream as `host`, pinned to dest, verified as the HTTPS leg
 * is (libcurl: system store, tls_ca_file); its outcome and the chain the upstream
 * presented are kept by tls_front.c (tls_front_verdict), then done is called. Returns a
 * handle for upstream_tls_probe_cancel, or NULL (done never called). */
typedef void (*upstream_tls_probe_fn)(void *arg);
void *upstream_tls_probe(int upstream, const char *host, const union shim_sockaddr *dest, socklen_t dest_len,
                         upstream_tls_probe_fn done, void *arg);
void upstream_tls_probe_cancel(void *probe);
#endif
