/* tls_marks.h — the app's OpenSSL contexts that trust the shim's CA, the mark their
 * ClientHellos carry, and what each marked ClientHello's own connection would accept
 * (tls_marks.c). */
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
void tls_marks_bytes(uint64_t id, uint64_t hello, unsigned char out[TLS_MARK_LEN]);

/* How the app's connection that sent a ClientHello verifies what it gets back, taken from
 * its SSL as the hello is made: its verification parameters (flags, depth, host checks,
 * purpose; a copy) and its security level. */
struct tls_app_view {
    X509_VERIFY_PARAM *param;
    int sec_level;
    bool store_unfilled;               /* its context's store held nothing but the shim's CA */
};
#define TLS_HELLOS_MAX 1024            /* views waiting for the engine; the oldest goes */
/* Keeps a view (taking param over) for the engine: the hello number its mark carries, or
 * 0 (then param was freed). */
uint64_t tls_marks_hello_add(X509_VERIFY_PARAM *param, int sec_level, bool store_unfilled);
/* A store that holds nothing but the shim's CA: its app fills it later, or never. */
bool tls_marks_store_unfilled(const X509_STORE *store);
/* A store filled after the ClientHello is done filling: curl's last step (X509_STORE_set_flags
 * with X509_V_FLAG_TRUSTED_FIRST, after its CA file and its revocation list) is taken. */
bool tls_marks_store_settled(const X509_STORE *store);
/* The view of the hello this mark came with, taken out (the caller frees its param):
 * false when there is none (not this process's, already taken, or pushed out). */
bool tls_marks_take_view(const unsigned char mark[TLS_MARK_LEN], struct tls_app_view *out);
/* Whether an app's connection verifying with this store and these parameters checks what
 * the shim's own leaf cannot pass, or runs the app's code: revocation lists (the leaf has
 * none), a verify callback on the store (the app's, which must not run on the engine's
 * thread, where it has no SSL). Such a connection is not the shim's to answer. */
bool tls_marks_checks_beyond_the_shim(const X509_STORE *store, const X509_VERIFY_PARAM *param);
/* The store of the context whose mark this is (a new reference), or NULL: not a mark of
 * this process, or a context since freed. */
X509_STORE *tls_marks_store(const unsigned char mark[TLS_MARK_LEN]);
#endif
