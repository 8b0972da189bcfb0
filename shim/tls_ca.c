/* tls_ca.c — owns the interception CA: made once per process when first needed, in
 * memory only (never a file, never the environment; a forked child keeps its parent's,
 * an exec'd program makes its own), name-constrained to the intercepting upstreams' host
 * names and addresses, valid for TLS_CA_VALID_HOURS; and the leaf certificates it signs,
 * one per name, only for names those constraints permit, cached. One P-256 key for the
 * CA and one for all leaves. Thread-safe: an app thread adds the CA to its contexts, the
 * engine mints leaves. */
#include "tls_ca.h"
#include "lazyssl.h"
#include "log.h"
#include <arpa/inet.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define LEAVES_MAX 256

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    bool tried, ok;
    X509 *cert;
    EVP_PKEY *key, *leaf_key;
    time_t not_after;
    size_t n_leaves;
    struct { char name[256]; X509 *cert; } leaves[LEAVES_MAX];
} CA;

static EVP_PKEY *new_key(void)
{
    EVP_PKEY *k = NULL;
    EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_id(EVP_PKEY_EC, NULL);
    if (!c || EVP_PKEY_keygen_init(c) <= 0 || EVP_PKEY_CTX_set_ec_paramgen_curve_nid(c, NID_X9_62_prime256v1) <= 0
        || EVP_PKEY_keygen(c, &k) <= 0)
        k = NULL;
    EVP_PKEY_CTX_free(c);
    return k;
}

static bool add_ext(X509 *cert, X509 *issuer, int nid, const char *value)
{
    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, issuer, cert, NULL, NULL, 0);
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &ctx, nid, value);
    bool ok = ext && X509_add_ext(cert, ext, -1) == 1;
    X509_EXTENSION_free(ext);
    return ok;
}

/* A certificate with a random serial, valid from an hour ago (clock skew) for `hours`. */
static X509 *new_cert(const char *cn, EVP_PKEY *subject_key, long hours)
{
    X509 *x = X509_new();
    uint64_t serial = 0;
    if (!x || RAND_bytes((unsigned char *)&serial, sizeof serial) != 1 || X509_set_version(x, 2) != 1
        || ASN1_INTEGER_set_uint64(X509_get_serialNumber(x), (serial >> 1) | 1) != 1
        || !X509_gmtime_adj(X509_getm_notBefore(x), -3600) || !X509_gmtime_adj(X509_getm_notAfter(x), hours * 3600)
        || X509_set_pubkey(x, subject_key) != 1
        || X509_NAME_add_entry_by_txt(X509_get_subject_name(x), "CN", MBSTRING_UTF8, (const unsigned char *)cn, -1,
                                      -1, 0) != 1) {
        X509_free(x);
        return NULL;
    }
    return x;
}

/* permitted;DNS:name,... for every intercepting upstream: its name, or its address. */
static bool constraints(const struct shim_config *cfg, char *out, size_t cap)
{
    size_t n = (size_t)snprintf(out, cap, "critical");
    size_t names = 0;
    for (size_t i = 0; i < cfg->n_upstreams && n < cap; i++) {
        const struct upstream_rule *u = &cfg->upstreams[i];
        if (u->tls != TLS_INTERCEPT)
            continue;
        if (!u->host_is_literal) {
            n += (size_t)snprintf(out + n, cap - n, ",permitted;DNS:%s", u->host);
            names++;
        }
        struct rules_addr addrs[8];
        size_t n_addrs = rules_addrs_of(cfg, i, addrs, 8);
        for (size_t a = 0; a < n_addrs && n < cap; a++) {
            char ip[INET6_ADDRSTRLEN];
            bool v4 = addrs[a].family == AF_INET;
            if (!inet_ntop(addrs[a].family, addrs[a].bytes, ip, sizeof ip))
                continue;
            n += (size_t)snprintf(out + n, cap - n, ",permitted;IP:%s/%s", ip,
                                  v4 ? "255.255.255.255" : "FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF");
            names++;
        }
    }
    return names && n < cap;
}

