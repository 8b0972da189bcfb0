/* redis_commands.h — what a Redis command asks of its connection (redis_commands.c). */
#ifndef HTTPSHIM_REDIS_COMMANDS_H
#define HTTPSHIM_REDIS_COMMANDS_H
#include <stdbool.h>
#include "resp.h"

/* BLPOP and its kin, WAIT, XREAD/XREADGROUP with BLOCK: the server may hold the reply. */
bool redis_command_blocks(const struct resp_item *it);
/* Whether the command leaves state only a connection of the app's own can keep. */
bool redis_command_needs_own_connection(const struct resp_item *it);
/* Whether it only reads: it may go before the server has confirmed the password the app
 * logged in with (its reply is held until then). */
bool redis_command_reads_only(const struct resp_item *it);
/* SCRIPT KILL, FUNCTION KILL: the server answers them while a script runs, on another
 * connection than the script's, so they must not wait behind it. */
bool redis_command_ends_a_script(const struct resp_item *it);
#endif
