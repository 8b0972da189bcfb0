/* tls_decide.h — what becomes of TLS the app encrypts itself on a diverted connection
 * (tls_decide.c): tunnelled (and why), or intercepted (with the pin its upstream legs must
 * hold), decided from its ClientHello, the upstream's configuration, the app context's
 * mark and store, and a probe of the upstream. */
#ifndef HTTPSHIM_TLS_DECIDE_H
#define HTTPSHIM_TLS_DECIDE_H
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "fdtable.h"
#include "loop.h"
#include "rules.h"
#include <openssl/x509.h>

enum tls_outcome {
    TLS_IS_NOT_TLS,                    /* not a ClientHello: go on as HTTP */
    TLS_NEEDS_MORE,                       /* the ClientHello is not whole yet: wait for bytes */
    TLS_DECIDING,                    /* the verdict is being found: decided() is called */
    TLS_TO_TUNNEL,                  /* relay it untouched: why counts it, what says it */
    TLS_TO_INTERCEPT,               /* terminate it for `name`; take over `pin` */
};

struct tls_wait;
struct tls_pin;
struct tls_terms;


/* Per connection, embedded in the engine's. */
struct tls_decision {
    void (*decided)(struct tls_decision *d);   /* after TLS_DECIDING: outcome is TLS_TO_TUNNEL or TLS_TO_INTERCEPT */
    enum tls_outcome outcome;
    _Atomic uint64_t *why;
    const char *what;
    struct tls_pin *pin;            /* INTERCEPT: a reference, the caller's to take */
    char name[256];                 /* the name the app asked for */
    /* the rest is tls_decide.c's */
    int fd, upstream;
    union shim_sockaddr dest;
    socklen_t dest_len;
    char where[64];                 /* the address and port dialled, as probes name it */
    X509_STORE *store;              /* the app context's store while waiting (a reference) */
    struct tls_terms *terms;        /* the app connection's own checks and offer, meanwhile */
    struct tls_wait *wait;          /* the probe it waits on, with others */
    struct tls_decision *next_waiter;
    struct loop_timer recheck;      /* the app's store was still empty, or not settled */
    int rechecks;
    bool store_unfilled;            /* at the ClientHello: filled after it (curl), or never */
    int settle_looks;
};

void tls_decide_init(struct tls_decision *d, void (*decided)(struct tls_decision *d));
/* At the connection's first bytes (bytes, n; eof: the app will send no more). */
enum tls_outcome tls_decide(struct tls_decision *d, const struct shim_config *cfg, int upstream, int fd,
                            const union shim_sockaddr *dest, socklen_t dest_len, const char *bytes, size_t n,
                            bool eof);
/* The connection goes: no more waiting, every reference dropped (decided() not called). */
void tls_decide_cancel(struct tls_decision *d);
void tls_decide_forget(void);       /* forked child: the parent's waits */
#endif
