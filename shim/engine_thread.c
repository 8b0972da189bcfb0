/* engine_thread.c — owns the engine thread: its start (once per process; the app thread
 * that needs it waits for the verdict), the setup of every subsystem on that thread, the
 * work after each loop dispatch (libcurl's finished transfers, the app's handed-over
 * answers and closes), and the reset in a forked child, where the thread did not survive.
 * The connections themselves are engine.c's. */
#include "engine_thread.h"
#include "cache.h"
#include "cache_redis.h"
#include "config.h"
#include "engine.h"
#include "fastpath.h"
#include "fdtable.h"
#include "flight.h"
#include "lazylib.h"
#include "linger.h"
#include "log.h"
#include "loop.h"
#include "real.h"
#include "redis_session.h"
#include "resolver.h"
#include "stats.h"
#include "stats_server.h"
#include "store.h"
#include "tls_decide.h"
#include "tls_front.h"
#include "tunnel.h"
#include "upstream.h"
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <signal.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

static struct {
    pthread_mutex_t lock;              /* guards started/failed; held across a fork */
    bool started, failed;
    const struct shim_config *cfg;
} T = { .lock = PTHREAD_MUTEX_INITIALIZER };

/* The closes app threads handed over (fdtable_bury): gathered for 10 ms (or until 128
 * wait), then made GRAVEYARD_SLICE at a time, each slice a 0 ms timer, so that the
 * loop serves I/O between slices. */
#define GRAVEYARD_SLICE 16
static struct loop_timer graveyard_timer;
static void on_graveyard_due(struct loop_timer *timer)
{
    if (fdtable_drain_graveyard(GRAVEYARD_SLICE) > 0)
        loop_timer_arm(timer, 0, on_graveyard_due);
}

static void set_up_http_asked(void);

/* The main thread left by pthread_exit. A process ends when its last thread does (glibc
 * then calls exit(0), and the app's atexit handlers run): the engine's thread must not be
 * the one that keeps it alive (it did, for ever, and SIGTERM's default was the shim's
 * handler, which no thread could run). From then on, every 20 ms, the engine looks for an
 * app thread still alive in /proc/self/task; with none left, it ends. */
static atomic_bool main_thread_left;
static struct loop_timer alone_timer;

static bool app_threads_alive(void)
{
    DIR *d = opendir("/proc/self/task");
    if (!d)
        return true;                   /* (cannot tell: stay) */
    bool alive = false;
    char self[16], path[300], stat[256];
    snprintf(self, sizeof self, "%d", (int)gettid());
    for (struct dirent *e; !alive && (e = readdir(d));) {
        if (e->d_name[0] == '.' || !strcmp(e->d_name, self))
            continue;
        snprintf(path, sizeof path, "/proc/self/task/%s/stat", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        ssize_t n = fd >= 0 ? read(fd, stat, sizeof stat - 1) : -1;
        if (fd >= 0)
            real_close(fd);
        stat[n > 0 ? n : 0] = 0;
        const char *state = strrchr(stat, ')');
        alive = n <= 0 || !state || (state[1] == ' ' && state[2] != 'Z' && state[2] != 'X');
    }
    closedir(d);
    return alive;
}

/* The process ends as glibc ends it after its last thread: exit(0), the app's atexit
 * handlers and destructors run, on a thread of their own with no signal blocked, while the
 * engine's loop goes on serving (a handler that makes a request, or reads one, is answered;
 * on the engine's thread it waited for ever on a loop that had stopped). */
static void *exit_as_the_last_thread(void *arg)
{
    (void)arg;
    sigset_t none;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, NULL);
    exit(0);
}

static void on_alone_due(struct loop_timer *timer)
{
    if (app_threads_alive()) {
        loop_timer_arm(timer, 20, on_alone_due);
        return;
    }
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&th, &attr, exit_as_the_last_thread, NULL) != 0)
        loop_stop();                   /* (the engine's thread ends: glibc exits on it) */
    pthread_attr_destroy(&attr);
}

void engine_main_thread_left(void)
{
    if (!atomic_exchange(&main_thread_left, true))
        loop_wake();
}

