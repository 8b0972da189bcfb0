/* fuzz_cache_policy.c — libFuzzer target for the cache's keys and storage policy
 * (shim/cache.c): cache_rule_for, cache_key, cache_vary_values, cache_variant_key,
 * cache_entry_new / cache_entry_matches_request, cache_policy_init / _header / _decide,
 * the stale windows (cache_stale_windows, cache_entry_stale_windows) and revalidation
 * (cache_entry_validators, _not_modified, _304_headers, _renewed).
 *
 * Input: an HTTP request head (parsed with http_parse_request; anything but DONE is
 * skipped), then lines ("\n", an optional "\r" before it is dropped) describing the
 * upstream, its rules and the response:
 *   @host NAME | @port N              the upstream (default api.example.com:80)
 *   @rule METHOD GLOB                 starts a cache rule (at most 8; default: GET, any path)
 *   @ttl MS | @ignore A,B | @key A,B | @status A,B | @rcc     options of the last rule
 *   @swr MS | @sie MS                 its stale_while_revalidate / stale_if_error (ms, >= 0)
 *   @resp STATUS                      a response status to decide for (at most 8)
 *   Name: value                       a response header (any other line)
 * Values that rules_load() could never produce (an unknown method, an entry with a comma
 * or blank, a ttl <= 0, a negative stale window, ...) are ignored, so every state reached
 * is a real one. The response's header lines, each with CRLF, are also the header block
 * of entries stored for the request (status 200 and one other), and the request's
 * If-None-Match / If-Modified-Since lines are the conditional request they answer.
 * Invariants (a violation aborts):
 *  - cache_rule_for returns the first rule whose method (HEAD also matches GET) and glob
 *    match the target's path, or NULL when none does, the target has no path, or the path
 *    is not plain (a "." or ".." segment, also before a ";" parameter, %2e / %2f / %5c in
 *    any case, a backslash);
 *  - cache_key is deterministic, never writes past cap (exactly sized heap buffers),
 *    returns the whole length when it fits and 0 when it does not (CACHE_KEY_MAX and small
 *    caps alike), and equals model_key() below byte for byte: the rule's host and port,
 *    the path and the query minus ignored and empty parameters, the request's normalised
 *    authority, the key headers, Authorization and (keyed) Cookie only as SHA-256 of their
 *    lines; a Cookie the rule does not key on, or a Connection line naming anything but
 *    the connection's own options, means no key; HEAD and GET give the same key;
 *  - cache_invalidation_target: nothing for GET, HEAD, OPTIONS, TRACE or a method a rule
 *    caches; otherwise, when it names a target, the key the request would have as a GET
 *    (method GET, the GET rule for its path) is its *own key, and starts with the target,
 *    which is exactly cache_key_target_len of it; over TLS (https) the same, the key's
 *    next line saying "scheme: https";
 *  - cache_vary_values / cache_variant_key: deterministic, bounded by cap, (size_t)-1 / 0
 *    exactly when the result does not fit, the variant key is KEY "\nvary: " VALUES;
 *  - an entry built from them matches the request it was built for;
 *  - cache_policy_decide: a known reason; NS_STATUS exactly when the status is not listed,
 *    then no-store, private, Set-Cookie and Vary: * in that order; a stored TTL is in
 *    (0, rule ttl], the rule's own ttl unless respect_cache_control=yes; no TTL is written
 *    when the response is not stored;
 *  - cache_policy_header: must_revalidate, swr_s, sie_s only when a Cache-Control line
 *    names must-/proxy-revalidate, stale-while-revalidate, stale-if-error; swr_s, sie_s >= -1;
 *  - cache_stale_windows: both windows >= 0; the rule's own without respect_cache_control,
 *    else 0/0 under must-revalidate, proxy-revalidate or no-cache, else the response's
 *    stale-while-revalidate / stale-if-error * 1000 where present and the rule's where not;
 *    cache_entry_stale_windows on an entry with these header lines says the same;
 *  - cache_entry_validators: the last ETag / Last-Modified line's value (model_line()
 *    below: a token name, the value without surrounding SP/HT), pointing inside the
 *    entry's headers, or empty;
 *  - cache_entry_not_modified: never for a status other than 200 or an entry without
 *    validators; with If-None-Match lines exactly when the entry has an ETag one of them
 *    lists under weak comparison (model_etag_listed()); without, only when the entry's
 *    Last-Modified and an If-Modified-Since parse, and always when the first
 *    If-Modified-Since is the entry's Last-Modified byte for byte and parses;
 *  - cache_entry_304_headers: at most cap bytes written (exactly sized heap buffers, small
 *    caps too), CRLF-terminated "Name: value" lines named cache-control, content-location,
 *    date, etag, expires, vary or last-modified, with room for all of them equal to
 *    model_304(), and with less room a subsequence of those lines;
 *  - cache_entry_renewed: the same key, status, reason, headers, Vary, values and body
 *    bytes (read after the original is released), keep_until_ms == expires_at_ms + keep,
 *    expires_at_ms - stored_at_ms == the new ttl. */
