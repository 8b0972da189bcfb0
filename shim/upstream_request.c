/* upstream_request.c — owns what the upstream is sent for an app's request, on an easy
 * handle it keeps spares of: its URL and
 * the address libcurl must connect to (the one the app dialled: the shim never re-resolves
 * behind its back), libcurl's verification for an HTTPS leg, the target as the app wrote
 * it, the app's headers minus hop-by-hop ones and those its Connection names (with the
 * cache's validators instead of its conditionals when the cache revalidates), none of
 * libcurl's own additions (Accept, Expect, Host, Content-Type), the method, and the
 * connection's timeouts and idle age; and the sockets libcurl opens and closes for it (a
 * connection the app's own connect made while the pool was cold, adopted). Engine thread
 * only. */
#include "upstream_request.h"
#include "clock.h"
#include "conn.h"
#include "curl_loop.h"
#include "lazyssl.h"
#include "pool.h"
#include "real.h"
#include "stats.h"
#include <errno.h>
#include <arpa/inet.h>
#include <openssl/ssl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Easy handles are reused: a new one per request cost an allocation of libcurl's own
 * state and buffers, and freeing it, on every request (a tenth of the engine's time
 * under load). A probe's handle is not: it keeps its CONNECT_ONLY connection. */
#define EASY_SPARE_MAX 64
static CURL *spare_easy[EASY_SPARE_MAX];
static int n_spare_easy;

CURL *upreq_easy_get(void)
{
    return n_spare_easy ? spare_easy[--n_spare_easy] : curl_easy_init();
}

void upreq_easy_put(CURL *e, bool is_probe)
{
    if (is_probe || n_spare_easy == EASY_SPARE_MAX) {
        curl_easy_cleanup(e);
        return;
    }
    curl_easy_reset(e);
    spare_easy[n_spare_easy++] = e;
}

void upreq_easy_forget(void) { n_spare_easy = 0; }

/* Debian's (and OpenSSL's default) directory of hashed system CA certificates */
#define SYSTEM_CA_PATH "/etc/ssl/certs"

static char scratch[HEAD_MAX + 512];   /* engine thread only: one header line, URL or target */

static int format_addr(char *out, size_t n, const union shim_sockaddr *a, uint16_t *port);

