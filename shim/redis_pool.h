/* redis_pool.h — the server connections of a protocol = redis upstream (redis_pool.c), as
 * the app's sessions (redis_session.c) use them. */
#ifndef HTTPSHIM_REDIS_POOL_H
#define HTTPSHIM_REDIS_POOL_H
#include <stdbool.h>
#include <stddef.h>
#include "fdtable.h"
#include "rules.h"

struct rpool_ident;
struct rconn;
struct rpool_client;

/* What a session hears from the pool. Never called from inside one of the session's own
 * calls into the pool. */
struct rpool_client_ops {
    /* the reply to the oldest of its commands in flight, whole, as the server sent it */
    void (*reply)(struct rpool_client *c, const char *p, size_t n);
    /* its identity was checked on a new connection (AUTH, SELECT): ok, else err is the
     * server's error reply, whole */
    void (*verified)(struct rpool_client *c, bool ok, const char *err, size_t n);
    /* direct: bytes from its own server connection, as they came; shared: a part of a
     * reply too large to hold whole (a value over RESP_REPLY_MAX), its last part then
     * coming to `reply` as if it were all of it */
    void (*raw)(struct rpool_client *c, const char *p, size_t n);
    /* the server connection with its commands (or its own) is gone: close the app's */
    void (*lost)(struct rpool_client *c);
    /* direct: its own server connection has room again for what the app sends */
    void (*drained)(struct rpool_client *c);
};

/* A session as the pool sees it (embedded in it). */
struct rpool_client {
    const struct rpool_client_ops *ops;
    int upstream;
    union shim_sockaddr dest;          /* where new server connections for it go */
    socklen_t dest_len;
    struct rconn *conn;                /* the connection its commands in flight (or its lent one) are on */
    struct rconn *verifying;           /* a connection checking an identity for it */
    struct rpool_client *next_verifying;   /* the next session waiting on the same check */
    unsigned inflight;                 /* replies still owed to it */
    bool lent;                         /* conn is lent to it alone */
    bool raw;                          /* ... and relays bytes both ways as they come */
    int pin_reason;                    /* enum rpool_pin while lent for a reason */
};

enum rpool_pin { RPOOL_PIN_MULTI, RPOOL_PIN_WATCH, RPOOL_PIN_BLOCKING };

/* server_lost: told after a server connection of an identity was lost (the sessions close
 * those of it that hold commands the app wrote before). */
struct rpool_ident;
void redis_pool_init(const struct shim_config *cfg, void (*server_lost)(int upstream, const struct rpool_ident *id));
void redis_pool_forget(void);          /* forked child: the parent's connections */

/* Who commands run as and how they are answered: user, password (none: has_pass false)
 * and database, as the app gave them (the database as its digits), and the protocol its
 * connections speak (2, or 3 after HELLO 3). */
struct rpool_who {
    const char *user, *pass, *db;
    size_t user_len, pass_len, db_len;
    bool has_user, has_pass;
    int proto;
};
#define RPOOL_WHO_DEFAULT ((struct rpool_who){ "", "", "0", 0, 0, 1, false, false, 2 })

/* An identity: a reference; *_put gives it back. The password is kept (for the
 * connections opened for it) and never shown. */
struct rpool_ident *rpool_ident_get(int upstream, const struct rpool_who *who);
struct rpool_ident *rpool_ident_ref(struct rpool_ident *id);
void rpool_ident_put(struct rpool_ident *id);
/* A connection has accepted it (or it asks nothing: the default identity), and no server
 * connection of the upstream was lost since. */
bool rpool_ident_verified(const struct rpool_ident *id);
/* It has shared connections open now. */
bool rpool_ident_connected(const struct rpool_ident *id);
/* The default user on database 0 in RESP2: what a new connection is before it says
 * anything, taken as good without a check. */
bool rpool_ident_is_default(const struct rpool_ident *id);
/* Its parts, to derive another identity from it (pointing into id). */
struct rpool_who rpool_ident_parts(const struct rpool_ident *id);

