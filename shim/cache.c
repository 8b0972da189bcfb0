/* cache.c — what may be cached and under which key: rule matching, key construction
 * (the rule's host and port first, then the request's own authority; ignored query
 * parameters dropped; named request headers, a hash of every Authorization and
 * Proxy-Authorization line, and Cookie only when the rule keys on it, hashed), Vary
 * variants (and Accept-Encoding for a coded body: store.c), the response
 * storage policy (no-store, private, Set-Cookie, Vary: *, statuses, Cache-Control
 * lifetimes) and building immutable, reference-counted entries. */
#include "cache.h"
#include "cache_target.h"
#include "clock.h"
#include <curl/curl.h>
#include <fnmatch.h>
#include "sha256.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

const char *const cache_not_stored_names[NS__COUNT] = {
    [NS_NONE] = "none", [NS_METHOD] = "method", [NS_STATUS] = "status", [NS_NO_STORE] = "no_store",
    [NS_PRIVATE] = "private", [NS_SET_COOKIE] = "set_cookie", [NS_VARY_STAR] = "vary_star",
    [NS_TOO_LARGE] = "too_large", [NS_INCOMPLETE] = "incomplete", [NS_UNFRAMED] = "unframed",
    [NS_ZERO_TTL] = "zero_ttl", [NS_NO_MEMORY] = "no_memory", [NS_MISFRAMED] = "misframed",
    [NS_TRAILERS] = "trailers", [NS_OBS_FOLD] = "obs_fold", [NS_INVALIDATED] = "invalidated", [NS_HOP_FIELDS] = "hop_fields",
};


/* The first cache rule of u for a request of this method to this target. */
static const struct cache_rule *rule_for(const struct upstream_rule *u, struct http_slice method, bool head,
                                         const struct target_view *v)
{
    if (!u->n_cache_rules)
        return NULL;
    const char *p = v->path;
    for (size_t i = 0; i < u->n_cache_rules; i++) {
        const struct cache_rule *r = &u->cache_rules[i];
        bool method_ok = !strcmp(r->method, "*") || (method.n == strlen(r->method)
                         && !memcmp(method.p, r->method, method.n))
                         || (head && !strcmp(r->method, "GET"));
        if (method_ok && fnmatch(r->glob, p, 0) == 0)
            return r;
    }
    return NULL;
}

const struct cache_rule *cache_rule_for(const struct upstream_rule *u, const struct http_request *req)
{
    struct target_view v;
    if (!u->n_cache_rules || !cache_view_target(req->target, false, &v))
        return NULL;
    return rule_for(u, req->method, http_method_is(req, "HEAD"), &v);
}

struct keybuf { char *p; size_t n, cap; bool overflow; };

static void put(struct keybuf *k, const void *s, size_t n)
{
    if (k->n + n > k->cap) {
        k->overflow = true;
        return;
    }
    memcpy(k->p + k->n, s, n);
    k->n += n;
}

static void puts_(struct keybuf *k, const char *s) { put(k, s, strlen(s)); }

static bool ignored(const struct cache_rule *r, const char *name, size_t n)
{
    for (size_t i = 0; i < r->n_ignore_query; i++)
        if (strlen(r->ignore_query[i]) == n && !memcmp(r->ignore_query[i], name, n))
            return true;
    return false;
}

static const struct http_header *find_header(const struct http_request *req, const char *name, size_t n,
                                             size_t from)
{
    for (size_t i = from; i < req->nheaders; i++)
        if (req->headers[i].name.n == n && !strncasecmp(req->headers[i].name.p, name, n))
            return &req->headers[i];
    return NULL;
}

/* All values of a header, in order, each line apart: two lines `a` and `b` are not the
 * one line `a, b` (an upstream that takes a singleton header's last line answers the first
 * for b, the second for "a, b"). A value with a control character is not keyed at all (the
 * request is not cached), so that the separators below mean only what they say. */
static void put_header_values(struct keybuf *k, const struct http_request *req, const char *name, size_t n)
{
    bool first = true;
    for (const struct http_header *h = find_header(req, name, n, 0); h;
         h = find_header(req, name, n, (size_t)(h - req->headers) + 1)) {
        for (size_t i = 0; i < h->value.n; i++)
            if (((unsigned char)h->value.p[i] < 0x20 && h->value.p[i] != '\t') || h->value.p[i] == 0x7f)
                k->overflow = true;
        if (!first)
            put(k, "\x02", 1);         /* the next line */
        put(k, h->value.p, h->value.n);
        first = false;
    }
    if (first)
        put(k, "\x01", 1);             /* absent differs from empty */
}

