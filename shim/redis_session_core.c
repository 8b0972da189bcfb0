/* redis_session_core.c — owns a Redis app session's keeping: its memory and its close,
 * what its app is answered (the server's words, the shim's own, held while a login is
 * checked) and when its app is read or written, the answers the shim gives from the
 * session's own state (a name, an arity error, a CLIENT subcommand's kept error), and
 * going direct. Below redis_session.c, which reads the commands. Engine thread only. */
#include "redis_session_core.h"
#include "linger.h"
#include "fdtable.h"
#include "log.h"
#include "redis_commands.h"
#include "stats.h"
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

static struct rsession *live;

void rs_link(struct rsession *s)
{
    s->next = live;
    if (live)
        live->prev = s;
    live = s;
}

void rs_forget_all(void) { live = NULL; }     /* the parent's: unreachable, never used */

/* A server connection of the identity was lost: a session of it holding commands its app wrote
 * before (a pipeline waiting on the app's reading) ends once the replies it has are read,
 * as its own connection would have ended with the server's; those commands never run on
 * the next one (nothing is sent again). */
void rs_close_holding(int upstream, const struct rpool_ident *id)
{
    for (struct rsession *s = live, *next; s; s = next) {
        next = s->next;
        if (s->client.upstream == upstream && s->id == id && !s->gone && !s->client.raw
            && (s->has_held || resp_stream_pending_command(&s->cmds) > 0)) {
            shim_debug("fd %d: redis: the server went while commands were held for it: ends once the "
                       "replies it has are read", s->src.fd);
            s->closing = s->reply_dropped = true;   /* (what came before the loss is still the app's) */
            rs_update(s);
        }
    }
}

static void reclaim(struct loop_deferred *d)
{
    free((char *)d - offsetof(struct rsession, reclaim));
}

