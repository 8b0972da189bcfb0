/* redis_link.c — owns the glue between a hiredis async context and the engine's loop:
 * hiredis asks for reads and writes through its adapter hooks, the loop reports the
 * events back, and the fd is marked as the engine's own so that no hook ever diverts or
 * closes it. Host names are turned into addresses by resolver.c, never on the engine's
 * thread. Engine thread only. */
#include "redis_link.h"
#include "fdtable.h"
#include "real.h"
#include "resolver.h"
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <string.h>
#include <sys/epoll.h>

static void on_io(struct loop_source *src, uint32_t ev)
{
    struct redis_link *l = (struct redis_link *)(void *)((char *)src - offsetof(struct redis_link, src));
    if (l->ac && (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)))
        redisAsyncHandleRead(l->ac);
    if (l->ac && (ev & (EPOLLOUT | EPOLLERR)))
        redisAsyncHandleWrite(l->ac);
    if (l->after_io)
        l->after_io(l);
}

static void watch(struct redis_link *l)
{
    if (l->fd < 0)
        return;
    uint32_t want = (l->want_read ? EPOLLIN : 0) | (l->want_write ? EPOLLOUT : 0);
    if (!l->src.active)
        loop_add(&l->src, l->fd, want, on_io);
    else
        loop_watch(&l->src, want);
}

static void add_read(void *d) { struct redis_link *l = d; l->want_read = true; watch(l); }
static void del_read(void *d) { struct redis_link *l = d; l->want_read = false; watch(l); }
static void add_write(void *d) { struct redis_link *l = d; l->want_write = true; watch(l); }
static void del_write(void *d) { struct redis_link *l = d; l->want_write = false; watch(l); }

static void cleanup(void *d)
{
    struct redis_link *l = d;
    loop_remove(&l->src);
    if (l->fd >= 0)
        fdtable_clear(l->fd);          /* hiredis closes it */
    l->want_read = l->want_write = false;
    l->fd = -1;
    l->ac = NULL;
}

int redis_link_connect(struct redis_link *l, const char *host, int port, const char *unix_path,
                       void (*on_connect)(const struct redisAsyncContext *, int),
                       void (*on_disconnect)(const struct redisAsyncContext *, int))
{
    l->ac = NULL;
    l->fd = -1;
    l->want_read = l->want_write = false;
    char addr[64];
    bool unix_socket = unix_path && unix_path[0];
    /* hiredis would resolve a name itself, blocking the engine: the address is asked for
     * off the engine's thread, and until it is known this attempt fails (the caller's
     * backoff tries again) */
    int known = unix_socket ? 0 : resolver_lookup(host, addr, sizeof addr);
    if (known != 0)
        return known == RESOLVER_PENDING ? REDIS_LINK_RESOLVING : -1;
    redisAsyncContext *ac = unix_socket ? redisAsyncConnectUnix(unix_path) : redisAsyncConnect(addr, port);
    if (!ac || ac->err) {
        if (ac)
            redisAsyncFree(ac);
        return -1;
    }
    l->ac = ac;
    l->fd = ac->c.fd;
    fdtable_mark_engine(l->fd);
    if (!unix_socket) {
        int one = 1;                   /* a request's commands leave in one segment, never behind Nagle */
        real_setsockopt(l->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    ac->ev.data = l;
    ac->ev.addRead = add_read;
    ac->ev.delRead = del_read;
    ac->ev.addWrite = add_write;
    ac->ev.delWrite = del_write;
    ac->ev.cleanup = cleanup;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    add_write(l);                      /* wait for the non-blocking connect */
    return 0;
}

void redis_link_drop(struct redis_link *l)
{
    if (l->ac)
        redisAsyncFree(l->ac);         /* its cleanup clears the link */
}

void redis_link_forget(struct redis_link *l)
{
    memset(&l->src, 0, sizeof l->src);
    l->ac = NULL;
    l->fd = -1;
    l->want_read = l->want_write = false;
}
