/* tls_front.c — owns terminating the app's TLS in the engine: a relay between the app's
 * socketpair end (ciphertext) and a second, in-process socketpair whose other end is an
 * ordinary engine connection (plaintext), with an OpenSSL server session in between over
 * memory BIOs, so that the handshake and every record are driven by the loop and never
 * block it. The session presents the CA's leaf for the name the app asked for and
 * selects http/1.1. Plaintext only ever crosses the in-process socketpair. Every buffer is
 * bounded; a full side stops reading the other. Also owns the verdicts on whether an
 * upstream would satisfy the app's own connection: its chain verified against the app
 * context's trust store with that connection's verification parameters and security
 * level, and what the upstream negotiated (version, cipher suite, group, signature
 * scheme) among what the app's ClientHello offered. */
#include "tls_front.h"
#include "clock.h"
#include "conn.h"
#include "lazyssl.h"
#include "linger.h"
#include "log.h"
#include "real.h"
#include "stats.h"
#include "tls_ca.h"
#include <arpa/inet.h>
#include <errno.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#define CIPHER_CAP (64 * 1024)          /* ciphertext either way, not yet moved on */

struct tls_front {
    struct loop_source app, plain;
    struct loop_deferred reclaim;
    int upstream;
    SSL *ssl;
    BIO *rbio, *wbio;                   /* owned by ssl */
    struct buf to_app;                  /* ciphertext for the app */
    struct buf to_plain;                /* plaintext for the engine's connection */
    struct buf from_plain;              /* plaintext the engine wrote, not yet encrypted */
    bool handshaken, dead, app_eof, app_gone, plain_eof, plain_shut, app_shut, alert_owed;
    int plain_peer;                     /* the engine's end of the plaintext pair, while open */
    bool plain_failed, plain_reset;     /* ... which ended after a failed exchange (a reset) */
    struct tls_front_app app_end;       /* the app's fd for app.fd's peer, and its socket */
    struct tls_front *next, *prev;
};

#define CHAINS_MAX 64
#define CHAIN_MS   60000
static struct {
    char name[256];
    char where[INET6_ADDRSTRLEN + 8];   /* the address and port it was probed at */
    int upstream;                       /* the upstream section it was probed for */
    bool verified;                      /* libcurl's verification accepted it */
    bool cert_requested;                /* the upstream asked for a client certificate */
    bool leg_known;
    struct tls_leg leg;                 /* what the probe's handshake negotiated */
    X509 *leaf;
    STACK_OF(X509) *chain;              /* what the upstream sent besides the leaf */
    int64_t until_ms;
} chains[CHAINS_MAX];

static const struct shim_config *cfg;
static struct tls_front *live;
static struct tls_front *orphaned;      /* a forked child's inheritance: never used */
static SSL_CTX *server_ctx;             /* engine thread only */
static char scratch[16384];             /* engine thread only */

static int select_http11(SSL *s, const unsigned char **out, unsigned char *outlen, const unsigned char *in,
                         unsigned int inlen, void *arg)
{
    (void)s;
    (void)arg;
    for (unsigned i = 0; i < inlen;) {
        unsigned n = in[i];
        if (i + 1 + n > inlen)
            break;
        if (n == 8 && !memcmp(in + i + 1, "http/1.1", 8)) {
            *out = in + i + 1;
            *outlen = 8;
            return SSL_TLSEXT_ERR_OK;
        }
        i += 1 + n;
    }
    return SSL_TLSEXT_ERR_NOACK;        /* no ALPN agreement: plain HTTP/1.1 anyway */
}

static bool ensure_server_ctx(void)
{
    if (server_ctx)
        return true;
    if (!lazyssl_load())
        return false;
    server_ctx = lazyssl_ctx_new(TLS_server_method());   /* the engine's own: never marked */
    if (!server_ctx)
        return false;
    SSL_CTX_set_min_proto_version(server_ctx, TLS1_2_VERSION);
    SSL_CTX_set_alpn_select_cb(server_ctx, select_http11, NULL);
    return true;
}

static void reclaim(struct loop_deferred *d)
{
    struct tls_front *f = (struct tls_front *)((char *)d - offsetof(struct tls_front, reclaim));
    if (f->ssl)
        SSL_free(f->ssl);
    buf_free(&f->to_app);
    buf_free(&f->to_plain);
    buf_free(&f->from_plain);
    free(f);
}

