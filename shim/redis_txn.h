/* redis_txn.h — the state an app's commands leave on a connection lent to it: a
 * transaction open, keys WATCHed (redis_txn.c). */
#ifndef HTTPSHIM_REDIS_TXN_H
#define HTTPSHIM_REDIS_TXN_H
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "resp.h"

struct redis_txn {
    /* as of the last command sent (the server's, once it has read them) */
    bool in_multi, watching;
    /* EXEC, DISCARD and UNWATCH sent, by the number of the reply that says whether the
     * server took them (an error, their arity's or an ACL's, leaves the transaction or the
     * WATCHes open: the connection is not given back) */
    struct { uint64_t reply; bool was_multi, was_watching; } endings[16];
    unsigned n_endings;
};

/* it goes to the server; its reply will be the reply_no-th the session gets. */
void redis_txn_sent(struct redis_txn *t, const struct resp_item *it, uint64_t reply_no);
/* The reply_no-th reply came: p, n. */
void redis_txn_reply(struct redis_txn *t, uint64_t reply_no, const char *p, size_t n);
/* Nothing is open: the connection may be given back (once nothing is owed). */
bool redis_txn_clean(const struct redis_txn *t);
#endif
