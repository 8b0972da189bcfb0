/* redis_commands.c — owns what a Redis command asks of the connection it runs on, read
 * from its name and arguments alone: whether it blocks (a connection lent to it while it
 * waits), whether it leaves state that only a connection of the app's own can keep (the
 * app connection goes direct), and whether it only reads (it may run before the server
 * has confirmed the app's password, its reply held until then). redis_session.c acts on
 * the answers. */
#include "redis_commands.h"

static bool name_in(const struct resp_item *it, const char *const *names)
{
    for (; *names; names++)
        if (resp_arg_is(it, 0, *names))
            return true;
    return false;
}

static const char *const blocking[] = { "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX",
                                         "BZMPOP", "WAIT", "WAITAOF", NULL };
/* (READONLY, READWRITE and ASKING: how a cluster node serves the connection's next
 * commands, replica reads or the next command's slot check: never another app's; REPLCONF:
 * the handshake of a replica, whose PSYNC must follow on the same connection; the
 * UNSUBSCRIBEs: even on a connection that subscribed to nothing, one reply per channel
 * named, and in RESP3 a push: on a shared connection, the second would be the next
 * command's, another app's) */
static const char *const own_connection[] = { "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE",
                                               "SUNSUBSCRIBE", "MONITOR", "SYNC", "PSYNC", "REPLCONF", "READONLY",
                                               "READWRITE", "ASKING", NULL };

bool redis_command_blocks(const struct resp_item *it)
{
    if (name_in(it, blocking))
        return true;
    if (resp_arg_is(it, 0, "XREAD") || resp_arg_is(it, 0, "XREADGROUP"))
        for (size_t i = 1; i < resp_argc(it); i++)
            if (resp_arg_is(it, i, "BLOCK"))
                return true;
    return false;
}

bool redis_command_needs_own_connection(const struct resp_item *it)
{
    if (name_in(it, own_connection))
        return true;
    /* (CLIENT ID and INFO: the app learns which connection is its own, to CLIENT KILL or
     * UNBLOCK it later; on a shared one that would end or wake other apps' commands) */
    if (resp_arg_is(it, 0, "CLIENT"))
        return resp_arg_is(it, 1, "TRACKING") || resp_arg_is(it, 1, "REPLY") || resp_arg_is(it, 1, "NO-EVICT")
               || resp_arg_is(it, 1, "CACHING") || resp_arg_is(it, 1, "NO-TOUCH") || resp_arg_is(it, 1, "ID")
               || resp_arg_is(it, 1, "INFO");
    /* a script debugger (YES, SYNC) holds the connection's next EVALs: another app's
     * would stop at its breakpoints */
    if (resp_arg_is(it, 0, "SCRIPT") && resp_arg_is(it, 1, "DEBUG"))
        return !resp_arg_is(it, 2, "NO");
    return false;
}

bool redis_command_ends_a_script(const struct resp_item *it)
{
    return (resp_arg_is(it, 0, "SCRIPT") || resp_arg_is(it, 0, "FUNCTION")) && resp_arg_is(it, 1, "KILL");
}

/* Commands that change nothing a client can see and answer from what is there (no STORE
 * option, no expiry set, no blocking form): TLS 1.3's early data, taken to Redis. A
 * command not named here waits for the verdict. */
static const char *const reads_only[] = { "GET", "MGET", "EXISTS", "STRLEN", "GETRANGE", "SUBSTR", "TTL", "PTTL",
                                          "EXPIRETIME", "PEXPIRETIME", "TYPE", "HGET", "HMGET", "HGETALL", "HEXISTS",
                                          "HLEN", "HKEYS", "HVALS", "HSTRLEN", "LLEN", "LRANGE", "LINDEX", "LPOS",
                                          "SCARD", "SISMEMBER", "SMISMEMBER", "SMEMBERS", "ZCARD", "ZSCORE",
                                          "ZMSCORE", "ZRANK", "ZREVRANK", "ZCOUNT", "ZLEXCOUNT", "ZRANGEBYSCORE",
                                          "ZREVRANGEBYSCORE", "ZREVRANGE", "ZRANGE", "XLEN", "PING", "ECHO", "DBSIZE", "INFO",
                                          "TIME", "BITCOUNT", "GETBIT", NULL };

bool redis_command_reads_only(const struct resp_item *it)
{
    return name_in(it, reads_only);   /* (ZRANGE's storing form is ZRANGESTORE, not named) */
}
