/* hitcost — where the microseconds of a connection-per-request memory hit go: each system
 * call the shim adds to (or moves off) the app's thread, timed alone, N times, on this
 * machine, next to the ones the inline limit and a direct connection make. Prints a
 * markdown table (nanoseconds per call, median of 5 batches).
 *   hitcost [N]      (default 4000; each holds 4 fds at once, so N is capped by the fd limit) */

#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BATCHES 5

static int n;
static int *a, *b, *c;

static double now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

static int cmp(const void *x, const void *y)
{
    double diff = *(const double *)x - *(const double *)y;
    return (diff > 0) - (diff < 0);
}

/* setup(i) prepares item i untimed; step(i) is timed; teardown(i) undoes it untimed */
typedef void (*fn)(int i);
static double timed(fn setup, fn step, fn teardown)
{
    double runs[BATCHES];
    for (int r = 0; r < BATCHES; r++) {
        for (int i = 0; setup && i < n; i++)
            setup(i);
        double t0 = now_ns();
        for (int i = 0; i < n; i++)
            step(i);
        runs[r] = (now_ns() - t0) / n;
        for (int i = 0; teardown && i < n; i++)
            teardown(i);
    }
    qsort(runs, BATCHES, sizeof runs[0], cmp);
    return runs[BATCHES / 2];
}

static char buf[4096];
static int *d;                         /* a dup of the TCP socket */
static void tcp_new(int i) { a[i] = socket(AF_INET, SOCK_STREAM, 0); }
static void tcp_close(int i) { close(a[i]); }
static void pair_new(int i)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0)
        sv[0] = sv[1] = -1;
    b[i] = sv[0];
    c[i] = sv[1];
}
static void pair_close(int i) { close(b[i]); close(c[i]); }
static void pair_close_b(int i) { close(b[i]); }
static void pair_close_c(int i) { close(c[i]); }
static void both(int i) { tcp_new(i); pair_new(i); d[i] = -1; }
static void all_close(int i) { close(a[i]); close(b[i]); close(c[i]); if (d[i] >= 0) close(d[i]); }
static void getsockname_step(int i)
{
    struct sockaddr_in s;
    socklen_t l = sizeof s;
    getsockname(a[i], (struct sockaddr *)&s, &l);
}
static void fstat_step(int i)
{
    struct stat st;
    fstat(b[i], &st);
}
static void dupfd_step(int i) { d[i] = fcntl(a[i], F_DUPFD_CLOEXEC, 0); }
static void dup3_step(int i) { dup3(b[i], a[i], O_CLOEXEC); }
static void send_step(int i) { send(c[i], buf, 160 + 1200, MSG_DONTWAIT | MSG_NOSIGNAL); }
static void write_step(int i) { ssize_t w = write(b[i], buf, 80); (void)w; }
static void read_step(int i) { ssize_t r = read(b[i], buf, sizeof buf); (void)r; }
static void shutdown_step(int i) { shutdown(c[i], SHUT_WR); }
static void fill(int i) { pair_new(i); send_step(i); }
/* after the swap: the app's fd (a) is the pair's end, b its spare, d the TCP socket */
static void swapped(int i) { both(i); d[i] = fcntl(a[i], F_DUPFD_CLOEXEC, 0); }
static void dup3_done(int i) { close(a[i]); close(b[i]); close(c[i]); close(d[i]); }
static void spare_closed(int i) { close(a[i]); close(c[i]); close(d[i]); }
static void swapped_dup3(int i) { swapped(i); dup3_step(i); }

int main(int argc, char **argv)
{
    n = argc > 1 ? atoi(argv[1]) : 4000;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && (rlim_t)n * 4 + 64 > rl.rlim_cur)
        n = (int)((rl.rlim_cur - 64) / 4);
    if (n < 100 || n > 200000) {
        fprintf(stderr, "usage: hitcost [N], 100 <= N <= 200000 (and 4 N fds allowed)\n");
        return 2;
    }
    a = calloc((size_t)n, sizeof *a);
    b = calloc((size_t)n, sizeof *b);
    c = calloc((size_t)n, sizeof *c);
    d = calloc((size_t)n, sizeof *d);
    memset(buf, 'a', sizeof buf);
    printf("| step | ns | who pays |\n|---|---|---|\n");
    printf("| socket(AF_INET) | %.0f | the app, with or without the shim |\n", timed(NULL, tcp_new, tcp_close));
    printf("| close of a TCP socket never connected | %.0f | the engine, batched (direct: the app) |\n",
           timed(tcp_new, tcp_close, NULL));
    printf("| socketpair | %.0f | the app's connect (the inline limit's too) |\n", timed(NULL, pair_new, pair_close));
    printf("| getsockname (not bound?) | %.0f | the app's connect of a socket the hooks did not see made (none for one they did) |\n", timed(both, getsockname_step, all_close));
    printf("| fcntl(F_DUPFD): the TCP socket kept for the engine | %.0f | the app's connect |\n",
           timed(both, dupfd_step, all_close));
    printf("| dup3 of the pair's end onto the app's fd | %.0f | the app's connect |\n",
           timed(swapped, dup3_step, dup3_done));
    printf("| close of the pair's spare end (a dup) | %.0f | the app's connect |\n",
           timed(swapped_dup3, pair_close_b, spare_closed));
    printf("| fstat (the inode, for stale checks) | %.0f | the engine, when it makes the pair ahead (the app's connect only when none is left) |\n", timed(both, fstat_step, all_close));
    printf("| write of the request (80 B) | %.0f | the app (direct: the same write) |\n",
           timed(pair_new, write_step, pair_close));
    printf("| send of the answer (160 + 1200 B, head and body in one buffer) into the pair | %.0f | the app's write (an inline hit) |\n",
           timed(pair_new, send_step, pair_close));
    printf("| read of the answer | %.0f | the app (direct: the same read) |\n", timed(fill, read_step, pair_close));
    printf("| shutdown(SHUT_WR): EOF after a closing answer | %.0f | the app's write |\n",
           timed(pair_new, shutdown_step, pair_close));
    printf("| close of the engine's end | %.0f | the engine, batched |\n", timed(pair_new, pair_close_c, pair_close_b));
    printf("| close of the app's end (its own close) | %.0f | the app (direct: close of its TCP socket) |\n",
           timed(pair_new, pair_close_b, pair_close_c));
    return 0;
}
