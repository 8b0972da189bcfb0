/* fuzz_tls_hello.c — libFuzzer target for tls_hello_parse() (shim/tls_hello.c), which reads
 * a connection's first bytes to decide whether they are a TLS ClientHello, and which server
 * name, private mark (extension 0xffa7, TLS_MARK_LEN bytes), ALPN and what it offers the
 * server (versions, cipher suites, groups, signature schemes) it carries.
 *
 * The input is a connection's first bytes. It is parsed whole, and as if only k bytes had
 * arrived for a few prefix lengths k (0..7, n/4, n/2, 3n/4, n-2, n-1, both sides of the end
 * of the first record, and 8 evenly spaced ones). Every parse gets its own exactly sized
 * heap copy, so ASan reports any read past the bytes the parser was given.
 * Built mode: an input starting with 0xfe (NOT_TLS as it stands, and checked as such) also
 * describes a ClientHello: the rest is items TYPE(2) LEN(1) DATA(LEN), built into extensions
 * of a hello whose record, handshake, block and extension lengths are all right, so that
 * the fuzzer varies what the extensions say without keeping five nested lengths in step.
 * TYPE fe00 is a server_name with DATA as its one host_name, fe10 an ALPN list of DATA's
 * ','-separated names; any other TYPE is an extension with DATA verbatim. The built hello
 * gets every check below, and must be OK (its layout is sound whatever the items say),
 * or UNREADABLE when it carries supported_versions, supported_groups or
 * signature_algorithms items (whose inner list lengths are the items' own).
 * Invariants (a violation aborts):
 *  - nothing past n is looked at: the whole input followed by 64 bytes of 0x00, or of 0xff,
 *    gives the same result and the same struct bytes as the exact copy;
 *  - deterministic, and the whole struct is written: two parses of the same bytes into
 *    structs pre-filled with different garbage give the same result and identical bytes;
 *  - every result is one of the four, and sni is NUL-terminated inside its array;
 *  - NOT_TLS exactly when n >= 1 and (p[0] != 0x16, or n >= 2 and p[1] != 0x03, or n >= 5
 *    and p[2] > 0x04): the record version's minor byte is only judged once the 5-byte header
 *    is whole (a 3- or 4-byte 16 03 05.. is INCOMPLETE); the empty input is INCOMPLETE;
 *  - streaming: with a TLS record header and a record length R in 1..16384, every prefix
 *    shorter than 5+R is INCOMPLETE; once a prefix gives anything but INCOMPLETE, every
 *    longer one gives the same result and the same struct bytes (so bytes past the first
 *    record never matter); R = 0 or R > 16384 is UNREADABLE as soon as the header is whole;
 *  - on OK, witnesses in the first record: a non-empty sni (length < 256, no NUL) appears
 *    in it as 00 LEN16 NAME (a host_name entry); has_mark means it holds ff a7 00 18 and then
 *    the 24 mark bytes, and no mark leaves mark all zero; offers_http11 false means it holds
 *    00 10 (an ALPN extension's type);
 *  - an independent model of the ClientHello layout gives the same result on every parse,
 *    and on OK the same sni, has_mark, mark and offers_http11. The model: record header
 *    (16 03 00..04, 2-byte length 1..16384, whole before anything is judged); handshake
 *    type 1 and a 3-byte length that fits the record (what follows it in the record is not
 *    read); version 2, random 32, session id (1-byte length), cipher suites (2-byte),
 *    compression methods (1-byte), each inside the handshake; then nothing (OK, no
 *    extensions) or a 2-byte extensions length inside the handshake whose block is tiled
 *    exactly by (type 2, length 2, data) (bytes after the block are not read). server_name
 *    (0): its list (2-byte length inside the extension) read as (type 1, length 2, name)
 *    entries while they fit; the first host_name (type 0) decides: a name of 1..255 bytes
 *    without NUL is taken, anything else gives no name from this extension. ALPN (16): offers
 *    http/1.1 when its list (2-byte length inside the extension) has an entry "http/1.1"
 *    among the (1-byte length, name) entries before the first one that does not fit (a list
 *    longer than its extension offers nothing); no ALPN extension counts as offering it. 0xffa7 with exactly 24 bytes: the mark; any
 *    other length is ignored. The offer: legacy_version alone unless supported_versions
 *    (43: a 1-byte list length) replaces it; the cipher suites, supported_groups (10) and
 *    signature_algorithms (13: 2-byte list lengths) as their 2-byte code points; a list
 *    whose length is odd, past its extension, or longer than its room (16, 160, 64, 64
 *    entries) makes the hello UNREADABLE. Repeated extensions (RFC 8446 4.2 forbids them; OpenSSL
 *    refuses the handshake): the last ALPN and the last 16-byte mark decide, and each
 *    server_name extension with a usable name replaces the name. */