#include "../../shim/cache.h"
#include "../../shim/sha256.h"
#include "fuzz.h"
#include "cache_policy_model.h"
#include <curl/curl.h>
#include <ctype.h>
#include <fnmatch.h>
#include <stdbool.h>
#include <string.h>
#include <strings.h>

#define MAX_STATUSES 8
#define MAX_LINES    512
#define VARY_CAP     1024               /* upstream.c's cap on the joined Vary names */

struct http_request req;
static struct http_request req_alt;
struct upstream_rule up;
struct cache_rule rules[MAX_RULES];

static bool starts(struct line l, const char *w, struct line *rest)
{
    size_t n = strlen(w);
    if (l.n < n || memcmp(l.p, w, n))
        return false;
    *rest = (struct line){ l.p + n, l.n - n };
    return true;
}

/* A NUL-terminated copy of a directive's argument, or false when it does not fit. */
static bool arg_copy(struct line a, char *out, size_t cap)
{
    if (a.n >= cap || memchr(a.p, 0, a.n))
        return false;
    memcpy(out, a.p, a.n);
    out[a.n] = 0;
    return true;
}

static bool parse_long(const char *s, long long lo, long long hi, long long *out)
{
    if (!*s)
        return false;
    long long v = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || v > 1000000000000000000LL / 10)
            return false;
        v = v * 10 + (*s - '0');
    }
    if (v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

/* ignore_query= / key_headers= entries as rules.c's parse_list leaves them. */
static void add_list(char *val, char dst[][64], size_t *n)
{
    for (char *save = NULL, *tok = strtok_r(val, ",", &save); tok && *n < RULES_MAX_LIST;
         tok = strtok_r(NULL, ",", &save))
        if (*tok && strlen(tok) < 64 && !strpbrk(tok, " \t"))
            snprintf(dst[(*n)++], 64, "%s", tok);
}

static bool valid_host(const char *h)
{
    if (!*h)
        return false;
    for (const char *c = h; *c; c++)
        if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z')
              || strchr(".-_:", *c)))
            return false;
    return true;
}

static void set_rule(struct cache_rule *r, const char *method, const char *glob)
{
    memset(r, 0, sizeof *r);
    size_t m = strlen(method), g = strlen(glob);
    if (m >= sizeof r->method || g >= sizeof r->glob)
        abort();                       /* the callers check */
    memcpy(r->method, method, m + 1);
    memcpy(r->glob, glob, g + 1);
    r->ttl_ms = 600000;
    r->line = 1;
}

static void directive(struct line l, int *statuses, size_t *n_statuses)
{
    static const char *const methods[] = { "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "*" };
    char a[600];
    struct line rest;
    struct cache_rule *r = up.n_cache_rules ? &rules[up.n_cache_rules - 1] : NULL;
    long long v;
    if (starts(l, "@host ", &rest)) {
        if (arg_copy(rest, a, sizeof up.host) && valid_host(a))
            memcpy(up.host, a, strlen(a) + 1);
    } else if (starts(l, "@port ", &rest)) {
        if (arg_copy(rest, a, sizeof a) && parse_long(a, 1, 65535, &v))
            up.port = (uint16_t)v;
    } else if (starts(l, "@rule ", &rest)) {
        if (up.n_cache_rules == MAX_RULES || !arg_copy(rest, a, sizeof a))
            return;
        char *sp = strchr(a, ' ');
        if (!sp)
            return;
        *sp = 0;
        const char *glob = sp + 1;
        bool known = false;
        for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++)
            known |= !strcmp(a, methods[i]);
        if (!known || (glob[0] != '/' && strcmp(glob, "*")) || strlen(glob) >= sizeof r->glob
            || strpbrk(glob, " \t"))
            return;
        set_rule(&rules[up.n_cache_rules++], a, glob);
    } else if (r && starts(l, "@ttl ", &rest)) {
        if (arg_copy(rest, a, sizeof a) && parse_long(a, 1, 9000000000000000LL, &v))
            r->ttl_ms = v;
    } else if (r && starts(l, "@ignore ", &rest)) {
        if (arg_copy(rest, a, sizeof a))
            add_list(a, r->ignore_query, &r->n_ignore_query);
    } else if (r && starts(l, "@key ", &rest)) {
        if (arg_copy(rest, a, sizeof a))
            add_list(a, r->key_headers, &r->n_key_headers);
    } else if (r && starts(l, "@status ", &rest)) {
        if (!arg_copy(rest, a, sizeof a))
            return;
        for (char *save = NULL, *tok = strtok_r(a, ",", &save); tok && r->n_status < RULES_MAX_LIST;
             tok = strtok_r(NULL, ",", &save))
            if (parse_long(tok, 100, 599, &v))
                r->status[r->n_status++] = (int)v;
    } else if (r && starts(l, "@swr ", &rest)) {
        if (arg_copy(rest, a, sizeof a) && parse_long(a, 0, 9000000000000000LL, &v))
            r->stale_while_revalidate_ms = v;
    } else if (r && starts(l, "@sie ", &rest)) {
        if (arg_copy(rest, a, sizeof a) && parse_long(a, 0, 9000000000000000LL, &v))
            r->stale_if_error_ms = v;
    } else if (r && l.n == 4 && !memcmp(l.p, "@rcc", 4)) {
        r->respect_cache_control = true;
    } else if (starts(l, "@resp ", &rest)) {
        if (*n_statuses < MAX_STATUSES && arg_copy(rest, a, sizeof a) && parse_long(a, 0, 999, &v))
            statuses[(*n_statuses)++] = (int)v;
    }
}

