/* cache_target.h — a request target as cache rules and keys read it (cache_target.c). */
#ifndef HTTPSHIM_CACHE_TARGET_H
#define HTTPSHIM_CACHE_TARGET_H
#include <stdbool.h>
#include <stddef.h>
#include "http.h"

/* A target as rules and keys read it: its path with the escapes of unreserved characters
 * decoded and the other escapes' hex digits in upper case (RFC 3986 6.2.2: `/items/%37`
 * and `/items/7`, `%c3%a9` and `%C3%A9` name one resource), and its query as written. */
struct target_view {
    char path[4096];
    size_t path_n;
    bool has_query;                    /* a '?', if only a bare one: a target of its own */
    struct http_slice query;
};

/* The view of a target, or false when it names no path a rule may cache: dot segments and
 * encoded dots or slashes are refused as written, or, for a write (`resolve`), resolved
 * first as the upstream would, so that `PUT /items/x/../7` reaches the entries of
 * `/items/7`. */
bool cache_view_target(struct http_slice target, bool resolve, struct target_view *v);
#endif