static int add_header(struct curl_slist **headers, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int add_header(struct curl_slist **headers, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(scratch, sizeof scratch, fmt, ap);
    va_end(ap);
    if (k < 0 || (size_t)k >= sizeof scratch)
        return -1;
    struct curl_slist *l = curl_slist_append(*headers, scratch);
    if (!l)
        return -1;
    *headers = l;
    return 0;
}

static bool named_in_connection(const struct http_request *req, struct http_slice name)
{
    for (size_t i = 0; i < req->nheaders; i++)
        if (http_slice_ieq(req->headers[i].name, "connection")) {
            char tok[64];
            if (name.n >= sizeof tok)
                return false;
            memcpy(tok, name.p, name.n);
            tok[name.n] = 0;
            if (http_list_has_token(req->headers[i].value, tok))
                return true;
        }
    return false;
}

void upstream_dialled_text(const union shim_sockaddr *a, char *out, size_t n)
{
    char ip[INET6_ADDRSTRLEN + 2];
    uint16_t port;
    format_addr(ip, sizeof ip, a, &port);
    snprintf(out, n, "%s:%u", ip, port);
}

static int format_addr(char *out, size_t n, const union shim_sockaddr *a, uint16_t *port)
{
    char ip[INET6_ADDRSTRLEN];
    if (a->sa.sa_family == AF_INET) {
        inet_ntop(AF_INET, &a->in.sin_addr, ip, sizeof ip);
        *port = ntohs(a->in.sin_port);
        return snprintf(out, n, "%s", ip);
    }
    if (IN6_IS_ADDR_V4MAPPED(&a->in6.sin6_addr))
        inet_ntop(AF_INET, a->in6.sin6_addr.s6_addr + 12, ip, sizeof ip);
    else
        inet_ntop(AF_INET6, &a->in6.sin6_addr, ip, sizeof ip);
    *port = ntohs(a->in6.sin6_port);
    return snprintf(out, n, strchr(ip, ':') ? "[%s]" : "%s", ip);
}

/* A TLS 1.2 server's HelloRequest could bring another certificate after the leg was held
 * to what the app trusts, checked only by libcurl then (not the app's store, not the host
 * name): every leg refuses to renegotiate. */
int upreq_refuse_renegotiation(void *curl, void *sslctx, void *parm)
{
    (void)curl;
    (void)parm;
    if (!lazyssl_load())
        return 1;                      /* (libcurl's OpenSSL not reachable: the leg fails) */
    SSL_CTX_set_options(sslctx, SSL_OP_NO_RENEGOTIATION);
    return 0;
}

void upreq_verify_tls(CURL *e, const struct upstream_rule *u)
{
    curl_easy_setopt(e, CURLOPT_SSL_CTX_FUNCTION, upreq_refuse_renegotiation);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    if (u->tls_ca_file[0]) {
        curl_easy_setopt(e, CURLOPT_CAINFO, u->tls_ca_file);
        curl_easy_setopt(e, CURLOPT_CAPATH, SYSTEM_CA_PATH);
    }
}

int upreq_aim(CURL *e, const struct upreq_where *w, struct curl_slist **connect_to)
{
    bool v6 = strchr(w->host, ':') != NULL;
    snprintf(scratch, sizeof scratch, v6 ? "%s://[%s]:%u/" : "%s://%s:%u/", w->scheme, w->host, w->port);
    curl_easy_setopt(e, CURLOPT_URL, scratch);
    if (!w->pin)
        return 0;
    char ip[INET6_ADDRSTRLEN + 2];
    uint16_t pport;
    format_addr(ip, sizeof ip, w->pin, &pport);
    snprintf(scratch, sizeof scratch, v6 ? "[%s]:%u:%s:%u" : "%s:%u:%s:%u", w->host, w->port, ip, pport);
    if (!(*connect_to = curl_slist_append(NULL, scratch)))
        return -1;
    curl_easy_setopt(e, CURLOPT_CONNECT_TO, *connect_to);
    return 0;
}

int upreq_build(CURL *e, const struct shim_config *cfg, const struct upstream_rule *u, const struct upreq_where *w,
                const struct http_request *req, struct http_slice etag, struct http_slice last_modified,
                struct curl_slist **headers, struct curl_slist **connect_to)
{
    if (upreq_aim(e, w, connect_to) != 0)
        return -1;
    if (w->verify)
        upreq_verify_tls(e, u);
    snprintf(scratch, sizeof scratch, "%.*s", (int)req->target.n, req->target.p);
    curl_easy_setopt(e, CURLOPT_REQUEST_TARGET, scratch);

    bool own_validators = etag.n || last_modified.n;
    bool has_accept = false, has_type = false, wants_trailers = false;
    for (size_t i = 0; i < req->nheaders; i++) {
        struct http_slice n = req->headers[i].name, v = req->headers[i].value;
        wants_trailers |= http_slice_ieq(n, "te") && http_list_has_token(v, "trailers");
        /* (Host is for every hop, whatever a Connection header says: without it libcurl
         * would send its own, and a name-based upstream would answer for another site) */
        if (http_is_hop_by_hop(n) || http_slice_ieq(n, "content-length") || http_slice_ieq(n, "expect")
            || (named_in_connection(req, n) && !http_slice_ieq(n, "host")))
            continue;
        if (own_validators && (http_slice_ieq(n, "if-none-match") || http_slice_ieq(n, "if-modified-since")))
            continue;                  /* the cache's go instead: the answer is for its entry */
        has_accept |= http_slice_ieq(n, "accept");
        has_type |= http_slice_ieq(n, "content-type");
        /* "Name;" is libcurl's spelling of a header with an empty value */
        int rc = v.n ? add_header(headers, "%.*s: %.*s", (int)n.n, n.p, (int)v.n, v.p)
                     : add_header(headers, "%.*s;", (int)n.n, n.p);
        if (rc)
            return -1;
    }
    if ((etag.n && add_header(headers, "If-None-Match: %.*s", (int)etag.n, etag.p))
        || (last_modified.n && add_header(headers, "If-Modified-Since: %.*s", (int)last_modified.n, last_modified.p)))
        return -1;
    /* TE is hop-by-hop, but its "trailers" the shim honours for the app (upstream.c relays
     * trailer fields): said again on this hop, with the connection option RFC 9110 10.1.4
     * asks for. Its transfer codings are not: libcurl would not undo them. */
    if (wants_trailers && (add_header(headers, "TE: trailers") || add_header(headers, "Connection: TE")))
        return -1;
    /* An HTTP/1.0 request may lack Host, but goes on as HTTP/1.1, which must carry one: its
     * absolute target's authority when it has one (what the upstream answers for direct,
     * RFC 9112 3.2.2), else libcurl's, the upstream's name and port. (An HTTP/1.1 one
     * without Host never parses: it is relayed as bytes.) */
    struct http_slice scheme, authority, rest;
    if (!req->has_host && http_absolute_target(req->target, &scheme, &authority, &rest) && authority.n
        && add_header(headers, "Host: %.*s", (int)authority.n, authority.p))
        return -1;
    if ((!has_accept && add_header(headers, "Accept:")) || add_header(headers, "Expect:")
        || (!has_type && add_header(headers, "Content-Type:")))
        return -1;
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, *headers);

    if (http_method_is(req, "HEAD")) {
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    } else if (http_method_is(req, "GET") && req->content_length < 0) {
        curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
    } else {
        snprintf(scratch, sizeof scratch, "%.*s", (int)req->method.n, req->method.p);
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, scratch);
    }
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    curl_easy_setopt(e, CURLOPT_PATH_AS_IS, 1L);
    curl_easy_setopt(e, CURLOPT_HTTP_CONTENT_DECODING, 0L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)cfg->upstream_timeout_ms);
    long secs = (long)((cfg->upstream_timeout_ms + 999) / 1000);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(e, CURLOPT_LOW_SPEED_TIME, secs);
    curl_easy_setopt(e, CURLOPT_MAXAGE_CONN, (long)((cfg->pool_idle_timeout_ms + 999) / 1000));
    return 0;
}

