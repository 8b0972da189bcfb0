/*
 * lazyssl.c - owns the shim's use of OpenSSL (libssl.so.3 / libcrypto.so.3): not linked,
 * bound on first use, from whichever thread needs it first (an app thread creating its
 * first SSL_CTX, or the engine), by the same hidden-forwarding-stub scheme as lazylib.c.
 *
 * It only ever binds to an OpenSSL the process has already loaded (RTLD_NOLOAD): the
 * app's own (whose contexts the shim marks), or the one libcurl brought in. A process
 * that never loads OpenSSL never loads it because of the shim.
 *
 * SSL_CTX_new, SSL_CTX_set_cert_store, SSL_CTX_set1_cert_store and
 * SSL_CTX_set_cert_verify_callback are not stubbed here:
 * the shim exports its own (tls_trust.c), which reach the real ones by dlvsym.
 */
#include <dlfcn.h>
#include <openssl/bio.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdbool.h>

#include "lazyssl.h"
#include "log.h"

enum lib { LIB_CRYPTO, LIB_SSL, LIB_COUNT };
static const char *const lib_names[LIB_COUNT] = { "libcrypto.so.3", "libssl.so.3" };

/* X(library, return type, name, parameter list, argument list) */
#define RETURNING(X)                                                                           \
    X(LIB_CRYPTO, EVP_PKEY_CTX *, EVP_PKEY_CTX_new_id, (int id, ENGINE *e), (id, e))           \
    X(LIB_CRYPTO, int, EVP_PKEY_keygen_init, (EVP_PKEY_CTX *c), (c))                           \
    X(LIB_CRYPTO, int, EVP_PKEY_CTX_set_ec_paramgen_curve_nid, (EVP_PKEY_CTX *c, int nid), (c, nid)) \
    X(LIB_CRYPTO, int, EVP_PKEY_keygen, (EVP_PKEY_CTX *c, EVP_PKEY **k), (c, k))               \
    X(LIB_CRYPTO, int, EVP_PKEY_up_ref, (EVP_PKEY *k), (k))                                    \
    X(LIB_CRYPTO, const EVP_MD *, EVP_sha256, (void), ())                                      \
    X(LIB_CRYPTO, X509 *, X509_new, (void), ())                                                \
    X(LIB_CRYPTO, int, X509_up_ref, (X509 *x), (x))                                            \
    X(LIB_CRYPTO, int, X509_set_version, (X509 *x, long v), (x, v))                            \
    X(LIB_CRYPTO, ASN1_INTEGER *, X509_get_serialNumber, (X509 *x), (x))                       \
    X(LIB_CRYPTO, int, ASN1_INTEGER_set_uint64, (ASN1_INTEGER *a, uint64_t r), (a, r))         \
    X(LIB_CRYPTO, ASN1_TIME *, X509_getm_notBefore, (const X509 *x), (x))                      \
    X(LIB_CRYPTO, ASN1_TIME *, X509_getm_notAfter, (const X509 *x), (x))                       \
    X(LIB_CRYPTO, ASN1_TIME *, X509_gmtime_adj, (ASN1_TIME *s, long adj), (s, adj))            \
    X(LIB_CRYPTO, int, X509_set_pubkey, (X509 *x, EVP_PKEY *k), (x, k))                        \
    X(LIB_CRYPTO, X509_NAME *, X509_get_subject_name, (const X509 *x), (x))                    \
    X(LIB_CRYPTO, int, X509_NAME_add_entry_by_txt,                                             \
      (X509_NAME *n, const char *f, int t, const unsigned char *b, int l, int loc, int set),   \
      (n, f, t, b, l, loc, set))                                                               \
    X(LIB_CRYPTO, int, X509_set_issuer_name, (X509 *x, const X509_NAME *n), (x, n))           \
    X(LIB_CRYPTO, X509_EXTENSION *, X509V3_EXT_conf_nid,                                       \
      (LHASH_OF(CONF_VALUE) *conf, X509V3_CTX *c, int nid, const char *v), (conf, c, nid, v))  \
    X(LIB_CRYPTO, int, X509_add_ext, (X509 *x, X509_EXTENSION *ex, int loc), (x, ex, loc))     \
    X(LIB_CRYPTO, int, X509_sign, (X509 *x, EVP_PKEY *k, const EVP_MD *md), (x, k, md))        \
    X(LIB_CRYPTO, int, RAND_bytes, (unsigned char *b, int n), (b, n))                          \
    X(LIB_CRYPTO, int, ERR_set_mark, (void), ())                                               \
    X(LIB_CRYPTO, int, ERR_pop_to_mark, (void), ())                                            \
    X(LIB_CRYPTO, int, X509_STORE_add_cert, (X509_STORE *s, X509 *x), (s, x))                  \
    X(LIB_CRYPTO, int, X509_STORE_up_ref, (X509_STORE *s), (s))                                \
    X(LIB_CRYPTO, STACK_OF(X509_OBJECT) *, X509_STORE_get0_objects, (const X509_STORE *s), (s)) \
    X(LIB_CRYPTO, X509_STORE_CTX_verify_cb, X509_STORE_get_verify_cb, (const X509_STORE *s), (s)) \
    X(LIB_CRYPTO, X509_VERIFY_PARAM *, X509_STORE_get0_param, (const X509_STORE *s), (s))      \
    X(LIB_CRYPTO, unsigned long, X509_VERIFY_PARAM_get_flags, (const X509_VERIFY_PARAM *p), (p)) \
    X(LIB_CRYPTO, X509_STORE_CTX *, X509_STORE_CTX_new, (void), ())                            \
    X(LIB_CRYPTO, int, X509_STORE_CTX_init,                                                    \
      (X509_STORE_CTX *c, X509_STORE *s, X509 *x, STACK_OF(X509) *chain), (c, s, x, chain))    \
    X(LIB_CRYPTO, X509_VERIFY_PARAM *, X509_STORE_CTX_get0_param, (const X509_STORE_CTX *c), (c)) \
    X(LIB_CRYPTO, int, X509_VERIFY_PARAM_set1_host, (X509_VERIFY_PARAM *p, const char *n, size_t l), \
      (p, n, l))                                                                               \
    X(LIB_CRYPTO, int, X509_VERIFY_PARAM_set1_ip_asc, (X509_VERIFY_PARAM *p, const char *ip), (p, ip)) \
    X(LIB_CRYPTO, int, X509_STORE_CTX_set_purpose, (X509_STORE_CTX *c, int p), (c, p))        \
    X(LIB_CRYPTO, int, X509_STORE_CTX_set_default, (X509_STORE_CTX *c, const char *n), (c, n)) \
    X(LIB_CRYPTO, X509_VERIFY_PARAM *, X509_VERIFY_PARAM_new, (void), ())                      \
    X(LIB_CRYPTO, char *, X509_VERIFY_PARAM_get0_host, (X509_VERIFY_PARAM *p, int i), (p, i))  \
    X(LIB_CRYPTO, char *, X509_VERIFY_PARAM_get1_ip_asc, (X509_VERIFY_PARAM *p), (p))          \
    X(LIB_CRYPTO, int, X509_VERIFY_PARAM_set1, (X509_VERIFY_PARAM *to, const X509_VERIFY_PARAM *from), (to, from)) \
    X(LIB_CRYPTO, int, X509_VERIFY_PARAM_set1_ip, (X509_VERIFY_PARAM *p, const unsigned char *ip, size_t l), \
      (p, ip, l))                                                                              \
    X(LIB_CRYPTO, int, EVP_PKEY_get_security_bits, (const EVP_PKEY *k), (k))                   \
    X(LIB_CRYPTO, int, EVP_PKEY_get_base_id, (const EVP_PKEY *k), (k))                         \
    X(LIB_CRYPTO, EVP_PKEY *, X509_get0_pubkey, (const X509 *x), (x))                          \
    X(LIB_CRYPTO, int, X509_verify_cert, (X509_STORE_CTX *c), (c))                             \
    X(LIB_CRYPTO, int, X509_STORE_CTX_get_error, (const X509_STORE_CTX *c), (c))               \
    X(LIB_CRYPTO, int, X509_STORE_CTX_get_error_depth, (const X509_STORE_CTX *c), (c))         \
    X(LIB_CRYPTO, X509 *, X509_STORE_CTX_get0_cert, (const X509_STORE_CTX *c), (c))            \
    X(LIB_CRYPTO, STACK_OF(X509) *, X509_STORE_CTX_get0_untrusted, (const X509_STORE_CTX *c), (c)) \
    X(LIB_CRYPTO, void *, X509_STORE_CTX_get_ex_data, (const X509_STORE_CTX *c, int i), (c, i)) \
    X(LIB_CRYPTO, int, OPENSSL_sk_num, (const OPENSSL_STACK *s), (s))                          \
    X(LIB_CRYPTO, void *, OPENSSL_sk_value, (const OPENSSL_STACK *s, int i), (s, i))           \
    X(LIB_CRYPTO, STACK_OF(X509) *, X509_chain_up_ref, (STACK_OF(X509) *c), (c))              \
    X(LIB_CRYPTO, const BIO_METHOD *, BIO_s_mem, (void), ())                                   \
    X(LIB_CRYPTO, BIO *, BIO_new, (const BIO_METHOD *m), (m))                                  \
    X(LIB_CRYPTO, int, BIO_write, (BIO *b, const void *d, int n), (b, d, n))                   \
    X(LIB_CRYPTO, int, BIO_read, (BIO *b, void *d, int n), (b, d, n))                          \
    X(LIB_CRYPTO, int, BIO_free, (BIO *b), (b))                                                \
    X(LIB_CRYPTO, long, BIO_ctrl, (BIO *b, int cmd, long larg, void *parg), (b, cmd, larg, parg)) \
    X(LIB_CRYPTO, int, CRYPTO_get_ex_new_index,                                                \
      (int ci, long argl, void *argp, CRYPTO_EX_new *nf, CRYPTO_EX_dup *df, CRYPTO_EX_free *ff), \
      (ci, argl, argp, nf, df, ff))                                                            \
    X(LIB_SSL, const SSL_METHOD *, TLS_server_method, (void), ())                              \
    X(LIB_SSL, X509_STORE *, SSL_CTX_get_cert_store, (const SSL_CTX *c), (c))                  \
    X(LIB_SSL, int, SSL_CTX_add_custom_ext,                                                    \
      (SSL_CTX *c, unsigned int t, unsigned int ctx, SSL_custom_ext_add_cb_ex a,               \
       SSL_custom_ext_free_cb_ex f, void *aa, SSL_custom_ext_parse_cb_ex p, void *pa),         \
      (c, t, ctx, a, f, aa, p, pa))                                                            \
    X(LIB_SSL, X509 *, SSL_get_certificate, (const SSL *s), (s))                               \
    X(LIB_SSL, int, SSL_get_ex_data_X509_STORE_CTX_idx, (void), ())                            \
    X(LIB_SSL, SSL_CTX *, SSL_get_SSL_CTX, (const SSL *s), (s))                                \
    X(LIB_SSL, int, SSL_CTX_set_ex_data, (SSL_CTX *c, int i, void *d), (c, i, d))              \
    X(LIB_SSL, void *, SSL_CTX_get_ex_data, (const SSL_CTX *c, int i), (c, i))                 \
    X(LIB_SSL, long, SSL_CTX_ctrl, (SSL_CTX *c, int cmd, long larg, void *parg), (c, cmd, larg, parg)) \
    X(LIB_SSL, uint64_t, SSL_CTX_set_options, (SSL_CTX *c, uint64_t o), (c, o))               \
    X(LIB_SSL, long, SSL_ctrl, (SSL *s, int cmd, long larg, void *parg), (s, cmd, larg, parg))   \
    X(LIB_SSL, SSL_verify_cb, SSL_get_verify_callback, (const SSL *s), (s))                    \
    X(LIB_SSL, int, SSL_get_wfd, (const SSL *s), (s))                                          \
    X(LIB_SSL, const char *, SSL_get_servername, (const SSL *s, const int type), (s, type))     \
    X(LIB_SSL, X509_VERIFY_PARAM *, SSL_get0_param, (SSL *s), (s))                             \
    X(LIB_SSL, int, SSL_get_security_level, (const SSL *s), (s))                               \
    X(LIB_SSL, int, SSL_version, (const SSL *s), (s))                                          \
    X(LIB_SSL, const SSL_CIPHER *, SSL_get_current_cipher, (const SSL *s), (s))                \
    X(LIB_SSL, uint16_t, SSL_CIPHER_get_protocol_id, (const SSL_CIPHER *c), (c))               \
    X(LIB_SSL, int, SSL_get_peer_signature_type_nid, (const SSL *s, int *n), (s, n))           \
    X(LIB_SSL, SSL *, SSL_new, (SSL_CTX *c), (c))                                              \
    X(LIB_SSL, int, SSL_do_handshake, (SSL *s), (s))                                           \
    X(LIB_SSL, int, SSL_read, (SSL *s, void *b, int n), (s, b, n))                             \
    X(LIB_SSL, int, SSL_write, (SSL *s, const void *b, int n), (s, b, n))                      \
    X(LIB_SSL, int, SSL_get_error, (const SSL *s, int rc), (s, rc))                            \
    X(LIB_SSL, int, SSL_shutdown, (SSL *s), (s))                                               \
    X(LIB_SSL, int, SSL_use_certificate, (SSL *s, X509 *x), (s, x))                            \
    X(LIB_SSL, int, SSL_use_PrivateKey, (SSL *s, EVP_PKEY *k), (s, k))                         \
    X(LIB_SSL, STACK_OF(X509) *, SSL_get_peer_cert_chain, (const SSL *s), (s))                 \
    X(LIB_SSL, X509 *, SSL_get1_peer_certificate, (const SSL *s), (s))                         \
    X(LIB_SSL, X509 *, SSL_get0_peer_certificate, (const SSL *s), (s))                         \
    X(LIB_CRYPTO, int, X509_cmp, (const X509 *a, const X509 *b), (a, b))