static bool rule_keys_on(const struct cache_rule *r, const char *name)
{
    for (size_t i = 0; i < r->n_key_headers; i++)
        if (!strcasecmp(r->key_headers[i], name))
            return true;
    return false;
}

/* "\nNAME-sha256: HEX" */
static void put_sha256_line(struct keybuf *k, const char *name, const unsigned char digest[SHA256_BYTES])
{
    char hex[2 * SHA256_BYTES + 1];
    for (size_t i = 0; i < SHA256_BYTES; i++)
        snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    put(k, "\n", 1);
    puts_(k, name);
    puts_(k, "-sha256: ");
    puts_(k, hex);
}

/* "\nNAME-sha256: HEX" of every line of the header, in order, each value prefixed by its
 * length so that no two different sequences of lines hash alike. Nothing when absent. */
static void put_header_hash(struct keybuf *k, const struct http_request *req, const char *name)
{
    size_t n = strlen(name);
    const struct http_header *h = find_header(req, name, n, 0);
    if (!h)
        return;
    struct sha256_ctx c;
    sha256_init(&c);
    for (; h; h = find_header(req, name, n, (size_t)(h - req->headers) + 1)) {
        char len[24];
        int l = snprintf(len, sizeof len, "%zu:", h->value.n);
        sha256_update(&c, len, (size_t)l);
        sha256_update(&c, h->value.p, h->value.n);
    }
    unsigned char digest[SHA256_BYTES];
    sha256_final(&c, digest);
    put_sha256_line(k, name, digest);
}

/* Two authorities are one: equal but for ASCII case and http's default port. */
static bool same_authority(struct http_slice x, struct http_slice y)
{
    if (x.n > 3 && !memcmp(x.p + x.n - 3, ":80", 3))
        x.n -= 3;
    if (y.n > 3 && !memcmp(y.p + y.n - 3, ":80", 3))
        y.n -= 3;
    return x.n == y.n && !strncasecmp(x.p, y.p, x.n);
}

/* The authority the request names, lower-cased and without the scheme's default port:
 * an absolute-form target's, else the Host header's. False when it is ambiguous (two
 * Host lines) or too long, so the request is not cached. */
static bool put_authority(struct keybuf *k, const struct http_request *req, bool https)
{
    struct http_slice a, scheme, rest;
    /* no Host (HTTP/1.0 may lack one): the authority the upstream answers for is not the
     * request's to say (libcurl's Host for the upstream's address goes, and an absolute
     * target names another), so nothing is keyed by it: an entry under "victim" filled with
     * the upstream's own answer was served to `Host: victim` */
    const struct http_header *h = find_header(req, "host", 4, 0);
    if (!h || find_header(req, "host", 4, (size_t)(h - req->headers) + 1))
        return false;
    if (http_absolute_target(req->target, &scheme, &a, &rest)) {
        /* an absolute-form target is cached only when it says what the connection is (http),
         * carries no credentials of its own (userinfo), and names the host the Host header
         * names: the upstream answers by the Host it is sent, so an entry keyed by another
         * authority could be served to requests for that one */
        if (!http_slice_ieq(scheme, "http") || memchr(a.p, '@', a.n) || !same_authority(h->value, a))
            return false;
    } else {
        a = h->value;
    }
    char norm[RULES_HOST_MAX + 16];
    if (a.n >= sizeof norm)
        return false;
    for (size_t i = 0; i < a.n; i++)       /* ASCII only: the app's locale must not matter */
        norm[i] = a.p[i] >= 'A' && a.p[i] <= 'Z' ? (char)(a.p[i] + 32) : a.p[i];
    size_t n = a.n;
    if (!https && n > 3 && !memcmp(norm + n - 3, ":80", 3) && norm[n - 4] != ':')
        n -= 3;                        /* http's default port: host and host:80 are one */
    if (https && n > 4 && !memcmp(norm + n - 4, ":443", 4) && norm[n - 5] != ':')
        n -= 4;                        /* (https's) */
    puts_(k, "\nhost: ");
    put(k, norm, n);
    return true;
}

