/* config.h — the configuration this process runs with (config.c). */
#ifndef HTTPSHIM_CONFIG_H
#define HTTPSHIM_CONFIG_H
#include <stdbool.h>
#include "rules.h"
#include <sys/socket.h>

/* In the constructor: the environment, then the rules read and parsed. */
void config_capture_environment(void);
void config_read_once(void);
/* The rules, made live on the first call (from an app thread), or NULL: no file, a
 * broken one (said once on stderr), or a call the shim must stay out of. */
struct shim_config *config_get(void);
/* The file the engine reads the CPU pressure from (/proc/pressure/cpu, or a test's). */
const char *config_cpu_pressure_path(void);
/* HTTPSHIM_TEST_FORK_PAUSE_MS as read at load (0: none; tests only). */
int config_test_fork_pause_ms(void);
/* HTTPSHIM_TEST_SOCKET_EMFILE: whether the engine's next upstream socket is to fail with
 * EMFILE (tests only; counts down). */
bool config_test_socket_emfile_take(void);
/* The rules as they are now, without loading them (NULL until loaded). */
struct shim_config *config_loaded(void);
/* The upstream addr matches (rules_match_addr), or -1. While the upstreams' host names
 * resolve in the background, the first connect to a named upstream's port that matches
 * nothing waits for them, once per process and CONFIG_NAMES_WAIT_MS at most. */
#define CONFIG_NAMES_WAIT_MS 250
int config_match_upstream(struct shim_config *cfg, const struct sockaddr *addr, socklen_t len);
/* A forked child: the upstreams' names are asked again if the parent's lookup was under
 * way (its thread is not in the child). Async-signal-safe. */
void config_atfork_child(void);
/* Loaded, and there is nothing to shim: no record of anything needs keeping. */
bool config_known_inert(void);
#endif
