/* config.c — owns the configuration this process runs with: the environment as it was
 * when the library loaded (HTTPSHIM_CONF, HTTPSHIM_DEBUG, HTTPSHIM_TEST_CLOCK,
 * HTTPSHIM_TEST_CPU_PRESSURE, HTTPSHIM_TEST_FORK_PAUSE_MS and HTTPSHIM_TEST_SOCKET_EMFILE:
 * servers
 * scrub their workers' environment long before the first connect), the rules read and
 * parsed in the constructor with the privileges the process starts with, and, at the
 * first use, either the rules made live (the fd table mapped, the upstreams' names
 * being resolved in the background) or one line on stderr and an inert record saying
 * why not. */
#include "config.h"
#include "clock.h"
#include "exited.h"
#include "fdtable.h"
#include "log.h"
#include "real.h"
#include "resolver.h"
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static pthread_once_t config_once = PTHREAD_ONCE_INIT;
static struct shim_config *config;   /* NULL: inert */
static _Atomic bool config_tried;    /* load_config ran: a NULL config is inert for good */

/* HTTPSHIM_CONF as it was when the library loaded: servers scrub their workers'
 * environment (clearenv, a whitelisting master) long before the first connect. */
static char conf_path[4096];
static enum { ENV_UNREAD, ENV_READ, ENV_TOO_LONG } conf_env;
/* where the engine reads the CPU pressure (loop.c): the kernel's, or a test's file
 * (HTTPSHIM_TEST_CPU_PRESSURE) */
static char cpu_pressure_path[256] = "/proc/pressure/cpu";
/* a fork's handlers pause this long once the parent's connections are shared, so that a
 * test can land another thread's connect inside the fork (HTTPSHIM_TEST_FORK_PAUSE_MS) */
static int fork_pause_ms;
/* the engine's next N upstream sockets fail with EMFILE, as in a process out of fds
 * (HTTPSHIM_TEST_SOCKET_EMFILE; engine thread only once read) */
static int socket_emfile_left;

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
    shim_debug_enable(shim_debug_wanted(getenv("HTTPSHIM_DEBUG")));
    clock_enable_test(getenv("HTTPSHIM_TEST_CLOCK") && !strcmp(getenv("HTTPSHIM_TEST_CLOCK"), "1"));
    const char *pressure = getenv("HTTPSHIM_TEST_CPU_PRESSURE");
    if (pressure && strlen(pressure) < sizeof cpu_pressure_path)
        memcpy(cpu_pressure_path, pressure, strlen(pressure) + 1);
    const char *emfile = getenv("HTTPSHIM_TEST_SOCKET_EMFILE");
    socket_emfile_left = emfile ? atoi(emfile) : 0;
    const char *pause = getenv("HTTPSHIM_TEST_FORK_PAUSE_MS");
    fork_pause_ms = pause ? atoi(pause) : 0;
    if (fork_pause_ms < 0 || fork_pause_ms > 1000)
        fork_pause_ms = 0;
}

const char *config_cpu_pressure_path(void) { return cpu_pressure_path; }

int config_test_fork_pause_ms(void) { return fork_pause_ms; }

bool config_test_socket_emfile_take(void)
{
    if (socket_emfile_left <= 0)
        return false;
    socket_emfile_left--;
    return true;
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

/* The upstreams named by host name, resolved on a thread of their own: the app's first
 * connect (to anything: the rules are made live then) never waits on DNS for them — a
 * slow or dead resolver held it for seconds. Until the answers come, a connect matches
 * the addresses learned from the app's own lookups (its getaddrinfo, which is hooked) and
 * the literal ones; the first connect to the port of a named upstream that matches
 * nothing waits for the answers, CONFIG_NAMES_WAIT_MS at most (a name in /etc/hosts or a
 * resolver's cache comes back in well under that); an address still not known connects
 * directly, as without the shim. A child forked while the thread ran asks again at its
 * first connect. */
enum { NAMES_NONE, NAMES_RESOLVING, NAMES_DONE, NAMES_LOST_IN_FORK };
static _Atomic int names_state = NAMES_NONE;
static _Atomic bool names_awaited;     /* one connect has waited on them already */
static pthread_mutex_t names_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t names_done;      /* on the monotonic clock: names_sync_init */
static pthread_mutex_t names_lock_fresh;   /* both as made, never used: a forked child's */
static pthread_cond_t names_done_fresh;

static void *resolve_names(void *arg)
{
    shim_in_engine = 1;                /* the lookup's own sockets are never the app's */
    struct shim_config *cfg = arg;
    rules_resolve_all(cfg, real_getaddrinfo);
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        char why[RULES_ERR_MAX];
        if (rules_shadowed(cfg, i, why, sizeof why))
            shim_log("%s:%d: %s", cfg->path, cfg->upstreams[i].line, why);
    }
    pthread_mutex_lock(&names_lock);
    atomic_store(&names_state, NAMES_DONE);
    pthread_cond_broadcast(&names_done);
    pthread_mutex_unlock(&names_lock);
    return NULL;
}