static void after_dispatch(void)
{
    if (atomic_load_explicit(&main_thread_left, memory_order_relaxed) && !loop_timer_armed(&alone_timer))
        loop_timer_arm(&alone_timer, 0, on_alone_due);
    set_up_http_asked();
    upstream_reap();
    engine_take_handoffs();
    if (fdtable_stash_short())
        fdtable_refill_stash();
    int buried = fdtable_graveyard();
    if (buried == 2)
        loop_timer_arm(&graveyard_timer, 0, on_graveyard_due);
    else if (buried && !loop_timer_armed(&graveyard_timer))
        loop_timer_arm(&graveyard_timer, 10, on_graveyard_due);
}

/* The engine's own setup, on the engine thread: libcurl, hiredis and OpenSSL keep
 * per-thread state from their initialisation, which must not be left on an app thread
 * (a daemon thread alive at exit would orphan it). The starting app thread waits for the
 * verdict, and so does an app thread that asks for HTTP's part later. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t done;
    int result;                        /* 1 running, -1 failed, 0 not yet */
} starting = { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0 };

/* HTTP's part of the engine (libcurl and upstream.c): set up when the engine starts for an
 * HTTP connection, or when the first one comes to an engine started for Redis. */
enum { HTTP_NONE, HTTP_ASKED, HTTP_READY, HTTP_FAILED };
static atomic_int http_state;

static int set_up_http(const struct shim_config *cfg)
{
    if (lazylib_load_curl() != 0 || upstream_init(cfg) != 0) {
        shim_log("HTTP upstreams cannot be served (libcurl): their connections go direct");
        return -1;
    }
    return 0;
}

/* (on the engine thread, after a dispatch: an app thread waits in engine_ensure_started) */
static void set_up_http_asked(void)
{
    if (atomic_load_explicit(&http_state, memory_order_acquire) != HTTP_ASKED)
        return;
    int state = set_up_http(T.cfg) == 0 ? HTTP_READY : HTTP_FAILED;
    pthread_mutex_lock(&starting.lock);
    atomic_store_explicit(&http_state, state, memory_order_release);
    pthread_cond_broadcast(&starting.done);
    pthread_mutex_unlock(&starting.lock);
}

static int set_up(const struct shim_config *cfg, bool http)
{
    if (lazylib_load_hiredis() != 0) {
        shim_log("engine not started: connections go direct");
        return -1;
    }
    /* libcurl completes transfers inside whatever call drove it: collect them after each
     * event, outside the handler that caused it */
    if (loop_init(after_dispatch) != 0)
        goto fail;
    loop_set_busy_poll(cfg->busy_poll_us, config_cpu_pressure_path());
    stats_server_start(cfg);          /* no stats socket is no reason to run unshimmed */
    memcache_configure(cfg->memory_max);
    flight_init(cfg);
    engine_conns_init(cfg);
    store_init(cfg);
    redis_session_init(cfg);
    tls_front_init(cfg);
    fastpath_init(engine_need, engine_drop_unseen);
    if (http)
        atomic_store(&http_state, set_up_http(cfg) == 0 ? HTTP_READY : HTTP_FAILED);
    if (redis_init(cfg) != 0)
        shim_log("redis tier could not start: memory tier and upstream only");
    return 0;
fail:
    shim_log("engine could not start (%s): connections go direct", strerror(errno));
    return -1;
}

static void *engine_main(void *arg)
{
    shim_in_engine = 1;
    int rc = set_up(T.cfg, (bool)(intptr_t)arg);
    pthread_mutex_lock(&starting.lock);
    starting.result = rc == 0 ? 1 : -1;
    pthread_cond_signal(&starting.done);
    pthread_mutex_unlock(&starting.lock);
    if (rc == 0)
        loop_run();
    return NULL;
}

/* A process's fd table grows by doubling, and while more than one thread shares it each
 * growth waits out an RCU grace period (Linux's expand_fdtable: milliseconds each, seen
 * 5 to 12 ms here). The engine thread makes the app's process multi-threaded, and a
 * diverted connection holds more fds than a direct one, so a storm of connects would pay
 * a grace period at each doubling that the same app, single-threaded and direct, never
 * pays. The table is grown once, here, before the thread exists: to FD_TABLE_PRESIZE
 * entries or the fd limit (a few tens of KB of kernel memory, never returned; fds past
 * it still grow it, a grace period per doubling). */
