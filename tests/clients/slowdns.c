/* slowdns.c — a test preload (after the shim in LD_PRELOAD): getaddrinfo of any name ending
 * in ".slow.test" sleeps SLOWDNS_MS (default 2000) and then answers 127.0.0.1, as a slow
 * DNS server would; one ending in ".fail.test" is answered "no such name" at once; every
 * other name goes to the next getaddrinfo. tests/test_redis.py
 * uses it to show that the engine never waits on a host name. */
#include <dlfcn.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int (*getaddrinfo_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res)
{
    getaddrinfo_fn next = (getaddrinfo_fn)dlsym(RTLD_NEXT, "getaddrinfo");
    if (!next)
        return EAI_FAIL;
    size_t n = node ? strlen(node) : 0;
    const char *suffix = ".slow.test", *failing = ".fail.test";
    if (n > strlen(failing) && !strcmp(node + n - strlen(failing), failing))
        return EAI_NONAME;
    if (n > strlen(suffix) && !strcmp(node + n - strlen(suffix), suffix)) {
        const char *ms = getenv("SLOWDNS_MS");
        long wait = ms ? atol(ms) : 2000;
        struct timespec ts = { wait / 1000, (wait % 1000) * 1000000L };
        while (nanosleep(&ts, &ts) != 0)
            ;
        return next("127.0.0.1", service, hints, res);
    }
    return next(node, service, hints, res);
}
