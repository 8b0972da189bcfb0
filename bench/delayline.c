/*
 * delayline - a userspace link emulator for bench/full (this kernel has no sch_netem).
 *
 * It creates two TUN devices (IFF_TUN | IFF_NO_PI, not persistent, so they vanish with
 * this process): A in the network namespace it was started in, then, after setns() into
 * the namespace given with --netns, B there (a TUN device belongs to the namespace the
 * process was in when it opened /dev/net/tun).  Every IP packet read from one device is
 * written to the other after a fixed delay (--delay-ms, default 10, each way), FIFO per
 * direction, timed on CLOCK_MONOTONIC with ppoll() (nanosecond timeouts).  Each direction
 * has a fixed ring (--slots, default 4096, of 2048 bytes); a packet arriving at a full
 * ring is dropped, as a real link queue would, and counted.  Addresses and routes are not
 * set here: once both devices exist it writes "ready" to --ready FILE, and the caller
 * configures them (ip addr add 10.213.0.1 peer 10.213.0.2 dev A; ip -n NS ... dev B).
 * SIGTERM / SIGINT: stop, print packets forwarded / dropped per direction on stderr,
 * exit 0.
 *
 * usage: delayline --netns /var/run/netns/NAME --dev-a NAME --dev-b NAME
 *                  [--delay-ms MS] [--delay-us US] [--slots N] [--spin-us US]
 *                  [--ready FILE]
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define SLOT_BYTES  2048            /* > the TUN MTU (1500); longer reads are dropped */
#define SLOTS_MAX   65536
#define READ_BATCH  64              /* packets read from one side per wakeup */

struct slot {
    int64_t due_ns;
    uint16_t len;
    unsigned char data[SLOT_BYTES];
};

struct dir {
    const char *name;               /* "a->b" */
    int in, out;                    /* read from in, write to out */
    struct slot *ring;
    uint32_t head, count;           /* oldest slot, slots in use */
    uint64_t fwd, drop_full, drop_big, drop_write;
    int64_t late_sum_ns, late_max_ns;   /* how long after due_ns packets went out */
};

static volatile sig_atomic_t stop_sig;
static uint32_t n_slots = 4096;
static int64_t delay_ns = 10 * 1000000LL;
static int64_t spin_ns = 300 * 1000LL;  /* poll without sleeping this close to a due time */

static void on_signal(int sig) { stop_sig = sig; }

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int tun_open(const char *name)
{
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "delayline: /dev/net/tun: %s\n", strerror(errno));
        return -1;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        fprintf(stderr, "delayline: TUNSETIFF %s: %s\n", name, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* Read what is waiting on d->in (at most READ_BATCH packets) into the ring. */
static void pull(struct dir *d)
{
    for (int i = 0; i < READ_BATCH; i++) {
        unsigned char scratch[SLOT_BYTES];
        bool full = d->count == n_slots;
        struct slot *s = full ? NULL : &d->ring[(d->head + d->count) % n_slots];
        ssize_t n = read(d->in, s ? s->data : scratch, SLOT_BYTES);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                fprintf(stderr, "delayline: read %s: %s\n", d->name, strerror(errno));
            return;
        }
        if (n == 0)
            return;
        if (full) {
            d->drop_full++;
            continue;
        }
        if (n >= SLOT_BYTES) {      /* may have been cut short: never forward a stub */
            d->drop_big++;
            continue;
        }
        s->len = (uint16_t)n;
        s->due_ns = now_ns() + delay_ns;
        d->count++;
    }
}

/* Write every packet that is due; returns when the next is due (INT64_MAX: none). */
static int64_t push(struct dir *d, int64_t t)
{
    while (d->count) {
        struct slot *s = &d->ring[d->head];
        if (s->due_ns > t)
            return s->due_ns;
        int64_t late = now_ns() - s->due_ns;
        ssize_t n = write(d->out, s->data, s->len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == (ssize_t)s->len) {
            d->fwd++;
            d->late_sum_ns += late;
            if (late > d->late_max_ns)
                d->late_max_ns = late;
        }
        else
            d->drop_write++;        /* the far side refused it: the link lost it */
        d->head = (d->head + 1) % n_slots;
        d->count--;
    }
    return INT64_MAX;
}

static long num_arg(const char *name, const char *s, long lo, long hi)
{
    char *e;
    errno = 0;
    long v = strtol(s, &e, 10);
    if (errno || e == s || *e || v < lo || v > hi) {
        fprintf(stderr, "delayline: bad --%s '%s'\n", name, s);
        exit(2);
    }
    return v;
}

