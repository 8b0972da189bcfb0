/* conn.h — what the engine shares with the files that answer an exchange on a diverted
 * connection (upstream.c, and store.c for a background refresh): the buffer caps, and struct app_side, the part of a
 * connection the engine shows them, with the callbacks they report back through. The
 * rest of the connection's state is the engine's own (engine.c). */
#ifndef HTTPSHIM_CONN_H
#define HTTPSHIM_CONN_H
#include <stdbool.h>
#include <stdint.h>
#include "buf.h"
#include "fdtable.h"

/* Caps. A request head beyond HEAD_MAX, or head + body beyond IN_CAP, is not parsed
 * but relayed as a raw tunnel; a response head beyond RESP_HEAD_MAX fails the exchange;
 * trailer fields beyond TRAILERS_MAX are not relayed. A response's last chunk (its trailers)
 * fits in OUT_CAP's room for a head: the head has gone out before it. */
#define HEAD_MAX        (64 * 1024)
#define IN_CAP          (128 * 1024)
#define OUT_SOFT        (64 * 1024)
#define RESP_HEAD_MAX   (64 * 1024)
#define TRAILERS_MAX    (16 * 1024)
#define OUT_CAP         (OUT_SOFT + RESP_HEAD_MAX + 1024)

struct app_side;
struct tls_pin;
enum exchange_end {
    EXCHANGE_OK,                    /* the response is whole in `out` */
    EXCHANGE_FAILED,                /* cut short after (part of) a response reached the app */
    EXCHANGE_UNANSWERED,            /* failed before any byte of a response reached the app */
    EXCHANGE_ABSORBED,              /* a 304 to the cache's own validators: nothing relayed */
    EXCHANGE_REFUSED,               /* the upstream's certificate was refused: nothing sent */
};
struct app_side_ops {
    /* Writes what `out` holds to the app now; -1 once the app is gone. */
    int (*flush)(struct app_side *app);
    /* `in` or `out` changed inside a callback: adjust what the app side waits for (no
     * other work, so it is safe from inside libcurl). */
    void (*rewatch)(struct app_side *app);
    /* The exchange has ended (the transfer is already gone). */
    void (*exchange_done)(struct app_side *app, enum exchange_end how, bool must_close);
};

struct app_side {
    const struct app_side_ops *ops;
    int fd;                         /* the engine's end of the socketpair (for log lines) */
    int upstream;                   /* index into the config's upstreams */
    union shim_sockaddr dest;       /* where the app connected: the exchange is pinned to it */
    socklen_t dest_len;
    struct buf in;                  /* the request's bytes at the front, then what follows */
    struct buf out;                 /* bytes for the app, bounded by OUT_CAP */
    bool app_eof;                   /* the app shut down its write side */
    bool app_gone;                  /* the app closed: nothing more can be delivered */
    bool upstream_reset;            /* the failed exchange ended in the upstream's reset */
    int gateway_status;             /* ... before an answer, as a gateway's 502 or 504 (or 0) */
    /* the request being answered */
    int req_minor;
    bool req_keep_alive, req_is_head;
    unsigned requests;              /* the engine has taken on this connection, this one included */
    uint64_t body_left;             /* streamed body bytes in `in` not yet taken */
    /* the app's TLS was terminated for this name: the upstream leg is HTTPS to it, and
     * must present what the app's verdict approved (tls_front.h; a reference) */
    const char *tls_host;
    struct tls_pin *tls_pin;
};
#endif
