/* hooks.h — what the interposed functions (hooks.c) share with the other interposers:
 * the configuration, loaded on first use. */
#ifndef HTTPSHIM_HOOKS_H
#define HTTPSHIM_HOOKS_H
#include "rules.h"

/* The rules (loaded on the first call), or NULL: no file, a broken one, or a call the
 * shim must stay out of. */
struct shim_config *hooks_config(void);
#endif
