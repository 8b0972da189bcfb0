/* exited.h — the records processes leave beside their stats sockets: the final counters
 * of an exited one, the reason of an inert one (exited.c). */
#ifndef HTTPSHIM_EXITED_H
#define HTTPSHIM_EXITED_H
#include <stdbool.h>
#include <sys/stat.h>
#include <stddef.h>
#include <time.h>

#define EXITED_KEEP       256          /* records kept, newest first */
#define EXITED_MAX_AGE_S  3600         /* a record older than this is removed */
#define EXITED_SCAN_MAX   1024         /* records looked at in one listing */
#define EXITED_PATH_MAX   256

struct exited_record { int pid; time_t mtime; char path[EXITED_PATH_MAX]; };

#define EXITED_SUFFIX ".exited"        /* an exited process's final /stats */
#define INERT_SUFFIX  ".inert"         /* why a process runs without the shim */
/* The default stats_socket: where a process that could not read its rules leaves its
 * inert record, and where the CLI looks for such records too. */
#define EXITED_DEFAULT_PATTERN "/tmp/httpshim-%u/%p.sock"

/* The records (name ending in suffix) for the stats_socket pattern (uid's own files only),
 * newest first, at most max into out (NULL: just prune); what is too old or beyond
 * EXITED_KEEP is removed. */
int exited_list(const char *pattern, unsigned uid, const char *suffix, struct exited_record *out, int max);
/* Leaves json as the record (socket_path + suffix) of the process: 0 on success. */
int exited_write(const char *socket_path, const char *suffix, const char *json, size_t len);
/* This process's inert record beside the default socket path: its pid, command and why
 * the shim is inert in it ({"pid", "comm", "cmdline", "started_unix", "start_ticks", "inert":
 * reason}). 0 on success. */
int exited_write_inert(const char *reason);
/* The socket's directory: created 0700, or an existing one that others cannot replace
 * files in. 0, or -1 with errno. */
/* Whether a directory no user but uid (and root) can replace files in: uid's or root's and
 * not writable by others, or root's with the sticky bit (/tmp). Another user's sticky
 * directory is not: its owner may remove anything in it. */
bool exited_dir_trusted(const struct stat *st, unsigned uid);
int exited_prepare_dir(const char *socket_path);
/* A JSON string's contents, escaped (and cut at n - 1 bytes). */
void exited_json_escape(const char *in, size_t in_len, char *out, size_t n);
/* When process pid (0: this one) started, in clock ticks since boot (/proc/PID/stat's
 * starttime): with its pid, what tells it from a later process given the same pid. 0 when
 * unknown. */
unsigned long long exited_start_ticks(int pid);
/* /proc/self/FILE's first n - 1 bytes, NULs as spaces, the trailing newline dropped. */
size_t exited_read_self(const char *file, char *out, size_t n);
#endif
