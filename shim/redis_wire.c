/* redis_wire.c — owns the bytes of the commands the shim itself sends a Redis server (RESP
 * arrays, each length said, each argument copied whole: a password may hold any byte):
 * a connection's setup and name, an AUTH, the AUTH that asks whether the default user
 * logs a new connection in. */
#include "redis_wire.h"
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>

int redis_wire_command(struct buf *b, int argc, const char *const *argv, const size_t *lens)
{
    char head[32];
    int k = snprintf(head, sizeof head, "*%d\r\n", argc);
    if (buf_append(b, head, (size_t)k))
        return -1;
    for (int i = 0; i < argc; i++) {
        k = snprintf(head, sizeof head, "$%zu\r\n", lens[i]);
        if (buf_append(b, head, (size_t)k) || buf_append(b, argv[i], lens[i]) || buf_append(b, "\r\n", 2))
            return -1;
    }
    return 0;
}

int redis_wire_setname(struct buf *b, const char *name, size_t name_len)
{
    const char *argv[3] = { "CLIENT", "SETNAME", name };
    size_t lens[3] = { 6, 7, name_len };
    return redis_wire_command(b, 3, argv, lens);
}

/* AUTH default <a password of this process's>: for a user without a password (nopass),
 * any password is accepted, and only then (see rpool_check_password). */
int redis_wire_default_check(struct buf *b)
{
    static char word[33];
    if (!word[0]) {
        unsigned char r[16] = { 0 };
        if (getrandom(r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r)
            for (size_t i = 0; i < sizeof r; i++)
                r[i] = (unsigned char)(rand() ^ (int)i);
        for (size_t i = 0; i < sizeof r; i++)
            snprintf(word + 2 * i, 3, "%02x", r[i]);
    }
    const char *argv[3] = { "AUTH", "default", word };
    size_t lens[3] = { 4, 7, 32 };
    return redis_wire_command(b, 3, argv, lens);
}

/* AUTH [user] password of id's, its lengths said and its bytes copied (a password may hold
 * any byte, NUL included) */
int redis_wire_auth(struct buf *b, const struct rpool_ident *id)
{
    const char *argv[3] = { "AUTH", id->user, id->pass };
    size_t lens[3] = { 4, id->user_len, id->pass_len };
    if (!id->has_user) {
        argv[1] = id->pass;
        lens[1] = id->pass_len;
    }
    return redis_wire_command(b, id->has_user ? 3 : 2, argv, lens);
}

int redis_wire_setup(struct buf *b, const struct rpool_ident *id, const char *name, size_t name_len)
{
    int n = 0;
    if (id->has_pass) {
        if (redis_wire_auth(b, id))
            return -1;
        n++;
    }
    if (id->proto == 3) {              /* (after AUTH: HELLO asks an authenticated connection) */
        const char *argv[2] = { "HELLO", "3" };
        size_t lens[2] = { 5, 1 };
        if (redis_wire_command(b, 2, argv, lens))
            return -1;
        n++;
    }
    if (!(id->db_len == 1 && id->db[0] == '0')) {
        const char *argv[2] = { "SELECT", id->db };
        size_t lens[2] = { 6, id->db_len };
        if (redis_wire_command(b, 2, argv, lens))
            return -1;
        n++;
    }
    if (name_len) {
        if (redis_wire_setname(b, name, name_len))
            return -1;
        n++;
    }
    return n;
}
