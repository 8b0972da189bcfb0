/* http.h — strict, allocation-free HTTP/1.x request parser, and what a response head's
 * status line and framing headers say (owned by http.c).
 * It never copies: every field points into the caller's buffer. Anything it does not
 * fully understand is HTTP_PARSE_ERROR, and the caller tunnels the bytes untouched. */
#ifndef HTTPSHIM_HTTP_H
#define HTTPSHIM_HTTP_H
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#define HTTP_MAX_HEADERS 100          /* more than this: not parsed, tunnelled */

struct http_slice { const char *p; size_t n; };

struct http_header { struct http_slice name, value; };

struct http_request {
    struct http_slice method, target;
    int minor_version;                 /* HTTP/1.<minor>, 0 or 1 */
    size_t head_len;                   /* bytes up to and including the blank line */
    int64_t content_length;            /* -1 when absent */
    bool chunked;                      /* Transfer-Encoding: chunked */
    bool keep_alive;                   /* connection persists after this exchange */
    bool expect_continue;
    bool upgrade;                      /* Upgrade header or Connection: upgrade */
    bool has_host;
    size_t nheaders;
    struct http_header headers[HTTP_MAX_HEADERS];
};

enum http_parse_result {
    HTTP_PARSE_DONE = 0,               /* a whole head is in the buffer */
    HTTP_PARSE_INCOMPLETE = 1,         /* valid so far, need more bytes */
    HTTP_PARSE_ERROR = 2,              /* not a request this parser accepts */
};

enum http_parse_result http_parse_request(const char *buf, size_t len, struct http_request *req);
/* For a request the parser refuses (a bare LF, a space before a colon, 101 fields, a head
 * too large): its method, its target and its first Host line, read as leniently as a
 * server might, so that a write the shim relays unread still invalidates what it names.
 * False when not even a request line is there. Never used to relay anything. */
bool http_read_target_leniently(const char *buf, size_t len, struct http_request *req);

/* Whether the first bytes of a connection can start an HTTP/1.x request line. A TLS
 * ClientHello or any binary protocol fails this on its first byte. */
bool http_looks_like_request(const char *buf, size_t len);

bool http_slice_ieq(struct http_slice s, const char *lit);
/* Hop-by-hop headers (RFC 9110 7.6.1) plus the framing headers the relay recomputes. */
bool http_is_hop_by_hop(struct http_slice name);
/* An absolute-form target (`scheme://authority/path?query`) cut into its scheme, its
 * authority (up to the first '/', '?' or '#') and the rest (empty, or starting with one of
 * them); false for any other form. */
bool http_absolute_target(struct http_slice target, struct http_slice *scheme, struct http_slice *authority,
                          struct http_slice *rest);
/* Whether `token` appears in a comma-separated header value (case-insensitive). */
bool http_list_has_token(struct http_slice value, const char *token);
/* A Connection value naming a field beyond the hop-by-hop ones (and "close"). */
bool http_connection_names_fields(struct http_slice value);
bool http_method_is(const struct http_request *req, const char *m);
/* The Connection header a response to this request carries ("" when none is needed),
 * and whether the connection must close after it. */
const char *http_connection_line(int minor, bool keep_alive);

/* ---- responses (the upstream's head arrives from libcurl one line at a time) ---- */

/* "HTTP/1.x SSS reason": status (100..999: past 599 no class, but clients take it) and the
 * reason phrase. False otherwise. */
bool http_parse_status_line(const char *line, size_t len, int *status, struct http_slice *reason);
/* "Name: value" (name without the white space a proxy removes before the colon, value
 * without surrounding white space). False when it is not a header line. */
bool http_split_header_line(const char *line, size_t len, struct http_slice *name, struct http_slice *value);

/* The framing headers of one response head (RFC 9112 6), gathered line by line. */
struct http_framing {
    int64_t content_length;            /* -1 when absent */
    bool chunked;                      /* Transfer-Encoding: chunked, alone */
    bool has_te, conflict;             /* conflict: unequal or invalid lengths, TE other than chunked */
};
enum http_framing_verdict {
    HTTP_FRAMING_OK,                   /* unambiguous */
    HTTP_FRAMING_UNSTORABLE,           /* Content-Length and chunked: relayed as chunked, never stored */
    HTTP_FRAMING_BROKEN,               /* no safe way to find the body's end: fail the exchange */
};
void http_framing_init(struct http_framing *f);
/* True when name is Content-Length or Transfer-Encoding (then it is taken into f). */
bool http_framing_header(struct http_framing *f, struct http_slice name, struct http_slice value);
enum http_framing_verdict http_framing_verdict(const struct http_framing *f);
#endif
