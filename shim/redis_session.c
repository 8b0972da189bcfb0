/* redis_session.c — owns an app's connection to a protocol = redis upstream: its commands
 * framed (resp.c) and read for the connection state they change, which is kept here and
 * never mixed between app connections: the identity they run as (AUTH's user and password,
 * SELECT's database; checked by the server on a connection opened for it, then answered
 * here), the protocol (HELLO 2 or 3: part of the identity, so RESP3 commands ride only
 * connections that said HELLO 3), the name (CLIENT SETNAME/GETNAME and HELLO's SETNAME
 * answered here), a transaction or WATCHed keys or a blocking command (on a connection lent
 * to it alone until its state ends, then given back clean), and what only a connection of
 * its own can carry (subscriptions, MONITOR, CLIENT TRACKING/REPLY/NO-EVICT, a cluster
 * node's READONLY/READWRITE/ASKING, inline commands, a HELLO not read whole, or the lent
 * cap reached): then it goes direct for good. Every other
 * command goes over the upstream's shared server connections (redis_pool.c), and the
 * replies come back in the order asked. A stream that is not RESP commands closes the
 * connection; nothing of it reaches Redis. The session's memory, its close and what its
 * app is answered are redis_session_core.c's, below this file. Engine thread only. */
#include "redis_session.h"
#include "redis_session_core.h"
#include "redis_commands.h"
#include "conn.h"
#include "log.h"
#include "redis_known.h"
#include "redis_pool.h"
#include "redis_txn.h"
#include "resp.h"
#include "stats.h"
#include "tunnel.h"
#include <errno.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static const struct shim_config *cfg;

void redis_session_init(const struct shim_config *config)
{
    cfg = config;
    redis_pool_init(config, rs_close_holding);
}

void redis_session_forget(void)
{
    rs_forget_all();
    redis_pool_forget();
}

static struct rsession *of_client(struct rpool_client *c) { return (struct rsession *)(void *)c; }

static void process(struct rsession *s);


/* ---- what the pool tells the session ---- */

static void hello_name_taken(struct rsession *s);

static void learn(struct rsession *s, const char *p, size_t n)
{
    static const char unknown[] = "-ERR unknown subcommand '";
    bool of_hello = s->learning[0] == 'H';
    bool hello_ok = of_hello && n && (p[0] == '%' || p[0] == '*');
    if (hello_ok)
        hello_name_taken(s);
    if (of_hello ? hello_ok : n > sizeof unknown - 1 && !memcmp(p, unknown, sizeof unknown - 1))
        redis_known_keep(s->client.upstream, s->learning, s->learning_len, p, n);
    s->learning_len = 0;
}

/* redis_known.c's key for whether the server runs commands for a connection that never
 * said AUTH: its answer is "+" (it does), or the server's refusal (requirepass). */
#define OPEN_KEY "OPEN"

static void on_verified(struct rpool_client *c, bool ok, const char *err, size_t n);

static void keep_open(int upstream)
{
    size_t n;
    const char *was = redis_known_get(upstream, LITERAL(OPEN_KEY), &n);
    if (was && was[0] != '+')
        redis_known_forget(upstream);  /* (the server's answers are learnt again) */
    redis_known_keep(upstream, LITERAL(OPEN_KEY), "+", 1);
}

static void on_reply(struct rpool_client *c, const char *p, size_t n)
{
    struct rsession *s = of_client(c);
    if (s->probing) {                  /* the shim's own PING: heard, not the app's */
        s->probing = false;
        bool refused = n > 8 && !memcmp(p, "-NOAUTH ", 8);
        s->probed = refused ? -1 : 1;
        redis_known_keep(c->upstream, LITERAL(OPEN_KEY), refused ? p : "+", refused ? n : 1);
        process(s);
        rs_update(s);
        return;
    }
    /* (of a value that came in parts, the last: its header's type says what it was) */
    const char *look = s->in_parts ? &s->parts_type : p;
    size_t look_n = s->in_parts ? 1 : n;
    if (s->learning_len && !s->in_parts)
        learn(s, p, n);
    s->learning_len = 0;
    s->throttling &= !s->in_parts;     /* (the pool let the connection go at the value's end) */
    s->in_parts = false;
    s->replied++;
    s->logged_in |= look_n && look[0] != '-' && look[0] != '!';   /* (an arity error comes before the login's) */
    redis_txn_reply(&s->txn, s->replied, look, look_n);
    rs_answer(s, p, n);
    if (c->lent && redis_txn_clean(&s->txn) && !c->inflight)
        rpool_give_back(c, true);      /* the transaction, the watch or the block is over */
    process(s);
    rs_update(s);
}

