/* redis_ident.c — owns the identities of protocol = redis upstreams: user, password (kept
 * for the connections opened for it, compared by hash, never shown), database and
 * protocol, one record per distinct identity and upstream, reference-counted by the
 * sessions and connections that run as it, and whether a server connection has accepted
 * it since the last one was lost. Engine thread only. */
#include "redis_ident.h"
#include <stdlib.h>
#include <string.h>

static struct rpool_ident *idents[RULES_MAX_UPSTREAMS];

static char *copy(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = 0;
    }
    return d;
}

struct rpool_ident *rpool_ident_get(int upstream, const struct rpool_who *who)
{
    unsigned char hash[SHA256_BYTES] = { 0 };
    const char *db = who->db_len ? who->db : "0";
    size_t db_len = who->db_len ? who->db_len : 1;
    if (who->has_pass)
        sha256(who->pass, who->pass_len, hash);
    if (db_len >= sizeof ((struct rpool_ident *)0)->db || (who->proto != 2 && who->proto != 3))
        return NULL;                   /* no database has so long a number */
    for (struct rpool_ident *id = idents[upstream]; id; id = id->next)
        if (id->has_user == who->has_user && id->user_len == who->user_len && !memcmp(id->user, who->user, who->user_len)
            && id->has_pass == who->has_pass && !memcmp(id->pass_hash, hash, sizeof hash) && id->db_len == db_len
            && !memcmp(id->db, db, db_len) && id->proto == who->proto) {
            id->refs++;
            return id;
        }
    struct rpool_ident *id = calloc(1, sizeof *id);
    if (!id || !(id->user = copy(who->user, who->user_len))
        || !(id->pass = copy(who->has_pass ? who->pass : "", who->has_pass ? who->pass_len : 0))) {
        if (id)
            free(id->user);
        free(id);
        return NULL;
    }
    id->upstream = upstream;
    id->user_len = who->user_len;
    id->has_user = who->has_user;
    id->pass_len = who->has_pass ? who->pass_len : 0;
    id->has_pass = who->has_pass;
    memcpy(id->pass_hash, hash, sizeof hash);
    memcpy(id->db, db, db_len);
    id->db_len = db_len;
    id->proto = who->proto;
    id->verified = rpool_ident_is_default(id);   /* (nothing to check) */
    id->refs = 1;
    id->next = idents[upstream];
    idents[upstream] = id;
    return id;
}

struct rpool_ident *rpool_ident_ref(struct rpool_ident *id)
{
    if (id)
        id->refs++;
    return id;
}

void rpool_ident_put(struct rpool_ident *id)
{
    if (!id || --id->refs)
        return;
    for (struct rpool_ident **p = &idents[id->upstream]; *p; p = &(*p)->next)
        if (*p == id) {
            *p = id->next;
            break;
        }
    memset(id->pass, 0, id->pass_len);
    free(id->pass);
    free(id->user);
    free(id);
}

bool rpool_ident_verified(const struct rpool_ident *id) { return id->verified; }
bool rpool_ident_connected(const struct rpool_ident *id) { return id->n_shared > 0; }

bool rpool_ident_is_default(const struct rpool_ident *id)
{
    return !id->has_pass && !id->has_user && id->db_len == 1 && id->db[0] == '0' && id->proto == 2;
}

struct rpool_who rpool_ident_parts(const struct rpool_ident *id)
{
    return (struct rpool_who){ .user = id->user, .user_len = id->user_len, .has_user = id->has_user, .pass = id->pass,
                               .pass_len = id->pass_len, .has_pass = id->has_pass, .db = id->db,
                               .db_len = id->db_len, .proto = id->proto };
}

bool redis_ident_same_login(const struct rpool_ident *a, const struct rpool_ident *b)
{
    return a->has_user == b->has_user && a->has_pass == b->has_pass && a->user_len == b->user_len
           && !memcmp(a->user, b->user, a->user_len) && !memcmp(a->pass_hash, b->pass_hash, sizeof a->pass_hash);
}

void rpool_ident_refused(const struct rpool_ident *refused)
{
    for (struct rpool_ident *id = idents[refused->upstream]; id; id = id->next)
        if (redis_ident_same_login(id, refused))
            id->refused = true;
}

bool rpool_ident_refused_since(const struct rpool_ident *id) { return id->refused; }

void redis_ident_accepted(struct rpool_ident *accepted)
{
    accepted->verified = true;
    for (struct rpool_ident *id = idents[accepted->upstream]; id; id = id->next)
        if (redis_ident_same_login(id, accepted))
            id->refused = false;
}

void redis_idents_unverify(int upstream)
{
    for (struct rpool_ident *id = idents[upstream]; id; id = id->next)
        id->verified = rpool_ident_is_default(id);
}

void redis_idents_forget(void)
{
    memset(idents, 0, sizeof idents);  /* the parent's: their memory stays unreachable */
}
