/* rules.c — owns rules.conf: parsing (strict, every error is "file:line: what", a key
 * said twice one of them), defaults, and the stats socket's path pattern. The upstreams'
 * address table, the only part that changes after load, is rules_addr.c's. */
#include "rules.h"
#include "real.h"
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

int64_t rules_parse_duration_ms(const char *s, bool *ok)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    *ok = false;
    if (end == s || errno || !(v >= 0))   /* !(v >= 0): NaN too */
        return 0;
    double mult;
    if (!strcmp(end, "ms")) mult = 1;
    else if (!strcmp(end, "s")) mult = 1000;
    else if (!strcmp(end, "m")) mult = 60000;
    else if (!strcmp(end, "h")) mult = 3600000;
    else if (!strcmp(end, "d")) mult = 86400000;
    else return 0;
    double ms = v * mult;
    if (ms > 9.0e15)
        return 0;
    *ok = true;
    return (int64_t)ms;
}

int64_t rules_parse_size(const char *s, bool *ok)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    *ok = false;
    if (end == s || errno || !(v >= 0))   /* !(v >= 0): NaN too */
        return 0;
    double mult;
    if (!*end || !strcasecmp(end, "B")) mult = 1;
    else if (!strcasecmp(end, "KB")) mult = 1024.0;
    else if (!strcasecmp(end, "MB")) mult = 1024.0 * 1024;
    else if (!strcasecmp(end, "GB")) mult = 1024.0 * 1024 * 1024;
    else return 0;
    double b = v * mult;
    if (b > 9.0e15)
        return 0;
    *ok = true;
    return (int64_t)b;
}

struct parser {
    const char *path;
    int line;
    char *err;
    int password_file_line, sentinel_password_line, cache_line;   /* where those keys were, for the checks at the end */
    int cache_said;                    /* the line of the cache key, once it has been read */
    unsigned globals_said, upstream_said;   /* keys said in [global], in this [upstream] */
};

static int fail(struct parser *p, const char *fmt, ...)
{
    int n = snprintf(p->err, RULES_ERR_MAX, "%s:%d: ", p->path, p->line);
    va_list ap;
    va_start(ap, fmt);
    if (n >= 0 && n < RULES_ERR_MAX)
        vsnprintf(p->err + n, RULES_ERR_MAX - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

/* A key said a second time is an error, not a silent "the last one wins". */
static int said_once(struct parser *p, unsigned *said, const char *const *keys, unsigned n, const char *key)
{
    for (unsigned i = 0; i < n && i < 32; i++)
        if (!strcmp(key, keys[i])) {
            if (*said & (1u << i))
                return fail(p, "'%s' is said twice", key);
            *said |= 1u << i;
        }
    return 0;
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1]))
        *--e = 0;
    return s;
}

/* The first %p of a stats_socket pattern that is one (not the tail of a "%%"), or NULL. */
static const char *pid_token(const char *pattern)
{
    for (const char *c = pattern; *c; c++)
        if (*c == '%' && c[1] == 'p')
            return c;
        else if (*c == '%' && c[1])
            c++;
    return NULL;
}

static void strip_comment(char *s)
{
    /* '#' starts a comment at line start or after white space, so globs and
     * values may still contain '#' when written without a space before it */
    for (char *c = s; *c; c++)
        if (*c == '#' && (c == s || isspace((unsigned char)c[-1]))) {
            *c = 0;
            return;
        }
}

static int parse_host_port(struct parser *p, char *spec, struct upstream_rule *u)
{
    char *colon;
    if (spec[0] == '[') {
        char *close = strchr(spec, ']');
        if (!close || close[1] != ':')
            return fail(p, "upstream '%s': expected [IPv6]:PORT", spec);
        *close = 0;
        colon = close + 1;
        spec++;
    } else {
        colon = strrchr(spec, ':');
        if (!colon)
            return fail(p, "upstream '%s': expected HOST:PORT", spec);
        *colon = 0;
    }
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port <= 0 || port > 65535 || end == colon + 1)
        return fail(p, "upstream port '%s' is not a number from 1 to 65535", colon + 1);
    if (!*spec || strlen(spec) >= sizeof u->host)
        return fail(p, "upstream host is empty or too long");
    for (const char *c = spec; *c; c++)
        if (!isalnum((unsigned char)*c) && !strchr(".-_:", *c))
            return fail(p, "upstream host '%s' has an invalid character '%c'", spec, *c);
    snprintf(u->host, sizeof u->host, "%s", spec);
    u->port = (uint16_t)port;
    snprintf(u->label, sizeof u->label, strchr(spec, ':') ? "[%s]:%u" : "%s:%u", spec, u->port);
    struct in6_addr a6;
    struct in_addr a4;
    if (inet_pton(AF_INET, spec, &a4) == 1) {
        u->host_is_literal = true;
        u->addrs[0].family = AF_INET;
        memcpy(u->addrs[0].bytes, &a4, 4);
        u->n_addrs = 1;
    } else if (inet_pton(AF_INET6, spec, &a6) == 1 && IN6_IS_ADDR_V4MAPPED(&a6)) {
        u->host_is_literal = true;     /* rules_match_addr looks mapped addresses up as IPv4 */
        u->addrs[0].family = AF_INET;
        memcpy(u->addrs[0].bytes, a6.s6_addr + 12, 4);
        u->n_addrs = 1;
    } else if (inet_pton(AF_INET6, spec, &a6) == 1) {
        u->host_is_literal = true;
        u->addrs[0].family = AF_INET6;
        memcpy(u->addrs[0].bytes, &a6, 16);
        u->n_addrs = 1;
    }
    return 0;
}

