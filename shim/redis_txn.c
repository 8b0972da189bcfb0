/* redis_txn.c — owns what an app's commands leave open on a connection lent to it, as the
 * server will read them: MULTI opens a transaction, WATCH (outside one) WATCHes keys,
 * EXEC and DISCARD end a transaction and every WATCH, UNWATCH (outside one) the WATCHes;
 * an ending counts only once the server's reply has taken it. redis_session.c gives the
 * connection back when nothing is open. */
#include "redis_txn.h"
#include <string.h>

/* An ending about to go: false when there is no room to follow its reply (the state is
 * then taken as still open: the connection stays lent, the safe side). */
static bool expect_ending(struct redis_txn *t, uint64_t reply_no)
{
    if (t->n_endings == sizeof t->endings / sizeof *t->endings)
        return false;
    t->endings[t->n_endings].reply = reply_no;
    t->endings[t->n_endings].was_multi = t->in_multi;
    t->endings[t->n_endings].was_watching = t->watching;
    t->n_endings++;
    return true;
}

void redis_txn_sent(struct redis_txn *t, const struct resp_item *it, uint64_t reply_no)
{
    /* (outside a transaction EXEC and DISCARD are errors that change nothing; inside one
     * UNWATCH is only queued, and WATCH is refused) */
    if (resp_arg_is(it, 0, "MULTI"))
        t->in_multi = true;
    else if (resp_arg_is(it, 0, "WATCH") && !t->in_multi)
        t->watching = true;
    else if ((resp_arg_is(it, 0, "EXEC") || resp_arg_is(it, 0, "DISCARD")) && t->in_multi && expect_ending(t, reply_no))
        t->in_multi = t->watching = false;
    else if (resp_arg_is(it, 0, "UNWATCH") && !t->in_multi && expect_ending(t, reply_no))
        t->watching = false;
}

void redis_txn_reply(struct redis_txn *t, uint64_t reply_no, const char *p, size_t n)
{
    if (!t->n_endings || t->endings[0].reply != reply_no)
        return;
    bool was_multi = t->endings[0].was_multi, was_watching = t->endings[0].was_watching;
    memmove(t->endings, t->endings + 1, --t->n_endings * sizeof *t->endings);
    /* (EXECABORT: the transaction was discarded all the same) */
    bool refused = n && p[0] == '-' && !(n >= 11 && !memcmp(p, "-EXECABORT ", 11));
    if (refused) {
        t->in_multi |= was_multi;
        t->watching |= was_watching;
    }
}

bool redis_txn_clean(const struct redis_txn *t) { return !t->in_multi && !t->watching; }
