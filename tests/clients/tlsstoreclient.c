/* tlsstoreclient.c — an OpenSSL client that replaces its context's trust store, as libcurl's
 * CA cache and some apps do: one HTTPS GET to 127.0.0.1:PORT for HOST, trusting only
 * CAFILE through a store it builds itself and installs with SSL_CTX_set_cert_store (or,
 * with --set1, SSL_CTX_set1_cert_store). Prints "STATUS BODY_BYTES", or "error WHAT".
 *
 * With --callback it keeps the context's store and verifies through a callback of its own
 * (one that could pin a certificate: the shim must not intercept it).
 *
 * With --late it keeps the context's own store, empty, sends its ClientHello, and loads
 * CAFILE into the store only 300 ms later, before it reads the answer (curl loads its CA
 * file after sending the ClientHello, to overlap the reading with the round trip), then
 * sets X509_V_FLAG_TRUSTED_FIRST on the store, as curl does last. The first handshake step
 * reads from an empty memory BIO, so that it cannot see the answer. --late-unmarked: the
 * same without the flag. --latecrl: curl with --crlfile, stalled: CAFILE at once, then
 * 300 ms later the revocation list in $TLS_CRL_PEM (CRL_CHECK | CRL_CHECK_ALL), then the
 * flag.
 *
 * With --depth0 it keeps the context's own store (CAFILE loaded) and allows no chain
 * beyond the leaf (SSL_CTX_set_verify_depth 0): a leaf issued by an intermediate fails.
 *
 * With --deny (the context's own store, CAFILE loaded) it verifies through
 * SSL_CTX_set_cert_verify_callback: OpenSSL's own check, then a deny list of one, the
 * certificate in the PEM file $TLS_DENY_PEM. With --ocsp it asks for a stapled OCSP status
 * and takes a connection without one (a soft-fail check that refuses only a staple that
 * says revoked). With --nosni it checks HOST (SSL_set1_host) but sends no server name;
 * with --ipcheck it sends HOST as its server name and checks the address 127.0.0.1.
 *
 * Once it has read the answer to the end it says its own close_notify (SSL_shutdown), with
 * SIGPIPE at its default, as a plain C client does ($TLS_SHUTDOWN_DELAY_MS later, if set).
 *
 *   tlsstoreclient [--set1|--callback|--late|--late-unmarked|--latecrl|--depth0|--deny|--ocsp|--nosni|--ipcheck]
 *                  HOST PORT CAFILE PATH */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ocsp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int keep_verdict(int preverify_ok, X509_STORE_CTX *x)
{
    (void)x;
    return preverify_ok;
}

static X509 *denied;

static int deny_listed(X509_STORE_CTX *x, void *arg)
{
    (void)arg;
    int ok = X509_verify_cert(x);
    if (ok == 1 && denied && X509_cmp(X509_STORE_CTX_get0_cert(x), denied) == 0) {
        X509_STORE_CTX_set_error(x, X509_V_ERR_CERT_REJECTED);
        return 0;
    }
    return ok;
}

static int soft_fail_status(SSL *s, void *arg)
{
    (void)arg;
    const unsigned char *p;
    long len = SSL_get_tlsext_status_ocsp_resp(s, &p);
    if (len <= 0 || !p)
        return 1;                      /* no staple: taken */
    OCSP_RESPONSE *r = d2i_OCSP_RESPONSE(NULL, &p, len);
    OCSP_BASICRESP *b = r ? OCSP_response_get1_basic(r) : NULL;
    int status = -1, reason;
    if (b && OCSP_resp_count(b) > 0)
        status = OCSP_single_get0_status(OCSP_resp_get0(b, 0), &reason, NULL, NULL, NULL);
    OCSP_BASICRESP_free(b);
    OCSP_RESPONSE_free(r);
    return status != V_OCSP_CERTSTATUS_REVOKED;
}

static SSL_CTX *the_ctx;               /* freed on every way out: a sanitized run reports no leak */
static SSL *the_ssl;

static int fail(const char *what)
{
    printf("error %s\n", what);
    X509_free(denied);
    if (the_ssl)
        SSL_free(the_ssl);
    if (the_ctx)
        SSL_CTX_free(the_ctx);
    return 1;
}

