/* tls_hello.h — reading a TLS ClientHello from the first bytes of a connection
 * (tls_hello.c): whether it is one, its server name, what it offers, and the shim's private
 * mark. */
#ifndef HTTPSHIM_TLS_HELLO_H
#define HTTPSHIM_TLS_HELLO_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The private ClientHello extension a context that trusts the shim's CA carries: its
 * type (from the range RFC 8446 4.2 leaves for private use; 0xff01 is renegotiation_info)
 * and its bytes (a per-process tag, then the context's number). */
#define TLS_MARK_EXT_TYPE 0xffa7
#define TLS_MARK_LEN      24            /* tag, context number, hello number: 8 bytes each */
#define TLS_HELLO_MAX     (16384 + 5)   /* one whole record; a hello spanning more is not read */

/* What a ClientHello offers the server, as the TLS code points it lists: the versions
 * (supported_versions, else legacy_version alone), cipher suites, groups and signature
 * schemes. A list longer than its room makes the hello UNREADABLE. */
#define TLS_OFFER_VERSIONS 16
#define TLS_OFFER_CIPHERS  160
#define TLS_OFFER_GROUPS   64
#define TLS_OFFER_SIGALGS  64
struct tls_offer {
    uint16_t versions[TLS_OFFER_VERSIONS], ciphers[TLS_OFFER_CIPHERS];
    uint16_t groups[TLS_OFFER_GROUPS], sigalgs[TLS_OFFER_SIGALGS];
    uint8_t n_versions, n_ciphers, n_groups, n_sigalgs;   /* 0 groups/sigalgs: not sent */
};

struct tls_hello {
    char sni[256];                     /* the host_name, NUL-terminated; "" when absent */
    bool has_mark;
    unsigned char mark[TLS_MARK_LEN];
    bool offers_http11;                /* ALPN absent, or listing http/1.1 */
    struct tls_offer offer;
};

enum tls_hello_result {
    TLS_HELLO_NOT_TLS,                 /* not a TLS handshake record */
    TLS_HELLO_INCOMPLETE,              /* a handshake record: wait for more bytes */
    TLS_HELLO_OK,
    TLS_HELLO_UNREADABLE,              /* TLS, but not a ClientHello we read: tunnel it */
};

/* Looks at the first n bytes of a connection. */
enum tls_hello_result tls_hello_parse(const unsigned char *p, size_t n, struct tls_hello *out);
#endif