static void usage(FILE *f)
{
    fputs("usage: delayline --netns /var/run/netns/NAME --dev-a NAME --dev-b NAME\n"
          "                 [--delay-ms MS | --delay-us US] [--slots N] [--ready FILE]\n"
          "  --dev-a NAME   TUN device created in the current network namespace\n"
          "  --dev-b NAME   TUN device created in the namespace --netns names\n"
          "  --delay-ms MS  one-way delay, each direction (default 10)\n"
          "  --slots N      ring capacity per direction, packets (default 4096)\n"
          "  --spin-us US   busy-poll this long before a packet is due (default 300;\n"
          "                 a sleeping thread wakes a few hundred µs late on a VM)\n"
          "  --ready FILE   written ('ready') once both devices exist\n", f);
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"netns", 1, 0, 'n'}, {"dev-a", 1, 0, 'a'}, {"dev-b", 1, 0, 'b'},
        {"delay-ms", 1, 0, 'd'}, {"delay-us", 1, 0, 'u'}, {"slots", 1, 0, 's'},
        {"ready", 1, 0, 'r'}, {"spin-us", 1, 0, 'S'}, {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
    const char *netns = NULL, *dev_a = NULL, *dev_b = NULL, *ready = NULL;
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'n': netns = optarg; break;
        case 'a': dev_a = optarg; break;
        case 'b': dev_b = optarg; break;
        case 'd': delay_ns = num_arg("delay-ms", optarg, 0, 10000) * 1000000LL; break;
        case 'u': delay_ns = num_arg("delay-us", optarg, 0, 10000000) * 1000LL; break;
        case 's': n_slots = (uint32_t)num_arg("slots", optarg, 1, SLOTS_MAX); break;
        case 'r': ready = optarg; break;
        case 'S': spin_ns = num_arg("spin-us", optarg, 0, 100000) * 1000LL; break;
        default:
            usage(ch == 'h' ? stdout : stderr);
            return ch == 'h' ? 0 : 2;
        }
    }
    if (optind < argc || !netns || !dev_a || !dev_b) {
        usage(stderr);
        return 2;
    }

    /* SIGTERM/SIGINT are blocked except inside ppoll(): no lost wakeup */
    sigset_t block, waitmask;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &waitmask);
    sigdelset(&waitmask, SIGTERM);
    sigdelset(&waitmask, SIGINT);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);   /* 1 ns: wake when asked */

    int fa = tun_open(dev_a);
    if (fa < 0)
        return 1;
    int nsfd = open(netns, O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) {
        fprintf(stderr, "delayline: %s: %s\n", netns, strerror(errno));
        return 1;
    }
    if (setns(nsfd, CLONE_NEWNET) < 0) {
        fprintf(stderr, "delayline: setns %s: %s\n", netns, strerror(errno));
        return 1;
    }
    close(nsfd);
    int fb = tun_open(dev_b);
    if (fb < 0)
        return 1;

    struct dir dirs[2] = {
        { .name = "a->b", .in = fa, .out = fb },
        { .name = "b->a", .in = fb, .out = fa },
    };
    for (int i = 0; i < 2; i++) {
        dirs[i].ring = calloc(n_slots, sizeof *dirs[i].ring);
        if (!dirs[i].ring) {
            fputs("delayline: out of memory\n", stderr);
            return 1;
        }
    }
    if (ready) {
        FILE *f = fopen(ready, "w");
        if (!f || fputs("ready\n", f) < 0 || fclose(f) != 0) {
            fprintf(stderr, "delayline: %s: %s\n", ready, strerror(errno));
            return 1;
        }
    }

    while (!stop_sig) {
        int64_t t = now_ns(), next = INT64_MAX;
        for (int i = 0; i < 2; i++) {
            int64_t due = push(&dirs[i], t);
            if (due < next)
                next = due;
        }
        struct timespec ts, *tp = NULL;
        if (next != INT64_MAX) {
            /* waking from a sleep takes a few hundred µs on an idle VM: sleep until
               spin_ns before the due time, then poll without sleeping */
            int64_t w = next - now_ns() - spin_ns;
            if (w < 0)
                w = 0;
            ts.tv_sec = (time_t)(w / 1000000000LL);
            ts.tv_nsec = (long)(w % 1000000000LL);
            tp = &ts;
        }
        struct pollfd pf[2] = { { .fd = fa, .events = POLLIN }, { .fd = fb, .events = POLLIN } };
        int n = ppoll(pf, 2, tp, &waitmask);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "delayline: ppoll: %s\n", strerror(errno));
            break;
        }
        for (int i = 0; i < 2; i++) {
            if (pf[i].revents & (POLLERR | POLLHUP | POLLNVAL)) {
                fprintf(stderr, "delayline: device %s failed\n", i ? dev_b : dev_a);
                stop_sig = -1;
            } else if (pf[i].revents & POLLIN) {
                pull(&dirs[i]);
            }
        }
    }

    for (int i = 0; i < 2; i++) {
        const struct dir *d = &dirs[i];
        fprintf(stderr, "delayline: %s forwarded=%llu dropped_full=%llu dropped_oversize=%llu "
                "dropped_write=%llu queued_at_exit=%u late_mean_us=%.0f late_max_us=%.0f\n",
                d->name, (unsigned long long)d->fwd, (unsigned long long)d->drop_full,
                (unsigned long long)d->drop_big, (unsigned long long)d->drop_write, d->count,
                d->fwd ? (double)d->late_sum_ns / (double)d->fwd / 1e3 : 0.0,
                (double)d->late_max_ns / 1e3);
        free(dirs[i].ring);
    }
    close(fa);
    close(fb);
    return stop_sig > 0 || stop_sig == 0 ? 0 : 1;
}
