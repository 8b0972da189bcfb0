/* sockrecord.h — the record of the app's socket before connect, and whether a connect
 * may divert it (sockrecord.c). */
#ifndef HTTPSHIM_SOCKRECORD_H
#define HTTPSHIM_SOCKRECORD_H
#include <stdbool.h>
#include "fdtable.h"

/* What divert needs to know of the app's socket to make the socketpair end behave like
 * it: its file flags, close-on-exec (-1: ask), and whether an owner, a signal or options
 * were set on it (ask for those, and copy them). */
struct socket_facts { int file_flags; int cloexec; unsigned ask; };

/* socket() made fd (entry e) with these arguments. */
void sockrecord_made(struct fd_entry *e, int domain, int type, int protocol);
/* A real connect (or its attempt): never a fresh socket again. */
void sockrecord_note_connected(int fd);
void sockrecord_note_bound(int fd);
/* Something divert cannot move to the socketpair end (registrations in more epoll sets than
 * the record holds): the socket is the app's own for good (a connect in progress too). */
void sockrecord_note_unmovable(int fd);
/* What fcntl, ioctl and setsockopt changed that divert would otherwise ask about; an
 * option that steers packets makes the socket the app's own for good. */
void sockrecord_note_fcntl(int fd, int cmd, void *arg);
void sockrecord_note_ioctl(int fd, unsigned long req, const void *arg);
void sockrecord_note_sockopt(int fd, int level, int name);
/* What the hooks saw the app do to its socket since socket(), if they saw it all. */
bool sockrecord_facts(const struct fd_entry *e, int family, struct socket_facts *f);
/* A TCP socket of that family the app made and has neither bound, steered, connected nor
 * shared, and what divert must carry over from it (*connected: false only because a real
 * connect was made on it already). */
bool sockrecord_fresh_tcp(int fd, int family, struct socket_facts *f, bool *connected);
/* Notes (or forgets) a registration of the fd in epfd in its entry, for divert to move (or
 * a kept reference's close to drop): false when there is no room for another epoll set. */
struct epoll_event;
bool sockrecord_note_epoll(struct fd_entry *e, int epfd, int op, const struct epoll_event *event);
/* Copies what the app set on its socket `from` that a Unix socket honours onto `to`. */
void sockrecord_carry_over(int from, int to, const struct socket_facts *f);
/* The way back: what the app set on its socketpair end `from`, onto a TCP socket `to`. */
void sockrecord_carry_back(int from, int to, const struct fd_entry *e);
#endif
