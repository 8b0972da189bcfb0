/* exited.h — the records exited processes leave beside their stats sockets (exited.c). */
#ifndef HTTPSHIM_EXITED_H
#define HTTPSHIM_EXITED_H
#include <stddef.h>
#include <time.h>

#define EXITED_KEEP       256          /* records kept, newest first */
#define EXITED_MAX_AGE_S  3600         /* a record older than this is removed */
#define EXITED_SCAN_MAX   1024         /* records looked at in one listing */
#define EXITED_PATH_MAX   256

struct exited_record { int pid; time_t mtime; char path[EXITED_PATH_MAX]; };

/* The records for the stats_socket pattern (uid's own files only), newest first, at most
 * max into out (NULL: just prune); what is too old or beyond EXITED_KEEP is removed. */
int exited_list(const char *pattern, unsigned uid, struct exited_record *out, int max);
/* Leaves json as the record of the process whose socket is socket_path: 0 on success. */
int exited_write(const char *socket_path, const char *json, size_t len);
#endif