#define FD_TABLE_PRESIZE 4096

static void presize_fd_table(void)
{
    struct rlimit rl;
    int want = FD_TABLE_PRESIZE;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)want)
        want = (int)rl.rlim_cur;
    if (want <= 64 || real_fcntl(want - 1, F_GETFD, NULL) >= 0)
        return;                        /* the smallest table holds 64; or grown already */
    int probe = eventfd(0, EFD_CLOEXEC);
    if (probe < 0)
        return;
    int high = real_fcntl(probe, F_DUPFD_CLOEXEC, (void *)(intptr_t)(want - 1));
    if (high >= 0)
        real_close(high);
    real_close(probe);
}

static int start_locked(const struct shim_config *cfg, bool http)
{
    T.cfg = cfg;
    starting.result = 0;
    presize_fd_table();
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);   /* the app's signals stay with the app */
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    int rc = pthread_create(&th, &attr, engine_main, (void *)(intptr_t)http);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        shim_log("engine could not start (%s): connections go direct", strerror(rc));
        return -1;
    }
    pthread_setname_np(th, "httpshim");
    /* bounded by the setup itself: loading libraries and making a few fds, no network */
    pthread_mutex_lock(&starting.lock);
    while (!starting.result)
        pthread_cond_wait(&starting.done, &starting.lock);
    rc = starting.result;
    pthread_mutex_unlock(&starting.lock);
    if (rc < 0)
        return -1;
    shim_debug("engine started");
    return 0;
}

/* Asks the running engine for HTTP's part and waits for it (T.lock held: one asks at once;
 * bounded by the setup itself, as the start). */
static int ensure_http_locked(void)
{
    int state = atomic_load_explicit(&http_state, memory_order_acquire);
    if (state == HTTP_NONE) {
        atomic_store_explicit(&http_state, HTTP_ASKED, memory_order_release);
        loop_wake();
    }
    pthread_mutex_lock(&starting.lock);
    while ((state = atomic_load_explicit(&http_state, memory_order_acquire)) == HTTP_ASKED)
        pthread_cond_wait(&starting.done, &starting.lock);
    pthread_mutex_unlock(&starting.lock);
    return state == HTTP_READY ? 0 : -1;
}

int engine_ensure_started(const struct shim_config *cfg, bool http)
{
    pthread_mutex_lock(&T.lock);
    if (!T.started) {
        T.started = true;
        T.failed = start_locked(cfg, http) != 0;
    }
    bool failed = T.failed;
    if (!failed && http && atomic_load_explicit(&http_state, memory_order_acquire) != HTTP_READY)
        failed = ensure_http_locked() != 0;
    pthread_mutex_unlock(&T.lock);
    return failed ? -1 : 0;
}

void engine_atfork_prepare(void)
{
    pthread_mutex_lock(&T.lock);
    engine_conns_lock();
    memcache_atfork_prepare();
}

void engine_atfork_parent(void)
{
    memcache_atfork_release();
    engine_conns_unlock();
    pthread_mutex_unlock(&T.lock);
}

void engine_atfork_child(void)
{
    /* The engine thread did not survive the fork. Its fds are copies that would keep
     * the parent's connections open: close them, forget the state, start afresh on the
     * next diverted connect. Only async-signal-safe work here. */
    fdtable_close_engine_fds();
    if (atomic_load(&http_state) == HTTP_READY)
        upstream_forget();
    atomic_store(&http_state, HTTP_NONE);
    engine_conns_forget();
    T.started = T.failed = false;
    loop_forget();
    flight_forget();
    tunnel_forget();
    linger_forget();
    tls_front_forget();
    tls_decide_forget();
    redis_session_forget();
    resolver_forget();
    graveyard_timer.slot = 0;          /* the parent's loop */
    alone_timer.slot = 0;
    atomic_store(&main_thread_left, false);
    fastpath_forget();
    stats_server_atfork_child();
    if (T.cfg && T.cfg->cache == CACHE_REDIS)
        redis_forget();
    stats_reset();
    memcache_atfork_release();
    engine_conns_unlock();
    pthread_mutex_unlock(&T.lock);
}