#include "../../shim/tls_hello.h"
#include "fuzz.h"
#include <stdbool.h>
#include <string.h>

/* memcmp of whole structs is meaningful only without padding */
_Static_assert(sizeof(struct tls_offer) == 2 * (TLS_OFFER_VERSIONS + TLS_OFFER_CIPHERS + TLS_OFFER_GROUPS + TLS_OFFER_SIGALGS) + 4,
               "struct tls_offer has padding");
_Static_assert(sizeof(struct tls_hello) == 256 + 1 + TLS_MARK_LEN + 1 + sizeof(struct tls_offer),
               "struct tls_hello has padding");

#define RECORD_MAX    16384
#define TAIL          64
#define MAX_PREFIXES  40
#define SPACED        8
#define BUILT_MODE    0xfe
#define HELLO_FIXED   (4 + 2 + 32 + 1 + 4 + 2 + 2)   /* handshake header .. extensions length */

/* ---- the model: a separate, index-based reading of the same layout ---- */

struct model {
    enum tls_hello_result rc;
    char sni[256];
    bool has_mark;
    unsigned char mark[TLS_MARK_LEN];
    bool http11;
    struct tls_offer offer;
};

static size_t be16(const uint8_t *p) { return (size_t)p[0] << 8 | p[1]; }

/* The record header's verdict: OK here means "a whole first record of *rec_len bytes is
 * there, read it". */
static enum tls_hello_result model_header(const uint8_t *p, size_t n, size_t *rec_len)
{
    *rec_len = 0;
    if (n == 0)
        return TLS_HELLO_INCOMPLETE;
    if (p[0] != 0x16)
        return TLS_HELLO_NOT_TLS;
    if (n >= 2 && p[1] != 0x03)
        return TLS_HELLO_NOT_TLS;
    if (n < 5)
        return TLS_HELLO_INCOMPLETE;
    if (p[2] > 0x04)
        return TLS_HELLO_NOT_TLS;
    size_t r = be16(p + 3);
    if (r == 0 || r > RECORD_MAX)
        return TLS_HELLO_UNREADABLE;
    if (n - 5 < r)
        return TLS_HELLO_INCOMPLETE;
    *rec_len = r;
    return TLS_HELLO_OK;
}

static void model_server_name(const uint8_t *d, size_t len, struct model *m)
{
    if (len < 2 || be16(d) > len - 2)
        return;
    const uint8_t *list = d + 2;
    size_t list_len = be16(d), at = 0;
    while (at < list_len) {
        if (list_len - at < 3)
            return;
        unsigned type = list[at];
        size_t name_len = be16(list + at + 1);
        at += 3;
        if (list_len - at < name_len)
            return;
        if (type == 0) {
            if (name_len >= 1 && name_len <= 255 && !memchr(list + at, 0, name_len)) {
                memcpy(m->sni, list + at, name_len);
                m->sni[name_len] = '\0';
            }
            return;
        }
        at += name_len;
    }
}

