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
 * connection; nothing of it reaches Redis. Engine thread only. */
#include "redis_session.h"
#include "redis_commands.h"
#include "conn.h"
#include "log.h"
#include "redis_known.h"
#include "redis_pool.h"
#include "resp.h"
#include "stats.h"
#include "tunnel.h"
#include <errno.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

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
    bool eof_passed;                   /* direct: the app's end passed on to its server connection */
    bool direct;                       /* went direct (the pool's raw flag goes with a lost connection) */
    /* the connection's state as of the last command sent (the server's, once it has read
     * them): a transaction open, keys WATCHed */
    bool in_multi, watching;
    /* EXEC, DISCARD and UNWATCH sent on a lent connection, by the number of the reply
     * that says whether the server took them (an error, their arity's or an ACL's, leaves
     * the transaction or the WATCHes open: the connection is not given back) */
    struct { uint64_t reply; bool was_multi, was_watching; } endings[16];
    unsigned n_endings;
    uint64_t sent, replied;            /* commands whose replies the app gets, and those replies */
    struct rpool_ident *pending_id;    /* being verified for an AUTH or SELECT (a reference) */
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
    bool checking_password;            /* the shim's AUTH for pending_id in flight: see ask_identity */
    struct rsession *next, *prev;
};

static const struct shim_config *cfg;
static struct rsession *live;

void redis_session_init(const struct shim_config *config)
{
    cfg = config;
    redis_pool_init(config);
}

void redis_session_forget(void)
{
    live = NULL;                       /* the parent's: unreachable, never used */
    redis_pool_forget();
}

static struct rsession *of_client(struct rpool_client *c) { return (struct rsession *)(void *)c; }

static void reclaim(struct loop_deferred *d)
{
    free((char *)d - offsetof(struct rsession, reclaim));
}

static void session_close(struct rsession *s)
{
    if (s->gone)
        return;
    s->gone = true;
    rpool_client_gone(&s->client);
    if (s->has_held && s->held.argv)
        freeReplyObject(s->held.argv);
    s->has_held = false;
    loop_remove(&s->src);
    fdtable_close_engine_fd(s->src.fd);
    resp_stream_free(&s->cmds);
    buf_free(&s->out);
    rpool_ident_put(s->id);
    rpool_ident_put(s->pending_id);
    if (s->prev)
        s->prev->next = s->next;
    else if (live == s)
        live = s->next;
    if (s->next)
        s->next->prev = s->prev;
    loop_defer(&s->reclaim, reclaim);
}

static void process(struct rsession *s);

static void update(struct rsession *s)
{
    if (s->gone)
        return;
    if (buf_len(&s->out) && buf_send(&s->out, s->src.fd) != 0) {
        session_close(s);
        return;
    }
    if (s->closing && !buf_len(&s->out)) {
        session_close(s);
        return;
    }
    /* A slow app holds back a server connection of its own (lent, or direct), not the
     * shim's memory. A shared one carries others' replies too, which must not wait on it:
     * that app's commands are no longer read, and the replies it already owes are kept, up
     * to out's cap (past it, its connection ends as a reset would: Redis's own
     * client-output-buffer-limit) */
    bool full = buf_len(&s->out) > OUT_SOFT_MAX;
    bool hold = full && (s->client.lent || s->client.raw);
    if (hold != s->throttling) {
        s->throttling = hold;
        rpool_throttle(&s->client, hold);
        if (s->gone)
            return;
    }
    if (s->app_eof && s->client.raw && !s->eof_passed) {
        s->eof_passed = true;          /* the server hears the end, answers what it read, closes */
        rpool_direct_eof(&s->client);
        if (s->gone)
            return;
    }
    if (s->app_eof && !s->client.raw && !s->client.inflight && !s->waiting_verdict && !buf_len(&s->out)
        && !s->has_held && resp_stream_pending_command(&s->cmds) == 0) {
        session_close(s);              /* the app is done and owed nothing */
        return;
    }
    bool reading = !s->app_eof && !s->closing && s->client.inflight < INFLIGHT_MAX && !full
                   && (s->client.raw ? !rpool_direct_full(&s->client) : resp_stream_pending(&s->cmds) < RESP_ITEM_MAX);
    loop_watch(&s->src, (reading ? EPOLLIN : 0) | (buf_len(&s->out) ? EPOLLOUT : 0));
}

