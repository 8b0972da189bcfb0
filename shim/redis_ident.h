/* redis_ident.h — who a protocol = redis upstream's commands run as (redis_ident.c): the
 * identity record, shared by the pool's connections (redis_pool.c), which count and
 * verify it. The sessions see it only through redis_pool.h. */
#ifndef HTTPSHIM_REDIS_IDENT_H
#define HTTPSHIM_REDIS_IDENT_H
#include "redis_pool.h"
#include "sha256.h"

struct rpool_ident {
    struct rpool_ident *next;
    int upstream;
    char *user, *pass;                 /* as the app gave them */
    size_t user_len, pass_len;
    bool has_user;                     /* AUTH named a user (which may be "": Redis allows it) */
    bool has_pass;
    unsigned char pass_hash[SHA256_BYTES];
    char db[24];
    size_t db_len;
    int proto;                         /* 2, or 3: its connections said HELLO 3 first */
    bool verified;
    bool refused;                      /* the server refused its password since it last accepted it */
    unsigned refs;
    unsigned n_shared;                 /* its shared connections */
};

/* A connection of id's accepted its password: so did the server for every identity of
 * that user and password (none of them is refused any more), and id is verified. */
void redis_ident_accepted(struct rpool_ident *id);
/* The same user and password (any database, either protocol). */
bool redis_ident_same_login(const struct rpool_ident *a, const struct rpool_ident *b);
/* A server connection of the upstream was lost: every identity is checked again before it
 * is answered for (the server may come back with other passwords). */
void redis_idents_unverify(int upstream);
void redis_idents_forget(void);        /* forked child: the parent's */
#endif