/* ---- an independent reading of the target, for the checks ---- */

static bool split_target(struct http_slice t, struct http_slice *path, struct http_slice *query)
{
    const char *p = t.p, *end = t.p + t.n;
    if (t.n && *p != '/') {
        const char *s = memmem(t.p, t.n, "://", 3);
        if (!s)
            return false;
        p = s + 3;                     /* the authority ends at '/', '?' or '#' */
        while (p < end && *p != '/' && *p != '?' && *p != '#')
            p++;
        if (p == end || *p != '/')
            return false;              /* no path */
    }
    const char *q = memchr(p, '?', (size_t)(end - p));
    *path = (struct http_slice){ p, (size_t)((q ? q : end) - p) };
    *query = q ? (struct http_slice){ q + 1, (size_t)(end - q - 1) } : (struct http_slice){ end, 0 };
    return true;
}

/* The path as keys and rules read it (RFC 3986 6.2.2): %XX of a letter, digit, '-', '.',
 * '_' or '~' as that character, every other %XX with upper-case hex digits. */
static size_t model_normal_path(struct http_slice path, char *out)
{
    size_t n = 0;
    for (size_t i = 0; i < path.n; i++) {
        if (path.p[i] == '%' && i + 2 < path.n && isxdigit((unsigned char)path.p[i + 1])
            && isxdigit((unsigned char)path.p[i + 2])) {
            char hex[3] = { path.p[i + 1], path.p[i + 2], 0 };
            int c = (int)strtol(hex, NULL, 16);
            if (isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
                out[n++] = (char)c;
            } else {
                out[n++] = '%';
                out[n++] = (char)toupper((unsigned char)hex[0]);
                out[n++] = (char)toupper((unsigned char)hex[1]);
            }
            i += 2;
        } else {
            out[n++] = path.p[i];
        }
    }
    return n;
}

/* The model's reading of a path that names what it says (segment by segment). */
static bool model_plain(struct http_slice path)
{
    if (memchr(path.p, '\\', path.n))
        return false;
    for (size_t i = 0; i + 2 < path.n; i++)
        if (path.p[i] == '%') {
            char hi = path.p[i + 1], lo = (char)tolower((unsigned char)path.p[i + 2]);
            if ((hi == '2' && (lo == 'e' || lo == 'f')) || (hi == '5' && lo == 'c'))
                return false;
        }
    for (size_t start = 0; start <= path.n;) {
        const char *slash = memchr(path.p + start, '/', path.n - start);
        size_t end = slash ? (size_t)(slash - path.p) : path.n;
        size_t len = end - start;
        const char *semi = memchr(path.p + start, ';', len);   /* a path parameter: `..;p` is `..` */
        if (semi)
            len = (size_t)(semi - (path.p + start));
        if ((len == 1 && path.p[start] == '.') || (len == 2 && path.p[start] == '.' && path.p[start + 1] == '.'))
            return false;
        start = end + 1;
    }
    return true;
}

static void check_rule_for(void)
{
    const struct cache_rule *got = cache_rule_for(&up, &req);
    struct http_slice path, query;
    const struct cache_rule *want = NULL;
    if (split_target(req.target, &path, &query) && path.n < 4096 && model_plain(path)) {
        char p[4096];
        p[model_normal_path(path, p)] = 0;
        bool head = http_method_is(&req, "HEAD");
        for (size_t i = 0; i < up.n_cache_rules && !want; i++) {
            const struct cache_rule *r = &rules[i];
            bool m = !strcmp(r->method, "*") || (req.method.n == strlen(r->method)
                     && !memcmp(req.method.p, r->method, req.method.n)) || (head && !strcmp(r->method, "GET"));
            if (m && fnmatch(r->glob, p, 0) == 0)
                want = r;
        }
    }
    FUZZ_CHECK(got == want);
}