/* A Unix socket closed with unread bytes in its queue gives its peer ECONNRESET: one byte
 * goes into app.fd through the app's own fd number, as engine.c's reset_app_end does,
 * while the fd table says that number is still this connection's app end. */
static void reset_app(const struct tls_front *f)
{
    if (f->app_end.fd < 0)
        return;
    fdtable_touch(f->app_end.fd);
    const struct fd_entry *e = fdtable_if_diverted(f->app_end.fd);
    if (e && e->engine_fd == f->app.fd && e->dev == f->app_end.dev && e->ino == f->app_end.ino)
        real_send(f->app_end.fd, "!", 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    fdtable_untouch();
}

static void front_close(struct tls_front *f)
{
    if (f->dead)
        return;
    f->dead = true;
    shim_debug("fd %d: TLS front closes (handshaken %d, app eof %d gone %d shut %d, plain eof %d shut %d, %zu/%zu/%zu "
               "bytes left)", f->app.fd, f->handshaken, f->app_eof, f->app_gone, f->app_shut, f->plain_eof,
               f->plain_shut, buf_len(&f->to_app), buf_len(&f->to_plain), buf_len(&f->from_plain));
    if (!f->handshaken)
        STAT_INC(f->upstream, tls_handshake_failures);
    loop_remove(&f->plain);
    fdtable_close_engine_fd(f->plain.fd);
    /* the app may write once more (its close_notify after ours): its end is kept a moment,
     * as TCP takes a write after the server's FIN, where a closed pair's EPIPE raised a
     * SIGPIPE that killed a C client that never ignores it */
    if (f->plain_reset && !f->app_gone)
        reset_app(f);
    if (f->app_gone || f->plain_reset || !linger_adopt(&f->app)) {
        loop_remove(&f->app);
        fdtable_close_engine_fd(f->app.fd);
    }
    if (f->prev)
        f->prev->next = f->next;
    else
        live = f->next;
    if (f->next)
        f->next->prev = f->prev;
    loop_defer(&f->reclaim, reclaim);
}

/* Moves what OpenSSL wrote into its output BIO to to_app. */
static void collect_cipher(struct tls_front *f)
{
    for (int rounds = 0; rounds < 64; rounds++) {
        size_t room = buf_make_room(&f->to_app, sizeof scratch);
        if (!room)
            return;
        int n = BIO_read(f->wbio, f->to_app.data + f->to_app.end, (int)(room < sizeof scratch ? room : sizeof scratch));
        if (n <= 0)
            return;
        f->to_app.end += (size_t)n;
    }
}

/* Decrypts what the app sent, as far as to_plain has room. */
static void decrypt_cipher(struct tls_front *f)
{
    if (!f->handshaken) {
        ERR_clear_error();
        int rc = SSL_do_handshake(f->ssl);
        collect_cipher(f);
        if (rc != 1) {
            int e = SSL_get_error(f->ssl, rc);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
                shim_debug("fd %d: TLS handshake with the app failed", f->app.fd);
                f->app_gone = true;    /* the app rejected us, or spoke nonsense: */
                f->alert_owed = true;  /* what OpenSSL says of it goes to the app before the end */
            }
            return;
        }
        f->handshaken = true;
        STAT_INC(f->upstream, tls_intercepted);
    }
    for (int rounds = 0; rounds < 64 && buf_len(&f->to_plain) < OUT_SOFT; rounds++) {
        ERR_clear_error();
        int n = SSL_read(f->ssl, scratch, sizeof scratch);
        if (n > 0) {
            if (buf_append(&f->to_plain, scratch, (size_t)n) != 0) {
                f->app_gone = true;
                return;
            }
            continue;
        }
        int e = SSL_get_error(f->ssl, n);
        if (e == SSL_ERROR_ZERO_RETURN)
            f->app_eof = true;         /* close_notify */
        else if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
            f->app_gone = true;
        break;
    }
    collect_cipher(f);
}

/* Encrypts what the engine's connection wrote, as far as to_app has room. */
static void encrypt_plain(struct tls_front *f)
{
    while (f->handshaken && buf_len(&f->from_plain) && buf_len(&f->to_app) < CIPHER_CAP) {
        size_t n = buf_len(&f->from_plain) < sizeof scratch ? buf_len(&f->from_plain) : sizeof scratch;
        ERR_clear_error();
        int w = SSL_write(f->ssl, buf_head(&f->from_plain), (int)n);
        if (w <= 0) {
            int e = SSL_get_error(f->ssl, w);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
                f->app_gone = true;
            break;
        }
        buf_consume(&f->from_plain, (size_t)w);
        collect_cipher(f);
    }
}