static void model_alpn(const uint8_t *d, size_t len, struct model *m)
{
    m->http11 = false;
    if (len < 2 || be16(d) > len - 2)
        return;
    const uint8_t *list = d + 2;
    size_t list_len = be16(d), at = 0;
    while (at < list_len) {
        size_t proto_len = list[at++];
        if (list_len - at < proto_len)
            return;
        if (proto_len == 8 && !memcmp(list + at, "http/1.1", 8))
            m->http11 = true;
        at += proto_len;
    }
}

/* A code point list: `width` length bytes, then that many bytes inside d[0..len), even,
 * at most room entries; false otherwise. */
static bool model_list(const uint8_t *d, size_t len, size_t width, uint16_t *out, size_t room, uint8_t *count)
{
    if (len < width)
        return false;
    size_t list = width == 1 ? d[0] : be16(d);
    if (list > len - width || list % 2 || list / 2 > room)
        return false;
    for (size_t i = 0; i < list / 2; i++)
        out[i] = (uint16_t)be16(d + width + 2 * i);
    *count = (uint8_t)(list / 2);
    return true;
}

static void model_parse(const uint8_t *p, size_t n, struct model *m)
{
    size_t rec_len;
    memset(m, 0, sizeof *m);
    m->http11 = true;
    m->rc = model_header(p, n, &rec_len);
    if (m->rc != TLS_HELLO_OK)
        return;
    m->rc = TLS_HELLO_UNREADABLE;
    const uint8_t *rec = p + 5;
    if (rec_len < 4 || rec[0] != 1)
        return;
    size_t hs_len = (size_t)rec[1] << 16 | (size_t)rec[2] << 8 | rec[3];
    if (hs_len > rec_len - 4)
        return;
    const uint8_t *hs = rec + 4;
    size_t at = 2 + 32;                               /* legacy_version, random */
    if (at > hs_len)
        return;
    m->offer.versions[0] = (uint16_t)be16(hs);
    m->offer.n_versions = 1;
    static const size_t widths[3] = { 1, 2, 1 };      /* session id, suites, compression */
    for (int i = 0; i < 3; i++) {
        if (hs_len - at < widths[i])
            return;
        size_t len = widths[i] == 1 ? hs[at] : be16(hs + at);
        if (i == 1 && !model_list(hs + at, hs_len - at, 2, m->offer.ciphers, TLS_OFFER_CIPHERS, &m->offer.n_ciphers))
            return;
        at += widths[i];
        if (hs_len - at < len)
            return;
        at += len;
    }
    if (at == hs_len) {
        m->rc = TLS_HELLO_OK;
        return;
    }
    if (hs_len - at < 2)
        return;
    size_t block = be16(hs + at);
    at += 2;
    if (hs_len - at < block)
        return;
    const uint8_t *ext = hs + at;
    for (size_t e = 0; e < block;) {                  /* first the shape of the whole block */
        if (block - e < 4 || block - e - 4 < be16(ext + e + 2))
            return;
        e += 4 + be16(ext + e + 2);
    }
    bool fits = true;
    for (size_t e = 0; e < block; e += 4 + be16(ext + e + 2)) {
        size_t type = be16(ext + e), len = be16(ext + e + 2);
        const uint8_t *d = ext + e + 4;
        struct tls_offer *o = &m->offer;
        if (type == 0)
            model_server_name(d, len, m);
        else if (type == 16)
            model_alpn(d, len, m);
        else if (type == 43)
            fits &= model_list(d, len, 1, o->versions, TLS_OFFER_VERSIONS, &o->n_versions);
        else if (type == 10)
            fits &= model_list(d, len, 2, o->groups, TLS_OFFER_GROUPS, &o->n_groups);
        else if (type == 13)
            fits &= model_list(d, len, 2, o->sigalgs, TLS_OFFER_SIGALGS, &o->n_sigalgs);
        else if (type == TLS_MARK_EXT_TYPE && len == TLS_MARK_LEN) {
            m->has_mark = true;
            memcpy(m->mark, d, TLS_MARK_LEN);
        }
    }
    if (fits)
        m->rc = TLS_HELLO_OK;
}

