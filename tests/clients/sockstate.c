/*
 * sockstate - makes TCP sockets to one upstream in the ways legacy programs do
 * (flags from socket(), fcntl, ioctl; timeouts; owner and signal; a dup before
 * connect; sockets whose fd number was closed and reused behind libc's back),
 * connects, does one GET, and prints per case what the kernel says about the fd
 * afterwards, asked with raw system calls so that no hook answers:
 *
 *   {"case":"plain","diverted":1,"nonblock":0,"cloexec":0,"async":0,"owner":0,"sig":0,
 *    "rcvtimeo_ms":0,"status":200,"timed_out":0,"connect_errno":0}
 *
 *   sockstate --port P [--case NAME]...   (all cases by default)
 *
 * "diverted" is SO_DOMAIN == AF_UNIX: the shim swapped the socket for its socketpair.
 *
 * Two cases write through glibc's own writes, which no hook sees (--case stdio: fdopen,
 * fprintf and fgets; --case dprintf), three GETs each: {"case":"stdio","status":[200,200,200]}.
 *
 * Two cases only on request: --case fclose (a connected socket that never wrote, closed
 * through fdopen + fclose, which closes behind the close hook: prints the process's open
 * fds before and after) and --case closefrom (closefrom(3) with a connection open, then
 * a new connection and a GET that misses: prints its status).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>

static int port;

static struct sockaddr_in upstream_addr(void)
{
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

static long raw_fcntl(int fd, int cmd) { return syscall(SYS_fcntl, fd, cmd, 0); }

static int raw_sockopt_int(int fd, int name)
{
    int v = -1;
    socklen_t len = sizeof v;
    if (syscall(SYS_getsockopt, fd, SOL_SOCKET, name, &v, &len) != 0)
        return -1;
    return v;
}

/* Waits (bounded) for a non-blocking connect; the errno it ended with. */
static int finish_connect(int fd)
{
    struct pollfd p = { .fd = fd, .events = POLLOUT };
    if (poll(&p, 1, 5000) != 1)
        return ETIMEDOUT;
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    return err;
}

/* One GET with Connection: close; the status, 0 when none arrived, -1 on a read timeout. */
static int get(int fd, const char *path)
{
    char req[256];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n", path, port);
    for (int off = 0, tries = 0; off < n && tries < 1000; tries++) {
        ssize_t w = write(fd, req + off, (size_t)(n - off));
        if (w > 0) {
            off += (int)w;
        } else if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd p = { .fd = fd, .events = POLLOUT };
            poll(&p, 1, 100);
        } else {
            return 0;
        }
    }
    char buf[4096];
    size_t have = 0;
    for (int tries = 0; tries < 1000 && have < sizeof buf - 1; tries++) {
        ssize_t r = read(fd, buf + have, sizeof buf - 1 - have);
        if (r > 0) {
            have += (size_t)r;
            continue;
        }
        if (r == 0)
            break;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN) {
            int fl = (int)raw_fcntl(fd, F_GETFL);
            if (!(fl & O_NONBLOCK))
                return -1;             /* a blocking read that timed out: SO_RCVTIMEO */
            struct pollfd p = { .fd = fd, .events = POLLIN };
            poll(&p, 1, 100);
            continue;
        }
        break;
    }
    buf[have] = 0;
    int status = 0;
    return sscanf(buf, "HTTP/1.%*d %d", &status) == 1 ? status : 0;
}

struct result {
    int connect_errno, status;
};

/* connect (waiting if non-blocking), then one GET of path. */
static struct result connect_and_get(int fd, const char *path)
{
    struct result r = { 0, 0 };
    struct sockaddr_in a = upstream_addr();
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        r.connect_errno = errno;
        if (errno == EINPROGRESS)
            r.connect_errno = finish_connect(fd);
        if (r.connect_errno)
            return r;
    }
    r.status = get(fd, path);
    return r;
}

static void report(const char *name, int fd, struct result r)
{
    struct timeval tv = { 0, 0 };
    socklen_t len = sizeof tv;
    syscall(SYS_getsockopt, fd, SOL_SOCKET, SO_RCVTIMEO, &tv, &len);
    long fl = raw_fcntl(fd, F_GETFL), fdfl = raw_fcntl(fd, F_GETFD);
    printf("{\"case\":\"%s\",\"diverted\":%d,\"nonblock\":%d,\"cloexec\":%d,\"async\":%d,\"owner\":%ld,\"sig\":%ld,"
           "\"rcvtimeo_ms\":%ld,\"status\":%d,\"timed_out\":%d,\"connect_errno\":%d}\n",
           name, raw_sockopt_int(fd, SO_DOMAIN) == AF_UNIX, fl >= 0 && (fl & O_NONBLOCK) != 0,
           fdfl >= 0 && (fdfl & FD_CLOEXEC) != 0, fl >= 0 && (fl & O_ASYNC) != 0, raw_fcntl(fd, F_GETOWN),
           raw_fcntl(fd, F_GETSIG), (long)tv.tv_sec * 1000 + (long)tv.tv_usec / 1000, r.status > 0 ? r.status : 0,
           r.status == -1, r.connect_errno);
    fflush(stdout);
}