static void take_identity(struct rsession *s, struct rpool_ident *id, bool hello, bool known);

/* A new connection for a session's database or protocol was refused its login, which the
 * server took for this app's connection before and would still honour there: the shim
 * cannot log a connection in as it any more. The app's connection ends, as a reset: an
 * error to its SELECT would leave what it pipelined behind it to run in the old database,
 * and direct the SELECT succeeds. */
static bool login_lost(const struct rsession *s, const char *err, size_t n)
{
    bool refused = (n >= 10 && !memcmp(err, "-WRONGPASS", 10)) || (n >= 7 && !memcmp(err, "-NOAUTH", 7));
    return refused && !s->pending_says_password && s->logged_in;
}

static void on_verified(struct rpool_client *c, bool ok, const char *err, size_t n)
{
    struct rsession *s = of_client(c);
    s->waiting_verdict = false;
    if (!ok && login_lost(s, err, n)) {
        shim_debug("fd %d: redis: a new connection for its database or protocol was refused the login it has: "
                   "closed, as a reset", s->src.fd);
        STAT_INC(s->client.upstream, redis_auth_refused_late);
        rpool_ident_put(s->pending_id);
        s->pending_id = NULL;
        rs_close(s);
        return;
    }
    if (ok) {
        take_identity(s, s->pending_id, s->hello_pending, false);
    } else {
        rpool_ident_put(s->pending_id);
        rs_answer(s, err, n);             /* the server's own words, as direct */
    }
    s->pending_id = NULL;
    s->hello_pending = false;
    process(s);
    rs_update(s);
}

static void on_raw(struct rpool_client *c, const char *p, size_t n)
{
    struct rsession *s = of_client(c);
    if (!c->raw && !s->in_parts && n) {   /* a value in parts on a shared connection: its header first */
        s->in_parts = true;
        s->parts_type = p[0];
    }
    rs_answer(s, p, n);
    rs_update(s);
}

static void on_lost(struct rpool_client *c)
{
    struct rsession *s = of_client(c);
    shim_debug("fd %d: redis: the server connection went away: closed, as a reset", s->src.fd);
    if (s->direct || s->eof_passed) {
        s->closing = true;             /* its own connection ended: what came of it first, then */
        rs_update(s);                  /* the end, as the server's (its next write taken: linger.c) */
        return;
    }
    rs_close(s);                  /* what was owed to it will not come: as a reset direct */
}

static void on_drained(struct rpool_client *c)
{
    rs_update(of_client(c));              /* read the app again */
}

static const struct rpool_client_ops client_ops = { on_reply, on_verified, on_raw, on_lost, on_drained };

/* The server's word on a password answered early comes to the checker. */
static struct rsession *of_checker(struct rpool_client *c)
{
    return (struct rsession *)(void *)((char *)c - offsetof(struct rsession, checker));
}

/* Accepted: what waited goes, and so do the commands held. Refused (the password was
 * changed or revoked since): the app's connection ends as a reset would, nothing of what
 * it asked answered and nothing but reads run, and the next app to say that password is
 * answered by the server's own check. */
