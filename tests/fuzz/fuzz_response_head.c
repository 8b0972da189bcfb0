/* fuzz_response_head.c — the response-head handling of the upstream path: the status
 * line, header lines split into name and value, the framing verdict (shim/http.c) and
 * the storage policy (shim/cache.c), fed line by line as libcurl hands them over. Checks:
 * every slice lies inside its line; a value has no surrounding white space; the framing
 * verdict agrees with a reference reading of the same lines (two different lengths, an
 * invalid length, or any Transfer-Encoding but one "chunked" is broken; a length with
 * chunked is unstorable); the policy's verdict is one of the reasons, with a positive TTL
 * when it allows storing. */
#include "fuzz.h"
#include "../../shim/cache.h"
#include "../../shim/http.h"
#include <stdlib.h>
#include <string.h>

static bool inside(struct http_slice s, const char *lo, size_t n)
{
    return s.n == 0 || (s.p >= lo && s.p + s.n <= lo + n);
}

/* The reference: a strict, slow reading of one Content-Length value list. */
static bool ref_length(struct http_slice v, long long *out)
{
    long long val = -1;
    size_t i = 0;
    if (v.n == 0)
        return false;
    while (i <= v.n) {
        size_t s = i;
        while (i < v.n && v.p[i] != ',')
            i++;
        size_t a = s, b = i;
        while (a < b && (v.p[a] == ' ' || v.p[a] == '\t'))
            a++;
        while (b > a && (v.p[b - 1] == ' ' || v.p[b - 1] == '\t'))
            b--;
        if (b == a || b - a > 18)
            return false;
        long long x = 0;
        for (size_t k = a; k < b; k++) {
            if (v.p[k] < '0' || v.p[k] > '9')
                return false;
            x = x * 10 + (v.p[k] - '0');
        }
        if (val >= 0 && x != val)
            return false;
        val = x;
        i++;
    }
    *out = val;
    return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf = malloc(size ? size : 1);
    if (!buf)
        return 0;
    memcpy(buf, data, size);
    struct http_framing f;
    struct response_policy pol;
    http_framing_init(&f);
    cache_policy_init(&pol);
    bool broken = false;
    int n_te = 0;
    long long length = -1;
    bool chunked = false, have_status = false;
    int status = 0;
    size_t pos = 0;
    for (int lines = 0; pos < size && lines < 200; lines++) {
        const char *nl = memchr(buf + pos, '\n', size - pos);
        size_t end = nl ? (size_t)(nl - buf) : size, len = end - pos;
        const char *line = buf + pos;
        if (len && line[len - 1] == '\r')
            len--;
        if (!have_status) {
            struct http_slice reason;
            if (http_parse_status_line(line, len, &status, &reason)) {
                FUZZ_CHECK(status >= 100 && status <= 999 && inside(reason, line, len));
                have_status = true;
            }
        } else {
            struct http_slice name, value;
            if (http_split_header_line(line, len, &name, &value)) {
                FUZZ_CHECK(name.n > 0 && inside(name, line, len) && inside(value, line, len));
                FUZZ_CHECK(value.n == 0 || (value.p[0] != ' ' && value.p[0] != '\t' && value.p[value.n - 1] != ' '
                                       && value.p[value.n - 1] != '\t'));
                bool framing = http_framing_header(&f, name, value);
                if (http_slice_ieq(name, "content-length")) {
                    long long x;
                    FUZZ_CHECK(framing);
                    if (!ref_length(value, &x) || (length >= 0 && x != length))
                        broken = true;
                    else
                        length = x;
                } else if (http_slice_ieq(name, "transfer-encoding")) {
                    FUZZ_CHECK(framing);
                    if (++n_te > 1 || !http_slice_ieq(value, "chunked"))
                        broken = true;
                    else
                        chunked = true;
                } else {
                    FUZZ_CHECK(!framing);
                    cache_policy_header(&pol, name, value);
                }
            }
        }
        pos = end + 1;
    }
    enum http_framing_verdict v = http_framing_verdict(&f);
    FUZZ_CHECK(broken ? v == HTTP_FRAMING_BROKEN
                 : v == (chunked && length >= 0 ? HTTP_FRAMING_UNSTORABLE : HTTP_FRAMING_OK));
    if (!broken)
        FUZZ_CHECK(f.content_length == length && f.chunked == chunked);
    struct cache_rule rule;
    memset(&rule, 0, sizeof rule);
    rule.ttl_ms = 600000;
    rule.n_status = 2;
    rule.status[0] = 200;
    rule.status[1] = status ? status : 404;
    rule.respect_cache_control = size & 1;
    int64_t ttl = -1;
    enum not_stored_reason why = cache_policy_decide(&pol, &rule, status ? status : 200, &ttl);
    FUZZ_CHECK(why >= NS_NONE && why < NS__COUNT);
    if (why == NS_NONE)
        FUZZ_CHECK(ttl > 0 && ttl <= rule.ttl_ms);
    free(buf);
    return 0;
}
