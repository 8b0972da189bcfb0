/* upstream.h — exchanges with the upstream through libcurl's multi interface, and the
 * pool of kept-alive connections it keeps (upstream.c). */
#ifndef HTTPSHIM_UPSTREAM_H
#define HTTPSHIM_UPSTREAM_H
#include "cache.h"
#include "conn.h"
#include "flight.h"
#include "http.h"
#include "rules.h"

struct transfer;
int upstream_init(const struct shim_config *cfg);
void upstream_forget(void);                  /* forked child: abandon the parent's state */
/* Starts the exchange for app's request; with a store rule and key, a cacheable response
 * is stored. body_len (size_t)-1: the body streams from app->in, app->body_left bytes of
 * it. The transfer reports through app->ops until it ends or is aborted. With a flight
 * (taken over, also on failure), the transfer lands it when it has stored the response
 * or knows it cannot. NULL: failed. */
struct transfer *upstream_start(struct app_side *app, const struct http_request *req, const char *body,
                                size_t body_len, const struct cache_rule *store_rule, const char *key,
                                size_t key_len, struct flight *flight);
void upstream_abort(struct transfer *t);
/* A background refresh of a stale entry, for no app connection: the request is app's
 * (its head at the front of app->in), conditional on the entry's validators; it leads
 * flight and stores what it gets (a 304 renews the entry). False: not started. */
bool upstream_refresh(const struct app_side *app, const struct http_request *req, const struct cache_rule *rule,
                      const char *key, size_t key_len, struct flight *flight, struct cache_entry *stale);
/* The app's connection is going: the transfer is aborted, unless requests wait on its
 * flight, for whom it goes on alone. Either way the app side is never touched again. */
void upstream_app_gone(struct transfer *t);
void upstream_resume(struct transfer *t);        /* `out` drained: unpause a paused transfer */
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
/* The address and port dialled, as the kept TLS verdicts name them ("1.2.3.4:443",
 * "[::1]:443"). */
void upstream_dialled_text(const union shim_sockaddr *a, char *out, size_t n);
#endif