static void pump(struct tls_front *f)
{
    decrypt_cipher(f);
    encrypt_plain(f);
    if ((!f->app_gone || f->alert_owed) && buf_send(&f->to_app, f->app.fd) != 0)
        f->app_gone = true;
    f->alert_owed = false;
    if (buf_send(&f->to_plain, f->plain.fd) != 0)
        f->plain_eof = true;           /* the engine's connection is gone */
    if (f->app_eof && !buf_len(&f->to_plain) && !f->plain_shut) {
        real_shutdown(f->plain.fd, SHUT_WR);
        f->plain_shut = true;
    }
    if (f->plain_eof)
        f->plain_peer = -1;            /* (its number may be another's now) */
    if (f->plain_eof && !buf_len(&f->from_plain) && f->handshaken && !f->app_shut) {
        if (!f->plain_failed) {
            SSL_shutdown(f->ssl);      /* close_notify, then our write side */
            collect_cipher(f);
        }
        f->app_shut = buf_send(&f->to_app, f->app.fd) == 0 && !buf_len(&f->to_app);
        if (f->app_shut && !f->plain_reset)
            real_shutdown(f->app.fd, SHUT_WR);
    }
    if (f->app_gone || (f->plain_eof && f->app_shut) || (f->plain_eof && !f->handshaken)
        || (f->app_eof && f->plain_shut && f->plain_eof)) {
        front_close(f);
        return;
    }
    /* (plaintext still to encrypt once to_app had its fill waits for room towards the app
     * too: with to_app sent whole and the engine's end already closed, nothing else would
     * wake the front, and a large answer stalled, its last 40 kB never sent) */
    uint32_t want_app = (!f->app_eof && buf_len(&f->to_plain) < OUT_SOFT ? EPOLLIN : 0)
                      | (buf_len(&f->to_app) || (f->handshaken && buf_len(&f->from_plain)) ? EPOLLOUT : 0);
    uint32_t want_plain = (!f->plain_eof && buf_len(&f->from_plain) < OUT_SOFT && buf_len(&f->to_app) < CIPHER_CAP
                               ? EPOLLIN : 0)
                        | (buf_len(&f->to_plain) ? EPOLLOUT : 0);
    loop_watch(&f->app, want_app);
    if (f->plain_eof)
        loop_remove(&f->plain);        /* a hang-up would be reported forever */
    else
        loop_watch(&f->plain, want_plain);
}

static void on_app(struct loop_source *src, uint32_t ev)
{
    struct tls_front *f = (struct tls_front *)((char *)src - offsetof(struct tls_front, app));
    if (ev & (EPOLLERR | EPOLLHUP))
        f->app_gone = f->app_eof = true;
    if (ev & (EPOLLIN | EPOLLHUP)) {
        for (int rounds = 0; rounds < 8 && !f->app_eof && buf_len(&f->to_plain) < OUT_SOFT; rounds++) {
            ssize_t n = recv(f->app.fd, scratch, sizeof scratch, MSG_DONTWAIT);
            if (n > 0) {
                if (BIO_write(f->rbio, scratch, (int)n) != (int)n)
                    f->app_gone = true;
                decrypt_cipher(f);     /* keep the BIO small: consume as it comes */
                continue;
            }
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                f->app_eof = true;
            break;
        }
    }
    pump(f);
}

static void on_plain(struct loop_source *src, uint32_t ev)
{
    struct tls_front *f = (struct tls_front *)((char *)src - offsetof(struct tls_front, plain));
    if (ev & EPOLLERR)
        f->plain_eof = true;
    /* a hang-up: the engine's connection wrote its last response and closed; read it all */
    if (ev & (EPOLLIN | EPOLLHUP)) {
        for (int rounds = 0; rounds < 8 && !f->plain_eof && buf_len(&f->from_plain) < OUT_SOFT; rounds++) {
            ssize_t n = recv(f->plain.fd, scratch, sizeof scratch, MSG_DONTWAIT);
            if (n > 0) {
                if (buf_append(&f->from_plain, scratch, (size_t)n) != 0)
                    f->plain_eof = true;
                continue;
            }
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                f->plain_eof = true;
            break;
        }
    }
    pump(f);
}

void tls_front_plain_failed(int plain_peer, bool reset)
{
    for (struct tls_front *f = live; f; f = f->next)
        if (f->plain_peer == plain_peer && !f->dead) {
            f->plain_failed = true;
            f->plain_reset = reset;
        }
}

