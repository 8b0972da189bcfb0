/* tls_trust.c — owns the trust the app's OpenSSL contexts place in the shim's CA, inside
 * this process only: the interposed SSL_CTX_new, which adds the CA to a client
 * context's store and a private ClientHello extension that marks the context (with a
 * number that tls_marks.c maps back to the context's own store) in the hellos bound for
 * an intercepting upstream, and no other, and the interposed store
 * swaps, which add the CA again and follow the new store. Only while some upstream is
 * configured `tls = intercept`, only for libssl.so.3, never for server-only contexts or
 * the engine's own (libcurl's); a connection that presents a client certificate says so
 * in its mark, and is tunnelled; one that verifies with a store of its own making
 * (SSL_set0_verify_cert_store) or through a verify callback of the app's is not marked.
 * Each marked ClientHello also leaves its connection's own verification parameters and
 * security level (tls_marks.c), so that the upstream is verified as that very connection
 * would verify it. Unversioned definitions satisfy the app's versioned references
 * (SSL_CTX_new@OPENSSL_3.0.0) because the library defines no versions of its own. */
#include "config.h"
#include "fdtable.h"
#include "lazyssl.h"
#include "real.h"
#include "tls_ca.h"
#include "tls_marks.h"
#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define SHIM_EXPORT __attribute__((visibility("default")))

static pthread_once_t index_once = PTHREAD_ONCE_INIT;
static int mark_index = -1;            /* SSL_CTX ex_data: the context's mark number */

static void drop_mark(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    (void)parent;
    (void)ad;
    (void)idx;
    (void)argl;
    (void)argp;
    if (ptr)
        tls_marks_drop((uint64_t)(uintptr_t)ptr);
}

static void make_index(void)
{
    mark_index = CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_SSL_CTX, 0, NULL, NULL, NULL, drop_mark);
}

static uint64_t mark_of(const SSL_CTX *ctx)
{
    return mark_index >= 0 ? (uint64_t)(uintptr_t)SSL_CTX_get_ex_data(ctx, mark_index) : 0;
}

static bool intercepting_upstream(const struct shim_config *cfg, int upstream)
{
    return cfg && upstream >= 0 && (size_t)upstream < cfg->n_upstreams
           && cfg->upstreams[upstream].tls == TLS_INTERCEPT;
}

/* Whether this ClientHello may be going to an upstream the shim intercepts: the mark is a
 * stable per-process value and a change to the client's fingerprint, not for other hosts.
 * A hello written to a socket goes where that socket was connected; one written into a
 * BIO of the app's own (asyncio's memory BIO, curl's) is judged by its server name, and
 * without one (an address dialled) by the connection its thread diverted last, or while
 * some intercepting upstream is named by its address. */
static bool bound_for_interception(SSL *s)
{
    const struct shim_config *cfg = config_get();
    int fd = SSL_get_wfd(s);
    if (fd >= 0) {
        const struct fd_entry *e = fdtable_diverted(fd);
        if (!e)
            e = fdtable_probing(fd);
        return e && intercepting_upstream(cfg, e->upstream);
    }
    const char *name = SSL_get_servername(s, TLSEXT_NAMETYPE_host_name);
    const struct fd_entry *last = name ? NULL : fdtable_diverted_by_this_thread();
    if (last && intercepting_upstream(cfg, last->upstream))
        return true;
    unsigned char addr[sizeof(struct in6_addr)];
    for (size_t i = 0; cfg && i < cfg->n_upstreams; i++) {
        const char *host = cfg->upstreams[i].host;
        if (!intercepting_upstream(cfg, (int)i))
            continue;
        bool literal = inet_pton(AF_INET, host, addr) == 1 || inet_pton(AF_INET6, host, addr) == 1;
        if (name ? !strcasecmp(name, host) : literal)
            return true;
    }
    return false;
}

/* OCSP stapling asked for (curl's --cert-status), or a status callback to judge the
 * staple: the shim's own answer carries none, and an app that refuses a "revoked" staple
 * but takes a missing one would have taken the shim's where direct it refuses the server. */