/* The key's first two lines, the target URI: the method (a HEAD's is GET's), the rule's
 * upstream, the path, the query without the parameters the rule ignores, then the request's
 * own authority (under the rule's upstream, so a spoofed Host never reaches another
 * upstream's entries). Every entry of one target starts with them, whatever its variant,
 * credentials or body. */
static bool put_target(struct keybuf *k, const struct upstream_rule *u, const struct cache_rule *r,
                       const struct http_request *req, const struct target_view *v, struct http_slice method,
                       bool https)
{
    struct http_slice path = { v->path, v->path_n }, query = v->query;
    put(k, method.p, method.n);
    puts_(k, " http://");
    puts_(k, u->label);
    put(k, path.p, path.n);
    /* the query as the upstream receives it, but for the parameters the rule ignores: an
     * empty parameter (`a=1&&b=2`, `a=1&`) or a bare `?` is a target of its own, which an
     * upstream that signs or logs its query tells apart */
    if (!v->has_query)
        return put_authority(k, req, https);
    put(k, "?", 1);
    bool first = true;
    for (size_t i = 0;;) {
        const char *amp = memchr(query.p + i, '&', query.n - i);
        size_t end = amp ? (size_t)(amp - query.p) : query.n;
        const char *param = query.p + i;
        size_t plen = end - i;
        const char *eq = memchr(param, '=', plen);
        size_t nlen = eq ? (size_t)(eq - param) : plen;
        if (!plen || !ignored(r, param, nlen)) {
            if (!first)
                put(k, "&", 1);
            put(k, param, plen);
            first = false;
        }
        if (!amp)
            break;
        i = end + 1;
    }
    return put_authority(k, req, https);
}

/* Whether a Connection header names anything but the connection's own options: a header
 * it names does not reach the upstream (RFC 9110 7.6.1), so an answer keyed or varied on
 * its value (Authorization, a key header, Accept-Language behind a Vary) would be stored
 * for a value the upstream never saw. */
static bool connection_names_a_field(const struct http_request *req)
{
    static const char *const own[] = { "close", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
                                       "proxy-connection" };
    for (const struct http_header *h = find_header(req, "connection", 10, 0); h;
         h = find_header(req, "connection", 10, (size_t)(h - req->headers) + 1)) {
        struct http_slice v = h->value;
        for (size_t i = 0; i < v.n;) {
            while (i < v.n && (v.p[i] == ',' || v.p[i] == ' ' || v.p[i] == '\t'))
                i++;
            size_t start = i;
            while (i < v.n && v.p[i] != ',' && v.p[i] != ' ' && v.p[i] != '\t')
                i++;
            if (i == start)
                continue;
            bool known = false;
            for (size_t k = 0; k < sizeof own / sizeof *own && !known; k++)
                known = strlen(own[k]) == i - start && !strncasecmp(own[k], v.p + start, i - start);
            if (!known)
                return true;
        }
    }
    return false;
}

static size_t key_as(const struct upstream_rule *u, const struct cache_rule *r, const struct http_request *req,
                     const struct target_view *v, struct http_slice method, bool https, char *out, size_t cap)
{
    if (connection_names_a_field(req))
        return 0;
    /* A cookie names a user: a shared cache must not hand that user's answer to another
     * (RFC 9111 3.5), unless the rule keys on it. */
    bool keys_cookie = rule_keys_on(r, "cookie");
    if (!keys_cookie && find_header(req, "cookie", 6, 0))
        return 0;
    /* A range asks for a part: a stored whole would answer it with a 200 the client did not
     * ask for (a resuming download fails on it), and its 206 is not the whole to store. */
    if (find_header(req, "range", 5, 0))
        return 0;
    /* a precondition on the upstream's current state (RFC 9110 13.1.1, 13.1.4): its 412 is
     * the upstream's to say, and a stored answer would say 200 without asking */
    if (find_header(req, "if-match", 8, 0) || find_header(req, "if-unmodified-since", 19, 0))
        return 0;
    struct keybuf k = { out, 0, cap, false };
    if (!put_target(&k, u, r, req, v, method, https))
        return 0;
    /* a request that came over the app's own TLS (tls = intercept): never answered with
     * what came over plaintext to the same host and port, nor the other way round; the
     * target stays the same, so that a write over either invalidates both */
    if (https)
        puts_(&k, "\nscheme: https");
    for (size_t i = 0; i < r->n_key_headers; i++) {
        if (!strcasecmp(r->key_headers[i], "cookie") || !strcasecmp(r->key_headers[i], "authorization")
            || !strcasecmp(r->key_headers[i], "proxy-authorization"))
            continue;                  /* credentials go in hashed, below */
        put(&k, "\n", 1);
        puts_(&k, r->key_headers[i]);
        put(&k, ": ", 2);
        put_header_values(&k, req, r->key_headers[i], strlen(r->key_headers[i]));
    }
    put_header_hash(&k, req, "authorization");
    put_header_hash(&k, req, "proxy-authorization");   /* a proxy's answer may depend on its user */
    if (keys_cookie)
        put_header_hash(&k, req, "cookie");
    return k.overflow ? 0 : k.n;
}