static void on_check_reply(struct rpool_client *c, const char *p, size_t n)
{
    struct rsession *s = of_checker(c);
    bool no_pass = !rpool_ident_parts(s->id).has_pass;
    /* (a server before Redis 6 has no users: its AUTH takes one argument, and the default
     * login cannot be asked about there; it is taken as before) */
    if ((n && p[0] == '+') || (no_pass && n >= 41 && !memcmp(p, "-ERR wrong number of arguments for 'auth'", 41))) {
        if (no_pass)   /* a new connection runs commands (a refusal kept is old) */
            keep_open(s->client.upstream);
        s->unconfirmed = false;
        s->logged_in = true;
        if (buf_len(&s->early) && buf_append(&s->out, buf_head(&s->early), buf_len(&s->early)) != 0)
            s->closing = true;
        buf_consume(&s->early, buf_len(&s->early));
        process(s);
        rs_update(s);
        return;
    }
    STAT_INC(s->client.upstream, redis_auth_refused_late);
    struct rpool_who who = rpool_ident_parts(s->id);
    if (!who.has_pass) {               /* a password set, or the user off: new connections for it */
        shim_debug("fd %d: redis: the server no longer logs a new connection in without a password: closed, "
                   "as a reset, and the connections logged in before are shared no more", s->src.fd);
        redis_known_forget(s->client.upstream);
        rpool_retire_login(s->id);
    } else {
        shim_debug("fd %d: redis: the server refused a password it had accepted before: closed, as a reset",
                   s->src.fd);
        rpool_ident_refused(s->id);
    }
    rs_close(s);
}

static void on_check_lost(struct rpool_client *c)
{
    rs_close(of_checker(c));      /* no word on the password will come */
}

/* (the checker is never verifying, lent or direct) */
static void on_check_raw(struct rpool_client *c, const char *p, size_t n) { (void)c, (void)p, (void)n; }
static void on_check_verified(struct rpool_client *c, bool ok, const char *e, size_t n) { (void)c, (void)ok, (void)e, (void)n; }
static void on_check_drained(struct rpool_client *c) { (void)c; }

static const struct rpool_client_ops checker_ops = { on_check_reply, on_check_verified, on_check_raw, on_check_lost,
                                                      on_check_drained };

/* ---- commands ---- */

static void hello_accepted(struct rsession *s);

/* The session runs as id from now on (the reference is its), and says so: +OK to an AUTH or
 * SELECT (answered here when id was known good), the server's own answer to a HELLO. */
static void take_identity(struct rsession *s, struct rpool_ident *id, bool hello, bool known)
{
    rpool_ident_put(s->id);
    s->id = id;
    if (s->pending_says_password || !known)
        s->logged_in = true;           /* (the server's word on a new password: after it, or here) */
    if (hello)
        hello_accepted(s);
    else if (known)
        rs_answer_local(s, LITERAL("+OK\r\n"));
    else
        rs_answer(s, LITERAL("+OK\r\n"));
}

/* AUTH, SELECT or HELLO asks for id. A database or a protocol alone, once known good, is
 * taken at once. A password is put to the server every time an app says one, so that one
 * changed or revoked since is never taken: one the server has accepted before is answered
 * at once and checked by an AUTH on a shared connection of that login (a command, not a
 * connection) while the app goes on, as TLS 1.3's early data: only commands that read go
 * before the server's word, their replies held until it, and a refusal ends the app's
 * connection (on_check_reply). Any other password is checked on a connection opened for
 * it, and the server's answer is the app's. */
static void ask_identity(struct rsession *s, struct rpool_ident *id, bool hello, bool says_password)
{
    bool known = rpool_ident_verified(id);
    s->pending_says_password = says_password;
    if (known && !says_password) {
        take_identity(s, id, hello, true);
        return;
    }
    int sent = known && !rpool_ident_refused_since(id) ? rpool_check_password(&s->checker, id, false) : -2;
    if (sent == -1) {
        rpool_ident_put(id);
        rs_close(s);
        return;
    }
    if (sent == 0) {
        STAT_INC(s->client.upstream, redis_auth_early);
        take_identity(s, id, hello, true);
        s->unconfirmed = true;         /* (after its answer: that one goes now) */
        return;
    }
    s->pending_id = id;
    s->hello_pending = hello;
    if (rpool_verify(&s->client, id) != 0) {
        rs_close(s);
        return;
    }
    s->waiting_verdict = true;
}

/* AUTH or SELECT: the identity its commands run as changes, once the server accepts it
 * (the first time the shim sees that identity; after that it is known good). */