static void check_invalidation(void)
{
    static char target[CACHE_KEY_MAX], own[CACHE_KEY_MAX], as_get[CACHE_KEY_MAX];
    size_t own_len = 1;
    size_t t = cache_invalidation_target(&up, &req, false, target, sizeof target, own, sizeof own, &own_len);
    FUZZ_CHECK(t <= sizeof target && own_len <= sizeof own && (t || !own_len));
    static const char *const safe[] = { "GET", "HEAD", "OPTIONS", "TRACE" };
    for (size_t i = 0; i < sizeof safe / sizeof *safe; i++)
        FUZZ_CHECK(!t || !http_method_is(&req, safe[i]));
    FUZZ_CHECK(!t || !cache_rule_for(&up, &req));
    if (!t)
        return;
    struct http_request g = req;
    g.method = (struct http_slice){ "GET", 3 };
    struct http_slice path, query;
    if (!split_target(req.target, &path, &query) || !model_plain(path))
        return;                        /* a write's dot segments are resolved: its GET is another target */
    const struct cache_rule *get_rule = cache_rule_for(&up, &g);
    FUZZ_CHECK(get_rule != NULL);
    size_t n = cache_key(&up, get_rule, &g, false, as_get, sizeof as_get);
    FUZZ_CHECK(n == own_len && !memcmp(own, as_get, n));
    FUZZ_CHECK(!own_len || (cache_key_target_len(own, own_len) == t && !memcmp(own, target, t)));
    /* over the app's own TLS: the same, with a line of its own after the target */
    size_t ts = cache_invalidation_target(&up, &req, true, target, sizeof target, own, sizeof own, &own_len);
    FUZZ_CHECK(ts > 0);
    n = cache_key(&up, get_rule, &g, true, as_get, sizeof as_get);
    FUZZ_CHECK(n == own_len && !memcmp(own, as_get, n));
    FUZZ_CHECK(!own_len || (cache_key_target_len(own, own_len) == ts && !memcmp(own, target, ts)
                            && own_len >= ts + 14 && !memcmp(own + ts, "\nscheme: https", 14)));
}

/* cache_key into an exactly sized heap buffer of cap bytes (one byte when cap is 0). */
static size_t key_into(const struct http_request *r, const struct cache_rule *rule, size_t cap, char **out)
{
    *out = malloc(cap ? cap : 1);
    if (!*out)
        abort();
    size_t n = cache_key(&up, rule, r, false, *out, cap);
    FUZZ_CHECK(n <= cap);
    return n;
}

static bool ignored(const struct cache_rule *r, const char *name, size_t n)
{
    for (size_t i = 0; i < r->n_ignore_query; i++)
        if (strlen(r->ignore_query[i]) == n && !memcmp(r->ignore_query[i], name, n))
            return true;
    return false;
}

/* A bounded writer for the model key. */
void emit(struct out *o, const void *s, size_t n)
{
    FUZZ_CHECK(o->n + n <= o->cap);    /* the model's buffer is sized for any key */
    memcpy(o->p + o->n, s, n);
    o->n += n;
}

void emits(struct out *o, const char *s) { emit(o, s, strlen(s)); }

const struct http_header *next_named(const struct http_request *r, const char *name, size_t from)
{
    size_t n = strlen(name);
    for (size_t i = from; i < r->nheaders; i++)
        if (r->headers[i].name.n == n && !strncasecmp(r->headers[i].name.p, name, n))
            return &r->headers[i];
    return NULL;
}

static void emit_hash_line(struct out *o, const struct http_request *r, const char *name)
{
    struct sha256_ctx c;
    sha256_init(&c);
    for (const struct http_header *h = next_named(r, name, 0); h; h = next_named(r, name, (size_t)(h - r->headers) + 1)) {
        char len[24];
        int l = snprintf(len, sizeof len, "%zu:", h->value.n);
        sha256_update(&c, len, (size_t)l);
        sha256_update(&c, h->value.p, h->value.n);
    }
    unsigned char d[SHA256_BYTES];
    sha256_final(&c, d);
    emits(o, "\n");
    emits(o, name);
    emits(o, "-sha256: ");
    for (size_t i = 0; i < SHA256_BYTES; i++) {
        char hex[3];
        snprintf(hex, sizeof hex, "%02x", d[i]);
        emit(o, hex, 2);
    }
}

/* The key of request r under rule as cache.c documents it, built independently:
 *   METHOD (GET for HEAD) " http://" RULE-HOST:PORT PATH [?kept query parameters]
 *   "\nhost: " the request's authority (absolute-form, else Host), lower-cased, ":80" dropped
 *   "\n" NAME ": " its lines' values apart by \x02 (or \x01 when absent; a control
 *       character in one: no key), per key header other than Cookie and Authorization
 *   "\nauthorization-sha256: " HEX   when the request has Authorization lines
 *   "\ncookie-sha256: " HEX          when the rule keys on Cookie and the request has one
 * where HEX hashes every line's "LEN:" and value, in order; the path with the escapes of
 * unreserved characters decoded and the others' hex in upper case. 0: the request is not
 * cached (no path or one that is not plain, a Cookie the rule does not key on, no Host or two, an over-long authority; an
 * absolute-form target whose scheme is not http, that carries userinfo, or whose
 * authority is not the Host header's, case and ":80" aside). */