size_t cache_key(const struct upstream_rule *u, const struct cache_rule *r, const struct http_request *req,
                 bool https, char *out, size_t cap)
{
    static const struct http_slice get = { "GET", 3 };
    struct target_view v;
    if (!cache_view_target(req->target, false, &v))
        return 0;
    return key_as(u, r, req, &v, http_method_is(req, "HEAD") ? get : req->method, https, out, cap);
}

/* RFC 9111 4.4: a request of an unsafe method that succeeds makes the GET entries of its
 * target stale. A method a rule caches (a search API's POST) is the operator's word that
 * it reads, and a target no GET rule names has no entries. */
size_t cache_invalidation_target(const struct upstream_rule *u, const struct http_request *req, bool https,
                                 char *target, size_t cap, char *own, size_t own_cap, size_t *own_len)
{
    static const struct http_slice get = { "GET", 3 };
    static const char *const safe[] = { "GET", "HEAD", "OPTIONS", "TRACE" };
    *own_len = 0;
    for (size_t i = 0; i < sizeof safe / sizeof *safe; i++)
        if (http_method_is(req, safe[i]))
            return 0;
    if (cache_rule_for(u, req))
        return 0;
    static struct target_view v;       /* (4 KiB: off the engine's stack) */
    const struct cache_rule *r = cache_view_target(req->target, true, &v) ? rule_for(u, get, false, &v) : NULL;
    if (!r)
        return 0;
    struct keybuf k = { target, 0, cap, false };
    if (!put_target(&k, u, r, req, &v, get, https) || k.overflow)
        return 0;
    *own_len = key_as(u, r, req, &v, get, https, own, own_cap);
    return k.n;
}

size_t cache_key_target_len(const char *key, size_t key_len)
{
    const char *nl = memchr(key, '\n', key_len);
    const char *end = nl ? memchr(nl + 1, '\n', key_len - (size_t)(nl + 1 - key)) : NULL;
    return end ? (size_t)(end - key) : key_len;
}

bool cache_request_no_store(const struct http_request *req)
{
    for (const struct http_header *h = find_header(req, "cache-control", 13, 0); h;
         h = find_header(req, "cache-control", 13, (size_t)(h - req->headers) + 1))
        if (http_list_has_token(h->value, "no-store"))
            return true;
    return false;
}

size_t cache_key_add_body(char *key, size_t key_len, size_t cap, const char *body, size_t body_len)
{
    if (!key_len || !body_len)
        return key_len;
    unsigned char digest[SHA256_BYTES];
    sha256(body, body_len, digest);
    struct keybuf k = { key, key_len, cap, false };
    put_sha256_line(&k, "body", digest);
    return k.overflow ? 0 : k.n;
}

size_t cache_vary_values(const char *vary, size_t vary_len, const struct http_request *req, char *out, size_t cap)
{
    struct keybuf k = { out, 0, cap, false };
    for (size_t i = 0; i < vary_len;) {
        while (i < vary_len && (vary[i] == ' ' || vary[i] == ',' || vary[i] == '\t'))
            i++;
        size_t start = i;
        while (i < vary_len && vary[i] != ',' && vary[i] != ' ' && vary[i] != '\t')
            i++;
        if (i > start) {
            put_header_values(&k, req, vary + start, i - start);
            put(&k, "\n", 1);
        }
    }
    return k.overflow ? (size_t)-1 : k.n;
}

