/* cache_policy_revalidation.c — fuzz_cache_policy's model of what comes after storing
 * (shim/cache.c): the stale windows (cache_stale_windows, cache_entry_stale_windows),
 * the validators and conditional requests (cache_entry_validators, _not_modified), the
 * 304's header lines (cache_entry_304_headers) and renewal (cache_entry_renewed); the
 * invariants are listed in fuzz_cache_policy.c's opening comment. */
#include "cache_policy_model.h"
#include "fuzz.h"
#include <curl/curl.h>
#include <ctype.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Whether some Cache-Control line's value contains the directive name (any case). */
bool cc_mentions(const struct line *hdr, size_t n_hdr, const char *word)
{
    size_t w = strlen(word);
    for (size_t i = 0; i < n_hdr; i++) {
        const char *colon = memchr(hdr[i].p, ':', hdr[i].n);
        struct http_slice name = { hdr[i].p, colon ? (size_t)(colon - hdr[i].p) : 0 };
        while (name.n && (name.p[name.n - 1] == ' ' || name.p[name.n - 1] == '\t'))
            name.n--;
        if (!colon || !http_slice_ieq(name, "cache-control"))
            continue;
        const char *v = colon + 1, *end = hdr[i].p + hdr[i].n;
        for (; (size_t)(end - v) >= w; v++)
            if (http_slice_ieq((struct http_slice){ v, w }, word))
                return true;
    }
    return false;
}

static void check_stale(const struct response_policy *p, const struct cache_rule *r, int64_t *swr, int64_t *sie)
{
    *swr = *sie = -7;
    cache_stale_windows(p, r, swr, sie);
    FUZZ_CHECK(*swr >= 0 && *sie >= 0);
    int64_t want_swr = r->stale_while_revalidate_ms, want_sie = r->stale_if_error_ms;
    if (r->respect_cache_control && (p->must_revalidate || p->no_cache)) {
        want_swr = want_sie = 0;
    } else if (r->respect_cache_control) {
        if (p->swr_s >= 0)
            want_swr = p->swr_s * 1000;
        if (p->sie_s >= 0)
            want_sie = p->sie_s * 1000;
    }
    FUZZ_CHECK(*swr == want_swr && *sie == want_sie);
}

/* RFC 9110 5.6.2 tchar, spelled out (NUL is not one). */
static bool model_tchar(unsigned char c)
{
    static const char extra[] = "!#$%&'*+-.^_`|~";
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
        || (c && memchr(extra, c, sizeof extra - 1));
}

/* A stored header line as the entry reads it: a non-empty token, ':', the value without
 * the SP/HT around it. False for anything else (the entry skips such lines). */
static bool model_line(struct line l, struct http_slice *name, struct http_slice *value)
{
    const char *colon = memchr(l.p, ':', l.n);
    if (!colon)
        return false;
    size_t name_n = (size_t)(colon - l.p);   /* white space before the colon is not the name's */
    while (name_n && (l.p[name_n - 1] == ' ' || l.p[name_n - 1] == '\t'))
        name_n--;
    if (!name_n)
        return false;
    for (size_t i = 0; i < name_n; i++)
        if (!model_tchar((unsigned char)l.p[i]))
            return false;
    const char *v = colon + 1, *end = l.p + l.n;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    *name = (struct http_slice){ l.p, name_n };
    *value = (struct http_slice){ v, (size_t)(end - v) };
    return true;
}

/* The value of the last line named `name`, or an empty slice. */
static struct http_slice model_last(const struct line *hdr, size_t n_hdr, const char *name)
{
    struct http_slice got = { "", 0 }, nm, v;
    for (size_t i = 0; i < n_hdr; i++)
        if (model_line(hdr[i], &nm, &v) && http_slice_ieq(nm, name))
            got = v;
    return got;
}

static bool slice_eq(struct http_slice a, struct http_slice b)
{
    return a.n == b.n && (!a.n || !memcmp(a.p, b.p, a.n));
}

/* An opaque tag for weak comparison: without a leading "W/" (when a tag follows it). */
static struct http_slice weak_tag(struct http_slice t)
{
    if (t.n > 2 && !memcmp(t.p, "W/", 2))
        return (struct http_slice){ t.p + 2, t.n - 2 };
    return t;
}

/* Whether an If-None-Match value names etag (non-empty) under weak comparison: its members
 * are separated by commas outside double quotes and trimmed of SP/HT; "*" names any. */