/* A Connection line that lists a token other than the connection's own options (close,
 * keep-alive, te, trailer, transfer-encoding, upgrade, proxy-connection; any case): tokens
 * are what lies between commas, spaces and tabs. */
static bool connection_names_field(const struct http_request *r)
{
    static const char *const own[] = { "close", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
                                       "proxy-connection" };
    for (size_t h = 0; h < r->nheaders; h++) {
        if (r->headers[h].name.n != 10 || strncasecmp(r->headers[h].name.p, "connection", 10))
            continue;
        char tok[64];
        size_t t = 0;
        struct http_slice v = r->headers[h].value;
        for (size_t i = 0; i <= v.n; i++) {
            bool sep = i == v.n || v.p[i] == ',' || v.p[i] == ' ' || v.p[i] == '\t';
            if (!sep) {
                if (t < sizeof tok - 1)
                    tok[t] = v.p[i];
                t++;
                continue;
            }
            if (!t)
                continue;
            bool known = false;
            if (t < sizeof tok) {
                tok[t] = 0;
                for (size_t k = 0; k < sizeof own / sizeof *own; k++)
                    known |= !strcasecmp(tok, own[k]);
            }
            if (!known)
                return true;
            t = 0;
        }
    }
    return false;
}

static size_t model_key(const struct cache_rule *rule, const struct http_request *r, char *buf, size_t cap)
{
    struct http_slice path, query;
    if (!split_target(r->target, &path, &query) || path.n >= 4096 || !model_plain(path))
        return 0;                      /* (a path that does not name what it says is never keyed) */
    static char normal[4096];
    path = (struct http_slice){ normal, model_normal_path(path, normal) };
    bool keys_cookie = false;
    for (size_t i = 0; i < rule->n_key_headers; i++)
        keys_cookie |= !strcasecmp(rule->key_headers[i], "cookie");
    if (!keys_cookie && next_named(r, "cookie", 0))
        return 0;
    if (connection_names_field(r))
        return 0;
    struct out o = { buf, 0, cap };
    if (http_method_is(r, "HEAD"))
        emits(&o, "GET");
    else
        emit(&o, r->method.p, r->method.n);
    char hostport[RULES_HOST_MAX + 16];
    snprintf(hostport, sizeof hostport, strchr(up.host, ':') ? " http://[%s]:%u" : " http://%s:%u", up.host, up.port);
    emits(&o, hostport);
    emit(&o, path.p, path.n);
    bool first = true;
    /* a '?' (a bare one too) is kept, and every parameter but the ignored ones, empty
     * ones included: `a=1&&b=2` is a target of its own */
    if (query.p != r->target.p + r->target.n || (r->target.n && query.p[-1] == '?'))
        emit(&o, "?", 1);
    for (size_t i = 0; i <= query.n && query.p[-1] == '?';) {   /* every step moves past one '&' */
        const char *amp = memchr(query.p + i, '&', query.n - i);
        size_t end = amp ? (size_t)(amp - query.p) : query.n;
        const char *eq = memchr(query.p + i, '=', end - i);
        size_t name_n = eq ? (size_t)(eq - (query.p + i)) : end - i;
        if (end == i || !ignored(rule, query.p + i, name_n)) {
            if (!first)
                emit(&o, "&", 1);
            emit(&o, query.p + i, end - i);
            first = false;
        }
        if (!amp)
            break;
        i = end + 1;
    }
    struct http_slice a = { "", 0 };
    const char *t = r->target.p;
    const char *scheme = r->target.n && t[0] != '/' ? memmem(t, r->target.n, "://", 3) : NULL;
    if (!next_named(r, "host", 0))
        return 0;                             /* no Host: the authority is not the request's to say */
    if (scheme) {
        if (scheme - t != 4 || strncasecmp(t, "http", 4))
            return 0;
        const char *stop = scheme + 3;
        while (*stop != '/')                  /* (split_target found the path's '/') */
            stop++;
        a = (struct http_slice){ scheme + 3, (size_t)(stop - scheme - 3) };
        if (memchr(a.p, '@', a.n))
            return 0;                         /* userinfo: not cached */
        const struct http_header *h = next_named(r, "host", 0);
        if (h) {
            if (next_named(r, "host", (size_t)(h - r->headers) + 1))
                return 0;
            struct http_slice x = h->value, y = a;
            if (x.n > 3 && !memcmp(x.p + x.n - 3, ":80", 3))
                x.n -= 3;
            if (y.n > 3 && !memcmp(y.p + y.n - 3, ":80", 3))
                y.n -= 3;
            if (x.n != y.n || strncasecmp(x.p, y.p, x.n))
                return 0;
        }
    } else {
        const struct http_header *h = next_named(r, "host", 0);
        if (h && next_named(r, "host", (size_t)(h - r->headers) + 1))
            return 0;
        if (h)
            a = h->value;
    }
    if (a.n >= RULES_HOST_MAX + 16)
        return 0;
    emits(&o, "\nhost: ");
    size_t an = a.n;
    if (an > 3 && !strncasecmp(a.p + an - 3, ":80", 3) && a.p[an - 4] != ':')
        an -= 3;
    for (size_t i = 0; i < an; i++) {
        char c = a.p[i] >= 'A' && a.p[i] <= 'Z' ? (char)(a.p[i] + 32) : a.p[i];
        emit(&o, &c, 1);
    }
    for (size_t i = 0; i < rule->n_key_headers; i++) {
        const char *name = rule->key_headers[i];
        if (!strcasecmp(name, "cookie") || !strcasecmp(name, "authorization"))
            continue;
        emits(&o, "\n");
        emits(&o, name);
        emits(&o, ": ");
        const struct http_header *h = next_named(r, name, 0);
        if (!h)
            emit(&o, "\x01", 1);
        for (bool sep = false; h; h = next_named(r, name, (size_t)(h - r->headers) + 1), sep = true) {
            for (size_t c = 0; c < h->value.n; c++)
                if (iscntrl((unsigned char)h->value.p[c]) && h->value.p[c] != '\t')
                    return 0;                 /* a control character: not keyed */
            if (sep)
                emits(&o, "\x02");           /* each line apart */
            emit(&o, h->value.p, h->value.n);
        }
    }
    if (next_named(r, "authorization", 0))
        emit_hash_line(&o, r, "authorization");
    if (keys_cookie && next_named(r, "cookie", 0))
        emit_hash_line(&o, r, "cookie");
    return o.n;
}