static void change_identity(struct rsession *s, const struct resp_item *it, bool auth)
{
    struct rpool_who who = rpool_ident_parts(s->id);
    if (auth) {
        if (resp_argc(it) > 3) {
            rs_answer_local(s, LITERAL("-ERR syntax error\r\n"));
            return;
        }
        if (resp_argc(it) != 2 && resp_argc(it) != 3) {
            rs_too_many_args(s, "auth");
            return;
        }
        who.user_len = 0;
        who.user = "";
        who.has_user = resp_argc(it) == 3;
        if (who.has_user)
            who.user = resp_arg(it, 1, &who.user_len);
        who.pass = resp_arg(it, resp_argc(it) - 1, &who.pass_len);
        who.has_pass = true;
    } else {
        if (resp_argc(it) != 2) {
            rs_too_many_args(s, "select");
            return;
        }
        who.db = resp_arg(it, 1, &who.db_len);
    }
    struct rpool_ident *id = auth || who.db_len ? rpool_ident_get(s->client.upstream, &who) : NULL;
    if (!id) {
        rs_answer_local(s, LITERAL("-ERR value is not an integer or out of range\r\n"));
        return;
    }
    ask_identity(s, id, false, auth);
}

/* HELLO protover [AUTH user pass] [SETNAME name]: the protocol its commands are answered
 * in (and the user they run as) change as AUTH changes the identity, on connections that
 * said the same HELLO first (a RESP3 app's commands share connections only with other
 * RESP3 apps'), and the name is the session's, as CLIENT SETNAME's. The answer is the
 * server's own, to a bare HELLO on a connection of the new identity (its `id` names that
 * shared connection). What the shim does not read whole (another version, an option it
 * does not know, a name the server would refuse) goes direct: its errors are the server's. */
static void hello(struct rsession *s, const struct resp_item *it)
{
    struct rpool_who who = rpool_ident_parts(s->id);
    size_t n;
    const char *v = resp_arg(it, 1, &n);
    who.proto = n == 1 && v[0] == '2' ? 2 : n == 1 && v[0] == '3' ? 3 : 0;
    bool ok = who.proto != 0;
    const char *name = NULL;
    size_t name_len = 0, argc = resp_argc(it);
    bool says_password = false;
    for (size_t i = 2; ok && i < argc;) {
        if (resp_arg_is(it, i, "AUTH") && i + 2 < argc) {
            who.user = resp_arg(it, i + 1, &who.user_len);
            who.pass = resp_arg(it, i + 2, &who.pass_len);
            who.has_user = who.has_pass = says_password = true;
            i += 3;
        } else if (resp_arg_is(it, i, "SETNAME") && i + 1 < argc) {
            name = resp_arg(it, i + 1, &name_len);
            ok = rs_valid_name(name, name_len) && name_len < NAME_MAX_LEN;   /* (longer: direct) */
            i += 2;
        } else {
            ok = false;
        }
    }
    struct rpool_ident *id = ok ? rpool_ident_get(s->client.upstream, &who) : NULL;
    if (!id) {
        rs_go_direct(s);
        return;
    }
    s->hello_has_name = name != NULL;
    s->hello_name_len = name_len;
    if (name_len)
        memcpy(s->hello_name, name, name_len);
    ask_identity(s, id, true, says_password);
}

/* The name a HELLO's SETNAME gave, once the server has answered the HELLO (a refused one,
 * -NOAUTH, names nothing: its connection set up with that name was refused in turn). */
static void hello_name_taken(struct rsession *s)
{
    if (s->hello_has_name) {
        memcpy(s->name, s->hello_name, s->hello_name_len);
        s->name_len = s->hello_name_len;
        s->has_name = s->name_len > 0;
        s->hello_has_name = false;
    }
}

/* The session's identity is the HELLO's now: its name is set, and it is answered what a
 * bare HELLO is answered on a connection of that protocol for that user (the server's
 * own words: asked the first time, kept for the next). */
