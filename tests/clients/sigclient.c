/* sigclient.c — signal handlers inside the hooks.
 *
 *   sigclient PORT ITERATIONS   a SIGALRM handler makes HTTP requests itself, with
 *                               async-signal-safe calls only (socket, connect, write, read,
 *                               close: POSIX allows them in a handler), every 700 µs, while
 *                               the main thread loops the same request: the handler often
 *                               interrupts a hook of the main thread's (a connect, a close,
 *                               an answer on its thread). Prints {"main_ok": N, "main_bad": N,
 *                               "handler_ok": N, "handler_bad": N}.
 *   sigclient PORT jump         writes requests it never reads the answers of until the
 *                               write blocks, and jumps out of it from an alarm's handler
 *                               (siglongjmp: a classic timeout); then two GETs. Prints
 *                               {"jumped": 1, "then_ok": N}.
 *
 * Each GET is a new connection, GET /bytes/100 with Connection: close. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static int port;
static volatile sig_atomic_t handler_ok, handler_bad;

/* One request; 1 when a whole 100-byte body came back. */
static int one_get(void)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0)
        return 0;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port) };
    a.sin_addr.s_addr = htonl(0x7f000001);
    static const char req[] = "GET /bytes/100 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    char buf[1024] = { 0 };
    size_t have = 0;
    if (connect(s, (struct sockaddr *)&a, sizeof a) == 0 && write(s, req, sizeof req - 1) == (ssize_t)sizeof req - 1)
        for (;;) {
            ssize_t n = read(s, buf + have, sizeof buf - have);
            if (n <= 0)
                break;
            have += (size_t)n;
            if (have == sizeof buf)
                break;
        }
    close(s);
    const char *end = NULL;
    for (size_t i = 0; i + 4 <= have && !end; i++)
        if (!memcmp(buf + i, "\r\n\r\n", 4))
            end = buf + i + 4;
    return end && !memcmp(buf, "HTTP/1.1 200", 12) && buf + have - end == 100;
}

static void on_alarm(int sig)
{
    (void)sig;
    int saved = errno;
    if (one_get())
        handler_ok++;
    else
        handler_bad++;
    errno = saved;
}

static sigjmp_buf timed_out;

static void on_timeout(int sig)
{
    (void)sig;
    siglongjmp(timed_out, 1);
}

static int jump_out_of_a_write(void)
{
    signal(SIGPIPE, SIG_IGN);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port) };
    a.sin_addr.s_addr = htonl(0x7f000001);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) != 0)
        return 1;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_timeout;
    sigaction(SIGALRM, &sa, NULL);
    static const char req[] = "GET /bytes/2000000 HTTP/1.1\r\nHost: x\r\n\r\n";
    volatile int jumped = 0;
    if (sigsetjmp(timed_out, 1) == 0) {
        struct itimerval once = { { 0, 0 }, { 0, 300000 } };
        setitimer(ITIMER_REAL, &once, NULL);
        for (int i = 0; i < 1000000; i++)
            if (write(s, req, sizeof req - 1) <= 0)
                break;
    } else {
        jumped = 1;
    }
    close(s);
    int ok = one_get() + one_get();
    printf("{\"jumped\": %d, \"then_ok\": %d}\n", jumped, ok);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    port = atoi(argv[1]);
    if (!strcmp(argv[2], "jump"))
        return jump_out_of_a_write();
    int iterations = atoi(argv[2]);
    one_get();                         /* (stored: the rest are hits) */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct itimerval every = { { 0, 700 }, { 0, 700 } }, stop = { { 0, 0 }, { 0, 0 } };
    setitimer(ITIMER_REAL, &every, NULL);
    int ok = 0, bad = 0;
    for (int i = 0; i < iterations; i++) {
        if (one_get())
            ok++;
        else
            bad++;
    }
    setitimer(ITIMER_REAL, &stop, NULL);
    printf("{\"main_ok\": %d, \"main_bad\": %d, \"handler_ok\": %d, \"handler_bad\": %d}\n", ok, bad,
           (int)handler_ok, (int)handler_bad);
    return 0;
}