/* Once (load_config), before the resolving thread exists; a forked child takes the
 * pristine copies (memcpy, in the atfork handler) in place of what a thread of the parent
 * may have held. */
static void names_sync_init(void)
{
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&names_done, &attr);
    pthread_condattr_destroy(&attr);
    memcpy(&names_lock_fresh, &names_lock, sizeof names_lock);
    memcpy(&names_done_fresh, &names_done, sizeof names_done);
}

static void resolve_names_in_background(void)
{
    if (!rules_has_named_upstreams(parsed)) {
        atomic_store(&names_state, NAMES_DONE);
        return;
    }
    atomic_store(&names_state, NAMES_RESOLVING);
    if (resolver_spawn(resolve_names, parsed) != 0)
        resolve_names(parsed);         /* no thread to be had: here, as it used to be */
}

void config_atfork_child(void)
{
    int resolving = NAMES_RESOLVING;
    if (atomic_compare_exchange_strong(&names_state, &resolving, NAMES_LOST_IN_FORK)) {
        memcpy(&names_lock, &names_lock_fresh, sizeof names_lock);
        memcpy(&names_done, &names_done_fresh, sizeof names_done);
        atomic_store(&names_awaited, false);
    }
}

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
    names_sync_init();
    resolve_names_in_background();
    config = parsed;
}

/* Waits for the names' answers, once per process, CONFIG_NAMES_WAIT_MS at most: true
 * when they came in. */
static bool await_names(void)
{
    if (atomic_exchange(&names_awaited, true))
        return false;
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);   /* (a wall clock set back must not stretch it) */
    until.tv_nsec += (long)CONFIG_NAMES_WAIT_MS * 1000000L;
    until.tv_sec += until.tv_nsec / 1000000000L;
    until.tv_nsec %= 1000000000L;
    pthread_mutex_lock(&names_lock);
    while (atomic_load(&names_state) == NAMES_RESOLVING)
        if (pthread_cond_timedwait(&names_done, &names_lock, &until) != 0)
            break;                     /* (ETIMEDOUT) */
    pthread_mutex_unlock(&names_lock);
    return atomic_load(&names_state) == NAMES_DONE;
}

int config_match_upstream(struct shim_config *cfg, const struct sockaddr *addr, socklen_t len)
{
    int lost = NAMES_LOST_IN_FORK;     /* a child forked during the lookup asks again */
    if (__builtin_expect(atomic_load_explicit(&names_state, memory_order_relaxed) == NAMES_LOST_IN_FORK, 0)
        && atomic_compare_exchange_strong(&names_state, &lost, NAMES_RESOLVING))
        resolve_names_in_background();
    int up = rules_match_addr(cfg, addr, len);
    /* (sin_port and sin6_port sit at the same place) */
    if (up < 0 && atomic_load_explicit(&names_state, memory_order_acquire) == NAMES_RESOLVING
        && len >= sizeof(struct sockaddr_in)
        && rules_named_upstream_port(cfg, ntohs(((const struct sockaddr_in *)(const void *)addr)->sin_port))
        && await_names())
        up = rules_match_addr(cfg, addr, len);   /* the answers just came in */
    return up;
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