int tls_front_start(struct loop_source *app_src, const struct tls_front_app *app, int plain_fd, int plain_peer,
                    int upstream, const char *name, struct buf *hello)
{
    X509 *leaf;
    EVP_PKEY *key;
    if (!ensure_server_ctx() || !tls_ca_leaf(cfg, name, &leaf, &key))
        return -1;
    struct tls_front *f = calloc(1, sizeof *f);
    if (!f)
        return -1;
    f->upstream = upstream;
    f->plain_peer = plain_peer;
    f->app_end = *app;
    f->to_app.cap = CIPHER_CAP + 16384;
    f->to_plain.cap = OUT_SOFT + 16384;
    f->from_plain.cap = OUT_SOFT + 16384;
    f->ssl = SSL_new(server_ctx);
    f->rbio = BIO_new(BIO_s_mem());
    f->wbio = BIO_new(BIO_s_mem());
    if (!f->ssl || !f->rbio || !f->wbio) {
        if (f->ssl)
            SSL_free(f->ssl);
        if (f->rbio)
            BIO_free(f->rbio);
        if (f->wbio)
            BIO_free(f->wbio);
        free(f);
        return -1;
    }
    SSL_set_bio(f->ssl, f->rbio, f->wbio);   /* the session owns them from here */
    if (SSL_use_certificate(f->ssl, leaf) != 1 || SSL_use_PrivateKey(f->ssl, key) != 1) {
        SSL_free(f->ssl);
        free(f);
        return -1;
    }
    SSL_set_accept_state(f->ssl);
    if (BIO_write(f->rbio, buf_head(hello), (int)buf_len(hello)) != (int)buf_len(hello)
        || loop_add(&f->plain, plain_fd, EPOLLIN, on_plain) != 0) {
        SSL_free(f->ssl);
        free(f);
        return -1;
    }
    if (loop_move(app_src, &f->app, EPOLLIN, on_app) != 0) {
        loop_remove(&f->plain);
        SSL_free(f->ssl);
        free(f);
        return -1;
    }
    buf_consume(hello, buf_len(hello));
    f->next = live;
    if (live)
        live->prev = f;
    live = f;
    pump(f);
    return 0;
}

void tls_front_init(const struct shim_config *config) { cfg = config; }

void tls_front_forget(void)
{
    if (live) {
        struct tls_front *last = live;
        while (last->next)
            last = last->next;
        last->next = orphaned;
        orphaned = live;
    }
    live = NULL;
    server_ctx = NULL;
    memset(chains, 0, sizeof chains);       /* the references were the parent's */
}

/* ---- does the upstream's chain verify as the app's context would verify it? ---- */

/* What a probe of the upstream found is kept a minute per name and address: whether libcurl's own
 * verification accepted it, and the chain it presented. Each app context's store is then
 * checked against that chain here, without another handshake: a client that makes a new
 * context per request (a session per call) costs one probe per minute, not one per
 * connection. */

static void free_x509(void *x) { X509_free(x); }

static void drop_chain(size_t i)
{
    if (chains[i].leaf)
        X509_free(chains[i].leaf);
    if (chains[i].chain)
        OPENSSL_sk_pop_free((OPENSSL_STACK *)chains[i].chain, free_x509);
    memset(&chains[i], 0, sizeof chains[i]);
}

/* Verifies leaf + the chain the upstream sent against the app context's store, for name,
 * as a TLS server's certificate, the way libssl verifies a server for that app's
 * connection (its verification parameters and security level; the host name checked is
 * the one the shim's leaf would carry): 1, or 0; TLS_VERDICT_NOT_YET when no issuer was
 * found in a store that holds nothing but the shim's CA — the app has not loaded its
 * trust yet (curl reads its CA file only after it has sent the ClientHello). */