static void answer(struct rsession *s, const char *p, size_t n)
{
    if (buf_append(&s->out, p, n) != 0)
        s->closing = true;             /* cannot be delivered whole: end as a reset would */
}

static void answer_local(struct rsession *s, const char *p, size_t n)
{
    STAT_INC(s->client.upstream, redis_local_replies);
    answer(s, p, n);
}

#define LITERAL(s) s, sizeof s - 1

/* A command goes to the server: -1 past INFLIGHT_MAX owed (an app that never reads). */
static int room_for_one(const struct rsession *s)
{
    return s->client.inflight < INFLIGHT_MAX ? 0 : -1;
}

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
static void check_ending(struct rsession *s, const char *p, size_t n);

static void on_reply(struct rpool_client *c, const char *p, size_t n)
{
    struct rsession *s = of_client(c);
    if (s->checking_password) {        /* the server's word on the app's password */
        s->checking_password = false;
        on_verified(c, n && p[0] == '+', p, n);
        return;
    }
    if (s->probing) {                  /* the shim's own PING: heard, not the app's */
        s->probing = false;
        bool refused = n > 8 && !memcmp(p, "-NOAUTH ", 8);
        redis_known_keep(c->upstream, LITERAL(OPEN_KEY), refused ? p : "+", refused ? n : 1);
        process(s);
        update(s);
        return;
    }
    if (s->learning_len)
        learn(s, p, n);
    s->replied++;
    check_ending(s, p, n);
    answer(s, p, n);
    if (c->lent && !s->in_multi && !s->watching && !c->inflight)
        rpool_give_back(c, true);      /* the transaction, the watch or the block is over */
    process(s);
    update(s);
}

static void take_identity(struct rsession *s, struct rpool_ident *id, bool hello, bool known);

static void on_verified(struct rpool_client *c, bool ok, const char *err, size_t n)
{
    struct rsession *s = of_client(c);
    s->waiting_verdict = false;
    if (ok) {
        take_identity(s, s->pending_id, s->hello_pending, false);
    } else {
        rpool_ident_put(s->pending_id);
        answer(s, err, n);             /* the server's own words, as direct */
    }
    s->pending_id = NULL;
    s->hello_pending = false;
    process(s);
    update(s);
}

static void on_raw(struct rpool_client *c, const char *p, size_t n)
{
    struct rsession *s = of_client(c);
    answer(s, p, n);
    update(s);
}

static void on_lost(struct rpool_client *c)
{
    struct rsession *s = of_client(c);
    shim_debug("fd %d: redis: the server connection went away: closed, as a reset", s->src.fd);
    if (s->direct && buf_len(&s->out)) {
        s->closing = true;             /* its own connection ended: what came of it first */
        update(s);
        return;
    }
    session_close(s);                  /* what was owed to it will not come: as a reset direct */
}

static void on_drained(struct rpool_client *c)
{
    update(of_client(c));              /* read the app again */
}

static const struct rpool_client_ops client_ops = { on_reply, on_verified, on_raw, on_lost, on_drained };

/* ---- commands ---- */

/* From here on the connection is the app's own, relaying bytes as they come: the rest of
 * what the app sent (this command first) goes as it is. */
static void go_direct(struct rsession *s)
{
    if (rpool_go_direct(&s->client, s->id, s->has_name ? s->name : NULL, s->has_name ? s->name_len : 0) != 0) {
        session_close(s);
        return;
    }
    s->learning_len = 0;               /* (its replies are bytes now) */
    s->direct = true;
    shim_debug("fd %d: redis: on a connection of its own from now on", s->src.fd);
    size_t n = buf_len(&s->cmds.raw);
    if (n && rpool_direct_write(&s->client, buf_head(&s->cmds.raw), n) != 0) {
        session_close(s);
        return;
    }
    resp_stream_free(&s->cmds);        /* no more framing of the app's bytes */
}