#define VOID_RETURNING(X)                                                                      \
    X(LIB_CRYPTO, void, EVP_PKEY_CTX_free, (EVP_PKEY_CTX *c), (c))                             \
    X(LIB_CRYPTO, void, EVP_PKEY_free, (EVP_PKEY *k), (k))                                     \
    X(LIB_CRYPTO, void, X509_free, (X509 *x), (x))                                             \
    X(LIB_CRYPTO, void, X509V3_set_ctx,                                                        \
      (X509V3_CTX *c, X509 *i, X509 *s, X509_REQ *r, X509_CRL *crl, int f), (c, i, s, r, crl, f)) \
    X(LIB_CRYPTO, void, X509_EXTENSION_free, (X509_EXTENSION *e), (e))                         \
    X(LIB_CRYPTO, void, X509_STORE_free, (X509_STORE *s), (s))                                 \
    X(LIB_CRYPTO, void, X509_STORE_CTX_free, (X509_STORE_CTX *c), (c))                         \
    X(LIB_CRYPTO, void, X509_VERIFY_PARAM_free, (X509_VERIFY_PARAM *p), (p))                   \
    X(LIB_CRYPTO, void, X509_VERIFY_PARAM_set_auth_level, (X509_VERIFY_PARAM *p, int l), (p, l)) \
    X(LIB_CRYPTO, void, ERR_clear_error, (void), ())                                           \
    X(LIB_CRYPTO, void, CRYPTO_free, (void *p, const char *file, int line), (p, file, line))    \
    X(LIB_CRYPTO, void, OPENSSL_sk_pop_free, (OPENSSL_STACK *s, void (*f)(void *)), (s, f))      \
    X(LIB_SSL, void, SSL_CTX_free, (SSL_CTX *c), (c))                                          \
    X(LIB_SSL, void, SSL_CTX_set_alpn_select_cb, (SSL_CTX *c, SSL_CTX_alpn_select_cb_func cb, void *a), \
      (c, cb, a))                                                                              \
    X(LIB_SSL, void, SSL_free, (SSL *s), (s))                                                  \
    X(LIB_SSL, void, SSL_set_bio, (SSL *s, BIO *r, BIO *w), (s, r, w))                         \
    X(LIB_SSL, void, SSL_set_accept_state, (SSL *s), (s))                                      \
    X(LIB_SSL, void, SSL_CTX_set_verify, (SSL_CTX *c, int mode, SSL_verify_cb cb), (c, mode, cb)) \
    X(LIB_SSL, void, SSL_CTX_set_info_callback, (SSL_CTX *c, void (*cb)(const SSL *s, int w, int r)), (c, cb)) \
    X(LIB_SSL, void, SSL_CTX_set_client_cert_cb,                                               \
      (SSL_CTX *c, int (*cb)(SSL *s, X509 **x, EVP_PKEY **k)), (c, cb))

