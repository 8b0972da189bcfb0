/* linger.c — owns the ends of connections the engine ended with an end of file while the
 * app still holds its own end: each is kept LINGER_MS (shut for writing: the app reads
 * EOF), then closed. Closed at once, the pair made the app's next write fail with EPIPE,
 * and SIGPIPE killed a C client that reused a kept-alive connection the server had just
 * ended, where TCP takes that write (and drops it). Kept in one ring of LINGER_MAX, closed
 * by one timer, no epoll registration: a connection costs nothing more than before but the
 * shutdown. Only in the lower half of the fd limit: an app that closes late, or leaks its
 * fds, holds one fd more per connection meanwhile, which it would not direct. */
#include "linger.h"
#include "clock.h"
#include "fdtable.h"
#include "real.h"
#include <sys/socket.h>

#define LINGER_MS  1000
#define LINGER_MAX 64

static struct {                        /* engine thread only */
    int fd[LINGER_MAX];
    int64_t until_ms[LINGER_MAX];
    unsigned head, count;              /* oldest first */
    struct loop_timer timer;
} R;

/* The app's end of the pair that fd ends: its next write is taken (and dropped) once this
 * end is closed, as TCP takes the first write after the server has gone, where a closed
 * pair's EPIPE raised SIGPIPE (a C client's SSL_shutdown long after the answer). While fd
 * is open no other connection can name it as its engine's end. */
static void take_the_next_write(int fd)
{
    for (int i = 0, top = fdtable_diverted_top(); i < top; i++) {
        struct fd_entry *e = fdtable_if_diverted(i);
        if (e && e->engine_fd == fd)
            fdtable_take_next_write(e);
    }
}

static void close_oldest(void)
{
    take_the_next_write(R.fd[R.head]);
    fdtable_close_engine_fd(R.fd[R.head]);
    R.head = (R.head + 1) % LINGER_MAX;
    R.count--;
}

static void on_due(struct loop_timer *timer)
{
    int64_t now = clock_mono_ms();
    while (R.count && R.until_ms[R.head] <= now)
        close_oldest();
    if (R.count)
        loop_timer_arm(timer, R.until_ms[R.head] - now, on_due);
}

bool linger_adopt(struct loop_source *src)
{
    int fd = src->fd;
    if (!fdtable_in_lower_half(fd))
        return false;
    loop_remove(src);
    real_shutdown(fd, SHUT_WR);
    if (R.count == LINGER_MAX)
        close_oldest();                /* (the longest kept: its app has had the most time) */
    unsigned at = (R.head + R.count) % LINGER_MAX;
    R.fd[at] = fd;
    R.until_ms[at] = clock_mono_ms() + LINGER_MS;
    R.count++;
    if (!loop_timer_armed(&R.timer))
        loop_timer_arm(&R.timer, LINGER_MS, on_due);
    return true;
}

void linger_forget(void)
{
    R.head = R.count = 0;              /* (their fds are the parent's engine's: closed with the rest) */
    R.timer.slot = 0;                  /* the parent's loop */
}