static void too_many_args(struct rsession *s, const char *cmd)
{
    char line[96];
    int k = snprintf(line, sizeof line, "-ERR wrong number of arguments for '%s' command\r\n", cmd);
    answer_local(s, line, (size_t)k);
}

static void hello_accepted(struct rsession *s);

/* The session runs as id from now on (the reference is its), and says so: +OK to an AUTH or
 * SELECT (answered here when id was known good), the server's own answer to a HELLO. */
static void take_identity(struct rsession *s, struct rpool_ident *id, bool hello, bool known)
{
    rpool_ident_put(s->id);
    s->id = id;
    if (hello)
        hello_accepted(s);
    else if (known)
        answer_local(s, LITERAL("+OK\r\n"));
    else
        answer(s, LITERAL("+OK\r\n"));
}

/* AUTH, SELECT or HELLO asks for id. A password is put to the server every time an app
 * says one, so that one changed or revoked since is refused as direct: as an AUTH on a
 * shared connection of id's when there is one (a command, not a connection), else on a
 * connection opened for it. A database or a protocol alone, once known good, is taken at
 * once. */
static void ask_identity(struct rsession *s, struct rpool_ident *id, bool hello, bool says_password)
{
    bool known = rpool_ident_verified(id);
    if (known && !says_password) {
        take_identity(s, id, hello, true);
        return;
    }
    s->pending_id = id;
    s->hello_pending = hello;
    /* (on a connection already open: one opened for it would say the password in its
     * setup, and a refusal there ends that connection as lost, not as this AUTH's answer) */
    int sent = known && rpool_ident_connected(id) && room_for_one(s) == 0 ? rpool_check_password(&s->client, id) : -2;
    if (sent == -1) {
        session_close(s);
        return;
    }
    if (sent == 0) {
        s->checking_password = true;
    } else if (rpool_verify(&s->client, id) != 0) {
        session_close(s);
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
            answer_local(s, LITERAL("-ERR syntax error\r\n"));
            return;
        }
        if (resp_argc(it) != 2 && resp_argc(it) != 3) {
            too_many_args(s, "auth");
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
            too_many_args(s, "select");
            return;
        }
        who.db = resp_arg(it, 1, &who.db_len);
    }
    struct rpool_ident *id = auth || who.db_len ? rpool_ident_get(s->client.upstream, &who) : NULL;
    if (!id) {
        answer_local(s, LITERAL("-ERR value is not an integer or out of range\r\n"));
        return;
    }
    ask_identity(s, id, false, auth);
}

static bool valid_name(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] < '!' || p[i] > '~')
            return false;
    return true;
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
            ok = valid_name(name, name_len) && name_len < NAME_MAX_LEN;   /* (longer: direct) */
            i += 2;
        } else {
            ok = false;
        }
    }
    struct rpool_ident *id = ok ? rpool_ident_get(s->client.upstream, &who) : NULL;
    if (!id) {
        go_direct(s);
        return;
    }
    s->hello_has_name = name != NULL;
    s->hello_name_len = name_len;
    if (name_len)
        memcpy(s->hello_name, name, name_len);
    ask_identity(s, id, true, says_password);
}

/* redis_known.c's key for a question: tag, then each part with its length before it (any
 * bytes may be in them). 0 when it does not fit. */
static size_t known_key(char *out, const char *tag, const char *a, size_t an, const char *b, size_t bn)
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

/* The session's identity is the HELLO's now: its name is set, and it is answered what a
 * bare HELLO is answered on a connection of that protocol for that user (the server's
 * own words: asked the first time, kept for the next). */
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