static int chain_trusted(X509_STORE *store, const struct tls_app_view *view, X509 *leaf, STACK_OF(X509) *untrusted,
                         const char *name)
{
    /* checks the shim's own leaf cannot pass (revocation lists: it has none, and the app
     * refused it), or a verify callback set on the store (the app's code: run here, on the
     * engine's thread with no SSL, one that read its SSL crashed the process), loaded with
     * the app's trust after its ClientHello (curl's --crlfile): its connection is its own */
    if (tls_marks_checks_beyond_the_shim(store, view->param)) {
        shim_debug("the app's connection to %s checks revocation, or verifies through a callback: tunnelled", name);
        return 0;
    }
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    int verdict = 0;
    if (ctx && X509_STORE_CTX_init(ctx, store, leaf, untrusted) == 1 && X509_STORE_CTX_set_default(ctx, "ssl_server") == 1) {
        unsigned char ip[16];
        X509_VERIFY_PARAM *param = X509_STORE_CTX_get0_param(ctx);
        X509_VERIFY_PARAM_set_auth_level(param, view->sec_level);
        bool literal = inet_pton(strchr(name, ':') ? AF_INET6 : AF_INET, name, ip) == 1, ok = false;
        if (X509_VERIFY_PARAM_set1(param, view->param) == 1 && X509_VERIFY_PARAM_set1_host(param, NULL, 0) == 1
            && X509_VERIFY_PARAM_set1_ip(param, NULL, 0) == 1
            && (literal ? X509_VERIFY_PARAM_set1_ip_asc(param, name) : X509_VERIFY_PARAM_set1_host(param, name, 0)) == 1)
            ok = X509_verify_cert(ctx) == 1;
        int err = X509_STORE_CTX_get_error(ctx);
        bool no_issuer = err == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY || err == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
                         || err == X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN || err == X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT;
        verdict = ok ? 1 : no_issuer && OPENSSL_sk_num((const OPENSSL_STACK *)X509_STORE_get0_objects(store)) <= 1
                               ? TLS_VERDICT_NOT_YET : 0;
        if (verdict == 0)
            shim_debug("the upstream's chain for %s does not verify as the app's connection would (error %d)", name, err);
    }
    if (ctx)
        X509_STORE_CTX_free(ctx);
    ERR_clear_error();
    return verdict;
}

/* A key exchange group's TLS code point from OpenSSL's NID for it; 0xffff: one this does
 * not know (no app offer lists it), 0: none (an RSA key exchange). */
static uint16_t group_code(long nid)
{
    static const struct { int nid; uint16_t code; } known[] = {
        { NID_X9_62_prime256v1, 23 }, { NID_secp384r1, 24 }, { NID_secp521r1, 25 }, { NID_X25519, 29 },
        { NID_X448, 30 }, { NID_ffdhe2048, 256 }, { NID_ffdhe3072, 257 }, { NID_ffdhe4096, 258 },
        { NID_ffdhe6144, 259 }, { NID_ffdhe8192, 260 },
    };
    if (nid <= 0)
        return 0;
    if (nid & TLSEXT_nid_unknown)
        return (uint16_t)(nid & 0xffff);
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        if (known[i].nid == nid)
            return known[i].code;
    return 0xffff;
}

/* The signature scheme (RFC 8446 4.2.3) of the server's handshake signature, from its
 * type, hash and the leaf's key; 0xffff: one this does not know. */
static uint16_t scheme_code(int type, int hash, const X509 *leaf)
{
    int hash_rank = hash == NID_sha256 ? 0 : hash == NID_sha384 ? 1 : hash == NID_sha512 ? 2 : hash == NID_sha1 ? 3 : -1;
    static const uint16_t ecdsa[] = { 0x0403, 0x0503, 0x0603, 0x0203 }, pkcs1[] = { 0x0401, 0x0501, 0x0601, 0x0201 };
    static const uint16_t pss_rsae[] = { 0x0804, 0x0805, 0x0806, 0xffff }, pss_pss[] = { 0x0809, 0x080a, 0x080b, 0xffff };
    if (type == EVP_PKEY_ED25519)
        return 0x0807;
    if (type == EVP_PKEY_ED448)
        return 0x0808;
    if (hash_rank < 0)
        return 0xffff;
    if (type == EVP_PKEY_EC)
        return ecdsa[hash_rank];
    if (type == EVP_PKEY_RSA)
        return pkcs1[hash_rank];
    if (type == EVP_PKEY_RSA_PSS) {
        EVP_PKEY *key = leaf ? X509_get0_pubkey(leaf) : NULL;
        return key && EVP_PKEY_get_base_id(key) == EVP_PKEY_RSA ? pss_rsae[hash_rank] : pss_pss[hash_rank];
    }
    return 0xffff;
}