static int parse_list(struct parser *p, const char *opt, char *val, char dst[][64], size_t *n)
{
    for (char *save = NULL, *tok = strtok_r(val, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (*n == RULES_MAX_LIST)
            return fail(p, "%s: at most %d entries", opt, RULES_MAX_LIST);
        if (!*tok || strlen(tok) >= 64)
            return fail(p, "%s: empty or over-long entry", opt);
        snprintf(dst[(*n)++], 64, "%s", tok);
    }
    return 0;
}

static int parse_cache_rule(struct parser *p, char *args, struct upstream_rule *u)
{
    if (u->n_cache_rules == RULES_MAX_CACHE_RULES)
        return fail(p, "too many cache rules in one upstream (max %d)", RULES_MAX_CACHE_RULES);
    struct cache_rule *grown = realloc(u->cache_rules, (u->n_cache_rules + 1) * sizeof *grown);
    if (!grown)
        return fail(p, "out of memory");
    u->cache_rules = grown;
    struct cache_rule *r = &u->cache_rules[u->n_cache_rules];
    memset(r, 0, sizeof *r);
    r->line = p->line;
    char *save = NULL;
    char *method = strtok_r(args, " \t", &save);
    char *glob = strtok_r(NULL, " \t", &save);
    if (!method || !glob)
        return fail(p, "expected: cache METHOD PATH-GLOB ttl=DURATION [options]");
    if (strcmp(method, "GET") && strcmp(method, "HEAD") && strcmp(method, "POST")
        && strcmp(method, "PUT") && strcmp(method, "DELETE") && strcmp(method, "PATCH")
        && strcmp(method, "OPTIONS") && strcmp(method, "*"))
        return fail(p, "unknown method '%s'", method);
    if (glob[0] != '/' && strcmp(glob, "*"))
        return fail(p, "path glob '%s' must start with '/'", glob);
    if (strlen(glob) >= sizeof r->glob)
        return fail(p, "path glob too long");
    snprintf(r->method, sizeof r->method, "%s", method);
    snprintf(r->glob, sizeof r->glob, "%s", glob);
    bool have_ttl = false;
    unsigned said = 0;
    static const char *const once[] = { "ttl", "respect_cache_control", "stale_while_revalidate", "stale_if_error",
                                        "coalesce", "ignore_query", "key_headers" };
    for (char *opt = strtok_r(NULL, " \t", &save); opt; opt = strtok_r(NULL, " \t", &save)) {
        char *eq = strchr(opt, '=');
        if (!eq || eq == opt || !eq[1])
            return fail(p, "option '%s': expected NAME=VALUE", opt);
        *eq = 0;
        if (said_once(p, &said, once, sizeof once / sizeof once[0], opt))
            return -1;
        char *val = eq + 1;
        bool ok;
        if (!strcmp(opt, "ttl")) {
            r->ttl_ms = rules_parse_duration_ms(val, &ok);
            if (!ok || r->ttl_ms <= 0)
                return fail(p, "ttl '%s': expected a duration like 500ms, 30s, 10m, 1h, 1d", val);
            have_ttl = true;
        } else if (!strcmp(opt, "ignore_query")) {
            if (parse_list(p, opt, val, r->ignore_query, &r->n_ignore_query))
                return -1;
        } else if (!strcmp(opt, "key_headers")) {
            if (parse_list(p, opt, val, r->key_headers, &r->n_key_headers))
                return -1;
        } else if (!strcmp(opt, "status")) {
            char tmp[RULES_MAX_LIST][64];
            size_t n = 0;
            if (parse_list(p, opt, val, tmp, &n))
                return -1;
            for (size_t i = 0; i < n; i++) {
                char *end;
                long code = strtol(tmp[i], &end, 10);
                if (*end || code < 100 || code > 599)
                    return fail(p, "status '%s' is not an HTTP status code", tmp[i]);
                /* a stored 206 would answer requests for the whole body with a part of it */
                if (code < 200 || code == 206 || code == 304)
                    return fail(p, "status %ld is never cached (%s)", code,
                                code == 206 ? "a partial body" : code == 304 ? "no body: a 304 renews a stored entry"
                                                                             : "an interim response");
                if (r->n_status == RULES_MAX_LIST)   /* status= may be repeated */
                    return fail(p, "%s: at most %d entries", opt, RULES_MAX_LIST);
                r->status[r->n_status++] = (int)code;
            }
        } else if (!strcmp(opt, "respect_cache_control")) {
            if (!strcmp(val, "yes")) r->respect_cache_control = true;
            else if (!strcmp(val, "no")) r->respect_cache_control = false;
            else return fail(p, "respect_cache_control takes yes or no, not '%s'", val);
        } else if (!strcmp(opt, "stale_while_revalidate") || !strcmp(opt, "stale_if_error")) {
            int64_t ms = rules_parse_duration_ms(val, &ok);
            if (!ok || ms < 0)
                return fail(p, "%s '%s': expected a duration like 30s, 10m, 1h", opt, val);
            if (!strcmp(opt, "stale_if_error"))
                r->stale_if_error_ms = ms;
            else
                r->stale_while_revalidate_ms = ms;
        } else if (!strcmp(opt, "coalesce")) {
            if (!strcmp(val, "on")) r->no_coalesce = false;
            else if (!strcmp(val, "off")) r->no_coalesce = true;
            else return fail(p, "coalesce takes on or off, not '%s'", val);
        } else {
            return fail(p, "unknown cache option '%s'", opt);
        }
    }
    if (!have_ttl)
        return fail(p, "cache rule needs ttl=DURATION");
    if (r->n_status == 0)
        r->status[r->n_status++] = 200;
    u->n_cache_rules++;
    return 0;
}

/* origin = https://HOST[:PORT] (an IPv6 literal in brackets) */
static int parse_origin(struct parser *p, const char *val, struct upstream_rule *u)
{
    if (strncmp(val, "https://", 8))
        return fail(p, "origin '%s': expected https://HOST[:PORT]", val);
    const char *h = val + 8, *end = h + strcspn(h, "/"), *colon;
    if (*end && end[1])
        return fail(p, "origin '%s': no path: the app's own path is sent", val);
    size_t hl;
    if (*h == '[') {
        const char *close = memchr(h, ']', (size_t)(end - h));
        if (!close)
            return fail(p, "origin '%s': expected [IPv6]", val);
        colon = close[1] == ':' ? close + 1 : NULL;
        h++;
        hl = (size_t)(close - h);
    } else {
        colon = memchr(h, ':', (size_t)(end - h));
        hl = (size_t)((colon ? colon : end) - h);
    }
    if (!hl || hl >= sizeof u->origin_host)
        return fail(p, "origin '%s': the host is empty or too long", val);
    for (size_t i = 0; i < hl; i++)
        if (!isalnum((unsigned char)h[i]) && !strchr(".-_:", h[i]))
            return fail(p, "origin '%s': the host has an invalid character '%c'", val, h[i]);
    long port = 443;
    if (colon) {
        char digits[8];
        size_t n = (size_t)(end - colon - 1);
        char *stop;
        if (!n || n >= sizeof digits)
            return fail(p, "origin '%s': the port is not a number from 1 to 65535", val);
        memcpy(digits, colon + 1, n);
        digits[n] = 0;
        port = strtol(digits, &stop, 10);
        if (*stop || port <= 0 || port > 65535)
            return fail(p, "origin '%s': the port is not a number from 1 to 65535", val);
    }
    memcpy(u->origin_host, h, hl);
    u->origin_host[hl] = 0;
    u->origin_port = (uint16_t)port;
    u->origin_https = true;
    return 0;
}

/* One host: the same name in any case, or the same address however it is written
 * (::1 and 0:0::1; the first section would take every connection, the second none). */
static bool same_host(const char *a, const char *b)
{
    unsigned char x[16], y[16];
    int family = strchr(a, ':') ? AF_INET6 : AF_INET;
    if (inet_pton(family, a, x) == 1 && inet_pton(family, b, y) == 1)
        return !memcmp(x, y, family == AF_INET6 ? 16 : 4);
    return !strcasecmp(a, b);
}

/* NAME = VALUE lines inside an [upstream] block */
static int parse_upstream_setting(struct parser *p, const char *key, const char *val, struct upstream_rule *u)
{
    static const char *const keys[] = { "tls", "tls_ca_file", "origin", "protocol", "pool_max_per_host",
                                        "redis_pinned_max" };
    if (said_once(p, &p->upstream_said, keys, sizeof keys / sizeof keys[0], key))
        return -1;
    if (!strcmp(key, "tls")) {
        if (!strcmp(val, "tunnel")) u->tls = TLS_TUNNEL;
        else if (!strcmp(val, "intercept")) u->tls = TLS_INTERCEPT;
        else return fail(p, "tls takes tunnel or intercept, not '%s'", val);
        return 0;
    }
    if (!strcmp(key, "tls_ca_file")) {
        if (strlen(val) >= sizeof u->tls_ca_file)
            return fail(p, "tls_ca_file is longer than %zu bytes", sizeof u->tls_ca_file - 1);
        if (access(val, R_OK) != 0)
            return fail(p, "tls_ca_file %s: %s", val, strerror(errno));
        snprintf(u->tls_ca_file, sizeof u->tls_ca_file, "%s", val);
        return 0;
    }
    if (!strcmp(key, "origin"))
        return parse_origin(p, val, u);
    if (!strcmp(key, "protocol")) {
        if (!strcmp(val, "http")) u->protocol = PROTO_HTTP;
        else if (!strcmp(val, "redis")) u->protocol = PROTO_REDIS;
        else return fail(p, "protocol takes http or redis, not '%s'", val);
        return 0;
    }
    if (!strcmp(key, "pool_max_per_host") || !strcmp(key, "redis_pinned_max")) {
        char *end;
        long lo = strcmp(key, "redis_pinned_max") ? 1 : 0;
        long n = strtol(val, &end, 10);
        if (!*val || *end || n < lo || n > RULES_POOL_MAX)
            return fail(p, "%s '%s': expected a number from %ld to %d", key, val, lo, RULES_POOL_MAX);
        if (lo) {
            u->pool_max = (unsigned)n;
        } else {
            u->redis_pinned_max = (unsigned)n;   /* 0: every connection that needs one goes direct */
            u->redis_pinned_set = true;
        }
        return 0;
    }
    return fail(p, "unknown setting '%s' in [upstream] (expected cache rules, tls, tls_ca_file, origin, protocol, "
                   "pool_max_per_host or redis_pinned_max)", key);
}

unsigned rules_pool_max(const struct shim_config *cfg, const struct upstream_rule *u)
{
    if (u->pool_max)
        return u->pool_max;
    return u->protocol == PROTO_REDIS ? RULES_REDIS_POOL_DEFAULT : cfg->pool_max_per_host;
}

/* What a section may not combine: cache rules, origin and interception are HTTP's. */
static int check_upstream(struct parser *p, struct upstream_rule *u)
{
    if (u->protocol != PROTO_REDIS)
        return 0;
    if (!u->redis_pinned_set)
        u->redis_pinned_max = RULES_REDIS_PINNED_DEFAULT;
    if (u->n_cache_rules || u->origin_https || u->tls == TLS_INTERCEPT)
        return fail(p, "[upstream %s] is protocol = redis: cache rules, origin and tls = intercept are for "
                       "protocol = http", u->label);
    return 0;
}

/* ---- [global]: every key, its default and how it is read, in one table ---- */

enum global_kind { G_COUNT, G_DURATION, G_MICROS, G_SWITCH, G_SIZE, G_CACHE, G_PREFIX, G_SECRET, G_PASSWORD, G_SOCKET };
#define BUSY_POLL_MAX_US 1000          /* a longer poll would burn a core for what a sleep costs */

struct global_key {
    const char *name;
    enum global_kind kind;
    const char *default_value;         /* read like a value from the file; NULL: none */
    size_t at;                         /* offsetof the field in struct shim_config */
    long min;                          /* G_COUNT: the smallest allowed (the largest is RULES_POOL_MAX) */
};

#define AT(field) offsetof(struct shim_config, field)
static const struct global_key global_keys[] = {
    /* Envoy's circuit breaker: caps storms, never throttles a service */
    { "pool_max_per_host", G_COUNT, "1024", AT(pool_max_per_host), 1 },
    { "pool_idle_max", G_COUNT, "16", AT(pool_idle_max), 0 },
    { "pool_queue_timeout", G_DURATION, "10s", AT(pool_queue_timeout_ms), 0 },
    { "pool_idle_timeout", G_DURATION, "60s", AT(pool_idle_timeout_ms), 0 },
    { "upstream_timeout", G_DURATION, "30s", AT(upstream_timeout_ms), 0 },
    { "fastpath", G_SWITCH, "on", AT(fastpath), 0 },
    { "busy_poll", G_MICROS, "50us", AT(busy_poll_us), 0 },     /* the kernel's net.core.busy_poll, in the engine */
    { "coalesce", G_SWITCH, "on", AT(coalesce), 0 },
    { "coalesce_timeout", G_DURATION, "5s", AT(coalesce_timeout_ms), 0 },      /* nginx's proxy_cache_lock_timeout */
    { "uncacheable_ttl", G_DURATION, "2m", AT(uncacheable_ttl_ms), 0 },        /* Varnish's hit-for-miss */
    { "redis_lock_ttl", G_DURATION, "10s", AT(redis_lock_ttl_ms), 0 },
    { "cache", G_CACHE, "memory", AT(cache), 0 },
    { "redis_prefix", G_PREFIX, "httpshim:", AT(redis_prefix), 0 },
    { "redis_timeout", G_DURATION, "50ms", AT(redis_timeout_ms), 0 },
    { "redis_max_object", G_SIZE, "1MB", AT(redis_max_object), 0 },
    { "redis_password_file", G_PASSWORD, NULL, AT(redis_password), 0 },
    { "redis_sentinel_password_file", G_PASSWORD, NULL, AT(redis_sentinel_password), 0 },
    { "redis_secret_file", G_SECRET, NULL, AT(redis_secret), 0 },
    { "memory_max", G_SIZE, "64MB", AT(memory_max), 0 },
    { "max_object", G_SIZE, "1MB", AT(max_object), 0 },
    { "stats_socket", G_SOCKET, "/tmp/httpshim-%u/%p.sock", AT(stats_socket), 0 },
};
#undef AT

size_t rules_global_keys(void) { return sizeof global_keys / sizeof global_keys[0]; }

const char *rules_global_key(size_t i, const char **default_value)
{
    if (i >= rules_global_keys())
        return NULL;
    *default_value = global_keys[i].default_value;
    return global_keys[i].name;
}

static int set_global(struct parser *p, const struct global_key *k, const char *val, struct shim_config *cfg)
{
    void *field = (char *)cfg + k->at;
    bool ok = false;
    const char *key = k->name;
    switch (k->kind) {
    case G_COUNT: {
        char *end;
        long n = strtol(val, &end, 10);
        if (!*val || *end || n < k->min || n > RULES_POOL_MAX)
            return fail(p, "%s '%s': expected a number from %ld to %d", key, val, k->min, RULES_POOL_MAX);
        *(unsigned *)field = (unsigned)n;
        return 0;
    }
    case G_DURATION: {
        int64_t ms = rules_parse_duration_ms(val, &ok);
        if (!ok || ms <= 0)
            return fail(p, "%s '%s': expected a duration like 500ms, 30s, 10m, 1h, 1d", key, val);
        *(int64_t *)field = ms;
        return 0;
    }
    case G_MICROS: {                   /* off, 0, NNus or NNms */
        long n = 0;
        if (strcmp(val, "off")) {
            char *end;
            n = strtol(val, &end, 10);
            long unit = !strcmp(end, "us") ? 1 : !strcmp(end, "ms") ? 1000 : !*end && n == 0 ? 1 : 0;
            if (end == val || !unit || n < 0 || n > BUSY_POLL_MAX_US)
                n = -1;
            else
                n *= unit;
        }
        if (n < 0 || n > BUSY_POLL_MAX_US)
            return fail(p, "%s '%s': expected off, or a time from 0us to %dus (e.g. 50us, 1ms)", key, val,
                        BUSY_POLL_MAX_US);
        *(int64_t *)field = n;
        return 0;
    }
    case G_SWITCH:
        if (strcmp(val, "on") && strcmp(val, "off"))
            return fail(p, "%s takes on or off, not '%s'", key, val);
        *(bool *)field = !strcmp(val, "on");
        return 0;
    case G_SIZE: {
        int64_t b = rules_parse_size(val, &ok);
        if (!ok || b <= 0)
            return fail(p, "%s '%s': expected a size like 512KB, 64MB, 1GB", key, val);
        *(int64_t *)field = b;
        return 0;
    }
    case G_CACHE:
        /* a second cache line would be laid over what the first set (its socket, its user,
         * its password), half of each: one tier, said once */
        if (p->cache_said)
            return fail(p, "cache is set twice (line %d first): keep one", p->cache_said);
        p->cache_said = p->line;
        if (!strcmp(val, "memory"))
            cfg->cache = CACHE_MEMORY;
        else if (!strcmp(val, "off"))
            cfg->cache = CACHE_OFF;
        else if (rules_parse_redis_url(val, cfg) == 0) {
            cfg->cache = CACHE_REDIS;
            p->cache_line = p->line;
        } else
            return fail(p, "cache: expected memory, off, redis://[[user]:password@]host:port/db, redis+unix:///path, "
                           "redis-sentinel://[[user]:password@]host:port,host:port/master/db or "
                           "redis-cluster://[[user]:password@]host:port,host:port (the value is not repeated here: "
                           "it may hold a password; a password also in redis_password_file is an error too)");
        return 0;
    case G_PREFIX:
        if (strlen(val) >= sizeof cfg->redis_prefix)
            return fail(p, "redis_prefix is longer than %zu bytes", sizeof cfg->redis_prefix - 1);
        /* every Redis key starts with it, and keys must survive `redis-cli --scan | xargs`,
         * SCAN patterns and GUIs: printable ASCII, no spaces */
        for (const char *c = val; *c; c++)
            if ((unsigned char)*c < 0x21 || (unsigned char)*c > 0x7e)
                return fail(p, "redis_prefix: byte %zu is 0x%02x; a Redis key prefix must be printable ASCII "
                               "without spaces (0x21 to 0x7e)", (size_t)(c - val) + 1, (unsigned char)*c);
        snprintf(cfg->redis_prefix, sizeof cfg->redis_prefix, "%s", val);
        return 0;
    case G_SECRET: {
        char why[RULES_ERR_MAX - 64];
        if (rules_read_secret_file(key, val, cfg->redis_secret, sizeof cfg->redis_secret, &cfg->redis_secret_len,
                                   why, sizeof why) != 0)
            return fail(p, "%s", why);
        return 0;
    }
    case G_PASSWORD: {                 /* the master's (redis_password) or the sentinels' */
        char why[RULES_ERR_MAX - 64];
        char *pw = field;
        size_t n = 0;
        bool masters = pw == cfg->redis_password;
        if (masters && cfg->redis_password[0])
            return fail(p, "redis_password_file: the cache URL has a password already; give it in one place");
        if (rules_read_secret_file(key, val, (unsigned char *)pw, RULES_PASSWORD_MAX - 1, &n, why, sizeof why) != 0)
            return fail(p, "%s", why);
        if (memchr(pw, 0, n) || memchr(pw, '\n', n))
            return fail(p, "%s %s: a password of one line without NUL bytes", key, val);
        pw[n] = 0;
        cfg->redis_password_from_file |= masters;
        *(masters ? &p->password_file_line : &p->sentinel_password_line) = p->line;
        return 0;
    }
    case G_SOCKET: {
        const char *slash = strrchr(val, '/');
        for (const char *c = val; *c; c++)
            if (*c == '%' && c[1] != 'p' && c[1] != 'u' && c[1] != '%')
                return fail(p, "stats_socket '%s': only %%p, %%u and %%%% may follow '%%'", val);
            else if (*c == '%')
                c++;
        /* one %p, in the file name: the CLI finds a process's socket by its pid there
         * (a "%%p" is a literal "%p", the same name for every process) */
        const char *pid_at = slash ? pid_token(slash) : NULL;
        if (val[0] != '/' || !pid_at || pid_token(pid_at + 2) || pid_token(val) != pid_at
            || strlen(val) >= sizeof cfg->stats_socket)
            return fail(p, "stats_socket '%s': expected an absolute path whose file name contains %%p once "
                           "(and the directory none)", val);
        snprintf(cfg->stats_socket, sizeof cfg->stats_socket, "%s", val);
        return 0;
    }
    }
    return fail(p, "%s: not a setting", key);
}

static int parse_global(struct parser *p, const char *key, const char *val, struct shim_config *cfg)
{
    for (size_t i = 0; i < rules_global_keys(); i++)
        if (!strcmp(key, global_keys[i].name)) {
            if (p->globals_said & (1u << i) && global_keys[i].kind != G_CACHE)   /* (its own says where) */
                return fail(p, "'%s' is said twice", key);
            p->globals_said |= 1u << i;
            return set_global(p, &global_keys[i], val, cfg);
        }
    return fail(p, "unknown setting '%s' in [global]", key);
}

/* Every [global] key at its default, read as the file's values are. */
static void set_defaults(struct shim_config *cfg)
{
    char err[RULES_ERR_MAX];
    struct parser p = { .path = "(defaults)", .line = 0, .err = err };
    for (size_t i = 0; i < rules_global_keys(); i++)
        if (global_keys[i].default_value)
            set_global(&p, &global_keys[i], global_keys[i].default_value, cfg);
}

int rules_load(const char *path, struct shim_config *cfg, char err[RULES_ERR_MAX])
{
    memset(cfg, 0, sizeof *cfg);
    snprintf(cfg->path, sizeof cfg->path, "%s", path);
    set_defaults(cfg);
    err[0] = 0;

    /* a regular file only: the library reads it in the constructor of every preloaded
     * program, where a FIFO would block it forever and /dev/stdin would eat its input */
    struct stat st;
    if (stat(path, &st) != 0)
        return -1;
    if (!S_ISREG(st.st_mode)) {
        snprintf(err, RULES_ERR_MAX, "%s: not a regular file", path);
        return -1;
    }
    if (st.st_size > RULES_FILE_MAX) {  /* (each exec would spend its start reading it) */
        snprintf(err, RULES_ERR_MAX, "%s: larger than %d KiB", path, RULES_FILE_MAX >> 10);
        return -1;
    }
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    struct parser p = { .path = path, .line = 0, .err = err };
    enum { NONE, GLOBAL, UPSTREAM } section = NONE;
    struct upstream_rule *u = NULL;
    char line[4096];
    int rc = 0;
    for (;;) {
        long at = ftell(f);           /* (what fgets consumed tells a NUL byte inside a line) */
        if (!fgets(line, sizeof line, f))
            break;
        p.line++;
        size_t len = strlen(line);
        if (at < 0 || ftell(f) != at + (long)len) {
            rc = fail(&p, "a NUL byte inside the line");
            break;
        }
        if (!strchr(line, '\n') && !feof(f)) {
            rc = fail(&p, "line longer than %zu bytes", sizeof line - 2);
            break;
        }
        char *s = line;
        if (p.line == 1 && !memcmp(s, "\xef\xbb\xbf", 3))
            s += 3;                   /* a UTF-8 byte order mark, as editors on Windows save */
        strip_comment(s);
        s = trim(s);
        if (!*s)
            continue;
        if (*s == '[') {
            char *close = strrchr(s, ']');
            if (!close || close[1]) {
                rc = fail(&p, "section header must end with ']'");
                break;
            }
            *close = 0;
            char *name = trim(s + 1);
            if (section == UPSTREAM && (rc = check_upstream(&p, u)))
                break;
            if (!strcmp(name, "global")) {
                section = GLOBAL;
            } else if (!strncmp(name, "upstream", 8) && isspace((unsigned char)name[8])) {
                if (cfg->n_upstreams == RULES_MAX_UPSTREAMS) {
                    rc = fail(&p, "too many upstreams (max %d)", RULES_MAX_UPSTREAMS);
                    break;
                }
                u = &cfg->upstreams[cfg->n_upstreams];
                memset(u, 0, sizeof *u);
                p.upstream_said = 0;
                u->line = p.line;
                if ((rc = parse_host_port(&p, trim(name + 8), u)))
                    break;
                for (size_t i = 0; i < cfg->n_upstreams; i++)
                    if (same_host(cfg->upstreams[i].host, u->host) && cfg->upstreams[i].port == u->port) {
                        rc = fail(&p, strchr(u->host, ':') ? "upstream [%s]:%u is already defined at line %d"
                                                           : "upstream %s:%u is already defined at line %d",
                                  u->host, u->port, cfg->upstreams[i].line);
                        break;
                    }
                if (rc)
                    break;
                cfg->n_upstreams++;
                section = UPSTREAM;
            } else {
                rc = fail(&p, "unknown section [%s] (expected [global] or [upstream HOST:PORT])", name);
                break;
            }
            continue;
        }
        if (section == UPSTREAM && !strncmp(s, "cache", 5) && isspace((unsigned char)s[5])) {
            if ((rc = parse_cache_rule(&p, s + 6, u)))
                break;
            continue;
        }
        char *eq = strchr(s, '=');
        if (section == NONE) {
            rc = fail(&p, "setting outside a section: put it under [global]");
            break;
        }
        if (!eq) {
            rc = fail(&p, section == UPSTREAM ? "expected: cache METHOD PATH-GLOB ttl=DURATION [options], "
                                                "or NAME = VALUE"
                                              : "expected: NAME = VALUE");
            break;
        }
        *eq = 0;
        char *key = trim(s), *val = trim(eq + 1);
        if (!*key || !*val) {
            rc = fail(&p, "expected: NAME = VALUE");
            break;
        }
        if ((rc = section == UPSTREAM ? parse_upstream_setting(&p, key, val, u) : parse_global(&p, key, val, cfg)))
            break;
    }
    if (!rc && section == UPSTREAM)
        rc = check_upstream(&p, u);
    /* a password file for a Redis that is not configured would be ignored without a word */
    if (!rc && p.password_file_line && cfg->cache != CACHE_REDIS) {
        p.line = p.password_file_line;
        rc = fail(&p, "redis_password_file is set but cache is not a Redis URL");
    }
    if (!rc && cfg->cache == CACHE_REDIS && cfg->redis_user[0] && !cfg->redis_password[0]) {
        p.line = p.cache_line;
        rc = fail(&p, "cache: a user without a password (give it in the URL or in redis_password_file)");
    }
    if (!rc && p.sentinel_password_line && (cfg->cache != CACHE_REDIS || cfg->redis_mode != REDIS_SENTINEL)) {
        p.line = p.sentinel_password_line;
        rc = fail(&p, "redis_sentinel_password_file is set but cache is not a redis-sentinel:// URL");
    }
    if (!rc && ferror(f)) {
        snprintf(err, RULES_ERR_MAX, "%s: read error", path);
        rc = -1;
    }
    real_fclose(f);
    if (rc)
        rules_free(cfg);
    return rc;
}

void rules_free(struct shim_config *cfg)
{
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        free(cfg->upstreams[i].cache_rules);
        cfg->upstreams[i].cache_rules = NULL;
        cfg->upstreams[i].n_cache_rules = 0;
    }
}