/* ---- the checks ---- */

/* One parse of data[0..len) from a heap copy of exactly len bytes, or of len + TAIL bytes
 * whose tail is `fill` (fill < 0: no tail); *out is pre-filled with `garbage`. */
static enum tls_hello_result parse_copy(const uint8_t *data, size_t len, int fill, unsigned char garbage,
                                        struct tls_hello *out)
{
    size_t alloc = len + (fill >= 0 ? TAIL : 0);
    unsigned char *buf = malloc(alloc ? alloc : 1);
    if (!buf)
        abort();
    if (len)
        memcpy(buf, data, len);
    if (fill >= 0)
        memset(buf + len, fill, TAIL);
    memset(out, garbage, sizeof *out);
    enum tls_hello_result rc = tls_hello_parse(buf, len, out);
    free(buf);
    FUZZ_CHECK(rc == TLS_HELLO_NOT_TLS || rc == TLS_HELLO_INCOMPLETE || rc == TLS_HELLO_OK
               || rc == TLS_HELLO_UNREADABLE);
    FUZZ_CHECK(memchr(out->sni, 0, sizeof out->sni) != NULL);
    return rc;
}

static bool not_tls_rule(const uint8_t *p, size_t n)
{
    return n >= 1 && (p[0] != 0x16 || (n >= 2 && p[1] != 0x03) || (n >= 5 && p[2] > 0x04));
}

/* Whether rec[0..len) holds `head` (hl bytes) immediately followed by tail[0..tl). */
static bool holds(const uint8_t *rec, size_t len, const uint8_t *head, size_t hl, const void *tail, size_t tl)
{
    for (size_t i = 0; i + hl + tl <= len; i++)
        if (!memcmp(rec + i, head, hl) && !memcmp(rec + i + hl, tail, tl))
            return true;
    return false;
}

static void check_ok(const uint8_t *p, size_t n, const struct tls_hello *h)
{
    FUZZ_CHECK(n >= 5);
    size_t rec_len = be16(p + 3);
    FUZZ_CHECK(rec_len >= 1 && n >= 5 + rec_len);
    const uint8_t *rec = p + 5;
    size_t sni_len = strlen(h->sni);                  /* terminated: checked in parse_copy */
    FUZZ_CHECK(sni_len < sizeof h->sni);
    if (sni_len) {
        const uint8_t entry[3] = { 0, (uint8_t)(sni_len >> 8), (uint8_t)sni_len };
        FUZZ_CHECK(holds(rec, rec_len, entry, sizeof entry, h->sni, sni_len));
    }
    static const uint8_t mark_ext[4] = { TLS_MARK_EXT_TYPE >> 8, TLS_MARK_EXT_TYPE & 0xff, 0, TLS_MARK_LEN };
    static const unsigned char zero[TLS_MARK_LEN];
    if (h->has_mark)
        FUZZ_CHECK(holds(rec, rec_len, mark_ext, sizeof mark_ext, h->mark, TLS_MARK_LEN));
    else
        FUZZ_CHECK(!memcmp(h->mark, zero, TLS_MARK_LEN));
    static const uint8_t alpn_type[2] = { 0, 16 };
    if (!h->offers_http11)
        FUZZ_CHECK(holds(rec, rec_len, alpn_type, sizeof alpn_type, "", 0));
}

