/* rules_addr.c — owns the upstreams' address table, consulted by the connect hook: the
 * literal addresses, and those learnt for named upstreams (resolved in the background, or
 * seen in the app's own lookups), and the matching of a connect's address against it. It
 * is the only part of the rules that changes after load; one mutex guards it (held across
 * fork by rules_atfork_prepare). */
#include "rules.h"
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

static pthread_mutex_t rules_addr_lock = PTHREAD_MUTEX_INITIALIZER;

static bool holds_locked(const struct upstream_rule *u, int family, const void *bytes, size_t n)
{
    for (size_t i = 0; i < u->n_addrs; i++)
        if (u->addrs[i].family == family && !memcmp(u->addrs[i].bytes, bytes, n))
            return true;
    return false;
}

static void add_addr_locked(struct shim_config *cfg, struct upstream_rule *u, int family, const void *bytes)
{
    static const uint8_t v4mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
    if (family == AF_INET6 && !memcmp(bytes, v4mapped, sizeof v4mapped)) {
        family = AF_INET;              /* as rules_match_addr looks it up */
        bytes = (const uint8_t *)bytes + 12;
    }
    size_t n = family == AF_INET ? 4 : 16;
    if (holds_locked(u, family, bytes, n))
        return;
    /* one address and port, one section: a name that resolves to another section's
     * address is said (rules_shadowed), never silently half-applied */
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const struct upstream_rule *o = &cfg->upstreams[i];
        if (o != u && o->port == u->port && holds_locked(o, family, bytes, n)) {
            if (!u->shadowed_by_line) {
                u->shadowed_by_line = o->line;
                u->shadowed.family = family;
                memset(u->shadowed.bytes, 0, sizeof u->shadowed.bytes);
                memcpy(u->shadowed.bytes, bytes, n);
            }
            return;
        }
    }
    if (u->n_addrs == RULES_MAX_ADDRS)
        return;                        /* documented cap: further addresses are not diverted */
    u->addrs[u->n_addrs].family = family;
    memset(u->addrs[u->n_addrs].bytes, 0, 16);
    memcpy(u->addrs[u->n_addrs].bytes, bytes, n);
    u->n_addrs++;
}

static void learn_from_addrinfo(struct shim_config *cfg, struct upstream_rule *u, const struct addrinfo *res)
{
    for (const struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        if (ai->ai_family == AF_INET)
            add_addr_locked(cfg, u, AF_INET, &((const struct sockaddr_in *)(const void *)ai->ai_addr)->sin_addr);
        else if (ai->ai_family == AF_INET6)
            add_addr_locked(cfg, u, AF_INET6, &((const struct sockaddr_in6 *)(const void *)ai->ai_addr)->sin6_addr);
    }
}

void rules_resolve_all(struct shim_config *cfg, rules_resolver resolve)
{
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        struct upstream_rule *u = &cfg->upstreams[i];
        if (u->host_is_literal)
            continue;
        struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res = NULL;
        if (resolve(u->host, NULL, &hints, &res) != 0 || !res)
            continue;                  /* learned later from the app's own lookups */
        pthread_mutex_lock(&rules_addr_lock);
        learn_from_addrinfo(cfg, u, res);
        pthread_mutex_unlock(&rules_addr_lock);
        freeaddrinfo(res);
    }
}

size_t rules_addrs_of(const struct shim_config *cfg, size_t upstream, struct rules_addr *out, size_t max)
{
    pthread_mutex_lock(&rules_addr_lock);
    const struct upstream_rule *u = &cfg->upstreams[upstream];
    size_t n = u->n_addrs < max ? u->n_addrs : max;
    memcpy(out, u->addrs, n * sizeof *out);
    pthread_mutex_unlock(&rules_addr_lock);
    return n;
}

bool rules_has_named_upstreams(const struct shim_config *cfg)
{
    return rules_named_upstream_port(cfg, 0);
}

bool rules_named_upstream_port(const struct shim_config *cfg, unsigned port)
{
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        if (!cfg->upstreams[i].host_is_literal && (!port || cfg->upstreams[i].port == port))
            return true;
    return false;
}

/* Across a fork: the child must not inherit the lock held by a thread it does not have.
 * Whoever holds it never waits on anything else, so taking it last is safe. */
void rules_atfork_prepare(void) { pthread_mutex_lock(&rules_addr_lock); }
void rules_atfork_release(void) { pthread_mutex_unlock(&rules_addr_lock); }

bool rules_name_is_listed(const struct shim_config *cfg, const char *name)
{
    for (size_t i = 0; i < cfg->n_upstreams; i++)
        if (!cfg->upstreams[i].host_is_literal && !strcasecmp(cfg->upstreams[i].host, name))
            return true;
    return false;
}

void rules_learn(struct shim_config *cfg, const char *name, int family, const void *bytes)
{
    pthread_mutex_lock(&rules_addr_lock);
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        struct upstream_rule *u = &cfg->upstreams[i];
        if (!u->host_is_literal && !strcasecmp(u->host, name))
            add_addr_locked(cfg, u, family, bytes);
    }
    pthread_mutex_unlock(&rules_addr_lock);
}

int rules_match_addr(struct shim_config *cfg, const struct sockaddr *sa, socklen_t len)
{
    struct rules_addr key;
    uint16_t port;
    if (sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)sa;
        key.family = AF_INET;
        memcpy(key.bytes, &in->sin_addr, 4);
        port = ntohs(in->sin_port);
    } else if (sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)(const void *)sa;
        port = ntohs(in6->sin6_port);
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            key.family = AF_INET;
            memcpy(key.bytes, in6->sin6_addr.s6_addr + 12, 4);
        } else {
            key.family = AF_INET6;
            memcpy(key.bytes, &in6->sin6_addr, 16);
        }
    } else {
        return -1;
    }
    size_t n = key.family == AF_INET ? 4 : 16;
    int found = -1;
    pthread_mutex_lock(&rules_addr_lock);
    for (size_t i = 0; i < cfg->n_upstreams && found < 0; i++) {
        const struct upstream_rule *u = &cfg->upstreams[i];
        if (u->port != port)
            continue;
        for (size_t k = 0; k < u->n_addrs; k++)
            if (u->addrs[k].family == key.family && !memcmp(u->addrs[k].bytes, key.bytes, n)) {
                found = (int)i;
                break;
            }
    }
    pthread_mutex_unlock(&rules_addr_lock);
    return found;
}

bool rules_shadowed(struct shim_config *cfg, size_t upstream, char *why, size_t cap)
{
    const struct upstream_rule *u = &cfg->upstreams[upstream];
    pthread_mutex_lock(&rules_addr_lock);
    int line = u->shadowed_by_line;
    struct rules_addr a = u->shadowed;
    pthread_mutex_unlock(&rules_addr_lock);
    if (!line)
        return false;
    char ip[INET6_ADDRSTRLEN];
    inet_ntop(a.family, a.bytes, ip, sizeof ip);
    snprintf(why, cap, "[upstream %s:%u] resolves to %s, which the section at line %d has already: "
                       "connections to %s:%u follow that section, never this one's settings and rules",
             u->host, u->port, ip, line, ip, u->port);
    return true;
}