static bool make_ca(const struct shim_config *cfg)
{
    char nc[8192];
    if (!constraints(cfg, nc, sizeof nc))
        return false;
    CA.key = new_key();
    CA.leaf_key = new_key();
    char cn[96];
    snprintf(cn, sizeof cn, "httpshim interception CA (pid %d, this process only)", (int)getpid());
    CA.cert = CA.key && CA.leaf_key ? new_cert(cn, CA.key, TLS_CA_VALID_HOURS) : NULL;
    if (!CA.cert || X509_set_issuer_name(CA.cert, X509_get_subject_name(CA.cert)) != 1
        || !add_ext(CA.cert, CA.cert, NID_basic_constraints, "critical,CA:TRUE,pathlen:0")
        || !add_ext(CA.cert, CA.cert, NID_key_usage, "critical,keyCertSign,cRLSign")
        || !add_ext(CA.cert, CA.cert, NID_subject_key_identifier, "hash")
        || !add_ext(CA.cert, CA.cert, NID_name_constraints, nc) || !X509_sign(CA.cert, CA.key, EVP_sha256())) {
        shim_log("could not make the interception CA: TLS connections are tunnelled");
        return false;
    }
    CA.not_after = time(NULL) + TLS_CA_VALID_HOURS * 3600;
    return true;
}

bool tls_ca_ensure(const struct shim_config *cfg)
{
    if (!lazyssl_load())
        return false;
    pthread_mutex_lock(&lock);
    if (!CA.tried) {
        CA.tried = true;
        CA.ok = make_ca(cfg);
    }
    bool ok = CA.ok && time(NULL) < CA.not_after - 600;
    pthread_mutex_unlock(&lock);
    return ok;
}

X509 *tls_ca_cert(void)
{
    return CA.ok ? CA.cert : NULL;
}

/* Whether name is one the CA's constraints permit: an intercepting upstream's host
 * name, or one of its addresses as a literal. */
static bool permitted(const struct shim_config *cfg, const char *name)
{
    unsigned char bytes[16];
    int family = strchr(name, ':') ? AF_INET6 : AF_INET;
    bool literal = inet_pton(family, name, bytes) == 1;
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const struct upstream_rule *u = &cfg->upstreams[i];
        if (u->tls != TLS_INTERCEPT)
            continue;
        if (!literal && !u->host_is_literal && !strcasecmp(u->host, name))
            return true;
        struct rules_addr addrs[8];
        size_t n_addrs = literal ? rules_addrs_of(cfg, i, addrs, 8) : 0;
        for (size_t a = 0; a < n_addrs; a++)
            if (addrs[a].family == family && !memcmp(addrs[a].bytes, bytes, family == AF_INET ? 4 : 16))
                return true;
    }
    return false;
}

bool tls_ca_leaf(const struct shim_config *cfg, const char *name, X509 **cert, EVP_PKEY **key)
{
    if (!tls_ca_ensure(cfg) || strlen(name) >= sizeof CA.leaves[0].name || !permitted(cfg, name))
        return false;
    pthread_mutex_lock(&lock);
    X509 *found = NULL;
    for (size_t i = 0; i < CA.n_leaves && !found; i++)
        if (!strcasecmp(CA.leaves[i].name, name))
            found = CA.leaves[i].cert;
    if (!found && CA.n_leaves < LEAVES_MAX) {
        unsigned char bytes[16];
        bool ip = inet_pton(strchr(name, ':') ? AF_INET6 : AF_INET, name, bytes) == 1;
        char san[300];
        snprintf(san, sizeof san, "%s:%s", ip ? "IP" : "DNS", name);
        long hours = (long)((CA.not_after - time(NULL)) / 3600) - 1;
        /* an address's leaf has it as its IP SAN only: a common name "127.0.0.1" reads as a
         * host name to OpenSSL's name-constraint check (a leaf without DNS SANs has its CN
         * checked), and with a DNS constraint in the CA as well (another upstream's name) it
         * would fail it: the CN says what it is in words, which no check reads as a name */
        char cn[sizeof CA.leaves[0].name + 32];
        snprintf(cn, sizeof cn, ip ? "httpshim leaf for %s" : "%s", name);
        X509 *x = hours > 0 ? new_cert(cn, CA.leaf_key, hours) : NULL;
        if (x && X509_set_issuer_name(x, X509_get_subject_name(CA.cert)) == 1
            && add_ext(x, CA.cert, NID_basic_constraints, "critical,CA:FALSE")
            && add_ext(x, CA.cert, NID_key_usage, "critical,digitalSignature")
            && add_ext(x, CA.cert, NID_ext_key_usage, "serverAuth") && add_ext(x, CA.cert, NID_subject_alt_name, san)
            && add_ext(x, CA.cert, NID_authority_key_identifier, "keyid:always") && X509_sign(x, CA.key, EVP_sha256())) {
            snprintf(CA.leaves[CA.n_leaves].name, sizeof CA.leaves[0].name, "%s", name);
            CA.leaves[CA.n_leaves++].cert = found = x;
        } else {
            X509_free(x);
        }
    }
    pthread_mutex_unlock(&lock);
    if (!found)
        return false;
    *cert = found;                     /* kept for the life of the process */
    *key = CA.leaf_key;
    return true;
}
