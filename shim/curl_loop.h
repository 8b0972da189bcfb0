/* curl_loop.h — libcurl's sockets and timer on the engine's loop (curl_loop.c). */
#ifndef HTTPSHIM_CURL_LOOP_H
#define HTTPSHIM_CURL_LOOP_H
#include <curl/curl.h>

/* Drives m from the loop: its socket and timer callbacks are set here. */
void curl_loop_attach(CURLM *m);
/* libcurl is closing fd (its close-socket callback): out of the epoll set first. */
void curl_loop_closing(int fd);
/* A forked child: the parent's handle, sockets and timer are never touched again. */
void curl_loop_forget(void);
#endif