static void check_model(const uint8_t *p, size_t n, enum tls_hello_result rc, const struct tls_hello *h)
{
    static struct model m;
    model_parse(p, n, &m);
    FUZZ_CHECK(rc == m.rc);
    if (rc != TLS_HELLO_OK)
        return;
    FUZZ_CHECK(!strcmp(h->sni, m.sni));
    FUZZ_CHECK(h->has_mark == m.has_mark);
    FUZZ_CHECK(!memcmp(h->mark, m.mark, TLS_MARK_LEN));
    FUZZ_CHECK(h->offers_http11 == m.http11);
    const struct tls_offer *o = &h->offer, *mo = &m.offer;
    FUZZ_CHECK(o->n_versions == mo->n_versions && o->n_ciphers == mo->n_ciphers && o->n_groups == mo->n_groups
               && o->n_sigalgs == mo->n_sigalgs);
    FUZZ_CHECK(!memcmp(o->versions, mo->versions, o->n_versions * 2) && !memcmp(o->ciphers, mo->ciphers, o->n_ciphers * 2)
               && !memcmp(o->groups, mo->groups, o->n_groups * 2) && !memcmp(o->sigalgs, mo->sigalgs, o->n_sigalgs * 2));
}

/* The checks every parse of p[0..n) gets, whatever n is. */
static void check_one(const uint8_t *p, size_t n, enum tls_hello_result rc, const struct tls_hello *h)
{
    FUZZ_CHECK((rc == TLS_HELLO_NOT_TLS) == not_tls_rule(p, n));
    if (n == 0)
        FUZZ_CHECK(rc == TLS_HELLO_INCOMPLETE);
    if (rc == TLS_HELLO_OK)
        check_ok(p, n, h);
    check_model(p, n, rc, h);
}

static int cmp_size(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? -1 : x > y;
}

static struct tls_hello whole, again, padded, part, decided;   /* compared bytewise */

/* Every check on one input; returns its whole parse's result. */
static enum tls_hello_result check_input(const uint8_t *data, size_t size)
{
    enum tls_hello_result rc = parse_copy(data, size, -1, 0xa5, &whole);
    FUZZ_CHECK(parse_copy(data, size, -1, 0x5a, &again) == rc);
    FUZZ_CHECK(!memcmp(&whole, &again, sizeof whole));
    FUZZ_CHECK(parse_copy(data, size, 0x00, 0x33, &padded) == rc);
    FUZZ_CHECK(!memcmp(&whole, &padded, sizeof whole));
    FUZZ_CHECK(parse_copy(data, size, 0xff, 0xcc, &padded) == rc);
    FUZZ_CHECK(!memcmp(&whole, &padded, sizeof whole));
    check_one(data, size, rc, &whole);

    /* the prefix lengths, in increasing order, the whole input last */
    size_t ks[MAX_PREFIXES], nk = 0;
    for (size_t k = 0; k < 8 && k < size; k++)
        ks[nk++] = k;
    ks[nk++] = size / 4;
    ks[nk++] = size / 2;
    ks[nk++] = size / 4 * 3;
    if (size >= 2)
        ks[nk++] = size - 2;
    if (size >= 1)
        ks[nk++] = size - 1;
    size_t record_end = 0;                            /* 0: no TLS header with a usable length */
    if (size >= 5 && data[0] == 0x16 && data[1] == 0x03 && data[2] <= 0x04 && be16(data + 3) >= 1
        && be16(data + 3) <= RECORD_MAX) {
        record_end = 5 + be16(data + 3);
        for (size_t k = record_end - 1; k <= record_end + 1; k++)
            if (k < size)
                ks[nk++] = k;
    }
    for (size_t i = 1; i <= SPACED; i++)
        ks[nk++] = (size_t)((unsigned long long)size * i / (SPACED + 1));
    ks[nk++] = size;
    qsort(ks, nk, sizeof ks[0], cmp_size);

    bool is_decided = false;
    enum tls_hello_result decided_rc = TLS_HELLO_INCOMPLETE;
    for (size_t i = 0; i < nk; i++) {
        size_t k = ks[i];
        if (i > 0 && k == ks[i - 1])
            continue;
        const struct tls_hello *h = &whole;
        enum tls_hello_result prc = rc;
        if (k < size) {
            prc = parse_copy(data, k, -1, (unsigned char)k, &part);
            check_one(data, k, prc, &part);
            h = &part;
        }
        if (record_end && k >= 5)
            FUZZ_CHECK((prc == TLS_HELLO_INCOMPLETE) == (k < record_end));
        if (is_decided) {                             /* more bytes never change a verdict */
            FUZZ_CHECK(prc == decided_rc);
            FUZZ_CHECK(!memcmp(h, &decided, sizeof decided));
        } else if (prc != TLS_HELLO_INCOMPLETE) {
            is_decided = true;
            decided_rc = prc;
            decided = *h;
        }
    }
    return rc;
}