static void hello_accepted(struct rsession *s)
{
    struct rpool_who who = rpool_ident_parts(s->id);
    char key[REDIS_KNOWN_KEY_MAX];
    size_t n, key_len = known_key(key, "HELLO", who.proto == 3 ? "3" : "2", 1, who.user, who.user_len);
    const char *known = key_len ? redis_known_get(s->client.upstream, key, key_len, &n) : NULL;
    if (known) {
        hello_name_taken(s);           /* (only a reply that accepted is kept) */
        answer_local(s, known, n);
        return;
    }
    if (!key_len)
        hello_name_taken(s);           /* (no room to read its reply: as before) */
    char cmd[] = "*2\r\n$5\r\nHELLO\r\n$1\r\n2\r\n";
    cmd[sizeof cmd - 4] = who.proto == 3 ? '3' : '2';
    if (room_for_one(s) != 0 || rpool_send(&s->client, s->id, cmd, sizeof cmd - 1) != 0) {
        session_close(s);
        return;
    }
    memcpy(s->learning, key, key_len);  /* (sent with nothing owed: the next reply is its) */
    s->learning_len = key_len;
}

/* A CLIENT subcommand this server said it does not know: the same error, at once. Else,
 * asked with nothing owed, its reply is read for that error. True when answered. */
static bool unknown_subcommand(struct rsession *s, const struct resp_item *it, bool idle)
{
    size_t n0, n1, n;
    const char *a0 = resp_arg(it, 0, &n0), *a1 = resp_arg(it, 1, &n1);
    char key[REDIS_KNOWN_KEY_MAX];
    size_t key_len = idle ? known_key(key, "CLIENT-SUB", a0, n0, a1, n1) : 0;
    if (!key_len)
        return false;
    const char *known = redis_known_get(s->client.upstream, key, key_len, &n);
    if (known) {
        answer_local(s, known, n);
        return true;
    }
    memcpy(s->learning, key, key_len);
    s->learning_len = key_len;
    return false;
}

/* Whether the server runs commands for the identity a connection has before any AUTH
 * (the default user, database 0, RESP2: taken as good without a check, so what the shim
 * answers for it itself must not claim more than the server would): 1 yes, 0 no (*refusal
 * is the server's words, as it said them to a PING: what it says to any command but AUTH,
 * HELLO, QUIT and RESET), -1 not known yet: a PING went in the session's place (it must
 * have nothing owed), the command waits for its reply. Asked once per upstream. */