static int on_progress(void *p, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
    struct upreq_silence *s = p;
    (void)dltotal, (void)ultotal;
    int64_t now = clock_mono_us();
    if (*s->status || *s->on_app || dlnow + ulnow != s->moved || !s->since_us) {
        s->moved = dlnow + ulnow;      /* (a head under way is the low-speed check's) */
        s->since_us = now;
        return 0;
    }
    s->overdue = now - s->since_us >= s->limit_us;
    return s->overdue;
}

void upreq_watch_silence(CURL *e, struct upreq_silence *s, const int *status, const bool *on_app, int64_t limit_ms)
{
    *s = (struct upreq_silence){ .status = status, .on_app = on_app, .limit_us = limit_ms * 1000 };
    curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(e, CURLOPT_XFERINFODATA, s);
    curl_easy_setopt(e, CURLOPT_NOPROGRESS, 0L);
}

int upreq_open_socket(int upstream, bool adopt, const struct curl_sockaddr *addr)
{
    int fd = adopt ? pool_take_offered(upstream, &addr->addr) : -1;
    /* libcurl will connect() the socket it is given; one the app's connect made is
     * connected already, so the connect hook answers 0 for it (marking it
     * CURL_SOCKOPT_ALREADY_CONNECTED failed the transfer with libcurl 7.88's multi
     * interface here) */
    bool adopted = fd >= 0;
    if (!adopted) {
        if ((fd = fdtable_raise(real_socket(addr->family, addr->socktype | SOCK_CLOEXEC, addr->protocol))) < 0)
            return -1;
        fdtable_mark_engine(fd);
    }
    fdtable_mark_upstream_socket(fd, upstream, adopted);
    STAT_INC(upstream, upstream_conns_opened);
    STAT_INC(upstream, pool_open);
    return fd;
}

/* libcurl may close a pooled socket long after the transfer that opened it is gone:
 * the upstream comes from the fd table, never from clientp. */
int upreq_close_socket(void *clientp, curl_socket_t fd)
{
    (void)clientp;
    curl_loop_closing(fd);             /* out of the set before the fd number can be reused */
    const struct fd_entry *e = fdtable_slot(fd);
    if (e && atomic_load(&e->kind) == FD_ENGINE)
        STAT_DEC(e->upstream, pool_open);
    return fdtable_close_engine_fd(fd);
}
