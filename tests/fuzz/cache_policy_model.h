/* cache_policy_model.h — what fuzz_cache_policy.c (requests, rules, keys, the storage
 * decision) shares with cache_policy_revalidation.c (stale windows, validators, 304s and
 * renewal): the input's parsed state and the checks each calls in the other. */
#ifndef CACHE_POLICY_MODEL_H
#define CACHE_POLICY_MODEL_H
#include "../../shim/cache.h"
#include <stdbool.h>
#include <stddef.h>

#define MAX_RULES 8

struct line { const char *p; size_t n; };   /* one input line, without its line end */
struct out { char *p; size_t n, cap; };      /* what a model writes, checked against cap */
void emit(struct out *o, const void *s, size_t n);
void emits(struct out *o, const char *s);

extern struct http_request req;              /* the request, and the conditional one */
extern struct upstream_rule up;
extern struct cache_rule rules[MAX_RULES];   /* up's rules */

const struct http_header *next_named(const struct http_request *r, const char *name, size_t from);
/* Whether some Cache-Control line's value contains the directive name (any case). */
bool cc_mentions(const struct line *hdr, size_t n_hdr, const char *word);
/* Entries stored for the request with the response's header lines (hdr, joined with CRLF
 * into eh), one per status: their stale windows, validators, 304s and renewals. */
void check_entry(const char *key, size_t key_len, const char *eh, size_t eh_len, const struct line *hdr,
                 size_t n_hdr, const struct response_policy *p, const char *vary, size_t vary_len,
                 const char *body, size_t body_len, int other_status);
#endif