static void hello_accepted(struct rsession *s)
{
    struct rpool_who who = rpool_ident_parts(s->id);
    char key[REDIS_KNOWN_KEY_MAX];
    /* (kept apart for a login without a password: a server that wants one refuses its
     * HELLO, -NOAUTH, where it answered the same user's after an AUTH) */
    const char *kind = who.has_pass ? (who.proto == 3 ? "3" : "2") : (who.proto == 3 ? "3 nopass" : "2 nopass");
    size_t n, key_len = redis_known_key(key, "HELLO", kind, strlen(kind), who.user, who.user_len);
    const char *known = key_len ? redis_known_get(s->client.upstream, key, key_len, &n) : NULL;
    if (known) {
        hello_name_taken(s);           /* (only a reply that accepted is kept) */
        rs_answer_local(s, known, n);
        return;
    }
    if (!key_len)
        hello_name_taken(s);           /* (no room to read its reply: as before) */
    char cmd[] = "*2\r\n$5\r\nHELLO\r\n$1\r\n2\r\n";
    cmd[sizeof cmd - 4] = who.proto == 3 ? '3' : '2';
    if (rs_room_for_one(s) != 0 || rpool_send(&s->client, s->id, cmd, sizeof cmd - 1) != 0) {
        rs_close(s);
        return;
    }
    memcpy(s->learning, key, key_len);  /* (sent with nothing owed: the next reply is its) */
    s->learning_len = key_len;
}

/* Whether the server runs commands for the identity a connection has before any AUTH
 * (the default user, database 0, RESP2: taken as good without a check, so what the shim
 * answers for it itself must not claim more than the server would): 1 yes, 0 no (*refusal
 * is the server's words, as it said them to a PING: what it says to any command but AUTH,
 * HELLO, QUIT and RESET), -1 not known yet: a PING went in the session's place (it must
 * have nothing owed), the command waits for its reply. Asked once per upstream while the
 * server runs commands without a password, each time while it refuses them. */
static int default_open(struct rsession *s, const char **refusal, size_t *n)
{
    const char *known = redis_known_get(s->client.upstream, LITERAL(OPEN_KEY), n);
    if (s->probed && known) {          /* the answer to the PING that went for this command */
        int open = s->probed > 0;
        s->probed = 0;
        *refusal = known;
        return open;
    }
    if (known && known[0] == '+') {
        *refusal = known;
        return 1;                      /* (a password set since: check_default_login's verdict first) */
    }
    if (known)                         /* a refusal is asked again: a password removed since runs commands */
        redis_known_forget(s->client.upstream);
    if (rpool_send(&s->client, s->id, LITERAL("*1\r\n$4\r\nPING\r\n")) != 0) {
        rs_close(s);
        return -1;
    }
    s->probing = true;
    return -1;
}

/* A command the shim would answer itself on the default identity (a name, SELECT 0), said
 * where the server refuses that identity: its refusal instead. False: go on (known open,
 * or not the default identity); true: answered, or waiting (*wait) for the server's word. */
static bool refused_as_default(struct rsession *s, bool *wait)
{
    const char *refusal;
    size_t n;
    if (s->unconfirmed && rpool_ident_is_default(s->id)) {
        *wait = true;                  /* the server's word on its login says it (on_check_reply) */
        return true;
    }
    int open = rpool_ident_is_default(s->id) ? default_open(s, &refusal, &n) : 1;
    *wait = open < 0;
    if (open == 0)
        rs_answer_local(s, refusal, n);
    return open != 1;
}

static int send_command(struct rsession *s, const struct resp_item *it)
{
    if (rs_room_for_one(s) != 0
        || (s->unconfirmed ? rpool_send_beside(&s->client, &s->checker, s->id, buf_head(&s->cmds.raw), it->raw_len)
                           : rpool_send(&s->client, s->id, buf_head(&s->cmds.raw), it->raw_len)) != 0) {
        rs_close(s);
        return -1;
    }
    s->sent++;
    return 0;
}

/* A connection that never said AUTH runs as the default user only while the server logs a
 * new connection in without a password: the pool's connections of that login that have
 * run commands logged in when it did, and stay logged in (as the server keeps any
 * connection's login) after a password is set or the user turned off. So the first
 * command an app connection runs without a password (AUTH, HELLO, QUIT and RESET change
 * or end the login first) asks the server again while any of them is logged in, as for a
 * password said again: an AUTH of the default user (any password for a user without one)
 * on a shared connection, the app's first command beside it, reads going on with their
 * replies held. Refused: the app's connection ends, and the old connections are shared no
 * more (rpool_retire_login). None logged in (none open, or the server refused all they
 * carried: requirepass from the start): the server judges each command, as direct. False:
 * the session closed. */
