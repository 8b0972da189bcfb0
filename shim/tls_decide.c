/* tls_decide.c — owns the decision about TLS the app encrypts itself on a diverted
 * connection, at its first bytes: tunnelled (the upstream is tls = tunnel, the ClientHello
 * cannot be read, the app's context carries no mark of trusting the shim, presents a
 * client certificate, asks for another name or not for http/1.1 or for what the shim's
 * leaf cannot give, or the upstream does not verify or negotiate as the app's own
 * connection would accept), or intercepted. The verdict for a name, address, port and
 * upstream comes from tls_front.c (kept a minute), checked against the app context's own
 * store; when there is none, one probe of the upstream per name and address runs, and the
 * ClientHellos that arrive meanwhile wait on it together; an app store that holds nothing
 * yet is asked again a few times. Engine thread only. */
#include "tls_decide.h"
#include "log.h"
#include "stats.h"
#include "tls_front.h"
#include "tls_hello.h"
#include "tls_marks.h"
#include "upstream.h"
#include "upstream_request.h"
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* One probe of the upstream per name and address at a time: the ClientHellos that
 * arrive while it runs (a burst of new sessions) wait on it together. */
struct tls_wait {
    struct tls_wait *next;
    void *probe;
    char name[256], where[64];
    int upstream;
    struct tls_decision *waiters;
};
static struct tls_wait *tls_waits;    /* engine thread only */
static const struct shim_config *cfg;

static void unlink_wait(struct tls_wait *w)
{
    for (struct tls_wait **p = &tls_waits; *p; p = &(*p)->next)
        if (*p == w) {
            *p = w->next;
            return;
        }
}

static void stop_waiting(struct tls_decision *c)
{
    struct tls_wait *w = c->wait;
    for (struct tls_decision **p = &w->waiters; *p; p = &(*p)->next_waiter)
        if (*p == c) {
            *p = c->next_waiter;
            break;
        }
    c->wait = NULL;
    if (!w->waiters) {                 /* no one left to hear it */
        upstream_tls_probe_cancel(w->probe);
        unlink_wait(w);
        free(w);
    }
}

static void decided(struct tls_decision *c, int verdict, bool waited);

static void drop_store(struct tls_decision *c)
{
    X509_STORE_free(c->store);
    c->store = NULL;
    tls_front_terms_release(c->terms);
    c->terms = NULL;
}
static bool wait_for_probe(struct tls_decision *c);

/* The kept verdict for exactly this connection's name, address, port and upstream,
 * against its app context's own store; an approval comes with the pin its legs must hold. */
static int verdict_of(struct tls_decision *c)
{
    tls_front_pin_release(c->pin);
    c->pin = NULL;
    return tls_front_verdict(c->store, c->terms, c->name, c->where, c->upstream, &c->pin);
}

/* An app that loads its trust store after sending its ClientHello (curl does, to overlap
 * the file's reading with the round trip) has none of it in the store yet when a quick
 * probe returns: ask again a few times, 5 ms doubling to 640 ms (1.3 s in all), before
 * tunnelling. Only a store that holds nothing but the shim's CA waits. */
#define TLS_RECHECKS_MAX 8
#define TLS_SETTLE_LOOKS 3             /* 5, 10, 20 ms: see decided() */

static void on_recheck(struct loop_timer *timer)
{
    struct tls_decision *c = (struct tls_decision *)(void *)((char *)timer - offsetof(struct tls_decision, recheck));
    int verdict = verdict_of(c);
    if (verdict == -1 && wait_for_probe(c))
        return;                        /* the kept probe expired meanwhile: probe again */
    decided(c, verdict == -1 ? 0 : verdict, true);
}

static void tunnel(struct tls_decision *c, _Atomic uint64_t *why, const char *what)
{
    c->outcome = TLS_TO_TUNNEL;
    c->why = why;
    c->what = what;
}