size_t cache_variant_key(const char *key, size_t key_len, const char *vary, size_t vary_len,
                         const struct http_request *req, char *out, size_t cap)
{
    static const char tag[] = "\nvary: ";
    if (key_len + sizeof tag > cap)
        return 0;
    memcpy(out, key, key_len);
    memcpy(out + key_len, tag, sizeof tag - 1);
    size_t n = key_len + sizeof tag - 1;
    size_t v = cache_vary_values(vary, vary_len, req, out + n, cap - n);
    return v == (size_t)-1 ? 0 : n + v;
}

bool cache_entry_matches_request(const struct cache_entry *e, const struct http_request *req)
{
    if (!e->vary_len)
        return true;
    char values[4096];
    size_t n = cache_vary_values(e->vary, e->vary_len, req, values, sizeof values);
    return n == e->vary_values_len && !memcmp(values, e->vary_values, n);
}

/* ---- response policy ---- */

void cache_policy_init(struct response_policy *p)
{
    memset(p, 0, sizeof *p);
    p->max_age_s = p->s_maxage_s = p->swr_s = p->sie_s = -1;
    p->expires_ms = p->date_ms = -1;
}

int64_t cache_policy_age_ms(const struct response_policy *p)
{
    static const int64_t year_s = 366LL * 24 * 3600;
    return (p->age_s < year_s ? p->age_s : year_s) * 1000;
}

static int64_t seconds_value(const char *v, size_t n)
{
    int64_t s = 0;
    size_t i = 0;
    if (i < n && v[i] == '"')
        i++;
    if (i >= n || v[i] < '0' || v[i] > '9')
        return 0;                      /* unparseable lifetimes count as already stale */
    for (; i < n && v[i] >= '0' && v[i] <= '9'; i++)
        s = s < 100000000000LL ? s * 10 + (v[i] - '0') : s;
    return s;
}

static int64_t http_date_ms(struct http_slice v)
{
    char tmp[128];
    if (v.n >= sizeof tmp)
        return 0;
    memcpy(tmp, v.p, v.n);
    tmp[v.n] = 0;
    time_t t = curl_getdate(tmp, NULL);
    /* libcurl accepts years up to 2^31: clamp (to about year 287000) before the multiply */
    return t < 0 ? 0 : (int64_t)(t > 9000000000000LL ? 9000000000000LL : t) * 1000;
}

/* A lifetime said twice (two max-age, two Expires lines): RFC 9111 4.2.1 allows the first
 * or "stale"; the least of them is one or the other, and never longer than the first. */
static void keep_least(int64_t *said, int64_t value)
{
    if (*said < 0 || value < *said)
        *said = value;
}

void cache_policy_header(struct response_policy *p, struct http_slice name, struct http_slice value)
{
    if (http_slice_ieq(name, "cache-control")) {
        for (size_t i = 0; i < value.n;) {
            while (i < value.n && (value.p[i] == ' ' || value.p[i] == ',' || value.p[i] == '\t'))
                i++;
            size_t start = i;
            while (i < value.n && value.p[i] != ',' && value.p[i] != '=')
                i++;
            struct http_slice d = { value.p + start, i - start };
            while (d.n && (d.p[d.n - 1] == ' ' || d.p[d.n - 1] == '\t'))
                d.n--;
            const char *arg = NULL;
            size_t arg_n = 0;
            if (i < value.n && value.p[i] == '=') {
                arg = value.p + ++i;
                bool quoted = i < value.n && value.p[i] == '"';
                if (quoted)
                    i++;
                while (i < value.n && (quoted ? value.p[i] != '"' : value.p[i] != ','))
                    i++;
                if (quoted && i < value.n)
                    i++;
                arg_n = (size_t)(value.p + i - arg);
            }
            if (http_slice_ieq(d, "no-store"))
                p->no_store = true;
            else if (http_slice_ieq(d, "private"))
                p->private_ = true;
            else if (http_slice_ieq(d, "no-cache"))
                p->no_cache = true;
            else if (http_slice_ieq(d, "max-age") && arg)
                keep_least(&p->max_age_s, seconds_value(arg, arg_n));
            else if (http_slice_ieq(d, "s-maxage") && arg)
                keep_least(&p->s_maxage_s, seconds_value(arg, arg_n));
            else if (http_slice_ieq(d, "must-revalidate") || http_slice_ieq(d, "proxy-revalidate"))
                p->must_revalidate = true;
            else if (http_slice_ieq(d, "stale-while-revalidate") && arg)
                keep_least(&p->swr_s, seconds_value(arg, arg_n));
            else if (http_slice_ieq(d, "stale-if-error") && arg)
                keep_least(&p->sie_s, seconds_value(arg, arg_n));
        }
    } else if (http_slice_ieq(name, "set-cookie") || http_slice_ieq(name, "set-cookie2")) {
        p->set_cookie = true;
    } else if (http_slice_ieq(name, "vary")) {
        p->vary_star |= http_list_has_token(value, "*");
    } else if (http_slice_ieq(name, "expires")) {
        keep_least(&p->expires_ms, http_date_ms(value));
    } else if (http_slice_ieq(name, "date")) {
        int64_t date = http_date_ms(value);
        p->date_ms = date > 0 ? date : -1;   /* an invalid Date: the time it arrived (RFC 9110 6.6.1) */
    } else if (http_slice_ieq(name, "age")) {
        int64_t age = seconds_value(value.p, value.n);   /* (unparseable: 0, as absent) */
        if (age > p->age_s)
            p->age_s = age;
    }
}