#define DECLARE_POINTER(lib, ret, name, params, args) static ret(*p_##name) params;
RETURNING(DECLARE_POINTER)
VOID_RETURNING(DECLARE_POINTER)

#define DEFINE_STUB(lib, ret, name, params, args) \
    ret name params { return p_##name args; }
#define DEFINE_VOID_STUB(lib, ret, name, params, args) \
    ret name params { p_##name args; }
RETURNING(DEFINE_STUB)
VOID_RETURNING(DEFINE_VOID_STUB)

struct symbol { enum lib lib; const char *name; void **slot; };
#define TABLE_ENTRY(lib, ret, name, params, args) { lib, #name, (void **)&p_##name },
static const struct symbol symbols[] = { RETURNING(TABLE_ENTRY) VOID_RETURNING(TABLE_ENTRY) };

static pthread_once_t once = PTHREAD_ONCE_INIT;
static bool loaded;

static void load(void)
{
    void *handles[LIB_COUNT];
    for (int i = 0; i < LIB_COUNT; i++) {
        handles[i] = dlopen(lib_names[i], RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
        if (!handles[i])
            return;                    /* no OpenSSL 3 in this process: nothing to do */
    }
    for (size_t i = 0; i < sizeof symbols / sizeof symbols[0]; i++) {
        void *sym = dlsym(handles[symbols[i].lib], symbols[i].name);
        if (!sym) {
            shim_log("%s has no %s: TLS interception is off", lib_names[symbols[i].lib], symbols[i].name);
            return;
        }
        *symbols[i].slot = sym;
    }
    loaded = true;                     /* the handles stay open for the life of the process */
}

bool lazyssl_load(void)
{
    pthread_once(&once, load);
    return loaded;
}

void *lazyssl_real(const char *name, const void *caller, const void *self)
{
    /* The caller's own scope first: an app's libssl is usually private to the module that
     * dlopen'ed it (Python's _ssl), out of reach of RTLD_NEXT, and if two libssl are
     * loaded this picks the one the caller linked against. */
    void *f = NULL;
    Dl_info info;
    if (caller && dladdr(caller, &info) && info.dli_fname) {
        void *h = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
        if (h) {
            f = dlsym(h, name);
            dlclose(h);
        }
        if (f == self)
            f = NULL;                  /* the main program's scope starts with the shim */
    }
    if (!f)
        f = dlvsym(RTLD_NEXT, name, "OPENSSL_3.0.0");
    if (!f)
        f = dlsym(RTLD_NEXT, name);
    if (!f) {
        void *h = dlopen("libssl.so.3", RTLD_LAZY | RTLD_NOLOAD);
        if (h) {
            f = dlsym(h, name);
            dlclose(h);
        }
    }
    return f;
}

SSL_CTX *lazyssl_ctx_new(const SSL_METHOD *meth)
{
    void *h = dlopen(lib_names[LIB_SSL], RTLD_LAZY | RTLD_LOCAL | RTLD_NOLOAD);
    SSL_CTX *(*real)(const SSL_METHOD *) = h ? (SSL_CTX * (*)(const SSL_METHOD *)) dlsym(h, "SSL_CTX_new") : NULL;
    if (h)
        dlclose(h);
    return real ? real(meth) : NULL;
}

bool lazyssl_is_openssl3(const void *function)
{
    Dl_info info;
    void *ssl3 = dlopen("libssl.so.3", RTLD_LAZY | RTLD_LOCAL | RTLD_NOLOAD);
    bool same = false;
    if (ssl3 && dladdr(function, &info)) {
        Dl_info lib;
        void *probe = dlsym(ssl3, "SSL_CTX_new");
        same = probe && dladdr(probe, &lib) && lib.dli_fbase == info.dli_fbase;
    }
    if (ssl3)
        dlclose(ssl3);
    return same;
}
