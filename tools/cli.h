/* cli.h — what the httpshim command's files share (tools/cli_common.c): finding the
 * processes' stats sockets, asking them, summing their JSON, reading the rules' socket
 * pattern. */
#ifndef HTTPSHIM_CLI_H
#define HTTPSHIM_CLI_H
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <jansson.h>

#ifndef HTTPSHIM_LIBDIR
#define HTTPSHIM_LIBDIR "/usr/local/lib/httpshim"
#endif
#define DEFAULT_CONF "/etc/httpshim/rules.conf"
#define MAX_PROCS 4096
#define RESPONSE_MAX (4 * 1024 * 1024)

struct proc { int pid; char path[256]; };
extern unsigned view_uid;              /* whose processes: ours, or --user's */

/* The rules file: the option, else $HTTPSHIM_CONF, else the default. */
const char *conf_path(const char *opt);
/* The live processes' sockets matching the rules' stats_socket pattern. */
int find_processes(const char *pattern, struct proc *procs, int max);
/* How long asking the processes may take, all of them together: a stopped process (its
 * socket accepts into the backlog, then nothing) costs this once, however many there are. */
#define ASK_DEADLINE_MS 3000
/* What asking one process came to. */
enum ask_outcome {
    ASK_ANSWERED,                      /* a 200: body holds it */
    ASK_SILENT,                        /* the request was sent, no answer by the deadline: stopped or busy */
    ASK_UNREACHED,                     /* not connected (refused, backlog full, not asked by the deadline) */
    ASK_FAILED                         /* another status, too large an answer, a broken connection */
};
struct answer { char *body; size_t len; enum ask_outcome outcome; };
/* One HTTP request to each of n processes' stats sockets, all in flight at once under one
 * overall deadline; out[i] is procs[i]'s (bodies malloc'ed, the caller frees them). */
void ask_all(const struct proc *procs, int n, const char *method, const char *target, struct answer *out);
/* The pids of the processes whose outcome is in `what` (a mask of 1u << outcome), as
 * " 1 2 3" into buf (as many as fit, then "..."); how many there are. */
#define ASK_NO_ANSWER ((1u << ASK_SILENT) | (1u << ASK_UNREACHED))
int pids_with(const struct proc *procs, const struct answer *answers, int n, unsigned what, char *buf, size_t size);
/* The processes whose answer was an error (ASK_FAILED; pids as pids_with gives them) named on stderr. */
void say_failed(const char *cmd, int count, const char *pids);
json_t *parse_answer(const char *text, size_t len);
double num(const json_t *obj, const char *key);
/* Adds src's numbers into dst (histogram buckets too), recursively. */
json_t *sum_into(json_t *dst, json_t *src, bool in_buckets);
json_t *integral_reals(json_t *j);
void print_json(json_t *j);
int load_pattern(const char *conf, char *pattern, size_t n);
int parse_user(const char *text, unsigned *uid);

struct shim_config;
struct redisContext;
/* The Redis tier's servers, logged in: its one server, the sentinels' master (checked
 * with ROLE), or a cluster's masters; how many (at most max) went into out, or -1 with a
 * message on stderr when they cannot all be reached. report: where to say each step. */
int cli_redis_connect(const struct shim_config *cfg, FILE *report, struct redisContext **out, int max);

int cmd_run(int argc, char **argv);
int cmd_stats(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_purge(int argc, char **argv);
#endif
