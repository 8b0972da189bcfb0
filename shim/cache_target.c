/* cache_target.c — owns reading a request target as the cache's rules and keys read it:
 * its path and query (origin- or absolute-form), whether the path names what it says (no
 * dot segment, no encoded dot or slash), its escapes normalized (RFC 3986 6.2.2), and for
 * a write its dot segments resolved as the upstream resolves them (RFC 3986 5.2.4). No
 * allocation; either thread. */
#include "cache_target.h"
#include <string.h>

/* The path and query of a request target (origin- or absolute-form). */
static bool target_path(struct http_slice target, struct http_slice *path, struct http_slice *query)
{
    const char *p = target.p, *end = target.p + target.n;
    struct http_slice scheme, authority, rest;
    if (http_absolute_target(target, &scheme, &authority, &rest)) {
        /* an empty path (`http://h?q/x`: its path is empty, "/x" is in its query) is none a
         * rule names: the authority ends at the first '/', '?' or '#' */
        if (!rest.n || rest.p[0] != '/')
            return false;
        p = rest.p;
    } else if (p < end && *p != '/') {
        return false;                  /* asterisk-form or authority-form */
    }
    const char *q = memchr(p, '?', (size_t)(end - p));
    *path = (struct http_slice){ p, (size_t)((q ? q : end) - p) };
    *query = q ? (struct http_slice){ q + 1, (size_t)(end - q - 1) } : (struct http_slice){ end, 0 };
    return true;
}

/* Whether the path names what it says: no dot-segment (`/../`, `/./`, `/..;p/`), no encoded
 * dot, slash or backslash, no backslash. An upstream resolves those (nginx serves `/public/../api/me`
 * as `/api/me`), so such a path may reach what no cache rule names, while the rules' globs
 * and the key read it as it is written. */
static bool path_is_plain(struct http_slice path)
{
    for (size_t i = 0; i < path.n; i++) {
        char c = path.p[i];
        if (c == '\\')
            return false;
        if (c == '%' && i + 2 < path.n) {
            char a = path.p[i + 1], b = (char)(path.p[i + 2] | 0x20);
            if ((a == '2' && (b == 'e' || b == 'f')) || (a == '5' && b == 'c'))
                return false;
        }
        if (c == '.' && (i == 0 || path.p[i - 1] == '/')) {
            size_t dots = i + 1 < path.n && path.p[i + 1] == '.' ? 2 : 1;
            if (i + dots == path.n || path.p[i + dots] == '/' || path.p[i + dots] == ';')
                return false;          /* (`..;x`: a Java server's path parameter on `..`) */
        }
    }
    return true;
}


static int hex_digit(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static size_t normalize_escapes(struct http_slice path, char *out)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = 0;
    for (size_t i = 0; i < path.n; i++) {
        int hi = path.p[i] == '%' && i + 2 < path.n ? hex_digit(path.p[i + 1]) : -1;
        int lo = hi >= 0 ? hex_digit(path.p[i + 2]) : -1;
        if (lo < 0) {
            out[n++] = path.p[i];
            continue;
        }
        char c = (char)(hi * 16 + lo);
        bool unreserved = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-'
                          || c == '.' || c == '_' || c == '~';
        if (unreserved) {
            out[n++] = c;
        } else {
            out[n++] = '%';
            out[n++] = hex[hi];
            out[n++] = hex[lo];
        }
        i += 2;
    }
    return n;
}

/* RFC 3986 5.2.4 on a path that starts with '/': what an upstream serves `/a/b/../c` as. */
static size_t remove_dot_segments(char *p, size_t n)
{
    size_t out = 0;
    for (size_t i = 0; i < n;) {
        size_t j = i + 1;
        while (j < n && p[j] != '/')
            j++;
        size_t seg = j - i - 1;
        if (seg == 1 && p[i + 1] == '.') {
            if (j == n)
                p[out++] = '/';
        } else if (seg == 2 && p[i + 1] == '.' && p[i + 2] == '.') {
            while (out > 0 && p[--out] != '/')
                ;
            if (j == n)
                p[out++] = '/';
        } else {
            memmove(p + out, p + i, j - i);
            out += j - i;
        }
        i = j;
    }
    if (!out)
        p[out++] = '/';
    return out;
}

/* The view of a target, or false when it names no path a rule may cache: dot segments and
 * encoded dots or slashes are refused as written (path_is_plain), or, for a write
 * (`resolve`), resolved first as the upstream would, so that `PUT /items/x/../7` reaches
 * the entries of `/items/7`. */
bool cache_view_target(struct http_slice target, bool resolve, struct target_view *v)
{
    struct http_slice path;
    if (!target_path(target, &path, &v->query) || path.n >= sizeof v->path || (!resolve && !path_is_plain(path)))
        return false;
    v->has_query = v->query.p != path.p + path.n;
    v->path_n = normalize_escapes(path, v->path);
    if (resolve) {
        v->path_n = remove_dot_segments(v->path, v->path_n);
        if (!path_is_plain((struct http_slice){ v->path, v->path_n }))
            return false;
    }
    v->path[v->path_n] = 0;
    return true;
}
