/* tls_front.h — the app's TLS terminated in the engine (tls_front.c). */
#ifndef HTTPSHIM_TLS_FRONT_H
#define HTTPSHIM_TLS_FRONT_H
#include <openssl/ssl.h>
#include <stdbool.h>
#include "buf.h"
#include "loop.h"
#include "rules.h"

void tls_front_init(const struct shim_config *cfg);
void tls_front_forget(void);          /* forked child: the parent's sessions are not ours */
/* Takes over the app's socketpair end (app_src, moved) and the ClientHello bytes read
 * from it (hello, emptied), answers as `name` with the CA's leaf, and relays the
 * plaintext to and from plain_fd, which it owns from then on. -1: nothing was taken
 * over; the caller still owns all of it. */
int tls_front_start(struct loop_source *app_src, int plain_fd, int upstream, const char *name, struct buf *hello);
/* A probe of the upstream checks the chain it presents against an app context's store
 * too: libcurl's CURLOPT_SSL_CTX_FUNCTION with a struct tls_check as its data. */
struct tls_check {
    X509 *leaf;                        /* what the upstream presented, once libcurl accepted it */
    STACK_OF(X509) *chain;
};
int tls_front_probe_ctx(void *curl, void *sslctx, void *parm);
void tls_front_check_release(struct tls_check *check);
/* A probe of `name` at address `where` ended (verified: libcurl accepted it): its chain
 * is kept a minute. */
void tls_front_keep_probe(const char *name, const char *where, bool verified, struct tls_check *check);
/* With a recent probe of name at where: 1 when libcurl accepted the upstream and its
 * chain also verifies against store (an app context's), 0 when not; -1: no recent probe;
 * TLS_VERDICT_NOT_YET: the store has no trust of the app's in it yet (ask again soon). */
#define TLS_VERDICT_NOT_YET (-2)
int tls_front_verdict(X509_STORE *store, const char *name, const char *where);
#endif
