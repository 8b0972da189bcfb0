/* lazyssl.h - OpenSSL 3 bound on first use, only when the process has loaded it already
 * (lazyssl.c). */
#ifndef HTTPSHIM_LAZYSSL_H
#define HTTPSHIM_LAZYSSL_H
#include <openssl/ssl.h>
#include <stdbool.h>

/* True when libssl.so.3 and libcrypto.so.3 are loaded and every function the shim uses
 * was found. Thread-safe; the answer never changes after the first true. */
bool lazyssl_load(void);
/* The definition of an OpenSSL function the shim interposes (self) that its caller would
 * have reached without the shim: in the caller's own scope, else the next one. */
void *lazyssl_real(const char *name, const void *caller, const void *self);
/* libssl.so.3's own SSL_CTX_new, never the shim's: for the shim's own contexts. */
SSL_CTX *lazyssl_ctx_new(const SSL_METHOD *meth);
/* Whether function lies in the libssl.so.3 this process has loaded. */
bool lazyssl_is_openssl3(const void *function);
#endif