enum not_stored_reason cache_policy_decide(const struct response_policy *p, const struct cache_rule *r,
                                           int status, int64_t *ttl_ms)
{
    bool listed = false;
    for (size_t i = 0; i < r->n_status; i++)
        listed |= r->status[i] == status;
    if (!listed)
        return NS_STATUS;
    if (p->no_store)
        return NS_NO_STORE;
    if (p->private_)
        return NS_PRIVATE;
    if (p->set_cookie)
        return NS_SET_COOKIE;
    if (p->vary_star)
        return NS_VARY_STAR;
    int64_t ttl = r->ttl_ms;
    if (r->respect_cache_control) {
        bool said = true;
        int64_t cc = 0;
        if (p->no_cache)
            cc = 0;
        else if (p->s_maxage_s >= 0)
            cc = p->s_maxage_s * 1000;
        else if (p->max_age_s >= 0)
            cc = p->max_age_s * 1000;
        else if (p->expires_ms >= 0)
            cc = p->expires_ms - (p->date_ms >= 0 ? p->date_ms : clock_wall_ms());
        else
            said = false;
        /* what is left of the lifetime: an upstream cache may have held it a while (Age) */
        cc -= cache_policy_age_ms(p);
        if (said && cc < ttl)
            ttl = cc;                  /* (at or below 0: Expires in the past, or aged out) */
    }
    if (ttl <= 0)
        return NS_ZERO_TTL;
    *ttl_ms = ttl;
    return NS_NONE;
}

void cache_stale_windows(const struct response_policy *p, const struct cache_rule *r, int64_t *swr_ms,
                         int64_t *sie_ms)
{
    *swr_ms = r->stale_while_revalidate_ms;
    *sie_ms = r->stale_if_error_ms;
    if (!r->respect_cache_control)
        return;
    if (p->must_revalidate || p->no_cache) {
        *swr_ms = *sie_ms = 0;
        return;
    }
    if (p->swr_s >= 0)
        *swr_ms = p->swr_s * 1000;
    if (p->sie_s >= 0)
        *sie_ms = p->sie_s * 1000;
}

/* Calls fn for each "Name: value" line of an entry's header block. */
static void each_header(const struct cache_entry *e, void (*fn)(struct http_slice, struct http_slice, void *),
                        void *arg)
{
    const char *p = e->headers, *end = e->headers + e->headers_len;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        size_t n = (size_t)((eol ? eol : end) - p);
        size_t l = n && p[n - 1] == '\r' ? n - 1 : n;
        struct http_slice name, value;
        if (http_split_header_line(p, l, &name, &value))
            fn(name, value, arg);
        p += n + 1;
    }
}

static void policy_line(struct http_slice name, struct http_slice value, void *arg)
{
    cache_policy_header(arg, name, value);
}

void cache_entry_stale_windows(const struct cache_entry *e, const struct cache_rule *r, int64_t *swr_ms,
                               int64_t *sie_ms)
{
    struct response_policy p;
    cache_policy_init(&p);
    if (r->respect_cache_control)
        each_header(e, policy_line, &p);
    cache_stale_windows(&p, r, swr_ms, sie_ms);
}

struct validators { struct http_slice etag, last_modified; };

static void validator_line(struct http_slice name, struct http_slice value, void *arg)
{
    struct validators *v = arg;
    if (http_slice_ieq(name, "etag"))
        v->etag = value;
    else if (http_slice_ieq(name, "last-modified"))
        v->last_modified = value;
}