void tls_front_leg_of(SSL *session, struct tls_leg *out)
{
    *out = (struct tls_leg){ .version = (uint16_t)SSL_version(session), .kx_bits = -1 };
    const SSL_CIPHER *cipher = SSL_get_current_cipher(session);
    out->cipher = cipher ? SSL_CIPHER_get_protocol_id(cipher) : 0xffff;
    out->group = group_code(SSL_get_negotiated_group(session));
    EVP_PKEY *tmp = NULL;
    if (SSL_get_peer_tmp_key(session, &tmp) == 1 && tmp) {
        out->kx_bits = EVP_PKEY_get_security_bits(tmp);
        EVP_PKEY_free(tmp);
    }
    int type = 0, hash = 0;
    if (SSL_get_peer_signature_type_nid(session, &type) == 1 && SSL_get_peer_signature_nid(session, &hash) == 1)
        out->sigalg = scheme_code(type, hash, SSL_get0_peer_certificate(session));
    ERR_clear_error();
}

static bool listed(const uint16_t *codes, size_t n, uint16_t code)
{
    for (size_t i = 0; i < n; i++)
        if (codes[i] == code)
            return true;
    return false;
}

/* Why the app's own handshake would not have accepted what the upstream negotiated, or
 * NULL: a leg is held to the app's offer and security level, so that no request travels
 * on a connection weaker than the app's own would have been. */
static const char *leg_refused(const struct tls_terms *t, const struct tls_leg *leg)
{
    static const int level_bits[] = { 0, 80, 112, 128, 192, 256 };
    const struct tls_offer *o = &t->offer;
    uint16_t lowest = 0xffff;
    for (size_t i = 0; i < o->n_versions; i++)
        if (o->versions[i] >= 0x0300 && o->versions[i] < lowest)
            lowest = o->versions[i];
    if (leg->version < lowest)
        return "an older protocol version than the app accepts";
    /* TLS 1.3 where the app offered only older versions: its suites are all AEAD with a
     * forward-secret exchange, stronger than any the app offered */
    if (!(leg->version == TLS1_3_VERSION && !listed(o->versions, o->n_versions, TLS1_3_VERSION))
        && !listed(o->ciphers, o->n_ciphers, leg->cipher))
        return "a cipher suite the app does not offer";
    if (leg->group && o->n_groups && !listed(o->groups, o->n_groups, leg->group))
        return "a key exchange group the app does not offer";
    int level = t->view.sec_level < 0 ? 0 : t->view.sec_level > 5 ? 5 : t->view.sec_level;
    if (leg->kx_bits >= 0 && leg->kx_bits < level_bits[level])
        return "a key exchange weaker than the app's security level";
    if (leg->sigalg && o->n_sigalgs && !listed(o->sigalgs, o->n_sigalgs, leg->sigalg))
        return "a signature scheme the app does not offer";
    return NULL;
}

bool tls_front_can_answer(const struct tls_offer *o)
{
    static const uint16_t ecdhe_ecdsa[] = { 0xc02b, 0xc02c, 0xcca9, 0xc023, 0xc024, 0xc009, 0xc00a };
    static const uint16_t groups[] = { 29, 23, 30, 25, 24 };   /* the front's: OpenSSL's defaults */
    bool tls13 = listed(o->versions, o->n_versions, TLS1_3_VERSION), tls12 = listed(o->versions, o->n_versions, TLS1_2_VERSION);
    bool group = !o->n_groups && !tls13, suite = false;
    for (size_t i = 0; i < sizeof groups / sizeof groups[0]; i++)
        group |= listed(o->groups, o->n_groups, groups[i]);
    for (size_t i = 0; i < sizeof ecdhe_ecdsa / sizeof ecdhe_ecdsa[0]; i++)
        suite |= listed(o->ciphers, o->n_ciphers, ecdhe_ecdsa[i]);
    bool suite13 = false;              /* the front's TLS 1.3 suites: OpenSSL's defaults (no CCM) */
    for (uint16_t c = 0x1301; c <= 0x1303; c++)
        suite13 |= listed(o->ciphers, o->n_ciphers, c);
    /* the leaf is ECDSA P-256 with SHA-256 */
    bool signs = listed(o->sigalgs, o->n_sigalgs, 0x0403);
    return group && signs && ((tls13 && suite13) || (tls12 && suite));
}

struct tls_terms *tls_front_terms_new(struct tls_app_view *view, const struct tls_offer *offer)
{
    struct tls_terms *t = calloc(1, sizeof *t);
    if (!t) {
        X509_VERIFY_PARAM_free(view->param);
        return NULL;
    }
    t->refs = 1;
    t->view = *view;
    t->offer = *offer;
    view->param = NULL;
    return t;
}