static bool check_default_login(struct rsession *s, const struct resp_item *it)
{
    if (s->login_checked || s->unconfirmed)
        return true;
    if (rpool_ident_parts(s->id).has_pass) {
        s->login_checked = true;       /* a password's login: put to the server by ask_identity */
        return true;
    }
    if (resp_arg_is(it, 0, "AUTH") || resp_arg_is(it, 0, "HELLO") || resp_arg_is(it, 0, "QUIT")
        || resp_arg_is(it, 0, "RESET"))
        return true;
    s->login_checked = true;
    if (!rpool_login_needs_check(s->client.upstream, s->id))
        return true;                   /* none logged in: the server judges each command, as direct */
    int sent = rpool_check_password(&s->checker, s->id, redis_command_ends_a_script(it));
    if (sent == -1) {
        rs_close(s);
        return false;
    }
    if (sent == 0) {
        STAT_INC(s->client.upstream, redis_auth_early);
        s->unconfirmed = true;
    }
    return true;
}

/* One command: true when it was taken (answered, sent, or the session changed course),
 * false when it must wait (replies owed first, an identity being checked). */
static bool one_command(struct rsession *s, const struct resp_item *it)
{
    struct rpool_client *c = &s->client;
    bool idle = c->inflight == 0;
    if (!check_default_login(s, it))
        return true;
    if (s->unconfirmed && !rs_early_allowed(s, it))
        return false;                  /* after the server's word on the password */
    if (redis_command_needs_own_connection(it)) {
        if (!idle && !c->lent)
            return false;              /* its replies first: then nothing is in between */
        rs_go_direct(s);
        return true;
    }
    bool hello_args = resp_arg_is(it, 0, "HELLO") && resp_argc(it) > 1;   /* (a bare HELLO changes nothing) */
    /* answered here, so only once the replies owed are in: they come first, as direct. A
     * lent connection carries the session's name: a new name there takes it direct, and
     * inside MULTI the server queues and answers them as any command. */
    bool setname = resp_arg_is(it, 0, "CLIENT") && resp_arg_is(it, 1, "SETNAME");
    bool named = setname || (resp_arg_is(it, 0, "CLIENT") && resp_arg_is(it, 1, "GETNAME"));
    if (named && !s->txn.in_multi && !(setname && c->lent)) {
        if (!idle)
            return false;
        bool wait;                     /* (an arity error comes first, as the server checks) */
        if (resp_argc(it) == (setname ? 3u : 2u) && refused_as_default(s, &wait))
            return !wait || s->gone;
        if (rs_client_name(s, it))
            return true;               /* (else a GETNAME with arguments: the server's error) */
        if (setname) {                 /* a name longer than the shim keeps: the server keeps it */
            if (s->unconfirmed)
                return false;          /* (a connection of its own runs whatever follows) */
            rs_go_direct(s);
            return true;
        }
    }
    if (c->lent) {                     /* a transaction, WATCHed keys or a blocking command */
        if (resp_arg_is(it, 0, "AUTH") || resp_arg_is(it, 0, "SELECT") || resp_arg_is(it, 0, "RESET")
            || resp_arg_is(it, 0, "QUIT") || hello_args || setname) {
            rs_go_direct(s);              /* the lent connection carries the app's state exactly */
            return true;
        }
        redis_txn_sent(&s->txn, it, s->sent + 1);
        send_command(s, it);           /* (given back once nothing is open and nothing owed) */
        return true;
    }
    bool multi = resp_arg_is(it, 0, "MULTI"), watch = resp_arg_is(it, 0, "WATCH"), block = redis_command_blocks(it);
    bool state = resp_arg_is(it, 0, "AUTH") || resp_arg_is(it, 0, "SELECT") || resp_arg_is(it, 0, "RESET")
                 || resp_arg_is(it, 0, "QUIT") || hello_args;
    if ((multi || watch || block || state) && !idle)
        return false;                  /* after the replies owed: it changes what follows */
    if (hello_args) {
        hello(s, it);
        return true;
    }
    if (resp_arg_is(it, 0, "SELECT") && resp_argc(it) == 2 && resp_arg_is(it, 1, "0")) {
        bool wait;                     /* (to the default identity, which nothing checked) */
        if (refused_as_default(s, &wait))
            return !wait || s->gone;
    }
    if (resp_arg_is(it, 0, "AUTH") || resp_arg_is(it, 0, "SELECT")) {
        change_identity(s, it, resp_arg_is(it, 0, "AUTH"));
        return true;
    }
    if (resp_arg_is(it, 0, "RESET") && resp_argc(it) != 1) {
        rs_too_many_args(s, "reset");
        return true;
    }
    if (resp_arg_is(it, 0, "RESET")) {
        struct rpool_ident *id = rpool_ident_get(c->upstream, &RPOOL_WHO_DEFAULT);   /* (RESP2 again) */
        if (!id) {
            rs_close(s);
            return true;
        }
        rpool_ident_put(s->id);
        s->id = id;
        s->has_name = false;
        s->name_len = 0;
        s->login_checked = false;      /* (logged out: the server's word again for what follows) */
        s->logged_in = false;
        rs_answer_local(s, LITERAL("+RESET\r\n"));
        return true;
    }
    if (resp_arg_is(it, 0, "QUIT")) {
        rs_answer_local(s, LITERAL("+OK\r\n"));
        s->closing = true;
        return true;
    }
    if (resp_arg_is(it, 0, "CLIENT") && resp_argc(it) >= 2 && rs_unknown_subcommand(s, it, idle))
        return true;
    if (multi || watch || block) {
        enum rpool_pin why = multi ? RPOOL_PIN_MULTI : watch ? RPOOL_PIN_WATCH : RPOOL_PIN_BLOCKING;
        if (rpool_lend(c, s->id, why, s->name, s->has_name ? s->name_len : 0) != 0) {
            rs_go_direct(s);              /* redis_pinned_max lent already: a connection of its own */
            return true;
        }
        redis_txn_sent(&s->txn, it, s->sent + 1);
        send_command(s, it);
        return true;
    }
    send_command(s, it);
    return true;
}