static size_t put16(uint8_t *at, size_t v)
{
    at[0] = (uint8_t)(v >> 8);
    at[1] = (uint8_t)v;
    return 2;
}

/* The built mode's hello from in[0..n) (after the 0xfe) into out (at least TLS_HELLO_MAX
 * bytes); items that would not fit in one record are left out. Returns its length. */
static size_t build_hello(const uint8_t *in, size_t n, uint8_t *out, bool *offer_lists)
{
    *offer_lists = false;
    uint8_t *ext = out + 5 + HELLO_FIXED;
    const size_t room = RECORD_MAX - HELLO_FIXED;
    size_t len = 0;
    for (size_t at = 0; n - at >= 3 && n - at - 3 >= in[at + 2];) {
        size_t type = be16(in + at), dl = in[at + 2];
        const uint8_t *d = in + at + 3;
        at += 3 + dl;
        uint8_t buf[4 + 2 + 2 * 255 + 1];
        size_t bl = 4;                                /* type and length first */
        if (type == 0xfe00) {
            type = 0;
            bl += put16(buf + bl, dl + 3);
            buf[bl++] = 0;
            bl += put16(buf + bl, dl);
            memcpy(buf + bl, d, dl);
            bl += dl;
        } else if (type == 0xfe10) {
            type = 16;
            size_t list = bl;
            bl += 2;
            for (size_t i = 0, start = 0; i <= dl; i++)
                if (i == dl || d[i] == ',') {
                    buf[bl++] = (uint8_t)(i - start);
                    memcpy(buf + bl, d + start, i - start);
                    bl += i - start;
                    start = i + 1;
                }
            put16(buf + list, bl - list - 2);
        } else {
            memcpy(buf + bl, d, dl);
            bl += dl;
        }
        if (type == 10 || type == 13 || type == 43)
            *offer_lists = true;       /* (their lists' own lengths are the input's to get right) */
        put16(buf, type);
        put16(buf + 2, bl - 4);
        if (bl > room - len)
            break;
        memcpy(ext + len, buf, bl);
        len += bl;
    }
    size_t hs = HELLO_FIXED - 4 + len;
    uint8_t *p = out;
    *p++ = 0x16, *p++ = 0x03, *p++ = 0x01;
    p += put16(p, 4 + hs);
    *p++ = 1, *p++ = (uint8_t)(hs >> 16), *p++ = (uint8_t)(hs >> 8), *p++ = (uint8_t)hs;
    *p++ = 0x03, *p++ = 0x03;
    memset(p, 0x42, 32);                              /* random */
    p += 32;
    *p++ = 0;                                         /* no session id */
    p += put16(p, 2);
    *p++ = 0x13, *p++ = 0x01;                         /* TLS_AES_128_GCM_SHA256 */
    *p++ = 1, *p++ = 0;                               /* null compression */
    p += put16(p, len);
    FUZZ_CHECK(p == ext);
    return 5 + HELLO_FIXED + len;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_input(data, size);
    if (size >= 1 && data[0] == BUILT_MODE) {
        static uint8_t built[TLS_HELLO_MAX];
        bool offer_lists;
        size_t n = build_hello(data + 1, size - 1, built, &offer_lists);
        FUZZ_CHECK(n <= sizeof built);
        enum tls_hello_result rc = check_input(built, n);
        FUZZ_CHECK(rc == TLS_HELLO_OK || (offer_lists && rc == TLS_HELLO_UNREADABLE));
    }
    return 0;
}