static bool model_etag_listed(struct http_slice list, struct http_slice etag)
{
    struct http_slice want = weak_tag(etag);
    size_t start = 0;
    bool quoted = false;
    for (size_t i = 0; i <= list.n; i++) {
        if (i < list.n && list.p[i] == '"')
            quoted = !quoted;
        if (i < list.n && (quoted || list.p[i] != ','))
            continue;
        struct http_slice m = { list.p + start, i - start };
        while (m.n && (m.p[0] == ' ' || m.p[0] == '\t')) {
            m.p++;
            m.n--;
        }
        while (m.n && (m.p[m.n - 1] == ' ' || m.p[m.n - 1] == '\t'))
            m.n--;
        if (m.n == 1 && m.p[0] == '*')
            return true;
        if (m.n && slice_eq(weak_tag(m), want))
            return true;
        start = i + 1;
    }
    return false;
}

/* curl_getdate of an HTTP-date, > 0 when it parses (cache.c reads dates up to 127 bytes). */
static bool model_date_parses(struct http_slice v)
{
    char tmp[128];
    if (v.n >= sizeof tmp)
        return false;
    memcpy(tmp, v.p, v.n);
    tmp[v.n] = 0;
    return curl_getdate(tmp, NULL) > 0;
}

static void check_not_modified(const struct cache_entry *e, struct http_slice etag, struct http_slice lm)
{
    bool nm = cache_entry_not_modified(e, &req);
    FUZZ_CHECK(nm == cache_entry_not_modified(e, &req));
    const struct http_header *inm = next_named(&req, "if-none-match", 0);
    if (e->status != 200 || (!etag.n && !lm.n && !inm))
        FUZZ_CHECK(!nm);
    if (inm) {                         /* If-Modified-Since does not count then */
        bool listed = false;           /* (`*` matches an entry without an ETag too) */
        for (const struct http_header *h = inm; h; h = next_named(&req, "if-none-match", (size_t)(h - req.headers) + 1))
            listed |= model_etag_listed(h->value, etag);
        FUZZ_CHECK(nm == (e->status == 200 && listed));
        return;
    }
    const struct http_header *ims = next_named(&req, "if-modified-since", 0);
    if (nm)
        FUZZ_CHECK(lm.n && ims && model_date_parses(lm) && model_date_parses(ims->value));
    if (e->status == 200 && lm.n && ims && slice_eq(ims->value, lm) && model_date_parses(lm))
        FUZZ_CHECK(nm);
}

static bool kept_in_304(struct http_slice name)
{
    static const char *const keep[] = { "cache-control", "content-location", "date", "etag", "expires", "vary",
                                        "last-modified" };
    for (size_t i = 0; i < sizeof keep / sizeof keep[0]; i++)
        if (http_slice_ieq(name, keep[i]))
            return true;
    return false;
}

/* What a 304 carries: the kept lines, in order, as "Name: value" CRLF. */
static size_t model_304(const struct line *hdr, size_t n_hdr, char *buf, size_t cap)
{
    struct out o = { buf, 0, cap };
    struct http_slice name, value;
    for (size_t i = 0; i < n_hdr; i++)
        if (model_line(hdr[i], &name, &value) && kept_in_304(name)) {
            emit(&o, name.p, name.n);
            emits(&o, ": ");
            emit(&o, value.p, value.n);
            emits(&o, "\r\n");
        }
    return o.n;
}

/* The next CRLF-terminated line of [*p, end), its CRLF included; false at the end. */
static bool next_304_line(const char **p, const char *end, struct http_slice *l)
{
    if (*p == end)
        return false;
    const char *nl = memchr(*p, '\n', (size_t)(end - *p));
    FUZZ_CHECK(nl && nl > *p && nl[-1] == '\r');
    *l = (struct http_slice){ *p, (size_t)(nl + 1 - *p) };
    *p = nl + 1;
    return true;
}

/* out[0, n) is a sequence of kept lines, in order a subsequence of full[0, full_n). */
static void check_304_lines(const char *out, size_t n, const char *full, size_t full_n)
{
    const char *p = out, *end = out + n, *f = full, *fend = full + full_n;
    struct http_slice l, fl;
    while (next_304_line(&p, end, &l)) {
        const char *colon = memchr(l.p, ':', l.n);
        FUZZ_CHECK(colon);
        FUZZ_CHECK(kept_in_304((struct http_slice){ l.p, (size_t)(colon - l.p) }));
        bool found = false;
        while (!found && next_304_line(&f, fend, &fl))
            found = slice_eq(l, fl);
        FUZZ_CHECK(found);
    }
}

static size_t h304_into(const struct cache_entry *e, size_t cap, char **out)
{
    *out = malloc(cap ? cap : 1);
    if (!*out)
        abort();
    size_t n = cache_entry_304_headers(e, *out, cap);
    FUZZ_CHECK(n <= cap);
    return n;
}

