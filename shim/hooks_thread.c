/* hooks_thread.c — owns the interposed pthread_exit: a process whose main thread leaves
 * by pthread_exit ends when its last thread does, and the engine's thread is told, so
 * that it is never that last thread (engine_main_thread_left). */
#include "engine_thread.h"
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#define SHIM_EXPORT __attribute__((visibility("default")))

SHIM_EXPORT void pthread_exit(void *retval)
{
    void (*real)(void *) = (void (*)(void *))dlsym(RTLD_NEXT, "pthread_exit");
    if (gettid() == getpid())
        engine_main_thread_left();
    if (!real)
        abort();                       /* (no libc without it) */
    real(retval);
    abort();                           /* (it does not return) */
}
