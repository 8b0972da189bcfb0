/* redis_wire.h — the shim's own commands to a Redis server, as bytes (redis_wire.c). */
#ifndef HTTPSHIM_REDIS_WIRE_H
#define HTTPSHIM_REDIS_WIRE_H
#include "buf.h"
#include "redis_ident.h"
#include <stddef.h>

/* Each appends one command to b: 0, or -1 (b is full: the command may be cut, b is not to be sent). */
int redis_wire_command(struct buf *b, int argc, const char *const *argv, const size_t *lens);
int redis_wire_setname(struct buf *b, const char *name, size_t name_len);
int redis_wire_auth(struct buf *b, const struct rpool_ident *id);
/* What a new connection of id's sends first (AUTH, HELLO 3, SELECT, CLIENT SETNAME): how
 * many commands, or -1. */
int redis_wire_setup(struct buf *b, const struct rpool_ident *id, const char *name, size_t name_len);
/* AUTH default <a password of this process's own>: accepted exactly when the default user
 * is on and takes any password (no password: a new connection is logged in as it). */
int redis_wire_default_check(struct buf *b);
#endif
