/* resolver.c — owns turning host names into addresses off the threads that must not wait:
 * the threads it runs lookups on (resolver_spawn: detached, the app's signals blocked),
 * and for the Redis tier's names, without ever blocking the engine: getaddrinfo runs on a short-lived thread of its own, the answer is
 * kept RESOLVER_KEEP_MS and refreshed in the background after that (the old answer serves
 * meanwhile). Until a name has an answer, a lookup says so at once and the caller tries
 * again later, on its own backoff. Bounded: RESOLVER_NAMES names, one thread per name at
 * most. IP literals are answered in place. */
#include "resolver.h"
#include "clock.h"
#include "log.h"
#include "real.h"
#include <arpa/inet.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define RESOLVER_NAMES   32
#define RESOLVER_KEEP_MS 30000         /* an answer older than this is refreshed (still used) */
#define RESOLVER_RETRY_MS 1000         /* a name that did not resolve is asked again after this */

struct name {
    char host[256];
    char addr[INET6_ADDRSTRLEN];       /* "" until an answer came */
    int64_t asked_ms;                  /* when the last resolution was started */
    bool resolving;
    bool failed;                       /* the last resolution gave no address */
    bool said;                         /* its failure is on stderr once */
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct name names[RESOLVER_NAMES];
static unsigned generation;            /* a forked child's threads of the parent do not exist */

struct job {
    size_t slot;
    unsigned generation;
    char host[256];
};

static void *resolve(void *arg)
{
    shim_in_engine = 1;                /* the resolver's own sockets are never the app's */
    struct job *job = arg;
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *res = NULL;
    char addr[INET6_ADDRSTRLEN] = "";
    if (real_getaddrinfo(job->host, NULL, &hints, &res) == 0) {
        for (const struct addrinfo *a = res; a && !addr[0]; a = a->ai_next)
            if (a->ai_family == AF_INET)
                inet_ntop(AF_INET, &((const struct sockaddr_in *)(const void *)a->ai_addr)->sin_addr, addr, sizeof addr);
            else if (a->ai_family == AF_INET6)
                inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)(const void *)a->ai_addr)->sin6_addr, addr,
                          sizeof addr);
        freeaddrinfo(res);
    }
    pthread_mutex_lock(&lock);
    struct name *n = &names[job->slot];
    if (job->generation == generation && !strcmp(n->host, job->host)) {
        n->resolving = false;
        n->failed = !addr[0];
        if (addr[0])
            memcpy(n->addr, addr, sizeof addr);
        else if (!n->said) {
            n->said = true;
            shim_log("redis host %s did not resolve: asked again every %d s, the tier fails open meanwhile",
                     job->host, RESOLVER_RETRY_MS / 1000);
        }
    }
    pthread_mutex_unlock(&lock);
    free(job);
    return NULL;
}

int resolver_spawn(void *(*run)(void *), void *arg)
{
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 128 * 1024);   /* getaddrinfo and its NSS modules */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);   /* the app's signals stay with the app */
    pthread_t th;
    int rc = pthread_create(&th, &attr, run, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return rc == 0 ? 0 : -1;
}

/* Under the lock: a thread for n, if one can be made. */
static void start(size_t slot, int64_t now)
{
    struct name *n = &names[slot];
    struct job *job = malloc(sizeof *job);
    if (!job)
        return;
    job->slot = slot;
    job->generation = generation;
    memcpy(job->host, n->host, sizeof job->host);
    if (resolver_spawn(resolve, job) != 0) {
        free(job);
        return;
    }
    n->resolving = true;
    n->asked_ms = now;
}

int resolver_lookup(const char *host, char *addr, size_t cap)
{
    unsigned char bytes[sizeof(struct in6_addr)];
    if (inet_pton(AF_INET, host, bytes) == 1 || inet_pton(AF_INET6, host, bytes) == 1) {
        if (strlen(host) >= cap)
            return -1;
        memcpy(addr, host, strlen(host) + 1);
        return 0;
    }
    if (strlen(host) >= sizeof names[0].host)
        return -1;
    int64_t now = clock_mono_ms();
    int rc = -1;
    pthread_mutex_lock(&lock);
    size_t slot = RESOLVER_NAMES, free_slot = RESOLVER_NAMES;
    for (size_t i = 0; i < RESOLVER_NAMES && slot == RESOLVER_NAMES; i++)
        if (!strcmp(names[i].host, host))
            slot = i;
        else if (!names[i].host[0] && free_slot == RESOLVER_NAMES)
            free_slot = i;
    if (slot == RESOLVER_NAMES && free_slot < RESOLVER_NAMES) {
        slot = free_slot;
        memset(&names[slot], 0, sizeof names[slot]);
        memcpy(names[slot].host, host, strlen(host) + 1);
    }
    if (slot < RESOLVER_NAMES) {
        struct name *n = &names[slot];
        int64_t due = n->addr[0] ? RESOLVER_KEEP_MS : RESOLVER_RETRY_MS;
        if (!n->resolving && (!n->asked_ms || now - n->asked_ms >= due))
            start(slot, now);
        if (n->addr[0] && strlen(n->addr) < cap) {
            memcpy(addr, n->addr, strlen(n->addr) + 1);
            rc = 0;
        } else if (!n->addr[0] && !n->failed && n->resolving) {
            rc = RESOLVER_PENDING;
        }
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

void resolver_forget(void)
{
    /* the parent's resolving threads are not in the child: their names start afresh */
    pthread_mutex_init(&lock, NULL);
    generation++;
    for (size_t i = 0; i < RESOLVER_NAMES; i++)
        names[i].resolving = false;
}
