/* redis_known.c — owns what the shim has learnt from a protocol = redis upstream that
 * depends on nothing but the server behind it: the reply to a bare HELLO for a protocol
 * and user (the same on every connection, but for the `id` field, which names a shared
 * connection anyway), and the error for a CLIENT subcommand the server does not know (a
 * client library's CLIENT SETINFO to a server older than 7.2; the server checks that
 * before anything else, so the error depends only on how the two words are spelt). A
 * client that says these at every connect, pipelined with its handshake, then costs no
 * round trip for them. At most KNOWN_MAX answers per upstream, each bounded; all of an
 * upstream's are forgotten when one of its server connections is lost. Engine thread only. */
#include "redis_known.h"
#include "rules.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KNOWN_MAX 16

struct known {
    struct known *next;
    size_t key_len, reply_len;
    char *key, *reply;
};

static struct known *kept[RULES_MAX_UPSTREAMS];
static unsigned count[RULES_MAX_UPSTREAMS];

void redis_known_keep(int up, const char *key, size_t key_len, const char *reply, size_t n)
{
    if (up < 0 || up >= RULES_MAX_UPSTREAMS || key_len > REDIS_KNOWN_KEY_MAX || n > REDIS_KNOWN_REPLY_MAX
        || count[up] >= KNOWN_MAX || redis_known_get(up, key, key_len, &(size_t){ 0 }))
        return;
    struct known *k = calloc(1, sizeof *k + key_len + n);
    if (!k)
        return;                        /* (asked again next time: nothing lost) */
    k->key = (char *)(k + 1);
    k->reply = k->key + key_len;
    memcpy(k->key, key, key_len);
    memcpy(k->reply, reply, n);
    k->key_len = key_len;
    k->reply_len = n;
    k->next = kept[up];
    kept[up] = k;
    count[up]++;
}

const char *redis_known_get(int up, const char *key, size_t key_len, size_t *n)
{
    if (up < 0 || up >= RULES_MAX_UPSTREAMS)
        return NULL;
    for (const struct known *k = kept[up]; k; k = k->next)
        if (k->key_len == key_len && !memcmp(k->key, key, key_len)) {
            *n = k->reply_len;
            return k->reply;
        }
    return NULL;
}

void redis_known_forget(int up)
{
    if (up < 0 || up >= RULES_MAX_UPSTREAMS)
        return;
    for (struct known *k = kept[up], *next; k; k = next) {
        next = k->next;
        free(k);
    }
    kept[up] = NULL;
    count[up] = 0;
}

void redis_known_forget_parents(void)
{
    memset(kept, 0, sizeof kept);
    memset(count, 0, sizeof count);
}

size_t redis_known_key(char *out, const char *tag, const char *a, size_t an, const char *b, size_t bn)
{
    char ha[40], hb[24];
    size_t na = (size_t)snprintf(ha, sizeof ha, "%s %zu:", tag, an), nb = (size_t)snprintf(hb, sizeof hb, "%zu:", bn);
    if (na >= sizeof ha || nb >= sizeof hb || na + an + nb + bn > REDIS_KNOWN_KEY_MAX)
        return 0;
    char *o = out;
    memcpy(o, ha, na);
    memcpy(o += na, a, an);
    memcpy(o += an, hb, nb);
    memcpy(o + nb, b, bn);
    return na + an + nb + bn;
}