/* A stream that is not RESP: as Redis does, the replies owed first, then its protocol
 * error in its words, then the end; what the app writes meanwhile is read and dropped. */
static void refuse_input(struct rsession *s)
{
    if (s->client.inflight || s->unconfirmed || s->probing)
        return;                        /* (again with the last reply) */
    char scratch[64], line[96];
    int k = snprintf(line, sizeof line, "-ERR %s\r\n", resp_stream_refusal(&s->cmds, scratch, sizeof scratch));
    rs_answer_local(s, line, (size_t)k);
    s->closing = true;
}

static void process(struct rsession *s)
{
    for (int n = 0; n < 100000; n++) {
        /* INFLIGHT_MAX owed, or replies piling up unread: the next command waits (for
         * replies, for the app to read), and the app's bytes go on being read, up to
         * RESP_HOLD_MAX, as Redis reads a client that writes all its pipeline before it
         * reads (redis-py's); a read stopped there would leave both waiting on the other */
        if (s->gone || s->client.raw || s->waiting_verdict || s->closing || s->client.inflight >= INFLIGHT_MAX
            || rs_replies_pile_up(s))
            return;
        if (s->refused) {
            refuse_input(s);
            return;
        }
        struct resp_item it = s->held;
        if (!s->has_held) {
            enum resp_next r = resp_stream_next(&s->cmds, &it);
            if (r == RESP_MORE)
                return;
            if (r == RESP_TOO_LARGE || r == RESP_INLINE) {
                /* a command larger than the shim frames, or an inline one: as it is, over
                 * a connection of its own (the lent one, whose state is the app's) */
                if ((s->client.inflight == 0 || s->client.lent) && !s->unconfirmed)
                    rs_go_direct(s);
                return;                /* (else after the replies owed, and the server's word on a password) */
            }
            if (r != RESP_ITEM) {
                STAT_INC(s->client.upstream, redis_malformed);
                shim_debug("fd %d: redis: not a RESP command: nothing of it sent, closed once the replies owed "
                           "are in", s->src.fd);
                s->refused = true;
                refuse_input(s);
                return;
            }
        }
        s->has_held = false;
        if (!one_command(s, &it)) {
            s->held = it;              /* the reader has it read: kept for the next turn */
            s->has_held = true;
            return;
        }
        if (s->gone || s->client.raw) {
            if (it.argv)
                freeReplyObject(it.argv);   /* its bytes went (direct) or nothing matters */
            return;
        }
        resp_item_done(&s->cmds, &it);
    }
}

