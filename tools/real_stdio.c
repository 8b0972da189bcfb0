/* real_stdio.c — real_fclose(), real_fdopen() and real_close() for the programs that use shim/rules.c
 * and shim/exited.c without the library (the CLI, the rules fuzz target): there, they are
 * libc's own. In the library, real.c binds them past the hooks. */
#include "../shim/real.h"
#include <unistd.h>

int real_fclose(FILE *f) { return fclose(f); }
FILE *real_fdopen(int fd, const char *mode) { return fdopen(fd, mode); }
int real_close(int fd) { return close(fd); }
