/* upstream_request.h — what the upstream is sent (upstream_request.c): the app's request
 * rewritten for libcurl, aimed at the address the app dialled. */
#ifndef HTTPSHIM_UPSTREAM_REQUEST_H
#define HTTPSHIM_UPSTREAM_REQUEST_H
#include <curl/curl.h>
#include <stdbool.h>
#include "fdtable.h"
#include "http.h"
#include "rules.h"

/* Where a transfer goes: its URL's scheme, host and port, the address libcurl must
 * connect to for it (NULL: resolve the host), and whether it is TLS libcurl verifies. */
struct upreq_where {
    const char *scheme, *host;
    unsigned port;
    const union shim_sockaddr *pin;
    bool verify;
};

/* An easy handle for a request (a spare, reset, or a new one), given back when its
 * transfer ends (a probe's is freed: it holds its connection); a forked child forgets the
 * parent's spares. */
CURL *upreq_easy_get(void);
void upreq_easy_put(CURL *e, bool is_probe);
void upreq_easy_forget(void);
/* libcurl's socket for a transfer to upstream: a connection the app's own connect made
 * while the pool was cold, when `adopt` and one is kept for that address, else a new one;
 * -1 with errno (EMFILE: the process is out of fds). And its close, counted. */
int upreq_open_socket(int upstream, bool adopt, const struct curl_sockaddr *addr);
int upreq_close_socket(void *clientp, curl_socket_t fd);
/* The URL and the pin (*connect_to: a list the caller frees). */
int upreq_aim(CURL *e, const struct upreq_where *w, struct curl_slist **connect_to);
/* libcurl's full verification (peer and host name), against the system store plus the
 * rule's tls_ca_file. */
void upreq_verify_tls(CURL *e, const struct upstream_rule *u);
/* libcurl's CURLOPT_SSL_CTX_FUNCTION for every TLS leg: no renegotiation. */
int upreq_refuse_renegotiation(void *curl, void *sslctx, void *parm);
/* Everything about the request but its body and the transfer's callbacks: the URL, pin and
 * verification, the target as the app wrote it, its headers minus hop-by-hop ones (and
 * with the cache's own validators instead of the app's conditionals, when it has some),
 * none of libcurl's own additions, the method, and the connection's limits. *headers and
 * *connect_to are the caller's to free, also on failure. */
int upreq_build(CURL *e, const struct shim_config *cfg, const struct upstream_rule *u, const struct upreq_where *w,
                const struct http_request *req, struct http_slice etag, struct http_slice last_modified,
                struct curl_slist **headers, struct curl_slist **connect_to);
/* The upstream's silence before its answer's head, from the last byte either way, as
 * upstream_timeout means it: libcurl's low-speed check (kept for the body) averages the
 * speed over 5 s counting what was sent, so a request with a body waited up to 5 s more.
 * libcurl's progress callback, run every second while that check is on, aborts the
 * transfer (overdue) once *status (the head's, 0 until one comes) has stayed 0 and no
 * byte has moved for limit_ms, none of it while *on_app (the body waits for the app). */
struct upreq_silence {
    const int *status;
    const bool *on_app;
    curl_off_t moved;
    int64_t since_us, limit_us;
    bool overdue;
};
void upreq_watch_silence(CURL *e, struct upreq_silence *s, const int *status, const bool *on_app, int64_t limit_ms);
/* The address and port dialled, as the kept TLS verdicts name them ("1.2.3.4:443",
 * "[::1]:443"). */
void upstream_dialled_text(const union shim_sockaddr *a, char *out, size_t n);
#endif