void cache_entry_validators(const struct cache_entry *e, struct http_slice *etag, struct http_slice *last_modified)
{
    struct validators v = { { "", 0 }, { "", 0 } };
    each_header(e, validator_line, &v);
    *etag = v.etag;
    *last_modified = v.last_modified;
}

/* Weak comparison (RFC 9110 8.8.3.2): the opaque tags match, W/ or not. */
static bool etag_listed(struct http_slice list, struct http_slice etag)
{
    if (etag.n > 2 && etag.p[0] == 'W' && etag.p[1] == '/') {
        etag.p += 2;
        etag.n -= 2;
    }
    for (size_t i = 0; i < list.n;) {
        while (i < list.n && (list.p[i] == ' ' || list.p[i] == '\t' || list.p[i] == ','))
            i++;
        size_t start = i;
        bool quoted = false;
        while (i < list.n && (quoted || list.p[i] != ',')) {
            if (list.p[i] == '"')
                quoted = !quoted;
            i++;
        }
        struct http_slice t = { list.p + start, i - start };
        while (t.n && (t.p[t.n - 1] == ' ' || t.p[t.n - 1] == '\t'))
            t.n--;
        if (t.n == 1 && t.p[0] == '*')
            return true;
        if (t.n > 2 && t.p[0] == 'W' && t.p[1] == '/') {
            t.p += 2;
            t.n -= 2;
        }
        if (t.n && t.n == etag.n && !memcmp(t.p, etag.p, t.n))
            return true;
    }
    return false;
}

/* Whether the request carries a conditional header at all: most do not, and then the
 * entry's validators need not be looked for. */
static bool conditional(const struct http_request *req)
{
    for (size_t i = 0; i < req->nheaders; i++)
        if (req->headers[i].name.n > 3 && (req->headers[i].name.p[0] | 0x20) == 'i'
            && (req->headers[i].name.p[1] | 0x20) == 'f' && req->headers[i].name.p[2] == '-')
            return true;
    return false;
}

bool cache_entry_not_modified(const struct cache_entry *e, const struct http_request *req)
{
    if (e->status != 200 || !conditional(req))
        return false;
    struct http_slice etag, lm;
    cache_entry_validators(e, &etag, &lm);
    bool has_inm = false;
    for (size_t i = 0; i < req->nheaders; i++) {
        if (!http_slice_ieq(req->headers[i].name, "if-none-match"))
            continue;
        has_inm = true;
        if (etag_listed(req->headers[i].value, etag))   /* (* matches an entry without an ETag too) */
            return true;
    }
    if (has_inm || !lm.n)
        return false;                  /* If-Modified-Since counts only without If-None-Match */
    int64_t modified = http_date_ms(lm);
    for (size_t i = 0; i < req->nheaders; i++)
        if (http_slice_ieq(req->headers[i].name, "if-modified-since")) {
            int64_t since = http_date_ms(req->headers[i].value);
            return modified > 0 && since > 0 && modified <= since;
        }
    return false;
}

struct lines304 { char *out; size_t n, cap; bool overflow; };

static void line304(struct http_slice name, struct http_slice value, void *arg)
{
    static const char *const keep[] = { "cache-control", "content-location", "date", "etag", "expires", "vary",
                                        "last-modified" };
    struct lines304 *l = arg;
    for (size_t i = 0; i < sizeof keep / sizeof keep[0]; i++) {
        if (!http_slice_ieq(name, keep[i]))
            continue;
        size_t need = name.n + 2 + value.n + 2;
        if (l->n + need > l->cap) {
            l->overflow = true;
            return;
        }
        memcpy(l->out + l->n, name.p, name.n);
        memcpy(l->out + l->n + name.n, ": ", 2);
        memcpy(l->out + l->n + name.n + 2, value.p, value.n);
        memcpy(l->out + l->n + name.n + 2 + value.n, "\r\n", 2);
        l->n += need;
        return;
    }
}

size_t cache_entry_304_headers(const struct cache_entry *e, char *out, size_t cap)
{
    struct lines304 l = { out, 0, cap, false };
    each_header(e, line304, &l);
    return l.n;
}

/* A bounded writer for heads built on every hit: memcpy and a digit loop, not snprintf
 * (which was a fifth of a hit's instructions). */
struct head_out { char *p; size_t n, cap; bool full; };

