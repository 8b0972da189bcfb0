/* linger.h — the ends of connections the engine has ended with an end of file, kept a
 * moment for the app's last write (linger.c). */
#ifndef HTTPSHIM_LINGER_H
#define HTTPSHIM_LINGER_H
#include "loop.h"
#include <stdbool.h>

/* Takes over src's fd (its registration goes; the caller forgets both) after the answer
 * that ended the connection: the app reads EOF, and a write it makes then succeeds, as
 * TCP's first write after a FIN does; the end is closed a moment later (a write then:
 * EPIPE, as after TCP's reset). False: not taken (fds short): the caller closes it. */
bool linger_adopt(struct loop_source *src);
void linger_forget(void);              /* a forked child: the parent's are not its own */
#endif
