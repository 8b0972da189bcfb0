/* pool_test.c — exercises shim/pool.c's probe slot on its own, in one process: a connect
 * to an address the pool already reaches never takes the probe slot, not even for an
 * instant that another thread could see (the engine's queue held its waiters for such
 * a probe until pool_queue_timeout, 2026-12-08); the first connect to a cold upstream
 * takes it, the connects meanwhile go alongside or wait, and its end gives it back and
 * proves the address. Prints "N passed, N failed" (tests/test_loop.py reads it). */
#include "../../shim/loop.h"
#include "../../shim/pool.h"
#include "check.h"
#include <arpa/inet.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define UP 0
static atomic_bool watching;
static atomic_long seen_taken;

/* what the engine's queue does between two events: look whether a probe holds it */
static void *watch_slot(void *arg)
{
    (void)arg;
    while (atomic_load(&watching))
        if (pool_probe_started_us(UP) != 0)
            atomic_fetch_add(&seen_taken, 1);
    return NULL;
}

int main(void)
{
    check(loop_init(NULL) == 0, "the loop starts (pool_end_probe wakes it)");
    union shim_sockaddr dest;
    memset(&dest, 0, sizeof dest);
    dest.in.sin_family = AF_INET;
    dest.in.sin_port = htons(8080);
    inet_pton(AF_INET, "127.0.0.1", &dest.in.sin_addr);

    /* a cold upstream: the first connect probes, the next ones meanwhile go alongside
     * (under the cap) or are diverted to wait for it (a cap of none alongside) */
    check(!pool_has_live_connection(UP, &dest.sa), "a cold upstream has no live connection");
    check(pool_begin_probe(UP, &dest.sa, 4) == POOL_PROBE_HELD, "the first connect takes the probe slot");
    check(pool_probe_holds(UP), "the probe holds the upstream's transfers");
    check(pool_begin_probe(UP, &dest.sa, 4) == POOL_PROBE_OTHER, "a connect meanwhile, under the cap, goes alongside");
    check(pool_connects_in_flight(UP) == 2, "the probe and the one alongside count against the cap");
    check(pool_begin_probe(UP, &dest.sa, 0) == POOL_PROBE_SAME, "a connect meanwhile, past the cap, waits for it");

    /* the probe's connection up: it joins the pool, and the address is proven */
    int pair[2], alongside[2];
    check(socketpair(AF_UNIX, SOCK_STREAM, 0, pair) == 0 && socketpair(AF_UNIX, SOCK_STREAM, 0, alongside) == 0,
          "connections to offer");
    pool_end_probe(UP, pair[0], &dest, true);
    pool_end_probe(UP, alongside[0], &dest, false);
    check(!pool_probe_holds(UP), "the probe's end gives the slot back");
    check(pool_connects_in_flight(UP) == 0, "both connects ended");
    check(pool_has_live_connection(UP, &dest.sa), "the upstream has a live connection at the proven address");

    /* connects to the proven address, another thread looking at the slot all along: not
     * one takes it, not for an instant (the look before the slot, never a slot taken and
     * given back) */
    atomic_store(&watching, true);
    pthread_t watcher;
    check(pthread_create(&watcher, NULL, watch_slot, NULL) == 0, "the watcher starts");
    int same = 0;
    for (int i = 0; i < 200000; i++)
        same += pool_begin_probe(UP, &dest.sa, 4) == POOL_PROBE_SAME;
    atomic_store(&watching, false);
    pthread_join(watcher, NULL);
    check(same == 200000, "every connect to the proven address is diverted at once");
    check(atomic_load(&seen_taken) == 0, "the probe slot was never seen taken");
    close(pair[1]);
    close(alongside[1]);
    return check_report();
}