int main(int argc, char **argv)
{
    int set1 = argc > 1 && !strcmp(argv[1], "--set1");
    int callback = argc > 1 && !strcmp(argv[1], "--callback");
    int unmarked = argc > 1 && !strcmp(argv[1], "--late-unmarked");
    int latecrl = argc > 1 && !strcmp(argv[1], "--latecrl");
    int late = (argc > 1 && !strcmp(argv[1], "--late")) || unmarked || latecrl;
    int depth0 = argc > 1 && !strcmp(argv[1], "--depth0");
    int deny = argc > 1 && !strcmp(argv[1], "--deny");
    int ocsp = argc > 1 && !strcmp(argv[1], "--ocsp");
    int nosni = argc > 1 && !strcmp(argv[1], "--nosni");
    int ipcheck = argc > 1 && !strcmp(argv[1], "--ipcheck");
    int own_store = callback || depth0 || deny || ocsp || nosni || ipcheck;
    if (own_store || late)
        set1 = 1;                      /* the flag takes the same place */
    if (argc != 5 + set1)
        return fail("usage: tlsstoreclient [--set1|--callback|--late|--depth0|--deny|--ocsp|--nosni|--ipcheck] HOST PORT "
                    "CAFILE PATH");
    const char *host = argv[1 + set1], *cafile = argv[3 + set1], *path = argv[4 + set1];
    int port = atoi(argv[2 + set1]);
    SSL_CTX *ctx = the_ctx = SSL_CTX_new(TLS_client_method());
    X509_STORE *store = X509_STORE_new();
    if (!ctx || !store || X509_STORE_load_file(store, cafile) != 1) {
        X509_STORE_free(store);
        return fail("store");
    }
    if (late) {
        X509_STORE_free(store);        /* the context's own store, filled after the ClientHello */
    } else if (own_store) {
        X509_STORE_free(store);
        if (SSL_CTX_load_verify_locations(ctx, cafile, NULL) != 1)
            return fail("store");
    } else if (set1) {
        SSL_CTX_set1_cert_store(ctx, store);
        X509_STORE_free(store);
    } else {
        SSL_CTX_set_cert_store(ctx, store);   /* the context owns it now */
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, callback ? keep_verdict : NULL);
    if (depth0)
        SSL_CTX_set_verify_depth(ctx, 0);
    if (deny) {
        FILE *f = getenv("TLS_DENY_PEM") ? fopen(getenv("TLS_DENY_PEM"), "r") : NULL;
        denied = f ? PEM_read_X509(f, NULL, NULL, NULL) : NULL;
        if (f)
            fclose(f);
        if (!denied)
            return fail("TLS_DENY_PEM");
        SSL_CTX_set_cert_verify_callback(ctx, deny_listed, NULL);
    }
    if (ocsp) {
        SSL_CTX_set_tlsext_status_cb(ctx, soft_fail_status);
        SSL_CTX_set_tlsext_status_type(ctx, TLSEXT_STATUSTYPE_ocsp);
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0)
        return fail("connect");
    SSL *ssl = the_ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (!nosni)
        SSL_set_tlsext_host_name(ssl, host);
    if (ipcheck)
        X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), "127.0.0.1");
    else
        SSL_set1_host(ssl, host);
    if (late) {
        /* the ClientHello goes out on the socket, while the answer is read from an empty
         * memory BIO: the first step cannot see the server's reply, however fast it is */
        BIO *empty = BIO_new(BIO_s_mem()), *out = BIO_new_socket(fd, BIO_NOCLOSE);
        if (!empty || !out)
            return fail("bio");
        SSL_set_bio(ssl, empty, out);
        int rc = SSL_connect(ssl);
        if (rc == 1 || SSL_get_error(ssl, rc) != SSL_ERROR_WANT_READ)
            return fail("handshake");  /* the ClientHello is out, the answer not read yet */
        X509_STORE *st = SSL_CTX_get_cert_store(ctx);
        if (latecrl && SSL_CTX_load_verify_locations(ctx, cafile, NULL) != 1)
            return fail("store");
        usleep(300 * 1000);
        if (latecrl) {
            X509_LOOKUP *lookup = X509_STORE_add_lookup(st, X509_LOOKUP_file());
            if (!lookup || !getenv("TLS_CRL_PEM") || X509_load_crl_file(lookup, getenv("TLS_CRL_PEM"), X509_FILETYPE_PEM) != 1)
                return fail("crl");
            X509_STORE_set_flags(st, X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL);
        } else if (SSL_CTX_load_verify_locations(ctx, cafile, NULL) != 1) {
            return fail("store");
        }
        if (!unmarked)
            X509_STORE_set_flags(st, X509_V_FLAG_TRUSTED_FIRST);   /* (curl's last step) */
        BIO *in = BIO_new_socket(fd, BIO_NOCLOSE);
        if (!in)
            return fail("bio");
        SSL_set0_rbio(ssl, in);        /* frees the empty one; nothing was in it */
        if (SSL_connect(ssl) != 1)
            return fail("handshake");
    } else if (SSL_connect(ssl) != 1) {
        return fail("handshake");
    }
    char req[512];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n", path, host, port);
    if (SSL_write(ssl, req, n) != n)
        return fail("write");
    static char buf[1 << 20];
    size_t got = 0;
    for (;;) {
        int r = SSL_read(ssl, buf + got, (int)(sizeof buf - got - 1));
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    buf[got] = 0;
    char *body = strstr(buf, "\r\n\r\n");
    int status = 0;
    if (!body || sscanf(buf, "HTTP/1.%*d %d", &status) != 1)
        return fail("response");
    printf("%d %zu\n", status, got - (size_t)(body + 4 - buf));
    fflush(stdout);
    if (getenv("TLS_SHUTDOWN_DELAY_MS"))
        usleep((useconds_t)atoi(getenv("TLS_SHUTDOWN_DELAY_MS")) * 1000);
    SSL_shutdown(ssl);                 /* its close_notify, after the server's: SIGPIPE not ignored */
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    X509_free(denied);
    close(fd);
    return 0;
}