/* Returns the key under `rule` (heap, *len bytes; NULL when the request has none). */
static char *check_key(const struct cache_rule *rule, size_t input_size, size_t *len)
{
    /* big enough for any key of this request: method, host, target, authority (each at
     * most the input or the host buffer), up to 16 key headers that could each repeat
     * every header value with a ", " between them, the two digests */
    size_t big = 18 * input_size + 16 * (64 + 4 + 2 * HTTP_MAX_HEADERS) + 2 * sizeof up.host + 1024;
    char *a, *b, *m;
    size_t la = key_into(&req, rule, big, &a);
    size_t lb = key_into(&req, rule, big, &b);
    FUZZ_CHECK(la == lb && !memcmp(a, b, la));
    free(b);
    char *want = malloc(big);
    if (!want)
        abort();
    size_t lw = model_key(rule, &req, want, big);
    FUZZ_CHECK(la == lw && !memcmp(a, want, la));
    free(want);
    size_t lm = key_into(&req, rule, CACHE_KEY_MAX, &m);
    FUZZ_CHECK(lm == (la <= CACHE_KEY_MAX ? la : 0));
    FUZZ_CHECK(!memcmp(m, a, lm));
    free(m);
    if (!la) {
        free(a);
        return NULL;
    }
    const size_t caps[] = { 0, 1, la / 2, la - 1, la, la + 1 };
    for (size_t i = 0; i < sizeof caps / sizeof caps[0]; i++) {
        char *s;
        size_t ls = key_into(&req, rule, caps[i], &s);
        FUZZ_CHECK(ls == (caps[i] >= la ? la : 0));
        FUZZ_CHECK(!memcmp(s, a, ls));
        free(s);
    }

    /* HEAD is answered from the stored GET: the same key either way */
    if (http_method_is(&req, "HEAD") || http_method_is(&req, "GET")) {
        req_alt = req;
        req_alt.method = (struct http_slice){ http_method_is(&req, "HEAD") ? "GET" : "HEAD",
                                              http_method_is(&req, "HEAD") ? 3 : 4 };
        char *h;
        size_t lh = key_into(&req_alt, rule, big, &h);
        FUZZ_CHECK(lh == la && !memcmp(h, a, la));
        free(h);
    }
    *len = la;
    return a;
}

static size_t vary_into(const char *vary, size_t vary_len, size_t cap, char **out)
{
    *out = malloc(cap ? cap : 1);
    if (!*out)
        abort();
    size_t n = cache_vary_values(vary, vary_len, &req, *out, cap);
    FUZZ_CHECK(n == (size_t)-1 || n <= cap);
    return n;
}

