/* stats_server.h — the per-process stats socket (stats_server.c). */
#ifndef HTTPSHIM_STATS_SERVER_H
#define HTTPSHIM_STATS_SERVER_H
#include "rules.h"

int stats_server_start(const struct shim_config *cfg);
void stats_server_atfork_child(void);
#endif