static void head_put(struct head_out *o, const char *s, size_t n)
{
    if (o->full || o->cap - o->n < n) {
        o->full = true;
        return;
    }
    memcpy(o->p + o->n, s, n);
    o->n += n;
}

static void head_str(struct head_out *o, const char *s) { head_put(o, s, strlen(s)); }

static void head_uint(struct head_out *o, uint64_t v)
{
    char digits[24];
    size_t i = sizeof digits;
    do
        digits[--i] = (char)('0' + v % 10);
    while ((v /= 10) && i);
    head_put(o, digits + i, sizeof digits - i);
}

size_t cache_entry_head(const struct cache_entry *e, int minor, bool keep_alive, bool not_modified, int64_t now_ms,
                        char *out, size_t cap)
{
    int64_t age = (now_ms - e->stored_at_ms) / 1000;
    struct head_out o = { out, 0, cap, false };
    char version[] = "HTTP/1.1 ";
    version[7] = (char)('0' + (minor == 0 ? 0 : 1));
    head_put(&o, version, sizeof version - 1);
    if (not_modified) {
        head_str(&o, "304 Not Modified\r\n");
        if (!o.full)
            o.n += cache_entry_304_headers(e, out + o.n, cap - o.n);
    } else {
        head_uint(&o, (uint64_t)(e->status > 0 && e->status < 1000 ? e->status : 0));
        head_put(&o, " ", 1);
        head_put(&o, e->reason, e->reason_len);
        head_put(&o, "\r\n", 2);
        head_put(&o, e->headers, e->headers_len);
        if (e->status != 204) {        /* (a 204 has no body, and says no length: RFC 9110 8.6) */
            head_str(&o, "Content-Length: ");
            head_uint(&o, e->body_len);
            head_put(&o, "\r\n", 2);
        }
    }
    head_str(&o, "Age: ");
    head_uint(&o, (uint64_t)(age < 0 ? 0 : age));
    head_put(&o, "\r\n", 2);
    head_str(&o, http_connection_line(minor, keep_alive));
    head_put(&o, "\r\n", 2);
    return o.full ? 0 : o.n;
}

struct cache_entry *cache_entry_renewed(const struct cache_entry *e, int64_t ttl_ms, int64_t keep_ms)
{
    struct cache_entry *r = cache_entry_new(e->key, e->key_len, e->status, e->reason, e->reason_len, e->headers,
                                            e->headers_len, e->vary, e->vary_len, e->vary_values,
                                            e->vary_values_len, e->body, e->body_len, ttl_ms);
    if (r) {
        r->keep_until_ms = r->expires_at_ms + keep_ms;
        r->upstream = e->upstream;
    }
    return r;
}

/* ---- entries ---- */

struct cache_entry *cache_entry_new(const char *key, size_t key_len, int status, const char *reason,
                                    size_t reason_len, const char *headers, size_t headers_len,
                                    const char *vary, size_t vary_len, const char *vary_values,
                                    size_t vary_values_len, const char *body, size_t body_len, int64_t ttl_ms)
{
    size_t total = sizeof(struct cache_entry) + key_len + reason_len + headers_len + vary_len
                 + vary_values_len + body_len;
    struct cache_entry *e = malloc(total);
    if (!e)
        return NULL;
    memset(e, 0, sizeof *e);
    char *p = (char *)(e + 1);
#define PLACE(field, src, n) do { if (n) memcpy(p, (src), (n)); e->field = p; e->field##_len = (n); p += (n); } while (0)
    PLACE(key, key, key_len);
    PLACE(reason, reason, reason_len);
    PLACE(headers, headers, headers_len);
    PLACE(vary, vary, vary_len);
    PLACE(vary_values, vary_values, vary_values_len);
    PLACE(body, body, body_len);
#undef PLACE
    atomic_init(&e->refs, 1);
    e->status = status;
    e->stored_at_ms = clock_wall_ms();
    e->expires_at_ms = e->keep_until_ms = e->stored_at_ms + ttl_ms;
    e->charge = total + 64;            /* + the hash table's share per entry */
    return e;
}

void cache_entry_ref(struct cache_entry *e)
{
    atomic_fetch_add(&e->refs, 1);
}

void cache_entry_release(struct cache_entry *e)
{
    if (e && atomic_fetch_sub(&e->refs, 1) == 1)
        free(e);
}
