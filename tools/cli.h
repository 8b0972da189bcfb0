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
/* One HTTP request to a process's stats socket: the body (malloc'ed), or NULL. */
char *ask(const struct proc *p, const char *method, const char *target, size_t *len);
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
