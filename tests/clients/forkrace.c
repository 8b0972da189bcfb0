/* forkrace.c — threads connect and ask while the main thread forks (tests/test_pool.py).
 *
 *     forkrace PORT ROUNDS
 *
 * Each round: 8 threads each open a new connection to 127.0.0.1:PORT and, once the fork
 * below is over, send one GET and read the answer to its end; meanwhile the main thread forks after 0 to 150 µs (about when the
 * threads connect; HTTPSHIM_TEST_FORK_PAUSE_MS widens the fork so that their connects land
 * inside it), and the child leaves at once. A connect that lands inside the
 * fork (between the fork handlers) must be answered in the parent as any other: a thread
 * still waiting 10 s after its round began is a request lost. Prints one JSON line:
 * {"rounds": N, "answered": A, "lost": L, "failed": F}; exit 0 when nothing was lost. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define THREADS 8

static int port;
static atomic_int answered, failed, forked;

static void *ask(void *arg)
{
    (void)arg;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    static const char q[] = "GET /bytes/64 HTTP/1.1\r\nHost: forkrace\r\nConnection: close\r\n\r\n";
    int ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    while (ok && !atomic_load(&forked))  /* the request goes once the fork is over */
        usleep(100);
    if (!ok || write(fd, q, sizeof q - 1) != (ssize_t)sizeof q - 1) {
        atomic_fetch_add(&failed, 1);
    } else {
        char b[4096];
        size_t got = 0;
        ssize_t k;
        while (got < sizeof b - 1 && (k = read(fd, b + got, sizeof b - 1 - got)) > 0)
            got += (size_t)k;
        b[got] = 0;
        atomic_fetch_add(strstr(b, " 200 ") ? &answered : &failed, 1);
    }
    if (fd >= 0)
        close(fd);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    port = atoi(argv[1]);
    int rounds = atoi(argv[2]), lost = 0;
    for (int r = 0; r < rounds && !lost; r++) {
        pthread_t t[THREADS];
        atomic_store(&forked, 0);
        for (int i = 0; i < THREADS; i++)
            pthread_create(&t[i], NULL, ask, NULL);
        usleep((useconds_t)(r % 4 * 50));  /* (around when the threads connect) */
        pid_t child = fork();
        if (child == 0)
            _exit(0);
        atomic_store(&forked, 1);
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 10;
        for (int i = 0; i < THREADS; i++)
            if (pthread_timedjoin_np(t[i], NULL, &until) != 0)
                lost++;
        if (child > 0)
            waitpid(child, NULL, 0);
    }
    printf("{\"rounds\": %d, \"answered\": %d, \"lost\": %d, \"failed\": %d}\n", rounds, atomic_load(&answered), lost,
           atomic_load(&failed));
    fflush(stdout);
    _exit(lost ? 1 : 0);               /* (a lost thread still blocks in read: no exit handlers) */
}