/* The verdict is in (1 approved, 0 not, TLS_VERDICT_NOT_YET: ask again shortly): the
 * outcome, heard through decided() when the connection had to wait. */
static void decided(struct tls_decision *c, int verdict, bool waited)
{
    /* A store filled after the ClientHello is judged once its app is done filling it: a look
     * between curl's CA file and its revocation list approved a connection curl then
     * refused (the shim's leaf has no list). Not settled within a few looks (35 ms), or
     * never marked so (another app that fills late): tunnelled, the app's own check then
     * made on the real certificate. */
    if (verdict != TLS_VERDICT_NOT_YET && c->store_unfilled && c->store && !tls_marks_store_settled(c->store)) {
        if (c->settle_looks < TLS_SETTLE_LOOKS && loop_timer_arm(&c->recheck, 5LL << c->settle_looks, on_recheck) == 0) {
            c->settle_looks++;
            c->outcome = TLS_DECIDING;
            return;
        }
        shim_debug("fd %d: the app's trust store for %s was filled after its ClientHello and is not known to be "
                   "complete: tunnelled", c->fd, c->name);
        verdict = 0;
    }
    if (verdict == TLS_VERDICT_NOT_YET) {
        if (c->rechecks < TLS_RECHECKS_MAX && loop_timer_arm(&c->recheck, 5LL << c->rechecks, on_recheck) == 0) {
            c->rechecks++;
            c->outcome = TLS_DECIDING;
            return;
        }
        shim_debug("fd %d: the app's trust store for %s stayed empty", c->fd, c->name);
        verdict = 0;
    }
    if (c->store)
        X509_STORE_free(c->store);
    c->store = NULL;
    tls_front_terms_release(c->terms);
    c->terms = NULL;
    if (verdict == 1 && c->pin)
        c->outcome = TLS_TO_INTERCEPT;
    else
        tunnel(c, &shim_stats[c->upstream].tls_tunnel_unverified,
               "the upstream does not verify as the app would (libcurl's checks, then the app's own store, "
               "parameters and offer)");
    if (waited)
        c->decided(c);
}

static void on_tls_probe(void *arg)
{
    struct tls_wait *w = arg;
    unlink_wait(w);
    for (int n = 0; w->waiters && n < 100000; n++) {
        struct tls_decision *c = w->waiters;
        w->waiters = c->next_waiter;
        c->wait = NULL;
        decided(c, verdict_of(c), true);
    }
    free(w);
}

/* The verdict is not known yet: wait for the probe of this name and address, starting it
 * if none runs. False: no probe could start. */
static bool wait_for_probe(struct tls_decision *c)
{
    struct tls_wait *w = tls_waits;
    while (w && (w->upstream != c->upstream || strcasecmp(w->name, c->name) || strcmp(w->where, c->where)))
        w = w->next;
    if (!w) {
        w = calloc(1, sizeof *w);
        if (!w)
            return false;
        snprintf(w->name, sizeof w->name, "%s", c->name);
        snprintf(w->where, sizeof w->where, "%s", c->where);
        w->upstream = c->upstream;
        w->probe = upstream_tls_probe(c->upstream, c->name, &c->dest, c->dest_len, on_tls_probe, w);
        if (!w->probe) {
            free(w);
            return false;
        }
        w->next = tls_waits;
        tls_waits = w;
    }
    c->wait = w;
    c->next_waiter = w->waiters;
    w->waiters = c;
    c->outcome = TLS_DECIDING;
    return true;
}

/* Whether the connection's name is one the upstream answers to: its host name, or for a
 * literal (or a ClientHello without a name) the address the app dialled. */
static bool name_for(struct tls_decision *c, const struct tls_hello *hello, const struct upstream_rule *u)
{
    if (hello->sni[0]) {
        snprintf(c->name, sizeof c->name, "%s", hello->sni);
        return !strcasecmp(hello->sni, u->host);
    }
    const union shim_sockaddr *d = &c->dest;
    const void *addr = d->sa.sa_family == AF_INET ? (const void *)&d->in.sin_addr : (const void *)&d->in6.sin6_addr;
    return inet_ntop(d->sa.sa_family, addr, c->name, sizeof c->name) != NULL;
}

