/* curl_loop.h — libcurl's sockets and timer on the engine's loop (curl_loop.c). */
#ifndef HTTPSHIM_CURL_LOOP_H
#define HTTPSHIM_CURL_LOOP_H
#include <curl/curl.h>

/* Drives m from the loop: its socket and timer callbacks are set here. */
void curl_loop_attach(CURLM *m);
/* A transfer ended and left its connection in libcurl's pool on fd (between these ports):
 * it is watched while
 * idle (parked), also when libcurl never asked for it to be (a transfer that completed
 * without waiting), so that bytes no request asked for are heard before a reuse. */
void curl_loop_watch_idle(curl_socket_t fd, const CURL *ended, unsigned local_port, unsigned peer_port);
/* A transfer took up the connection between these ports (libcurl's pre-request callback):
 * it is no longer idle, even if libcurl never asks for it to be watched. */
void curl_loop_taken(unsigned local_port, unsigned peer_port);
/* libcurl is closing fd (its close-socket callback): out of the epoll set first. */
void curl_loop_closing(int fd);
/* A forked child: the parent's handle, sockets and timer are never touched again. */
void curl_loop_forget(void);
#endif