static int default_open(struct rsession *s, const char **refusal, size_t *n)
{
    const char *known = redis_known_get(s->client.upstream, LITERAL(OPEN_KEY), n);
    if (known) {
        *refusal = known;
        return known[0] == '+';
    }
    if (rpool_send(&s->client, s->id, LITERAL("*1\r\n$4\r\nPING\r\n")) != 0) {
        session_close(s);
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
    int open = rpool_ident_is_default(s->id) ? default_open(s, &refusal, &n) : 1;
    *wait = open < 0;
    if (open == 0)
        answer_local(s, refusal, n);
    return open != 1;
}

/* CLIENT SETNAME / GETNAME, answered here: the name belongs to the app's connection, not
 * to the shared server connection its commands happen to ride. */
static bool client_name(struct rsession *s, const struct resp_item *it)
{
    if (resp_arg_is(it, 1, "SETNAME")) {
        size_t n;
        const char *name = resp_arg(it, 2, &n);
        if (resp_argc(it) != 3)
            too_many_args(s, "client|setname");
        else if (!valid_name(name, n))
            answer_local(s, LITERAL("-ERR Client names cannot contain spaces, newlines or special characters.\r\n"));
        else if (n >= NAME_MAX_LEN)
            return false;              /* longer than the shim keeps: the caller goes direct */
        else {
            memcpy(s->name, name, n);
            s->name_len = n;
            s->has_name = n > 0;
            answer_local(s, LITERAL("+OK\r\n"));
        }
        return true;
    }
    if (resp_arg_is(it, 1, "GETNAME") && resp_argc(it) == 2) {
        if (!s->has_name) {
            if (rpool_ident_parts(s->id).proto == 3)
                answer_local(s, LITERAL("_\r\n"));   /* RESP3's null */
            else
                answer_local(s, LITERAL("$-1\r\n"));
        } else {
            char head[32];
            int k = snprintf(head, sizeof head, "$%zu\r\n", s->name_len);
            answer_local(s, head, (size_t)k);
            answer(s, s->name, s->name_len);
            answer(s, "\r\n", 2);
        }
        return true;
    }
    return false;
}

static int send_command(struct rsession *s, const struct resp_item *it)
{
    if (room_for_one(s) != 0 || rpool_send(&s->client, s->id, buf_head(&s->cmds.raw), it->raw_len) != 0) {
        session_close(s);
        return -1;
    }
    s->sent++;
    return 0;
}

/* A command that ends a transaction (EXEC, DISCARD) or the WATCHes (UNWATCH) is about to
 * go on the lent connection: false when there is no room to follow its reply (the state
 * is then taken as still open: the connection stays lent, the safe side). */
static bool expect_ending(struct rsession *s)
{
    if (s->n_endings == sizeof s->endings / sizeof *s->endings)
        return false;
    s->endings[s->n_endings].reply = s->sent + 1;
    s->endings[s->n_endings].was_multi = s->in_multi;
    s->endings[s->n_endings].was_watching = s->watching;
    s->n_endings++;
    return true;
}

/* The reply to such a command: taken, or refused (the state it was to end is open still). */
static void check_ending(struct rsession *s, const char *p, size_t n)
{
    if (!s->n_endings || s->endings[0].reply != s->replied)
        return;
    bool was_multi = s->endings[0].was_multi, was_watching = s->endings[0].was_watching;
    memmove(s->endings, s->endings + 1, --s->n_endings * sizeof *s->endings);
    /* (EXECABORT: the transaction was discarded all the same) */
    bool refused = n && p[0] == '-' && !(n >= 11 && !memcmp(p, "-EXECABORT ", 11));
    if (refused) {
        s->in_multi |= was_multi;
        s->watching |= was_watching;
    }
}

/* One command: true when it was taken (answered, sent, or the session changed course),
 * false when it must wait (replies owed first, an identity being checked). */
static bool one_command(struct rsession *s, const struct resp_item *it)
{
    struct rpool_client *c = &s->client;
    bool idle = c->inflight == 0;
    if (redis_command_needs_own_connection(it)) {
        if (!idle && !c->lent)
            return false;              /* its replies first: then nothing is in between */
        go_direct(s);
        return true;
    }
    bool hello_args = resp_arg_is(it, 0, "HELLO") && resp_argc(it) > 1;   /* (a bare HELLO changes nothing) */
    /* answered here, so only once the replies owed are in: they come first, as direct. A
     * lent connection carries the session's name: a new name there takes it direct, and
     * inside MULTI the server queues and answers them as any command. */
    bool setname = resp_arg_is(it, 0, "CLIENT") && resp_arg_is(it, 1, "SETNAME");
    bool named = setname || (resp_arg_is(it, 0, "CLIENT") && resp_arg_is(it, 1, "GETNAME"));
    if (named && !s->in_multi && !(setname && c->lent)) {
        if (!idle)
            return false;
        bool wait;                     /* (an arity error comes first, as the server checks) */
        if (resp_argc(it) == (setname ? 3u : 2u) && refused_as_default(s, &wait))
            return !wait || s->gone;
        if (client_name(s, it))
            return true;               /* (else a GETNAME with arguments: the server's error) */
        if (setname) {                 /* a name longer than the shim keeps: the server keeps it */
            go_direct(s);
            return true;
        }
    }
    if (c->lent) {                     /* a transaction, WATCHed keys or a blocking command */
        if (resp_arg_is(it, 0, "AUTH") || resp_arg_is(it, 0, "SELECT") || resp_arg_is(it, 0, "RESET")
            || resp_arg_is(it, 0, "QUIT") || hello_args || setname) {
            go_direct(s);              /* the lent connection carries the app's state exactly */
            return true;
        }
        /* what the server will make of it, as it does: EXEC and DISCARD end a transaction
         * and every WATCH (outside one they are errors that change nothing), UNWATCH ends the
         * WATCHes (inside one it is only queued), WATCH inside one is refused */
        if (resp_arg_is(it, 0, "MULTI"))
            s->in_multi = true;
        else if (resp_arg_is(it, 0, "WATCH") && !s->in_multi)
            s->watching = true;
        else if ((resp_arg_is(it, 0, "EXEC") || resp_arg_is(it, 0, "DISCARD")) && s->in_multi && expect_ending(s))
            s->in_multi = s->watching = false;
        else if (resp_arg_is(it, 0, "UNWATCH") && !s->in_multi && expect_ending(s))
            s->watching = false;
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
        too_many_args(s, "reset");
        return true;
    }
    if (resp_arg_is(it, 0, "RESET")) {
        struct rpool_ident *id = rpool_ident_get(c->upstream, &RPOOL_WHO_DEFAULT);   /* (RESP2 again) */
        if (!id) {
            session_close(s);
            return true;
        }
        rpool_ident_put(s->id);
        s->id = id;
        s->has_name = false;
        s->name_len = 0;
        answer_local(s, LITERAL("+RESET\r\n"));
        return true;
    }
    if (resp_arg_is(it, 0, "QUIT")) {
        answer_local(s, LITERAL("+OK\r\n"));
        s->closing = true;
        return true;
    }
    if (resp_arg_is(it, 0, "CLIENT") && resp_argc(it) >= 2 && unknown_subcommand(s, it, idle))
        return true;
    if (multi || watch || block) {
        enum rpool_pin why = multi ? RPOOL_PIN_MULTI : watch ? RPOOL_PIN_WATCH : RPOOL_PIN_BLOCKING;
        if (rpool_lend(c, s->id, why, s->name, s->has_name ? s->name_len : 0) != 0) {
            go_direct(s);              /* redis_pinned_max lent already: a connection of its own */
            return true;
        }
        s->in_multi = multi;
        s->watching = watch;
        send_command(s, it);
        return true;
    }
    send_command(s, it);
    return true;
}

static void process(struct rsession *s)
{
    for (int n = 0; n < 100000; n++) {
        /* (INFLIGHT_MAX owed: the next command waits for replies, and the app's bytes for
         * room, as a server's socket buffer would make them wait) */
        if (s->gone || s->client.raw || s->waiting_verdict || s->closing || s->client.inflight >= INFLIGHT_MAX)
            return;
        struct resp_item it = s->held;
        if (!s->has_held) {
            enum resp_next r = resp_stream_next(&s->cmds, &it);
            if (r == RESP_MORE)
                return;
            if (r == RESP_TOO_LARGE || r == RESP_INLINE) {
                /* a command larger than the shim frames, or an inline one: as it is, over
                 * a connection of its own (the lent one, whose state is the app's) */
                if (s->client.inflight == 0 || s->client.lent)
                    go_direct(s);
                return;                /* (else after the replies owed) */
            }
            if (r != RESP_ITEM) {
                STAT_INC(s->client.upstream, redis_malformed);
                shim_debug("fd %d: redis: not a RESP command: closed, nothing of it sent", s->src.fd);
                session_close(s);
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
        session_close(s);
        return;
    }
    if (ev & EPOLLIN) {
        char chunk[16384];
        for (int rounds = 0; rounds < 8 && !s->gone && !s->app_eof; rounds++) {
            bool direct = s->client.raw;
            if (direct && rpool_direct_full(&s->client))
                break;
            if (!direct && resp_stream_pending(&s->cmds) >= RESP_ITEM_MAX)
                break;
            ssize_t n = recv(src->fd, chunk, sizeof chunk, MSG_DONTWAIT);
            if (n > 0) {
                int rc = direct ? rpool_direct_write(&s->client, chunk, (size_t)n)
                                : resp_stream_feed(&s->cmds, chunk, (size_t)n);
                if (rc != 0) {
                    session_close(s);
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
    update(s);
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
    s->out.cap = OUT_SOFT_MAX + RESP_REPLY_MAX + 64 * 1024;
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
    s->next = live;
    if (live)
        live->prev = s;
    live = s;
    shim_debug("fd %d: a redis session", s->src.fd);
    process(s);
    update(s);
    return 0;
}