/* ---- the app's side ---- */

static void on_app(struct loop_source *src, uint32_t ev)
{
    struct rsession *s = (struct rsession *)(void *)((char *)src - offsetof(struct rsession, src));
    if (ev & (EPOLLERR | EPOLLHUP) && !(ev & EPOLLIN)) {
        rs_app_went(s);                   /* (direct: its server connection hears the end once what waits is sent) */
        rs_update(s);
        return;
    }
    if (ev & EPOLLIN) {
        char chunk[16384];
        for (int rounds = 0; rounds < 8 && !s->gone && !s->app_eof; rounds++) {
            bool direct = s->client.raw;
            if (direct && rpool_direct_full(&s->client))
                break;
            bool drop = !direct && (s->closing || s->refused);   /* (ending: read, and dropped; see rs_update) */
            if (!direct && !drop && resp_stream_pending(&s->cmds) + sizeof chunk > RESP_HOLD_MAX)
                break;
            ssize_t n = recv(src->fd, chunk, sizeof chunk, MSG_DONTWAIT);
            if (n > 0 && drop)
                continue;
            if (n > 0) {
                int rc = direct ? rpool_direct_write(&s->client, chunk, (size_t)n)
                                : resp_stream_feed(&s->cmds, chunk, (size_t)n);
                if (rc != 0) {
                    rs_close(s);
                    return;
                }
                if (!direct)
                    process(s);
                continue;
            }
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                s->app_eof = true;
            break;
        }
    }
    if (s->gone)
        return;
    bool piled = rs_replies_pile_up(s);
    rs_update(s);
    if (piled && !s->gone && !rs_replies_pile_up(s)) {
        process(s);                    /* the app read: what it wrote meanwhile goes on */
        rs_update(s);
    }
}

int redis_session_start(struct loop_source *app_src, int upstream, const union shim_sockaddr *dest,
                        socklen_t dest_len, struct buf *in, bool app_eof)
{
    /* not RESP (an inline command, as typed at a telnet): the connection is relayed as it
     * is, over a connection of its own */
    if (buf_len(in) && buf_head(in)[0] != '*') {
        struct buf none = { .cap = OUT_CAP };   /* what the tunnel owes the app */
        STAT_INC(upstream, redis_direct);
        STAT_INC(upstream, upstream_conns_opened);
        return tunnel_start(app_src, upstream, dest, dest_len, in, &none, app_eof);
    }
    struct rsession *s = calloc(1, sizeof *s);
    if (!s)
        return -1;
    s->client.ops = &client_ops;
    s->client.upstream = upstream;
    s->client.dest = *dest;
    s->client.dest_len = dest_len;
    s->checker = s->client;
    s->checker.ops = &checker_ops;
    s->out.cap = OUT_SOFT_MAX + RESP_REPLY_MAX + 64 * 1024;
    s->early.cap = s->out.cap;
    s->app_eof = app_eof;
    if (resp_stream_init(&s->cmds, true) != 0
        || !(s->id = rpool_ident_get(upstream, &RPOOL_WHO_DEFAULT))
        || (buf_len(in) && resp_stream_feed(&s->cmds, buf_head(in), buf_len(in)) != 0)
        || loop_move(app_src, &s->src, EPOLLIN, on_app) != 0) {
        resp_stream_free(&s->cmds);
        rpool_ident_put(s->id);
        free(s);
        return -1;
    }
    buf_free(in);
    rs_link(s);
    shim_debug("fd %d: a redis session", s->src.fd);
    process(s);
    rs_update(s);
    return 0;
}
