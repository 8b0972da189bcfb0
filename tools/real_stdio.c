/* real_stdio.c — real_fclose() for the programs that use shim/rules.c and shim/exited.c
 * without the library (the CLI, the rules fuzz target): there, fclose is libc's own. In
 * the library, real.c binds it past the fclose hook. */
#include "../shim/real.h"

int real_fclose(FILE *f) { return fclose(f); }