static struct tls_terms *terms_ref(struct tls_terms *t)
{
    t->refs++;
    return t;
}

void tls_front_terms_release(struct tls_terms *t)
{
    if (!t || --t->refs > 0)
        return;
    X509_VERIFY_PARAM_free(t->view.param);
    free(t);
}

static pthread_once_t check_once = PTHREAD_ONCE_INIT;
static int check_index = -1;           /* libcurl's SSL_CTX for a probe: its struct tls_check */

static void make_check_index(void)
{
    check_index = CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_SSL_CTX, 0, NULL, NULL, NULL, NULL);
}

/* The upstream asked the probe for a client certificate: an app without one would have
 * been refused (or let in on other terms) by it, so such an upstream is tunnelled. */
static int asked_for_client_cert(SSL *ssl, X509 **cert, EVP_PKEY **key)
{
    struct tls_check *check = check_index >= 0 ? SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), check_index) : NULL;
    (void)cert;
    (void)key;
    if (check)
        check->cert_requested = true;
    return 0;                          /* none */
}

/* The probe's handshake is done: what it negotiated is what the app's offer is held to. */
static void probe_handshake(const SSL *ssl, int where, int ret)
{
    struct tls_check *check = check_index >= 0 ? SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), check_index) : NULL;
    (void)ret;
    if (check && (where & SSL_CB_HANDSHAKE_DONE)) {
        tls_front_leg_of((SSL *)ssl, &check->leg);
        check->leg_known = true;
    }
}

/* libcurl's own verification runs as it always does (this returns its verdict); once it
 * has accepted the leaf, the same chain is checked against the app's store too. */
static int probe_verify(int preverify_ok, X509_STORE_CTX *x)
{
    SSL *ssl = X509_STORE_CTX_get_ex_data(x, SSL_get_ex_data_X509_STORE_CTX_idx());
    struct tls_check *check = ssl && check_index >= 0 ? SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), check_index) : NULL;
    if (check && preverify_ok && X509_STORE_CTX_get_error_depth(x) == 0 && !check->leaf) {
        X509 *leaf = X509_STORE_CTX_get0_cert(x);
        STACK_OF(X509) *untrusted = X509_STORE_CTX_get0_untrusted(x);
        if (leaf && X509_up_ref(leaf) == 1) {
            check->leaf = leaf;
            check->chain = untrusted ? X509_chain_up_ref(untrusted) : NULL;
        }
    }
    return preverify_ok;
}

int tls_front_probe_ctx(void *curl, void *sslctx, void *parm)
{
    (void)curl;
    pthread_once(&check_once, make_check_index);
    if (check_index < 0 || !SSL_CTX_set_ex_data(sslctx, check_index, parm))
        return 1;                      /* CURLE_UNSUPPORTED_PROTOCOL: the probe fails */
    SSL_CTX_set_verify(sslctx, SSL_VERIFY_PEER, probe_verify);
    SSL_CTX_set_options(sslctx, SSL_OP_NO_RENEGOTIATION);   /* (as every leg: upreq_refuse_renegotiation) */
    SSL_CTX_set_client_cert_cb(sslctx, asked_for_client_cert);
    SSL_CTX_set_info_callback(sslctx, probe_handshake);
    return 0;
}

void tls_front_check_release(struct tls_check *check)
{
    if (check->leaf)
        X509_free(check->leaf);
    if (check->chain)
        OPENSSL_sk_pop_free((OPENSSL_STACK *)check->chain, free_x509);
    check->leaf = NULL;
    check->chain = NULL;
    check->cert_requested = false;
    check->leg_known = false;
}

static bool same_key(size_t i, const char *name, const char *where, int upstream)
{
    return chains[i].upstream == upstream && !strcasecmp(chains[i].name, name) && !strcmp(chains[i].where, where);
}

void tls_front_keep_probe(const char *name, const char *where, int upstream, bool verified, struct tls_check *check)
{
    int64_t now = clock_mono_ms();
    size_t slot = 0;
    for (size_t i = 0; i < CHAINS_MAX; i++) {
        if (chains[i].until_ms <= now || same_key(i, name, where, upstream)) {
            slot = i;
            break;
        }
        if (chains[i].until_ms < chains[slot].until_ms)
            slot = i;
    }
    if (strlen(name) >= sizeof chains[slot].name || strlen(where) >= sizeof chains[slot].where) {
        tls_front_check_release(check);
        return;
    }
    drop_chain(slot);
    snprintf(chains[slot].name, sizeof chains[slot].name, "%s", name);
    snprintf(chains[slot].where, sizeof chains[slot].where, "%s", where);
    chains[slot].upstream = upstream;
    chains[slot].verified = verified && check->leaf;
    chains[slot].cert_requested = check->cert_requested;
    chains[slot].leg_known = verified && check->leg_known;
    chains[slot].leg = check->leg;
    chains[slot].leaf = check->leaf;   /* taken over */
    chains[slot].chain = check->chain;
    check->leaf = NULL;
    check->chain = NULL;
    chains[slot].until_ms = now + CHAIN_MS;
}