void rs_close(struct rsession *s)
{
    if (s->gone)
        return;
    s->gone = true;
    rpool_client_gone(&s->client);
    rpool_client_gone(&s->checker);
    if (s->has_held && s->held.argv)
        freeReplyObject(s->held.argv);
    s->has_held = false;
    if (!s->lingered) {
        loop_remove(&s->src);
        fdtable_close_engine_fd(s->src.fd);
    }
    resp_stream_free(&s->cmds);
    buf_free(&s->out);
    buf_free(&s->early);
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

/* The app's end is closed: its fd leaves the loop (which would report the hang-up for
 * ever), the commands it sent run as direct, and what it is answered is dropped. */
void rs_app_went(struct rsession *s)
{
    s->app_gone = s->app_eof = true;
    buf_free(&s->out);
    buf_free(&s->early);
    loop_remove(&s->src);
}

void rs_update(struct rsession *s)
{
    if (s->gone)
        return;
    if (buf_len(&s->out) && buf_send(&s->out, s->src.fd) != 0) {
        if (s->closing) {
            rs_close(s);
            return;
        }
        rs_app_went(s);
    }
    if (s->closing && !buf_len(&s->out)) {
        /* an end as the server's own (QUIT answered, the server ending a direct session): the
         * app's next write is taken, as TCP's first after a FIN; closed at once, its EPIPE
         * raised SIGPIPE in a C client. A lost connection's is a reset, as direct */
        if (!s->app_gone && !s->reply_dropped && !s->refused && linger_adopt(&s->src))
            s->lingered = true;
        rs_close(s);
        return;
    }
    /* A slow app holds back a server connection of its own (lent, or direct), or the one
     * a value in parts comes to it on, not the shim's memory. A shared one carries others' replies too, which must not wait on it:
     * that app's commands are no longer read, and the replies it already owes are kept, up
     * to out's cap (past it, its connection ends as a reset would: Redis's own
     * client-output-buffer-limit) */
    bool hold = rs_replies_pile_up(s) && (s->client.lent || s->client.raw || s->in_parts);
    if (hold != s->throttling) {
        s->throttling = hold;
        rpool_throttle(&s->client, hold);
        if (s->gone)
            return;
    }
    /* the server hears the end, answers what it read, and closes, as direct: a command of
     * the app's still blocked there (BLPOP 0) is dropped, never left to take an item for no
     * one (a lent connection's: once every command the app wrote has gone to it) */
    /* (behind a blocked command nothing the app wrote after it would run direct: what is
     * held for a local answer, CLIENT GETNAME after a BLPOP, does not keep the end back) */
    bool blocked = s->client.lent && s->client.inflight && s->client.pin_reason == RPOOL_PIN_BLOCKING;
    if (s->app_eof && !s->eof_passed
        && (s->client.raw || blocked
            || (s->client.lent && s->client.inflight && !s->has_held && !s->waiting_verdict
                && resp_stream_pending_command(&s->cmds) == 0))) {
        s->eof_passed = true;
        rpool_app_eof(&s->client);
        if (s->gone)
            return;
    }
    if (s->app_eof && !s->client.raw && !s->client.inflight && !s->waiting_verdict && !s->unconfirmed && !buf_len(&s->out)
        && !s->has_held && resp_stream_pending_command(&s->cmds) == 0) {
        rs_close(s);              /* the app is done and owed nothing */
        return;
    }
    /* (what the app writes is read while replies pile up: it may read them only once it has
     * written all; the commands wait, held, see process. Once the session is ending (QUIT),
     * what it writes still is read, and dropped, as Redis reads a client it will close: an
     * app that writes its whole pipeline first would wait on us while we wait on it) */
    bool draining = s->closing && !s->client.raw;
    bool reading = !s->app_eof
                   && (draining || (!s->closing && (s->client.raw ? !rpool_direct_full(&s->client)
                                                                  : resp_stream_pending(&s->cmds) + 16384 <= RESP_HOLD_MAX)));
    loop_watch(&s->src, (reading ? EPOLLIN : 0) | (buf_len(&s->out) ? EPOLLOUT : 0));
}

static void rs_put(struct rsession *s, struct buf *to, const char *p, size_t n)
{
    if (s->app_gone || s->reply_dropped)
        return;                        /* (after a reply dropped, none: the app would read the next as its) */
    if (buf_append(to, p, n) != 0) {
        s->reply_dropped = true;       /* cannot be delivered whole: end as a reset would */
        s->closing = true;
    }
}

/* The server's words: held while the password is being checked (ask_identity). */
void rs_answer(struct rsession *s, const char *p, size_t n)
{
    rs_put(s, s->unconfirmed ? &s->early : &s->out, p, n);
}

/* The shim's own answer, whole: on the session's own state (its database, its name), or
 * what the server says to anyone, it goes at once unless a held reply comes first. */
void rs_answer_local(struct rsession *s, const char *p, size_t n)
{
    STAT_INC(s->client.upstream, redis_local_replies);
    bool after_held = s->unconfirmed && (buf_len(&s->early) || s->client.inflight);
    rs_put(s, after_held ? &s->early : &s->out, p, n);
}

bool rs_replies_pile_up(const struct rsession *s)
{
    return buf_len(&s->out) + buf_len(&s->early) > OUT_SOFT_MAX;
}

/* A command goes to the server: -1 past INFLIGHT_MAX owed (an app that never reads). */
int rs_room_for_one(const struct rsession *s)
{
    return s->client.inflight < INFLIGHT_MAX ? 0 : -1;
}

/* From here on the connection is the app's own, relaying bytes as they come: the rest of
 * what the app sent (this command first) goes as it is. */
void rs_go_direct(struct rsession *s)
{
    if (s->unconfirmed) {              /* (never: its callers wait for the server's word first) */
        rs_close(s);              /* a connection of its own would run what follows unchecked */
        return;
    }
    if (rpool_go_direct(&s->client, s->id, s->has_name ? s->name : NULL, s->has_name ? s->name_len : 0) != 0) {
        rs_close(s);
        return;
    }
    s->learning_len = 0;               /* (its replies are bytes now) */
    s->direct = true;
    shim_debug("fd %d: redis: on a connection of its own from now on", s->src.fd);
    size_t n = buf_len(&s->cmds.raw);
    if (n && rpool_direct_write(&s->client, buf_head(&s->cmds.raw), n) != 0) {
        rs_close(s);
        return;
    }
    resp_stream_free(&s->cmds);        /* no more framing of the app's bytes */
}

void rs_too_many_args(struct rsession *s, const char *cmd)
{
    char line[96];
    int k = snprintf(line, sizeof line, "-ERR wrong number of arguments for '%s' command\r\n", cmd);
    rs_answer_local(s, line, (size_t)k);
}

bool rs_valid_name(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] < '!' || p[i] > '~')
            return false;
    return true;
}