static void check_vary(const char *key, size_t key_len, const char *vary, size_t vary_len)
{
    /* the values' length: grow the buffer until they fit (each of at most 512 names adds
     * at most every header value, so 24 doublings from 4 KB always get there) */
    size_t big = 4096, lv = (size_t)-1;
    char *v = NULL, *w;
    for (int tries = 0; tries < 24 && lv == (size_t)-1; tries++, big *= 2) {
        free(v);
        lv = vary_into(vary, vary_len, big, &v);
    }
    FUZZ_CHECK(lv != (size_t)-1);
    big = lv;
    size_t lw = vary_into(vary, vary_len, big, &w);
    FUZZ_CHECK(lv == lw && !memcmp(v, w, lv));
    free(w);
    const size_t caps[] = { 0, 1, lv / 2, lv ? lv - 1 : 0, lv, 4096 };
    for (size_t i = 0; i < sizeof caps / sizeof caps[0]; i++) {
        char *s;
        size_t ls = vary_into(vary, vary_len, caps[i], &s);
        FUZZ_CHECK(ls == (caps[i] >= lv ? lv : (size_t)-1));
        if (ls != (size_t)-1)
            FUZZ_CHECK(!memcmp(s, v, ls));
        free(s);
    }

    static const char tag[] = "\nvary: ";
    size_t t = sizeof tag - 1, total = key_len + t + lv;
    const size_t kcaps[] = { 0, key_len, total - 1, total, total + 1, CACHE_KEY_MAX };
    for (size_t i = 0; i < sizeof kcaps / sizeof kcaps[0]; i++) {
        size_t cap = kcaps[i];
        char *out = malloc(cap ? cap : 1);
        if (!out)
            abort();
        size_t n = cache_variant_key(key, key_len, vary, vary_len, &req, out, cap);
        /* fits -> the whole length, else 0; cache.c also wants one spare byte past the tag
         * (cap == total with no values is refused: harmless, the response is not stored) */
        bool fits = cap >= total && !(lv == 0 && cap == total);
        FUZZ_CHECK(n == (fits ? total : 0));
        if (n) {
            FUZZ_CHECK(!memcmp(out, key, key_len) && !memcmp(out + key_len, tag, t));
            FUZZ_CHECK(!memcmp(out + key_len + t, v, lv));
        }
        free(out);
    }

    /* an entry stored for this request matches it (upstream.c keeps values within 4096) */
    struct cache_entry *e = cache_entry_new(key, key_len, 200, "OK", 2, "X: y\r\n", 6, vary, vary_len,
                                            v, lv, "body", 4, 60000);
    if (!e)
        abort();
    FUZZ_CHECK(e->key_len == key_len && !memcmp(e->key, key, key_len));
    FUZZ_CHECK(e->vary_len == vary_len && e->vary_values_len == lv && e->body_len == 4);
    FUZZ_CHECK(!cache_entry_is_vary_marker(e));
    FUZZ_CHECK(e->expires_at_ms - e->stored_at_ms == 60000);
    if (lv <= 4096)
        FUZZ_CHECK(cache_entry_matches_request(e, &req));
    cache_entry_ref(e);
    cache_entry_release(e);
    cache_entry_release(e);
    free(v);
}

