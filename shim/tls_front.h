/* tls_front.h — the app's TLS terminated in the engine (tls_front.c). */
#ifndef HTTPSHIM_TLS_FRONT_H
#define HTTPSHIM_TLS_FRONT_H
#include <openssl/ssl.h>
#include <stdbool.h>
#include <sys/types.h>
#include "buf.h"
#include "loop.h"
#include "rules.h"
#include "tls_hello.h"
#include "tls_marks.h"

void tls_front_init(const struct shim_config *cfg);
void tls_front_forget(void);          /* forked child: the parent's sessions are not ours */
/* Takes over the app's socketpair end (app_src, moved) and the ClientHello bytes read
 * from it (hello, emptied), answers as `name` with the CA's leaf, and relays the
 * plaintext to and from plain_fd, which it owns from then on. -1: nothing was taken
 * over; the caller still owns all of it. */
/* app: the app's own fd number for that end, and the socket's identity, so that the front
 * can end the app's connection as a reset (see tls_front_plain_failed). */
struct tls_front_app { int fd; dev_t dev; ino_t ino; };
int tls_front_start(struct loop_source *app_src, const struct tls_front_app *app, int plain_fd, int plain_peer,
                    int upstream, const char *name, struct buf *hello);
/* The engine's connection on the front's plaintext pair (plain_peer, its end: still open)
 * ends after an exchange that failed: the front ends the app's TLS without close_notify,
 * as the upstream's cut connection would end it direct, so the app sees its answer cut
 * ("unexpected eof"), never a clean end after part of a body; after the upstream's reset
 * (reset), the app's connection is reset too. */
void tls_front_plain_failed(int plain_peer, bool reset);
/* A probe of the upstream checks the chain it presents against an app context's store
 * too: libcurl's CURLOPT_SSL_CTX_FUNCTION with a struct tls_check as its data. */
/* What a handshake with the upstream negotiated, as TLS code points: version, cipher
 * suite, key exchange group (0: none), signature scheme (0: none; 0xffff: unknown), and
 * the key exchange's security bits (-1: none). */
struct tls_leg {
    uint16_t version, cipher, group, sigalg;
    int kx_bits;
};
void tls_front_leg_of(SSL *session, struct tls_leg *out);

struct tls_check {
    X509 *leaf;                        /* what the upstream presented, once libcurl accepted it */
    STACK_OF(X509) *chain;
    bool cert_requested;               /* it asked for a client certificate */
    bool leg_known;                    /* its handshake completed: */
    struct tls_leg leg;                /* what it negotiated */
};
int tls_front_probe_ctx(void *curl, void *sslctx, void *parm);
void tls_front_check_release(struct tls_check *check);
/* What a probe found is kept a minute, keyed by everything the answer depends on: the
 * name, the address and port dialled (`where`, "1.2.3.4:443") and the upstream section.
 * verified: libcurl accepted the chain. */
void tls_front_keep_probe(const char *name, const char *where, int upstream, bool verified, struct tls_check *check);

/* What the app's own connection would accept: how it verifies (tls_marks.c) and what its
 * ClientHello offered. Reference-counted; engine thread only. */
struct tls_terms {
    int refs;
    struct tls_app_view view;
    struct tls_offer offer;
};
/* Takes view->param over (freed on failure); NULL without memory. */
struct tls_terms *tls_front_terms_new(struct tls_app_view *view, const struct tls_offer *offer);
void tls_front_terms_release(struct tls_terms *terms);            /* NULL-safe */
/* Whether the shim's own leaf (ECDSA P-256, SHA-256) can answer this offer at all. */
bool tls_front_can_answer(const struct tls_offer *offer);
/* With a recent probe for exactly (name, where, upstream): 1 when libcurl accepted the
 * upstream, what it negotiated is among what the app offered (at the app's security
 * level), it asked for no client certificate, and its chain also verifies against store
 * (an app context's) as the app's connection (terms) would verify it; 0 when not; -1:
 * no recent probe; TLS_VERDICT_NOT_YET: the store has no trust of the app's in it yet (ask
 * again soon). On 1, *pin (when pin is not NULL) is what the connection's upstream legs
 * must then present (a new reference). */
#define TLS_VERDICT_NOT_YET (-2)
struct tls_pin;
int tls_front_verdict(X509_STORE *store, struct tls_terms *terms, const char *name, const char *where, int upstream,
                      struct tls_pin **pin);
/* An upstream leg for (name, where, upstream) failed verification: the kept probe is
 * dropped, so the next app connection is probed afresh (and tunnelled). */
void tls_front_forget_verdict(const char *name, const char *where, int upstream);
/* The pin of an intercepted connection: every upstream leg that carries its requests
 * (new or reused) must have negotiated what the app offered, and present the leaf its
 * verdict approved, or a chain that verifies as the app would for the name. Engine
 * thread only. */
struct tls_pin *tls_front_pin_ref(struct tls_pin *pin);           /* NULL-safe */
void tls_front_pin_release(struct tls_pin *pin);                  /* NULL-safe */
bool tls_front_pin_holds(const struct tls_pin *pin, SSL *upstream_session);
#endif