/* The server's error kept for this CLIENT subcommand, or NULL; *key_len is its key's
 * length in key (0: it does not fit). */
const char *rs_kept_subcommand_error(const struct rsession *s, const struct resp_item *it, char *key,
                                         size_t *key_len, size_t *n)
{
    size_t n0, n1;
    const char *a0 = resp_arg(it, 0, &n0), *a1 = resp_arg(it, 1, &n1);
    *key_len = redis_known_key(key, "CLIENT-SUB", a0, n0, a1, n1);
    return *key_len ? redis_known_get(s->client.upstream, key, *key_len, n) : NULL;
}

/* A CLIENT subcommand this server said it does not know: the same error, at once. Else,
 * asked with nothing owed, its reply is read for that error. True when answered. */
bool rs_unknown_subcommand(struct rsession *s, const struct resp_item *it, bool idle)
{
    char key[REDIS_KNOWN_KEY_MAX];
    size_t n, key_len;
    if (!idle)
        return false;
    const char *known = rs_kept_subcommand_error(s, it, key, &key_len, &n);
    if (!key_len)
        return false;
    if (known) {
        rs_answer_local(s, known, n);
        return true;
    }
    memcpy(s->learning, key, key_len);
    s->learning_len = key_len;
    return false;
}

/* CLIENT SETNAME / GETNAME, answered here: the name belongs to the app's connection, not
 * to the shared server connection its commands happen to ride. */
bool rs_client_name(struct rsession *s, const struct resp_item *it)
{
    if (resp_arg_is(it, 1, "SETNAME")) {
        size_t n;
        const char *name = resp_arg(it, 2, &n);
        if (resp_argc(it) != 3)
            rs_too_many_args(s, "client|setname");
        else if (!rs_valid_name(name, n))
            rs_answer_local(s, LITERAL("-ERR Client names cannot contain spaces, newlines or special characters.\r\n"));
        else if (n >= NAME_MAX_LEN)
            return false;              /* longer than the shim keeps: the caller goes direct */
        else {
            memcpy(s->name, name, n);
            s->name_len = n;
            s->has_name = n > 0;
            rs_answer_local(s, LITERAL("+OK\r\n"));
        }
        return true;
    }
    if (resp_arg_is(it, 1, "GETNAME") && resp_argc(it) == 2) {
        if (!s->has_name) {
            if (rpool_ident_parts(s->id).proto == 3)
                rs_answer_local(s, LITERAL("_\r\n"));   /* RESP3's null */
            else
                rs_answer_local(s, LITERAL("$-1\r\n"));
        } else {
            char bulk[NAME_MAX_LEN + 32];
            int k = snprintf(bulk, sizeof bulk, "$%zu\r\n", s->name_len);
            memcpy(bulk + k, s->name, s->name_len);
            memcpy(bulk + k + s->name_len, "\r\n", 2);
            rs_answer_local(s, bulk, (size_t)k + s->name_len + 2);
        }
        return true;
    }
    return false;
}

/* What may go while the password the app logged in with is being checked: reads, and what
 * the shim answers itself (the session's database and name, the server's error for a
 * CLIENT subcommand it does not know), while what waits for the app is under its cap. */
bool rs_early_allowed(const struct rsession *s, const struct resp_item *it)
{
    if (buf_len(&s->early) >= OUT_SOFT_MAX)
        return false;
    if (resp_arg_is(it, 0, "CLIENT")) {
        char key[REDIS_KNOWN_KEY_MAX];
        size_t key_len, n;
        return resp_arg_is(it, 1, "SETNAME") || resp_arg_is(it, 1, "GETNAME")
               || rs_kept_subcommand_error(s, it, key, &key_len, &n);
    }
    return resp_arg_is(it, 0, "SELECT") || redis_command_reads_only(it);
}