enum tls_outcome tls_decide(struct tls_decision *c, const struct shim_config *config, int upstream, int fd,
                            const union shim_sockaddr *dest, socklen_t dest_len, const char *bytes, size_t n,
                            bool eof)
{
    cfg = config;
    c->fd = fd;
    c->upstream = upstream;
    c->dest = *dest;
    c->dest_len = dest_len;
    const struct upstream_rule *u = &cfg->upstreams[upstream];
    struct upstream_stats *st = &shim_stats[upstream];
    struct tls_hello hello;
    struct tls_app_view view;
    enum tls_hello_result r = tls_hello_parse((const unsigned char *)bytes, n, &hello);
    bool answerable = r == TLS_HELLO_OK && u->tls == TLS_INTERCEPT && tls_front_can_answer(&hello.offer);
    if (r == TLS_HELLO_NOT_TLS)
        return c->outcome = TLS_IS_NOT_TLS;
    if (r == TLS_HELLO_INCOMPLETE) {
        if (eof || n >= TLS_HELLO_MAX)
            tunnel(c, &st->tls_tunnel_unreadable, "a ClientHello that never completes");
        else
            c->outcome = TLS_NEEDS_MORE;
    } else if (u->tls != TLS_INTERCEPT) {
        tunnel(c, &st->tls_tunnel_not_configured, "tls = tunnel for this upstream");
    } else if (r == TLS_HELLO_UNREADABLE) {
        tunnel(c, &st->tls_tunnel_unreadable, "a ClientHello the shim does not read");
    } else if (hello.has_mark && (tls_marks_number(hello.mark) & TLS_MARK_CLIENT_CERT)) {
        tunnel(c, &st->tls_tunnel_client_cert, "the app presents a client certificate");
    } else if (!(c->store = hello.has_mark ? tls_marks_store(hello.mark) : NULL)) {
        tunnel(c, &st->tls_tunnel_no_mark, "its TLS does not trust the shim (no mark)");
    } else if (!tls_marks_take_view(hello.mark, &view) || !(c->terms = tls_front_terms_new(&view, &hello.offer))) {
        drop_store(c);
        tunnel(c, &st->tls_tunnel_no_mark, "its connection's own checks are not known (no view)");
    } else if (!hello.offers_http11 || !answerable || !name_for(c, &hello, u)) {
        drop_store(c);
        tunnel(c, &st->tls_tunnel_unverified, !hello.offers_http11 ? "ALPN without http/1.1"
                                              : !answerable        ? "an offer the shim's leaf cannot answer"
                                                                   : "a name the upstream does not go by");
    } else {
        upstream_dialled_text(dest, c->where, sizeof c->where);
        c->store_unfilled = view.store_unfilled;
        int verdict = verdict_of(c);
        if (verdict != -1)
            decided(c, verdict, false);
        else if (!wait_for_probe(c))
            decided(c, 0, false);
    }
    return c->outcome;
}

void tls_decide_init(struct tls_decision *d, void (*decided_fn)(struct tls_decision *d))
{
    memset(d, 0, sizeof *d);
    d->decided = decided_fn;
}

void tls_decide_cancel(struct tls_decision *d)
{
    if (d->wait)
        stop_waiting(d);
    loop_timer_cancel(&d->recheck);
    if (d->store)                      /* (OpenSSL is bound only once the process has it) */
        X509_STORE_free(d->store);
    d->store = NULL;
    tls_front_terms_release(d->terms);
    d->terms = NULL;
    tls_front_pin_release(d->pin);
    d->pin = NULL;
}

void tls_decide_forget(void)
{
    tls_waits = NULL;                  /* their waiters were the parent's connections */
}