int rules_expand_socket_path(const char *pattern, int pid, unsigned uid, char *out, size_t cap)
{
    size_t n = 0;
    for (const char *c = pattern; *c; c++) {
        char tmp[24];
        const char *piece = tmp;
        if (*c == '%' && c[1] == 'p')
            snprintf(tmp, sizeof tmp, "%d", pid);
        else if (*c == '%' && c[1] == 'u')
            snprintf(tmp, sizeof tmp, "%u", uid);
        else if (*c == '%' && c[1] == '%')
            piece = "%";
        else
            snprintf(tmp, sizeof tmp, "%c", *c);
        if (*c == '%' && c[1])
            c++;
        size_t len = strlen(piece);
        if (n + len >= cap)
            return -1;
        memcpy(out + n, piece, len);
        n += len;
    }
    out[n] = 0;
    return 0;
}

int rules_socket_names(const char *pattern, unsigned uid, struct rules_socket_names *n)
{
    char dir[512];
    const char *slash = strrchr(pattern, '/');
    if (!slash || rules_expand_socket_path(pattern, 0, uid, dir, sizeof dir) != 0)
        return -1;
    char *dslash = strrchr(dir, '/');
    const char *pp = pid_token(slash + 1);
    char prefix[sizeof n->prefix];
    if (!dslash || !pp || (size_t)(pp - slash - 1) >= sizeof prefix)
        return -1;
    *dslash = 0;
    snprintf(n->dir, sizeof n->dir, "%s", dir[0] ? dir : "/");
    memcpy(prefix, slash + 1, (size_t)(pp - slash - 1));
    prefix[pp - slash - 1] = 0;
    /* the name around the pid, its %u and %% spelt out as the library spells them */
    if (rules_expand_socket_path(prefix, 0, uid, n->prefix, sizeof n->prefix) != 0
        || rules_expand_socket_path(pp + 2, 0, uid, n->suffix, sizeof n->suffix) != 0)
        return -1;
    return 0;
}

int rules_socket_pid(const struct rules_socket_names *n, const char *name, const char *tail)
{
    size_t len = strlen(name), pl = strlen(n->prefix), sl = strlen(n->suffix), tl = strlen(tail);
    if (len <= pl + sl + tl || strncmp(name, n->prefix, pl) || strncmp(name + len - sl - tl, n->suffix, sl)
        || strcmp(name + len - tl, tail) || len - pl - sl - tl > 9)
        return 0;
    int pid = 0;
    for (size_t i = pl; i < len - sl - tl; i++) {
        if (name[i] < '0' || name[i] > '9')
            return 0;
        pid = pid * 10 + (name[i] - '0');
    }
    return pid;
}
