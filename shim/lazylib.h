/* lazylib.h - loads libcurl and hiredis on first use (see lazylib.c). */
#ifndef HTTPSHIM_LAZYLIB_H
#define HTTPSHIM_LAZYLIB_H

/* 0 when the libraries are loaded and every function the shim uses was found; -1 (and
 * a log line) otherwise. Idempotent; called with the engine's start lock held. */
int lazylib_load(void);

#endif