static int tcp(int flags) { return socket(AF_INET, SOCK_STREAM | flags, 0); }

static int open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    for (struct dirent *de; d && (de = readdir(d)) && n < 100000;)
        n += de->d_name[0] != '.';
    if (d)
        closedir(d);
    return n;
}

/* The open fds once the engine has settled (its start loads libraries on its own thread):
 * two looks 50 ms apart that agree, within 2 s. */
static int settled_fds(void)
{
    int n = open_fds();
    for (int i = 0; i < 40; i++) {
        usleep(50 * 1000);
        int again = open_fds();
        if (again == n)
            break;
        n = again;
    }
    return n;
}

/* Three GETs of path, a connection each, written through stdio (fdopen + fprintf + fflush,
 * read with fgets) or with dprintf (read with read): the status of each, 0 for none. Neither
 * write goes through the PLT: glibc writes from within itself. */
static void stdio_gets(const char *name, const char *path)
{
    int status[3] = { 0, 0, 0 };
    for (int i = 0; i < 3; i++) {
        struct sockaddr_in a = upstream_addr();
        int fd = tcp(0);
        struct timeval tv = { 5, 0 };
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
            close(fd);
            continue;
        }
        FILE *f = fdopen(fd, "r+");
        if (!f) {
            close(fd);
            continue;
        }
        const char *fmt = "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n";
        char line[256];
        if (!strcmp(name, "dprintf")) {
            ssize_t n = dprintf(fd, fmt, path, port) > 0 ? read(fd, line, sizeof line - 1) : -1;
            line[n > 0 ? n : 0] = 0;
        } else if (fprintf(f, fmt, path, port) < 0 || fflush(f) != 0 || !fgets(line, sizeof line, f)) {
            line[0] = 0;
        }
        sscanf(line, "HTTP/1.%*d %d", &status[i]);
        fclose(f);
    }
    printf("{\"case\":\"%s\",\"status\":[%d,%d,%d]}\n", name, status[0], status[1], status[2]);
}

/* A connection made, then a vfork child that closes its copy fd by fd, as CPython's
 * subprocess does where the kernel has no close_range (or dup2s it onto its stdout first),
 * then the parent's GET on it: the parent's connection must be untouched. */
static void vfork_close(const char *name)
{
    struct sockaddr_in a = upstream_addr();
    int fd = tcp(0);
    int rc = connect(fd, (struct sockaddr *)&a, sizeof a);
    pid_t child = vfork();
    if (child == 0) {
        if (!strcmp(name, "vfork_dup2"))
            dup2(fd, 1);
        close(fd);
        _exit(0);
    }
    int status = -1;
    if (child > 0)
        waitpid(child, &status, 0);
    int got = rc == 0 ? get(fd, "/bytes/100") : 0;
    printf("{\"case\":\"%s\",\"connect\":%d,\"child\":%d,\"status\":%d}\n", name, rc, status, got);
    close(fd);
}

