/* tls_hello.c — owns reading a TLS ClientHello (RFC 8446 4.1.2, the same layout as TLS
 * 1.2's): the record and handshake headers, the cipher suites, then the server_name,
 * ALPN, supported_versions, supported_groups, signature_algorithms and the shim's private
 * mark among the extensions. Bounds-checked at every length; anything it cannot
 * read whole from the first record is UNREADABLE, and the connection is tunnelled. */
#include "tls_hello.h"
#include <string.h>

struct reader { const unsigned char *p; size_t n; bool bad; };

static unsigned take(struct reader *r, size_t bytes)
{
    unsigned v = 0;
    if (r->bad || r->n < bytes) {
        r->bad = true;
        return 0;
    }
    for (size_t i = 0; i < bytes; i++)
        v = (v << 8) | r->p[i];
    r->p += bytes;
    r->n -= bytes;
    return v;
}

/* A sub-reader over the next len bytes (which r then skips). */
static struct reader sub(struct reader *r, size_t len)
{
    struct reader s = { r->p, len, r->bad || r->n < len };
    if (s.bad) {
        r->bad = true;
        s.n = 0;
        return s;
    }
    r->p += len;
    r->n -= len;
    return s;
}

static void server_name(struct reader ext, struct tls_hello *out)
{
    struct reader list = sub(&ext, take(&ext, 2));
    while (list.n && !list.bad) {
        unsigned type = take(&list, 1);
        struct reader name = sub(&list, take(&list, 2));
        if (type != 0 || name.bad)
            continue;
        if (name.n == 0 || name.n >= sizeof out->sni || memchr(name.p, 0, name.n))
            return;                    /* no name we could match: as if there were none */
        memcpy(out->sni, name.p, name.n);
        out->sni[name.n] = 0;
        return;
    }
}

static void alpn(struct reader ext, struct tls_hello *out)
{
    struct reader list = sub(&ext, take(&ext, 2));
    out->offers_http11 = false;
    while (list.n && !list.bad) {
        struct reader proto = sub(&list, take(&list, 1));
        if (!proto.bad && proto.n == 8 && !memcmp(proto.p, "http/1.1", 8))
            out->offers_http11 = true;
    }
}

/* A list of 16-bit code points (len bytes of them) into out[room]; false when it does not
 * fit or is malformed. */
static bool code_points(struct reader list, uint16_t *out, size_t room, uint8_t *n)
{
    if (list.bad || list.n % 2 || list.n / 2 > room)
        return false;
    for (*n = 0; list.n;)
        out[(*n)++] = (uint16_t)take(&list, 2);
    return true;
}

enum tls_hello_result tls_hello_parse(const unsigned char *p, size_t n, struct tls_hello *out)
{
    memset(out, 0, sizeof *out);
    out->offers_http11 = true;
    if (n == 0)
        return TLS_HELLO_INCOMPLETE;
    if (p[0] != 0x16)
        return TLS_HELLO_NOT_TLS;      /* 22: handshake */
    if (n < 5)
        return n >= 2 && p[1] != 0x03 ? TLS_HELLO_NOT_TLS : TLS_HELLO_INCOMPLETE;
    if (p[1] != 0x03 || p[2] > 0x04)
        return TLS_HELLO_NOT_TLS;
    size_t record = ((size_t)p[3] << 8) | p[4];
    if (record == 0 || record > 16384)
        return TLS_HELLO_UNREADABLE;
    if (n < 5 + record)
        return TLS_HELLO_INCOMPLETE;
    struct reader r = { p + 5, record, false };
    if (take(&r, 1) != 1)              /* client_hello */
        return TLS_HELLO_UNREADABLE;
    size_t body = take(&r, 3);
    if (r.bad || body > r.n)
        return TLS_HELLO_UNREADABLE;   /* continues in another record */
    struct reader h = sub(&r, body);
    struct tls_offer *o = &out->offer;
    o->versions[0] = (uint16_t)take(&h, 2);   /* legacy_version */
    o->n_versions = 1;
    sub(&h, 32);                       /* random */
    sub(&h, take(&h, 1));              /* legacy_session_id */
    if (!code_points(sub(&h, take(&h, 2)), o->ciphers, TLS_OFFER_CIPHERS, &o->n_ciphers))
        return TLS_HELLO_UNREADABLE;
    sub(&h, take(&h, 1));              /* legacy_compression_methods */
    if (h.bad)
        return TLS_HELLO_UNREADABLE;
    if (h.n == 0)
        return TLS_HELLO_OK;           /* no extensions at all */
    bool fits = true;
    struct reader exts = sub(&h, take(&h, 2));
    while (exts.n && !exts.bad) {
        unsigned type = take(&exts, 2);
        struct reader ext = sub(&exts, take(&exts, 2));
        if (ext.bad)
            break;
        if (type == 0)
            server_name(ext, out);
        else if (type == 16)
            alpn(ext, out);
        else if (type == 43)           /* supported_versions: a one-byte length */
            fits &= code_points(sub(&ext, take(&ext, 1)), o->versions, TLS_OFFER_VERSIONS, &o->n_versions);
        else if (type == 10)           /* supported_groups */
            fits &= code_points(sub(&ext, take(&ext, 2)), o->groups, TLS_OFFER_GROUPS, &o->n_groups);
        else if (type == 13)           /* signature_algorithms */
            fits &= code_points(sub(&ext, take(&ext, 2)), o->sigalgs, TLS_OFFER_SIGALGS, &o->n_sigalgs);
        else if (type == TLS_MARK_EXT_TYPE && ext.n == TLS_MARK_LEN) {
            out->has_mark = true;
            memcpy(out->mark, ext.p, TLS_MARK_LEN);
        }
    }
    return exts.bad || h.bad || !fits ? TLS_HELLO_UNREADABLE : TLS_HELLO_OK;
}