static bool asks_for_a_stapled_status(SSL *s)
{
    int (*status_cb)(SSL *, void *) = NULL;
    SSL_CTX_ctrl(SSL_get_SSL_CTX(s), SSL_CTRL_GET_TLSEXT_STATUS_REQ_CB, 0, (void *)&status_cb);
    return SSL_ctrl(s, SSL_CTRL_GET_TLSEXT_STATUS_REQ_TYPE, 0, NULL) != -1 || status_cb;
}

/* A name checked that the hello does not send: a host name (SSL_set1_host) other than its
 * server name, or an address (X509_VERIFY_PARAM_set1_ip) beside a server name. The shim's
 * leaf names what the hello sends (or the address dialled), and the app would refuse it
 * where the real certificate names both. */
static bool checks_a_name_it_does_not_send(SSL *s)
{
    const char *sni = SSL_get_servername(s, TLSEXT_NAMETYPE_host_name);
    X509_VERIFY_PARAM *param = SSL_get0_param(s);
    for (int i = 0; i < 16; i++) {
        const char *host = X509_VERIFY_PARAM_get0_host(param, i);
        if (!host)
            break;
        if (!sni || strcasecmp(host, sni))
            return true;
    }
    if (!sni)
        return false;
    ERR_set_mark();                    /* (no address set: an error of its own, the app's queue kept) */
    char *ip = X509_VERIFY_PARAM_get1_ip_asc(param);
    ERR_pop_to_mark();
    if (ip)
        CRYPTO_free(ip, __FILE__, __LINE__);
    return ip != NULL;
}

static int add_mark(SSL *s, unsigned int type, unsigned int context, const unsigned char **out, size_t *outlen,
                    X509 *x, size_t chainidx, int *al, void *arg)
{
    (void)type;
    (void)context;
    (void)x;
    (void)chainidx;
    (void)al;
    (void)arg;
    uint64_t id = mark_of(SSL_get_SSL_CTX(s));
    X509_STORE *verify_store = NULL;
    SSL_get0_verify_cert_store(s, &verify_store);
    /* a separate verification store never got the CA, and a verify callback may pin the
     * upstream's own certificate: either would reject the shim's, so no mark. So does one
     * set on the store itself (X509_STORE_set_verify_cb: the engine ran it, on its own
     * thread with no SSL, and a callback that read its SSL crashed the process), and a
     * check of revocation lists (the shim's leaf has none: the app refused it) */
    const X509_STORE *store = SSL_CTX_get_cert_store(SSL_get_SSL_CTX(s));
    if (!id || verify_store || SSL_get_verify_callback(s) || !store
        || tls_marks_checks_beyond_the_shim(store, SSL_get0_param(s)) || asks_for_a_stapled_status(s)
        || checks_a_name_it_does_not_send(s)
        || !bound_for_interception(s))
        return 0;
    /* what this connection's own checks are (its host name rules, strictness flags, chain
     * depth, security level), for the engine to verify the upstream by */
    X509_VERIFY_PARAM *param = X509_VERIFY_PARAM_new();
    if (param && X509_VERIFY_PARAM_set1(param, SSL_get0_param(s)) != 1) {
        X509_VERIFY_PARAM_free(param);
        param = NULL;
    }
    uint64_t hello = tls_marks_hello_add(param, SSL_get_security_level(s), tls_marks_store_unfilled(store));
    unsigned char *m = hello ? malloc(TLS_MARK_LEN) : NULL;
    if (!m)
        return 0;                      /* (a view without a mark is pushed out in time) */
    /* mutual TLS: the mark says so, and the engine tunnels the connection untouched */
    tls_marks_bytes(SSL_get_certificate(s) ? id | TLS_MARK_CLIENT_CERT : id, hello, m);
    *out = m;
    *outlen = TLS_MARK_LEN;
    return 1;
}

static void free_mark(SSL *s, unsigned int type, unsigned int context, const unsigned char *out, void *arg)
{
    (void)s;
    (void)type;
    (void)context;
    (void)arg;
    free((void *)out);
}

static bool intercepting(const struct shim_config *cfg)
{
    for (size_t i = 0; cfg && i < cfg->n_upstreams; i++)
        if (intercepting_upstream(cfg, (int)i))
            return true;
    return false;
}