static void check_304(const struct cache_entry *e, const struct line *hdr, size_t n_hdr)
{
    /* a kept line grows by at most the ": " and CR it may lack */
    size_t big = 2 * e->headers_len + 16;
    char *full, *want = malloc(big);
    if (!want)
        abort();
    size_t nf = h304_into(e, big, &full);
    size_t nw = model_304(hdr, n_hdr, want, big);
    FUZZ_CHECK(nf == nw && !memcmp(full, want, nf));
    free(want);
    check_304_lines(full, nf, full, nf);
    const size_t caps[] = { 0, 1, 16, nf / 2, nf ? nf - 1 : 0, nf, nf + 1 };
    for (size_t i = 0; i < sizeof caps / sizeof caps[0]; i++) {
        char *s;
        size_t ns = h304_into(e, caps[i], &s);
        if (caps[i] >= nf)
            FUZZ_CHECK(ns == nf && !memcmp(s, full, nf));
        check_304_lines(s, ns, full, nf);
        free(s);
    }
    free(full);
}

/* Renews e and releases it (a copy keeps its bytes to compare with). */
static void check_renewed(struct cache_entry *e, int64_t ttl, int64_t keep)
{
    int status = e->status, upstream = e->upstream;
    struct cache_entry *r = cache_entry_renewed(e, ttl, keep);
    if (!r)
        abort();
    struct cache_entry *copy = cache_entry_new(e->key, e->key_len, e->status, e->reason, e->reason_len, e->headers,
                                               e->headers_len, e->vary, e->vary_len, e->vary_values,
                                               e->vary_values_len, e->body, e->body_len, 1);
    if (!copy)
        abort();
    cache_entry_release(e);            /* r must not point into it (ASan) */
    FUZZ_CHECK(atomic_load(&r->refs) == 1 && r->status == status && r->upstream == upstream);
#define SAME(f) FUZZ_CHECK(r->f##_len == copy->f##_len && (!r->f##_len || !memcmp(r->f, copy->f, r->f##_len)))
    SAME(key);
    SAME(reason);
    SAME(headers);
    SAME(vary);
    SAME(vary_values);
    SAME(body);
#undef SAME
    FUZZ_CHECK(r->expires_at_ms >= r->stored_at_ms && r->expires_at_ms - r->stored_at_ms == ttl);
    FUZZ_CHECK(r->keep_until_ms == r->expires_at_ms + keep);
    cache_entry_release(copy);
    cache_entry_release(r);
}

/* Entries stored for the request with the response's header lines (hdr, joined with CRLF
 * into eh), one per status. */
void check_entry(const char *key, size_t key_len, const char *eh, size_t eh_len, const struct line *hdr,
               size_t n_hdr, const struct response_policy *p, const char *vary, size_t vary_len,
                        const char *body, size_t body_len, int other_status)
{
    const int statuses[] = { 200, other_status };
    for (size_t s = 0; s < sizeof statuses / sizeof statuses[0]; s++) {
        struct cache_entry *e = cache_entry_new(key, key_len, statuses[s], "OK", 2, eh, eh_len, vary, vary_len,
                                                "v\n", 2, body, body_len, 60000);
        if (!e)
            abort();
        e->upstream = 3;
        int64_t keep = 0;
        for (size_t i = 0; i < up.n_cache_rules; i++) {
            int64_t swr, sie, eswr = -7, esie = -7;
            check_stale(p, &rules[i], &swr, &sie);
            cache_entry_stale_windows(e, &rules[i], &eswr, &esie);
            FUZZ_CHECK(eswr == swr && esie == sie);
            if (!i)
                keep = swr > sie ? swr : sie;
        }

        struct http_slice etag = { NULL, 7 }, lm = { NULL, 7 };
        cache_entry_validators(e, &etag, &lm);
        FUZZ_CHECK(etag.p && lm.p);
        FUZZ_CHECK(!etag.n || fuzz_inside(e->headers, e->headers_len, etag.p, etag.n));
        FUZZ_CHECK(!lm.n || fuzz_inside(e->headers, e->headers_len, lm.p, lm.n));
        FUZZ_CHECK(slice_eq(etag, model_last(hdr, n_hdr, "etag")));
        FUZZ_CHECK(slice_eq(lm, model_last(hdr, n_hdr, "last-modified")));

        check_not_modified(e, etag, lm);
        check_304(e, hdr, n_hdr);

        /* upstream.c's renew(): the rule's ttl, kept for the longer window or the ttl; and
         * an entry renewed twice */
        struct cache_entry *again = cache_entry_renewed(e, rules[0].ttl_ms, 0);
        if (!again)
            abort();
        check_renewed(again, 1, keep);
        check_renewed(e, rules[0].ttl_ms, keep > rules[0].ttl_ms ? keep : rules[0].ttl_ms);
    }
}