/* Checks id on a connection opened for it (its setup: AUTH, HELLO 3, SELECT), or waits for
 * the check already under way for id (one at a time per identity: a burst of new clients
 * saying the same AUTH or HELLO 3 opens one connection, not one each); ops->verified follows.
 * -1: cannot try (no memory, the connect failed at once). */
int rpool_verify(struct rpool_client *c, struct rpool_ident *id);
/* One command (its exact bytes) of c, run as id: on c's lent connection, else on a shared
 * one of id's (c's current one while it has replies owed, so they come back in order);
 * one reply comes back through ops->reply. -1: too much queued, no memory: close. */
int rpool_send(struct rpool_client *c, struct rpool_ident *id, const char *cmd, size_t n);
/* The same, on the connection `beside`'s last command went on when it is one of id's that
 * c may use (the session's first command beside its login's check, so that the check
 * takes no connection of its own); else as rpool_send. */
int rpool_send_beside(struct rpool_client *c, const struct rpool_client *beside, struct rpool_ident *id,
                      const char *cmd, size_t n);
/* Whether a connection of id's login (user and password, any database) has run a command:
 * logged in, it would run one after the server stopped logging new connections in. */
bool rpool_login_needs_check(int upstream, const struct rpool_ident *id);
/* The server refused id's password (changed since it was accepted): no identity of that
 * user and password is answered for before the server accepts it again (a database alone
 * still is: the connections logged in with it stay logged in, as direct). */
void rpool_ident_refused(const struct rpool_ident *id);
bool rpool_ident_refused_since(const struct rpool_ident *id);
/* id's AUTH, as a command of c's (its one reply comes back through ops->reply), on a
 * shared connection logged in as id's user with id's password (any database or protocol)
 * that is open and set up already (never one opened for it, whose setup would say the
 * same password first): -2 when there is none (or c is lent, or owed replies), -1 as for
 * rpool_send. */
int rpool_check_password(struct rpool_client *c, struct rpool_ident *id, bool urgent);
/* The same for an identity without a password (the default user, whom a new connection
 * is logged in as when the server requires no password): an AUTH of the default user with
 * a password of the process's own, which succeeds exactly when a new connection would be
 * logged in (the user is on and takes any password). Redis 6 and later. */
/* The server refuses id's login to a new connection now (a password set, the user turned
 * off, since its connections logged in): none of them is shared again, and each closes
 * once nothing is owed on it; new ones are opened for what comes, as direct would. */
void rpool_retire_login(const struct rpool_ident *id);
/* Lends c a connection of id's to itself (for a transaction, WATCHed keys, a blocking
 * command), named `name` while lent when name_len > 0: -1 when the upstream has
 * redis_pinned_max lent already (go direct instead). c must have no replies owed. */
int rpool_lend(struct rpool_client *c, struct rpool_ident *id, enum rpool_pin why, const char *name, size_t name_len);
/* The lent connection goes back to the shared ones (its state is clean), or is closed. */
void rpool_give_back(struct rpool_client *c, bool clean);
/* From now on c's connection is its own for good and relays bytes as they come: its lent
 * one, else a new one with id's setup (and `name`, when set, as CLIENT SETNAME). c must
 * have no replies owed on a shared one. -1: no connection. */
int rpool_go_direct(struct rpool_client *c, struct rpool_ident *id, const char *name, size_t name_len);
/* Direct: bytes for the server; -1 when too much waits (stop reading the app). */
int rpool_direct_write(struct rpool_client *c, const char *p, size_t n);
bool rpool_direct_full(const struct rpool_client *c);
/* Direct or lent: the app has ended its side; the server connection's follows once what
 * waits is sent (the server then answers what it read and closes, as it would the app's). */
void rpool_app_eof(struct rpool_client *c);
/* The app went away (or its session ends): replies owed to it are read and dropped, a
 * lent connection is cleaned and given back when it can be, else closed. */
void rpool_client_gone(struct rpool_client *c);
/* Stop (or resume) reading c's connection while c cannot take more replies. */
void rpool_throttle(struct rpool_client *c, bool stop);
#endif
