/* curl_loop.h — libcurl's sockets and timer on the engine's loop (curl_loop.c). */
#ifndef HTTPSHIM_CURL_LOOP_H
#define HTTPSHIM_CURL_LOOP_H
#include <curl/curl.h>
#include <stdbool.h>

/* Drives m from the loop: its socket and timer callbacks are set here. */
void curl_loop_attach(CURLM *m);
/* A transfer ended and left its connection in libcurl's pool on fd (between these ports):
 * it is watched while
 * idle (parked), also when libcurl never asked for it to be (a transfer that completed
 * without waiting), so that bytes no request asked for are heard before a reuse. */
void curl_loop_watch_idle(curl_socket_t fd, const CURL *ended, unsigned local_port, unsigned peer_port);
/* A transfer's hold on the connection it sends on, from libcurl's pre-request callback
 * to its end: a connection someone holds is never idle, whatever order libcurl reports
 * the end of the one before in (it may hand the connection on, and the new transfer
 * pause on it, without a word to the socket callback). Lives in the transfer. */
struct curl_hold {
    unsigned local_port, peer_port;
    bool held;
    struct curl_hold *prev, *next;
};
/* The transfer of h took up the connection between these ports: no longer idle, even if
 * libcurl never asks for it to be watched. */
void curl_loop_taken(struct curl_hold *h, unsigned local_port, unsigned peer_port);
/* The transfer of h is done with its connection (before curl_loop_watch_idle; again is harmless). */
void curl_loop_let_go(struct curl_hold *h);
/* libcurl is closing fd (its close-socket callback): out of the epoll set first. */
void curl_loop_closing(int fd);
/* A forked child: the parent's handle, sockets and timer are never touched again. */
void curl_loop_forget(void);
#endif
