/* tls_marks.h — the app's OpenSSL contexts that trust the shim's CA, and the mark their
 * ClientHellos carry (tls_marks.c). */
#ifndef HTTPSHIM_TLS_MARKS_H
#define HTTPSHIM_TLS_MARKS_H
#include <openssl/x509.h>
#include <stdbool.h>
#include <stdint.h>
#include "tls_hello.h"

#define TLS_MARKS_MAX 4096             /* contexts marked at once; more are not marked */
#define TLS_MARK_CLIENT_CERT (1ULL << 63)   /* in a mark's number: the connection is mutual TLS */

/* The number a mark carries (TLS_MARK_CLIENT_CERT included). */
uint64_t tls_marks_number(const unsigned char mark[TLS_MARK_LEN]);

/* A new context trusting the CA, with its trust store (referenced): its number, 0 when
 * the registry is full. */
uint64_t tls_marks_add(X509_STORE *store);
void tls_marks_set_store(uint64_t id, X509_STORE *store);   /* the app swapped stores */
void tls_marks_drop(uint64_t id);                           /* the context was freed */
void tls_marks_bytes(uint64_t id, unsigned char out[TLS_MARK_LEN]);
/* The store of the context whose mark this is (a new reference), or NULL: not a mark of
 * this process, or a context since freed. */
X509_STORE *tls_marks_store(const unsigned char mark[TLS_MARK_LEN]);
#endif
