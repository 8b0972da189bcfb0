/* config.c — owns the configuration this process runs with: the environment as it was
 * when the library loaded (HTTPSHIM_CONF, HTTPSHIM_DEBUG, HTTPSHIM_TEST_CLOCK: servers
 * scrub their workers' environment long before the first connect), the rules read and
 * parsed in the constructor with the privileges the process starts with, and, at the
 * first use, either the rules made live (the fd table mapped, the upstreams' names
 * resolved) or one line on stderr and an inert record saying why not. */
#include "config.h"
#include "clock.h"
#include "exited.h"
#include "fdtable.h"
#include "log.h"
#include "real.h"
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static pthread_once_t config_once = PTHREAD_ONCE_INIT;
static struct shim_config *config;   /* NULL: inert */
static _Atomic bool config_tried;    /* load_config ran: a NULL config is inert for good */

/* HTTPSHIM_CONF as it was when the library loaded: servers scrub their workers'
 * environment (clearenv, a whitelisting master) long before the first connect. */
static char conf_path[4096];
static enum { ENV_UNREAD, ENV_READ, ENV_TOO_LONG } conf_env;

void config_capture_environment(void)
{
    const char *path = getenv("HTTPSHIM_CONF");
    size_t n = path ? strlen(path) : 0;
    if (n < sizeof conf_path) {
        memcpy(conf_path, path ? path : "", n + 1);
        conf_env = ENV_READ;
    } else {
        conf_env = ENV_TOO_LONG;
    }
    shim_debug_enable(getenv("HTTPSHIM_DEBUG") != NULL);
    clock_enable_test(getenv("HTTPSHIM_TEST_CLOCK") && !strcmp(getenv("HTTPSHIM_TEST_CLOCK"), "1"));
}

/* The rules are read and parsed in the constructor, with the privileges and the file
 * system the process starts with: a master that reads them as root, then drops to
 * `nobody` and forks its workers, hands the workers a parsed configuration (reading it
 * at their first connect, they would find it unreadable). What must wait for the first
 * connect waits: the fd table, name resolution, the engine. */
static pthread_once_t read_once = PTHREAD_ONCE_INIT;
static struct shim_config *parsed;    /* NULL: nothing to shim in this process */
static char inert_reason[sizeof conf_path + RULES_ERR_MAX];   /* why not, when it is an error */

static void read_config(void)
{
    if (conf_env == ENV_UNREAD)        /* a hook ran before the constructor */
        config_capture_environment();
    if (conf_env == ENV_TOO_LONG) {
        snprintf(inert_reason, sizeof inert_reason, "HTTPSHIM_CONF is longer than %zu bytes", sizeof conf_path - 1);
        return;
    }
    const char *path = conf_path[0] ? conf_path : "/etc/httpshim/rules.conf";
    struct shim_config *cfg = malloc(sizeof *cfg);   /* (rules_load zeroes it first: 130 KB, once) */
    if (!cfg) {
        snprintf(inert_reason, sizeof inert_reason, "%s: no memory to read it", path);
        return;
    }
    char err[RULES_ERR_MAX];
    if (rules_load(path, cfg, err) != 0) {
        int why = errno;
        if (err[0])
            snprintf(inert_reason, sizeof inert_reason, "%s", err);
        else if (why != ENOENT || conf_path[0])   /* only an unset default path is silent */
            snprintf(inert_reason, sizeof inert_reason, "%s: %s", path, strerror(why));
        rules_free(cfg);
        free(cfg);
        return;
    }
    parsed = cfg;
}

void config_read_once(void) { pthread_once(&read_once, read_config); }

/* At the first use: one line on stderr and a record for `httpshim stats` when the rules
 * could not be read, else the parsed rules made live. */
static void load_config(void)
{
    config_read_once();
    if (!parsed) {
        if (inert_reason[0]) {
            char line[sizeof inert_reason + 64];
            int n = snprintf(line, sizeof line, "httpshim: %s (the shim is inert in this process)\n", inert_reason);
            ssize_t w = real_write(2, line, n > 0 && (size_t)n < sizeof line ? (size_t)n : strlen(line));
            (void)w;
            exited_write_inert(inert_reason);
        }
        return;
    }
    if (parsed->n_upstreams == 0 || fdtable_init() != 0)
        return;
    rules_resolve_all(parsed, real_getaddrinfo);
    config = parsed;
}

static void load_config_once(void)
{
    load_config();
    atomic_store(&config_tried, true);
}

struct shim_config *config_get(void)
{
    if (shim_in_engine)
        return config;
    int saved = errno;
    real_bind();
    if (!real_bound())
        return NULL;                   /* a call from inside dlsym: stay out of the way */
    pthread_once(&config_once, load_config_once);
    errno = saved;
    return config;
}

bool config_known_inert(void)
{
    return atomic_load_explicit(&config_tried, memory_order_relaxed) && !config;
}

struct shim_config *config_loaded(void) { return config; }