struct tls_pin {
    int refs;                          /* engine thread only */
    X509 *leaf;                        /* the leaf the verdict approved */
    X509_STORE *store;                 /* the app context's own store */
    struct tls_terms *terms;           /* the app connection's own checks and offer */
    char name[256];
};

static struct tls_pin *pin_new(X509_STORE *store, struct tls_terms *terms, X509 *leaf, const char *name)
{
    struct tls_pin *p = strlen(name) < sizeof p->name ? calloc(1, sizeof *p) : NULL;
    if (!p)
        return NULL;
    if (X509_up_ref(leaf) != 1) {
        free(p);
        return NULL;
    }
    if (X509_STORE_up_ref(store) != 1) {
        X509_free(leaf);
        free(p);
        return NULL;
    }
    p->refs = 1;
    p->leaf = leaf;
    p->store = store;
    p->terms = terms_ref(terms);
    snprintf(p->name, sizeof p->name, "%s", name);
    return p;
}

struct tls_pin *tls_front_pin_ref(struct tls_pin *pin)
{
    if (pin)
        pin->refs++;
    return pin;
}

void tls_front_pin_release(struct tls_pin *pin)
{
    if (!pin || --pin->refs > 0)
        return;
    X509_free(pin->leaf);
    X509_STORE_free(pin->store);
    tls_front_terms_release(pin->terms);
    free(pin);
}

bool tls_front_pin_holds(const struct tls_pin *pin, SSL *upstream_session)
{
    X509 *leaf = upstream_session ? SSL_get0_peer_certificate(upstream_session) : NULL;
    if (!pin || !leaf)
        return false;
    struct tls_leg leg;
    tls_front_leg_of(upstream_session, &leg);
    const char *refused = leg_refused(pin->terms, &leg);
    if (refused) {
        shim_debug("an upstream leg for %s negotiated %s", pin->name, refused);
        return false;
    }
    if (X509_cmp(leaf, pin->leaf) == 0)
        return true;
    /* another certificate than the one approved (a rotation, another backend, or a
     * server the app would refuse): the app's own checks decide */
    bool ok = chain_trusted(pin->store, &pin->terms->view, leaf, SSL_get_peer_cert_chain(upstream_session), pin->name) == 1;
    if (!ok)
        shim_debug("the upstream for %s now presents a certificate the app's store does not accept", pin->name);
    return ok;
}

int tls_front_verdict(X509_STORE *store, struct tls_terms *terms, const char *name, const char *where, int upstream,
                      struct tls_pin **pin)
{
    int64_t now = clock_mono_ms();
    for (size_t i = 0; i < CHAINS_MAX; i++) {
        if (chains[i].until_ms <= now || !same_key(i, name, where, upstream))
            continue;
        if (!chains[i].verified || !chains[i].leg_known) {
            shim_debug("the upstream for %s: %s", name, chains[i].verified ? "what its handshake negotiated is not known"
                                                                          : "libcurl refused it");
            return 0;
        }
        if (chains[i].cert_requested) {
            shim_debug("the upstream for %s asks for a client certificate", name);
            return 0;
        }
        const char *refused = leg_refused(terms, &chains[i].leg);
        if (refused) {
            shim_debug("the upstream for %s negotiated %s", name, refused);
            return 0;
        }
        int verdict = chain_trusted(store, &terms->view, chains[i].leaf, chains[i].chain, name);
        if (verdict == 1 && pin && !(*pin = pin_new(store, terms, chains[i].leaf, name)))
            return 0;                  /* nothing to hold its legs to: not intercepted */
        return verdict;
    }
    return -1;
}

void tls_front_forget_verdict(const char *name, const char *where, int upstream)
{
    for (size_t i = 0; i < CHAINS_MAX; i++)
        if (chains[i].until_ms && same_key(i, name, where, upstream))
            drop_chain(i);
}
