/* redis_session_core.h — what redis_session.c and redis_session_core.c share: an app
 * connection's session (struct rsession) and the calls that keep it (its memory, its
 * close, what its app is answered and when its app is read), which the command side
 * (redis_session.c) calls down into. Engine thread only. */
#ifndef HTTPSHIM_REDIS_SESSION_CORE_H
#define HTTPSHIM_REDIS_SESSION_CORE_H
#include "buf.h"
#include "loop.h"
#include "redis_known.h"
#include "redis_pool.h"
#include "redis_txn.h"
#include "resp.h"
#include <stdbool.h>
#include <stdint.h>

#define OUT_SOFT_MAX (1u << 20)        /* replies waiting for the app: beyond, its server connection waits */
#define INFLIGHT_MAX 8192              /* commands in flight per session */
#define NAME_MAX_LEN 512

struct rsession {
    struct rpool_client client;        /* first: what the pool holds */
    struct loop_source src;
    struct loop_deferred reclaim;
    struct resp_stream cmds;
    struct buf out;                    /* replies for the app */
    struct rpool_ident *id;            /* who its commands run as (a reference) */
    char name[NAME_MAX_LEN];
    size_t name_len;
    bool has_name;
    bool app_eof, gone, closing, waiting_verdict, throttling;
    bool refused;                      /* what the app sent is not RESP: see refuse_input */
    bool reply_dropped;                /* a reply could not be kept for it: none after it either */
    bool lingered;                     /* its end is linger.c's (closed later, not by rs_close) */
    /* a value too large to hold whole is coming in parts on a shared connection (its
     * header's type byte kept): that connection's reading waits on this app's */
    bool in_parts;
    char parts_type;
    /* the app closed its end: what it sent before still runs, as direct, and what it is
     * answered is dropped */
    bool app_gone;
    bool eof_passed;                   /* direct: the app's end passed on to its server connection */
    bool direct;                       /* went direct (the pool's raw flag goes with a lost connection) */
    struct redis_txn txn;              /* what its commands leave open on a lent connection */
    uint64_t sent, replied;            /* commands whose replies the app gets, and those replies */
    struct rpool_ident *pending_id;    /* being verified for an AUTH or SELECT (a reference) */
    bool pending_says_password;        /* that change logs in anew (else it keeps the login) */
    /* the server has taken its login: an AUTH accepted, its login checked, or a command
     * answered without an error; a connection logged in stays so, whatever the server's
     * passwords do later */
    bool logged_in;
    struct resp_item held;             /* a command read but waiting for the replies owed first */
    bool has_held;
    /* a HELLO whose identity is being checked: the name it sets once it is accepted */
    bool hello_pending, hello_has_name;
    char hello_name[NAME_MAX_LEN];
    size_t hello_name_len;
    /* a command sent with nothing owed, whose reply (the next to come) is learnt from:
     * redis_known.c's key for it, or none */
    char learning[REDIS_KNOWN_KEY_MAX];
    size_t learning_len;
    bool probing;                      /* a PING of the shim's own in flight: see default_open */
    int probed;                        /* its answer, for the command that waited: 1 open, -1 refused */
    /* logged in with a password the server accepted before: answered at once and checked
     * alongside what follows (the checker's AUTH); until the server's word only reads go,
     * and what the app is answered waits in early (see ask_identity) */
    bool unconfirmed;
    /* its login without a password asked of the server for this connection (see
     * check_default_login), as for a password said again */
    bool login_checked;
    struct rpool_client checker;
    struct buf early;
    struct rsession *next, *prev;
};

#define LITERAL(s) s, sizeof s - 1

/* the live sessions: s joins them; a forked child forgets the parent's */
void rs_link(struct rsession *s);
void rs_forget_all(void);
void rs_close_holding(int upstream, const struct rpool_ident *id);   /* (redis_pool.c's server_lost) */
void rs_close(struct rsession *s);
/* The app's end is closed: its fd leaves the loop, the commands it sent run as direct,
 * and what it is answered is dropped. */
void rs_app_went(struct rsession *s);
/* Writes what the app is owed, and watches the app as what it owes and is owed allow. */
void rs_update(struct rsession *s);
void rs_answer(struct rsession *s, const char *p, size_t n);
void rs_answer_local(struct rsession *s, const char *p, size_t n);
int rs_room_for_one(const struct rsession *s);
/* Over OUT_SOFT_MAX of replies wait for the app: its next command waits for it to read. */
bool rs_replies_pile_up(const struct rsession *s);
void rs_go_direct(struct rsession *s);
void rs_too_many_args(struct rsession *s, const char *cmd);
bool rs_valid_name(const char *p, size_t n);
const char *rs_kept_subcommand_error(const struct rsession *s, const struct resp_item *it, char *key, size_t *key_len,
                                     size_t *n);
bool rs_unknown_subcommand(struct rsession *s, const struct resp_item *it, bool idle);
bool rs_client_name(struct rsession *s, const struct resp_item *it);
bool rs_early_allowed(const struct rsession *s, const struct resp_item *it);
#endif
