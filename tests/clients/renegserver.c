/* renegserver.c — a TLS 1.2 server that changes its certificate by renegotiating once it
 * has read a request: the attack on a proxy that checks the upstream's chain only in the
 * first handshake. Listens on 127.0.0.1 (an ephemeral port, written to PORTFILE),
 * serves one connection at a time: handshake with CERT, read the request, then a
 * HelloRequest and a new handshake with CERT2; only if the client renegotiates does it
 * answer 200 "renegotiated". Appends REQ, RENEGOTIATED and ANSWERED lines to LOG.
 *
 *   renegserver PORTFILE LOG CERT KEY CERT2 KEY2 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static FILE *logf;

static void note(const char *what)
{
    fprintf(logf, "%s\n", what);
    fflush(logf);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* The new handshake runs as the client answers the HelloRequest: driven by reads, for
 * a second at most. */
static int renegotiated(SSL *s, int fd)
{
    if (SSL_renegotiate(s) != 1 || SSL_do_handshake(s) != 1)
        return 0;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);   /* (the reads below wait in poll) */
    for (double end = now() + 1; now() < end;) {
        char b[64];
        int r = SSL_read(s, b, sizeof b);
        if (!SSL_renegotiate_pending(s))
            return 1;
        int e = SSL_get_error(s, r);
        if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
            return 0;
        struct pollfd p = { fd, POLLIN, 0 };
        poll(&p, 1, 50);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: renegserver PORTFILE LOG CERT KEY CERT2 KEY2\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    logf = fopen(argv[2], "a");
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!logf || !ctx || SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION) != 1
        || SSL_CTX_use_certificate_chain_file(ctx, argv[3]) != 1
        || SSL_CTX_use_PrivateKey_file(ctx, argv[4], SSL_FILETYPE_PEM) != 1)
        return 1;
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET };
    socklen_t len = sizeof a;
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 16) != 0
        || getsockname(ls, (struct sockaddr *)&a, &len) != 0)
        return 1;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", argv[1]);
    FILE *pf = fopen(tmp, "w");
    if (!pf)
        return 1;
    fprintf(pf, "%d\n", ntohs(a.sin_port));
    fclose(pf);
    rename(tmp, argv[1]);
    for (int served = 0; served < 1000; served++) {
        int c = accept(ls, NULL, NULL);
        if (c < 0)
            continue;
        struct timeval tv = { 0, 500 * 1000 };   /* (a probe that sends no request holds it no longer) */
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        SSL *s = SSL_new(ctx);
        char req[8192];
        if (s && SSL_set_fd(s, c) == 1 && SSL_accept(s) == 1 && SSL_read(s, req, sizeof req) > 0) {
            note("REQ");
            if (SSL_use_certificate_chain_file(s, argv[5]) == 1
                && SSL_use_PrivateKey_file(s, argv[6], SSL_FILETYPE_PEM) == 1 && renegotiated(s, c)) {
                note("RENEGOTIATED");
                static const char answer[] = "HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\n"
                                             "renegotiated";
                if (SSL_write(s, answer, sizeof answer - 1) > 0)
                    note("ANSWERED");
            }
            SSL_shutdown(s);
        }
        ERR_clear_error();
        SSL_free(s);
        close(c);
    }
    SSL_CTX_free(ctx);
    return 0;
}
