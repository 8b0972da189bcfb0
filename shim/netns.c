/* netns.c — owns the answer to "is this thread in the process's own network namespace",
 * and the hooks that change it (setns, unshare). A thread that enters another one addresses other servers by
 * the same numbers: 127.0.0.1:8080 there is not the upstream the rules name, and a
 * connection the engine made, or an answer it cached, would be another server's. Such a
 * thread is away: its sockets and its connects are never diverted. The namespace is told
 * by the inode of /proc/thread-self/ns/net, read only when a thread switches; without
 * /proc, a thread that switched is taken to be away. */
#include "netns.h"
#include "real.h"
#include <sched.h>
#include <errno.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <sys/types.h>

static _Atomic int home_noted;         /* home_dev/home_ino were read (0 ino: not known) */
static ino_t home_ino;
static dev_t home_dev;
static _Atomic int ever_away;
static __thread int away __attribute__((tls_model("initial-exec")));

static bool current_netns(dev_t *dev, ino_t *ino)
{
    struct stat st;
    if (stat("/proc/thread-self/ns/net", &st) != 0)
        return false;
    *dev = st.st_dev;
    *ino = st.st_ino;
    return true;
}

/* Read lazily, by the first thread about to switch: every thread is home until it leaves
 * through setns or unshare, so what that thread reads of itself first is home (and a
 * process that never switches never pays the look). */
void netns_before_switch(void)
{
    if (atomic_load(&home_noted) || away)
        return;
    dev_t dev;
    ino_t ino;
    bool known = current_netns(&dev, &ino);
    static _Atomic int claimed;
    if (atomic_exchange(&claimed, 1))
        return;                        /* (another thread, also at home, is reading it) */
    if (known) {
        home_dev = dev;
        home_ino = ino;
    }
    atomic_store(&home_noted, 1);
}

int netns_after_switch(int rc, bool net)
{
    if (rc != 0 || !net)
        return rc;
    int saved = errno;
    dev_t dev = 0;
    ino_t ino = 0;
    bool known = current_netns(&dev, &ino);
    bool home_known = atomic_load(&home_noted) && home_ino;
    away = !(known && home_known && ino == home_ino && dev == home_dev);
    if (away)
        atomic_store(&ever_away, 1);
    errno = saved;
    return rc;
}

bool netns_thread_away(void)
{
    return away != 0;
}

bool netns_ever_away(void)
{
    return atomic_load_explicit(&ever_away, memory_order_relaxed) != 0;
}

/* ---- the hooks: a thread that enters another namespace is away ---- */

#define SHIM_EXPORT __attribute__((visibility("default")))

SHIM_EXPORT int setns(int fd, int nstype)
{
    real_bind();
    bool net = nstype == 0 || (nstype & CLONE_NEWNET);   /* (0: whatever fd names) */
    if (net)
        netns_before_switch();
    return netns_after_switch(real_setns(fd, nstype), net);
}

SHIM_EXPORT int unshare(int flags)
{
    real_bind();
    bool net = (flags & CLONE_NEWNET) != 0;
    if (net)
        netns_before_switch();
    return netns_after_switch(real_unshare(flags), net);
}
