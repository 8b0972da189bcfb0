/* writecost.c — what the write() hook costs a write the shim does not touch: N writes of
 * one byte to /dev/null, timed; run with and without LD_PRELOAD (bench/full scenario 6).
 * It first connects to 127.0.0.1:PORT (a port the rules list, nothing listening), so that
 * the rules are loaded and the fd table exists, as in a shimmed process.
 *
 *   writecost N [PORT]      prints "ns_per_write=X" */
#include <arpa/inet.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 10000000;
    if (argc > 2) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2])) };
        inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
        if (s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) != 0)
            perror("connect (expected: nothing listens)");
        if (s >= 0)
            close(s);
    }
    int fd = open("/dev/null", O_WRONLY);
    if (fd < 0 || n <= 0)
        return 1;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++)
        if (write(fd, "x", 1) != 1)
            return 1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ns = ((double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec)) / (double)n;
    printf("ns_per_write=%.1f\n", ns);
    return 0;
}