static bool special_case(const char *name)
{
    if (!strcmp(name, "stdio") || !strcmp(name, "dprintf")) {
        stdio_gets(name, "/bytes/100");
    } else if (!strcmp(name, "vfork_close") || !strcmp(name, "vfork_dup2")) {
        vfork_close(name);
    } else if (!strcmp(name, "fclose")) {
        struct sockaddr_in a = upstream_addr();
        int fd = tcp(0), rc = connect(fd, (struct sockaddr *)&a, sizeof a);
        close(fd);                     /* the engine (and its own fds) is up from here on */
        int before = settled_fds();
        fd = tcp(0);
        rc |= connect(fd, (struct sockaddr *)&a, sizeof a);
        close(fd);
        int closed = settled_fds();
        fd = tcp(0);
        rc |= connect(fd, (struct sockaddr *)&a, sizeof a);
        FILE *f = fdopen(fd, "r+");
        if (f)
            fclose(f);
        int after = settled_fds();
        printf("{\"case\":\"fclose\",\"connect\":%d,\"fds_before\":%d,\"fds_after_close\":%d,"
               "\"fds_after_fclose\":%d}\n", rc, before, closed, after);
    } else if (!strcmp(name, "closefrom")) {
        int fd = tcp(0);
        struct result r = connect_and_get(fd, "/bytes/100");
        closefrom(3);                  /* fd too, and whatever else is at 3 or above */
        int again = tcp(0);
        struct timeval tv = { 5, 0 };  /* a dead engine would never answer */
        setsockopt(again, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        struct result r2 = connect_and_get(again, "/bytes/101");   /* a miss: the engine's work */
        printf("{\"case\":\"closefrom\",\"first\":%d,\"after\":%d}\n", r.status, r2.status);
        close(again);
    } else {
        return false;
    }
    fflush(stdout);
    return true;
}

static void run_case(const char *name)
{
    int fd = -1, one = 1, zero = 0;
    struct result r = { 0, 0 };
    if (special_case(name))
        return;
    if (!strcmp(name, "plain")) {
        fd = tcp(0);
        r = connect_and_get(fd, "/bytes/100");
    } else if (!strcmp(name, "socket_flags")) {
        fd = tcp(SOCK_NONBLOCK | SOCK_CLOEXEC);
        r = connect_and_get(fd, "/bytes/100");
    } else if (!strcmp(name, "fcntl_nonblock")) {
        fd = tcp(0);
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        fcntl(fd, F_SETFD, FD_CLOEXEC);
        r = connect_and_get(fd, "/bytes/100");
    } else if (!strcmp(name, "ioctl_on_off")) {
        fd = tcp(SOCK_CLOEXEC);
        ioctl(fd, FIONBIO, &one);
        ioctl(fd, FIONBIO, &zero);
        ioctl(fd, FIONCLEX);
        r = connect_and_get(fd, "/bytes/100");
    } else if (!strcmp(name, "ioctl_nonblock")) {
        fd = tcp(0);
        ioctl(fd, FIONBIO, &one);
        ioctl(fd, FIOCLEX);
        r = connect_and_get(fd, "/bytes/100");
    } else if (!strcmp(name, "rcvtimeo")) {
        fd = tcp(0);
        struct timeval tv = { 0, 300 * 1000 };
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        r = connect_and_get(fd, "/delay/3000/bytes/10");
    } else if (!strcmp(name, "owner_sig")) {
        fd = tcp(0);
        fcntl(fd, F_SETOWN, getpid());
        fcntl(fd, F_SETSIG, SIGURG);
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_ASYNC);
        r = connect_and_get(fd, "/bytes/100");
    } else if (!strcmp(name, "dup_first")) {
        fd = tcp(0);
        int other = dup(fd);
        fcntl(other, F_SETFL, O_NONBLOCK);     /* the same open file: fd is non-blocking too */
        r = connect_and_get(fd, "/bytes/100");
        close(other);
    } else if (!strcmp(name, "reused_bound")) {
        /* the fd number is closed, then made again and bound behind the hooks: the shim
         * has no record of this socket, and must ask the kernel whether it is bound */
        /* (the engine thread may take the freed number first, making a socketpair ahead:
         * then the dance is tried again, a bounded number of times) */
        int again = -1;
        fd = -2;
        for (int tries = 0; tries < 50 && again != fd; tries++) {
            if (again >= 0)
                syscall(SYS_close, again);
            fd = tcp(0);
            close(fd);
            again = (int)syscall(SYS_socket, AF_INET, SOCK_STREAM, 0);
        }
        if (again != fd) {
            printf("{\"case\":\"%s\",\"error\":\"fd %d came back as %d\"}\n", name, fd, again);
            fflush(stdout);
            syscall(SYS_close, again);
            return;
        }
        struct sockaddr_in local = upstream_addr();
        local.sin_port = 0;
        syscall(SYS_bind, fd, &local, sizeof local);
        r = connect_and_get(fd, "/bytes/100");
    } else if (!strcmp(name, "udp")) {
        fd = socket(AF_INET, SOCK_DGRAM, 0);
        struct sockaddr_in a = upstream_addr();
        r.connect_errno = connect(fd, (struct sockaddr *)&a, sizeof a) == 0 ? 0 : errno;
    } else {
        printf("{\"case\":\"%s\",\"error\":\"unknown case\"}\n", name);
        fflush(stdout);
        return;
    }
    report(name, fd, r);
    close(fd);
}

int main(int argc, char **argv)
{
    static const char *all[] = { "plain", "socket_flags", "fcntl_nonblock", "ioctl_on_off", "ioctl_nonblock",
                                 "rcvtimeo", "owner_sig", "dup_first", "reused_bound", "udp" };
    const char *cases[32];
    int n = 0;
    signal(SIGURG, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--port") && i + 1 < argc)
            port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--case") && i + 1 < argc && n < 32)
            cases[n++] = argv[++i];
        else {
            fprintf(stderr, "usage: sockstate --port P [--case NAME]...\n");
            return 2;
        }
    }
    if (!port) {
        fprintf(stderr, "usage: sockstate --port P [--case NAME]...\n");
        return 2;
    }
    if (!n)
        for (; n < (int)(sizeof all / sizeof all[0]); n++)
            cases[n] = all[n];
    for (int i = 0; i < n; i++)
        run_case(cases[i]);
    return 0;
}
