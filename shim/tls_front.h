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
/* Whether the chain the upstream presented on upstream_ssl verifies for name against
 * store (an app context's), as a TLS server's chain. */
bool tls_front_chain_trusted(X509_STORE *store, const SSL *upstream_ssl, const char *name);
#endif
