/* tls_ca.h — the per-process interception CA and the leaves it signs (tls_ca.c). */
#ifndef HTTPSHIM_TLS_CA_H
#define HTTPSHIM_TLS_CA_H
#include <openssl/x509.h>
#include <stdbool.h>
#include "rules.h"

#define TLS_CA_VALID_HOURS (7 * 24)    /* then interception stops: the process tunnels */

/* Makes the CA on first call (cfg names the intercepting upstreams); false when there is
 * none to make, OpenSSL 3 is not loaded, or it has (almost) expired. */
bool tls_ca_ensure(const struct shim_config *cfg);
X509 *tls_ca_cert(void);              /* the CA certificate, or NULL before tls_ca_ensure */
/* A leaf for name (a host name, or an address literal), which the CA's constraints must
 * permit. Borrowed: kept for the life of the process. */
bool tls_ca_leaf(const struct shim_config *cfg, const char *name, X509 **cert, EVP_PKEY **key);
#endif