static void check_decide(const struct response_policy *p, const struct cache_rule *r, int status)
{
    int64_t ttl = -7;
    enum not_stored_reason why = cache_policy_decide(p, r, status, &ttl);
    FUZZ_CHECK((int)why >= 0 && why < NS__COUNT && cache_not_stored_names[why]);
    bool listed = false;
    for (size_t i = 0; i < r->n_status; i++)
        listed |= r->status[i] == status;
    enum not_stored_reason first = !listed ? NS_STATUS : p->no_store ? NS_NO_STORE : p->private_ ? NS_PRIVATE
                                 : p->set_cookie ? NS_SET_COOKIE : p->vary_star ? NS_VARY_STAR : NS_NONE;
    if (first != NS_NONE) {
        FUZZ_CHECK(why == first);
    } else if (!r->respect_cache_control) {
        FUZZ_CHECK(why == NS_NONE && ttl == r->ttl_ms);
    } else {
        FUZZ_CHECK(why == NS_NONE || why == NS_ZERO_TTL);
        if (p->no_cache)
            FUZZ_CHECK(why == NS_ZERO_TTL);
    }
    if (why == NS_NONE)
        FUZZ_CHECK(ttl > 0 && ttl <= r->ttl_ms);
    else
        FUZZ_CHECK(ttl == -7);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* the request: an exactly sized copy so reads past it show */
    char *buf = calloc(size ? size : 1, 1);
    if (!buf)
        abort();
    if (size)
        memcpy(buf, data, size);
    if (http_parse_request(buf, size, &req) != HTTP_PARSE_DONE) {
        free(buf);
        return 0;
    }

    memset(&up, 0, sizeof up);
    snprintf(up.host, sizeof up.host, "api.example.com");
    up.port = 80;
    up.cache_rules = rules;
    int statuses[MAX_STATUSES + 2];
    size_t n_statuses = 0;
    struct line hdr[MAX_LINES];
    size_t n_hdr = 0;
    for (size_t pos = req.head_len, lines = 0; pos < size && lines < MAX_LINES; lines++) {
        const char *nl = memchr(buf + pos, '\n', size - pos);
        size_t end = nl ? (size_t)(nl - buf) : size;
        struct line l = { buf + pos, end - pos };
        if (l.n && l.p[l.n - 1] == '\r')
            l.n--;
        if (l.n && l.p[0] == '@')
            directive(l, statuses, &n_statuses);
        else if (l.n)
            hdr[n_hdr++] = l;
        pos = end + 1;
    }
    /* how rules.c names the upstream once its section is read */
    snprintf(up.label, sizeof up.label, strchr(up.host, ':') ? "[%s]:%u" : "%s:%u", up.host, up.port);
    if (!up.n_cache_rules)
        set_rule(&rules[up.n_cache_rules++], "GET", "/*");
    for (size_t i = 0; i < up.n_cache_rules; i++)
        if (!rules[i].n_status)
            rules[i].status[rules[i].n_status++] = 200;

    check_rule_for();
    check_invalidation();
    size_t no_rules = up.n_cache_rules;
    up.n_cache_rules = 0;
    FUZZ_CHECK(cache_rule_for(&up, &req) == NULL);
    up.n_cache_rules = no_rules;
    const struct cache_rule *rule = cache_rule_for(&up, &req);

    /* the response head, read the way upstream.c reads it */
    struct response_policy p;
    cache_policy_init(&p);
    char vary[VARY_CAP];
    size_t vary_len = 0;
    for (size_t i = 0; i < n_hdr; i++) {
        const char *colon = memchr(hdr[i].p, ':', hdr[i].n);
        if (!colon)
            continue;
        struct http_slice name = { hdr[i].p, (size_t)(colon - hdr[i].p) };
        while (name.n && (name.p[name.n - 1] == ' ' || name.p[name.n - 1] == '\t'))
            name.n--;                         /* "Name : v" is Name's line (RFC 9112 5.1) */
        const char *v = colon + 1, *end = hdr[i].p + hdr[i].n;
        while (v < end && (*v == ' ' || *v == '\t'))
            v++;
        struct http_slice value = { v, (size_t)(end - v) };
        cache_policy_header(&p, name, value);
        if (http_slice_ieq(name, "vary") && vary_len + (vary_len ? 1 : 0) + value.n <= sizeof vary) {
            if (vary_len)
                vary[vary_len++] = ',';
            memcpy(vary + vary_len, value.p, value.n);
            vary_len += value.n;
        }
    }
    FUZZ_CHECK(p.max_age_s >= -1 && p.s_maxage_s >= -1 && p.expires_ms >= -1 && p.date_ms >= -1);
    FUZZ_CHECK(p.swr_s >= -1 && p.sie_s >= -1);
    FUZZ_CHECK(!p.must_revalidate || cc_mentions(hdr, n_hdr, "must-revalidate")
               || cc_mentions(hdr, n_hdr, "proxy-revalidate"));
    FUZZ_CHECK(p.swr_s < 0 || cc_mentions(hdr, n_hdr, "stale-while-revalidate"));
    FUZZ_CHECK(p.sie_s < 0 || cc_mentions(hdr, n_hdr, "stale-if-error"));

    statuses[n_statuses++] = 200;
    statuses[n_statuses++] = 100 + (int)(data[size - 1] % 500);

    /* the header block an entry stores: the lines, each ending CRLF (exactly sized) */
    size_t eh_len = 0;
    for (size_t i = 0; i < n_hdr; i++)
        eh_len += hdr[i].n + 2;
    char *eh = malloc(eh_len ? eh_len : 1);
    if (!eh)
        abort();
    for (size_t i = 0, at = 0; i < n_hdr; at += hdr[i].n + 2, i++) {
        memcpy(eh + at, hdr[i].p, hdr[i].n);
        memcpy(eh + at + hdr[i].n, "\r\n", 2);
    }
    bool entry_checked = false;
    for (size_t i = 0; i < up.n_cache_rules; i++) {
        size_t key_len = 0;
        char *key = check_key(&rules[i], size, &key_len);
        if (key && &rules[i] == rule) {
            check_vary(key, key_len, vary, vary_len);
            check_entry(key, key_len, eh, eh_len, hdr, n_hdr, &p, vary, vary_len, buf, size,
                        statuses[n_statuses - 1]);
            entry_checked = true;
        }
        free(key);
    }
    if (!entry_checked)
        check_entry("k", 1, eh, eh_len, hdr, n_hdr, &p, vary, vary_len, buf, size, statuses[n_statuses - 1]);
    free(eh);

    for (size_t s = 0; s < n_statuses; s++)
        for (size_t i = 0; i < up.n_cache_rules; i++) {
            check_decide(&p, &rules[i], statuses[s]);
            check_decide(&p, &rules[i], rules[i].status[s % rules[i].n_status]);
        }
    free(buf);
    return 0;
}
