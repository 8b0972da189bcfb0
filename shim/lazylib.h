/* lazylib.h - loads hiredis and libcurl on first use (see lazylib.c). */
#ifndef HTTPSHIM_LAZYLIB_H
#define HTTPSHIM_LAZYLIB_H

/* 0 when the library is loaded and every function the shim uses of it was found; -1 (and
 * a log line) otherwise. Idempotent; called on the engine thread, or with its start lock
 * held. */
int lazylib_load_hiredis(void);
int lazylib_load_curl(void);

#endif
