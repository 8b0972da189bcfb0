/* closerace.c — a thread closes the socket another thread is connecting, and opens a file
 * that takes the freed number ("cancel a connect by closing it", as watchdogs do).
 *
 *   closerace PORT ITERATIONS
 *
 * Prints one JSON line: {"races": N, "clobbered": N, "fds_before": N, "fds_after": N}:
 * clobbered counts the files the other thread opened that were no longer what it opened
 * when it looked (a connect that replaced them); the fds are counted before and after (a
 * connect that re-created a number closed under it leaks one). */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static _Atomic int slot = -1, opened = -1, stop;

static void *watchdog(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop)) {
        int s = atomic_exchange(&slot, -1);
        if (s >= 0) {
            close(s);
            atomic_store(&opened, open("/dev/null", O_WRONLY | O_CLOEXEC));
        }
    }
    return NULL;
}

static int count_fds(void)
{
    int n = 0;
    for (int fd = 0; fd < 4096; fd++)
        n += fcntl(fd, F_GETFD) >= 0;
    return n;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1])),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    int iterations = atoi(argv[2]), races = 0, clobbered = 0;
    int warm = socket(AF_INET, SOCK_STREAM, 0);     /* the pool warm: later connects divert at once */
    if (warm < 0 || connect(warm, (struct sockaddr *)&a, sizeof a) != 0)
        return 2;
    close(warm);
    usleep(300000);
    int before = count_fds();
    pthread_t t;
    if (pthread_create(&t, NULL, watchdog, NULL) != 0)
        return 2;
    for (int i = 0; i < iterations; i++) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0)
            break;
        atomic_store(&opened, -1);
        atomic_store(&slot, s);                      /* the watchdog may close it from now on */
        connect(s, (struct sockaddr *)&a, sizeof a);
        int mine = s;
        if (atomic_compare_exchange_strong(&slot, &mine, -1)) {
            close(s);                                /* the watchdog never took it */
            continue;
        }
        int f;
        for (long spins = 0; (f = atomic_load(&opened)) == -1 && spins < 100000000L; spins++)
            ;
        if (f < 0)
            continue;
        races++;
        struct stat st;
        if (fstat(f, &st) != 0 || !S_ISCHR(st.st_mode))
            clobbered++;                             /* no longer /dev/null */
        close(f);
    }
    atomic_store(&stop, 1);
    pthread_join(t, NULL);
    usleep(500000);                                  /* the engine closes its ends meanwhile */
    printf("{\"races\": %d, \"clobbered\": %d, \"fds_before\": %d, \"fds_after\": %d}\n", races, clobbered, before,
           count_fds());
    return 0;
}
