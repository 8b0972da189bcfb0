/* epollclient.h — what the two halves of epollclient share: the connection slot, the
 * options, and the calls each makes into the other (epollclient.c runs the loop and the
 * connections; epollclient_resp.c parses what comes back). */
#ifndef EPOLLCLIENT_H
#define EPOLLCLIENT_H
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEAD_CAP   ((size_t)1 << 20)   /* response head (and chunk trailers) */
#define BODY_CAP   ((uint64_t)256 << 20)
#define READ_CHUNK 65536
#define LINE_CAP   4096                /* chunk-size line */

enum mode { M_CLOSE, M_KEEPALIVE, M_PIPELINE };
enum cstate { C_IDLE, C_START, C_CONNECTING, C_OPEN };
enum pstate { P_HEAD, P_LEN, P_EOF, P_CSIZE, P_CDATA, P_CCRLF, P_CTRAIL, P_DONE };

struct buf { char *p; size_t len, cap; };

struct conn {
    enum cstate st;
    int fd;
    bool registered, fresh;      /* fresh: start a new clock for request cur */
    uint32_t gen, events;        /* gen: bumped on close, tags epoll events */
    long cur, last;              /* requests [cur, last) belong to this slot */
    double t_req, deadline;      /* start of request cur; when it times out */
    struct buf w; size_t woff; int werr;
    struct buf r; size_t rpos;
    /* parser state of the response to request cur */
    enum pstate ps;
    size_t scan, trail;
    uint64_t left, body_n;
    int status;
    bool reusable, seen;         /* seen: an interim 1xx already arrived */
    struct buf body;             /* kept only with --out */
};

struct options {
    const char *host, *path, *method, *body, *out, *samples;
    int port, conc, timeout_ms;
    long count, warmup;
    long inline_limit;           /* > 0: the physical limit of an in-process hit (see usage) */
    enum mode mode;
    bool http10, reg_before, print_status, latency, keep_going, head_req, unique;
};

extern struct options opt;
extern FILE *outf;               /* --out */
extern bool stop;                /* a failure ends the run (without --keep-going) */

bool buf_add(struct buf *b, const void *d, size_t n);
void fail(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void complete(struct conn *c);   /* request cur answered whole */
void parse_response(struct conn *c);   /* as far as the bytes read go */
#endif