static void mark_context(SSL_CTX *ctx, const SSL_METHOD *meth, const void *real)
{
    struct shim_config *cfg = config_get();
    if (!intercepting(cfg) || !lazyssl_load() || !lazyssl_is_openssl3(real) || meth == TLS_server_method()
        || !tls_ca_ensure(cfg))
        return;
    pthread_once(&index_once, make_index);
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    if (mark_index < 0 || !store || X509_STORE_add_cert(store, tls_ca_cert()) != 1)
        return;
    uint64_t id = tls_marks_add(store);
    if (!id)
        return;
    if (!SSL_CTX_set_ex_data(ctx, mark_index, (void *)(uintptr_t)id)
        || SSL_CTX_add_custom_ext(ctx, TLS_MARK_EXT_TYPE, SSL_EXT_CLIENT_HELLO, add_mark, free_mark, NULL, NULL,
                                  NULL) != 1) {
        SSL_CTX_set_ex_data(ctx, mark_index, NULL);
        tls_marks_drop(id);
    }
}

SHIM_EXPORT SSL_CTX *SSL_CTX_new(const SSL_METHOD *meth)
{
    SSL_CTX *(*real)(const SSL_METHOD *) = (SSL_CTX * (*)(const SSL_METHOD *))
        lazyssl_real("SSL_CTX_new", __builtin_return_address(0), (const void *)SSL_CTX_new);
    if (!real)
        return NULL;
    SSL_CTX *ctx = real(meth);
    if (ctx && !shim_in_engine)
        mark_context(ctx, meth, (const void *)real);
    return ctx;
}

/* The app verifies the chain with a function of its own (SSL_CTX_set_cert_verify_callback
 * replaces OpenSSL's check whole): what it accepts is not the store's to say, and one that
 * denies a listed certificate would take the shim's. Its context is marked no more. */
SHIM_EXPORT void SSL_CTX_set_cert_verify_callback(SSL_CTX *ctx, int (*cb)(X509_STORE_CTX *, void *), void *arg)
{
    void (*real)(SSL_CTX *, int (*)(X509_STORE_CTX *, void *), void *) =
        (void (*)(SSL_CTX *, int (*)(X509_STORE_CTX *, void *), void *))lazyssl_real(
            "SSL_CTX_set_cert_verify_callback", __builtin_return_address(0), (const void *)SSL_CTX_set_cert_verify_callback);
    if (!real)
        return;
    real(ctx, cb, arg);
    uint64_t id = shim_in_engine || !cb ? 0 : mark_of(ctx);
    if (id) {
        SSL_CTX_set_ex_data(ctx, mark_index, NULL);
        tls_marks_drop(id);
    }
}

/* The app replaced the context's store: the CA joins the new one, which the mark now
 * stands for. */
static void follow_store(SSL_CTX *ctx, X509_STORE *store)
{
    uint64_t id = shim_in_engine ? 0 : mark_of(ctx);
    if (id && store && X509_STORE_add_cert(store, tls_ca_cert()) == 1)
        tls_marks_set_store(id, store);
}

SHIM_EXPORT void SSL_CTX_set_cert_store(SSL_CTX *ctx, X509_STORE *store)
{
    void (*real)(SSL_CTX *, X509_STORE *) = (void (*)(SSL_CTX *, X509_STORE *))
        lazyssl_real("SSL_CTX_set_cert_store", __builtin_return_address(0), (const void *)SSL_CTX_set_cert_store);
    if (!real)
        return;
    real(ctx, store);
    follow_store(ctx, store);
}

SHIM_EXPORT void SSL_CTX_set1_cert_store(SSL_CTX *ctx, X509_STORE *store)
{
    void (*real)(SSL_CTX *, X509_STORE *) = (void (*)(SSL_CTX *, X509_STORE *))
        lazyssl_real("SSL_CTX_set1_cert_store", __builtin_return_address(0), (const void *)SSL_CTX_set1_cert_store);
    if (!real)
        return;
    real(ctx, store);
    follow_store(ctx, store);
}
