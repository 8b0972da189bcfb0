/*
 * lazylib.c - owns the shim's heavy dependencies: libcurl and hiredis are not linked
 * (no DT_NEEDED), they are dlopen'ed when the engine first needs them: hiredis (one small
 * library) when it starts, libcurl (about 30 libraries and OpenSSL's setup: 5-8 ms) only
 * once an HTTP connection is diverted, so that a process that speaks only Redis through
 * the shim (a redis-cli per call) never pays for it.
 *
 * Why: the library is preloaded into every exec of the host, most of which never
 * connect to a listed upstream. Linking libcurl pulled ~35 libraries into each of them
 * (/bin/true 2 ms -> 18 ms, +6 MB RSS) and put hiredis/libcurl symbols into the
 * process's global scope, where they could interpose on an app's own copy of a
 * different version. Loaded here with RTLD_LOCAL they cost nothing until the first
 * diverted connection and stay private to the shim.
 *
 * The rest of the shim calls the libraries by their usual names: this file defines
 * those names as hidden forwarding stubs (exports.map keeps them out of the dynamic
 * symbol table, so neither the app nor the libraries themselves ever bind to them).
 * The sonames are the ones the headers were compiled against (Makefile, -D...).
 */
#define CURL_DISABLE_TYPECHECK   /* we define curl_easy_setopt itself below */
#include <curl/curl.h>
#include <dlfcn.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>

#include "lazylib.h"
#include "log.h"

#ifndef LAZYLIB_CURL
#define LAZYLIB_CURL "libcurl.so.4"
#endif
#ifndef LAZYLIB_HIREDIS
#define LAZYLIB_HIREDIS "libhiredis.so.0.14"
#endif

enum lib { LIB_CURL, LIB_HIREDIS, LIB_COUNT };
static const char *const lib_names[LIB_COUNT] = { LAZYLIB_CURL, LAZYLIB_HIREDIS };

/* X(library, return type, name, parameter list, argument list) */
#define RETURNING(X)                                                                          \
    X(LIB_CURL, CURLcode, curl_global_init, (long flags), (flags))                           \
    X(LIB_CURL, CURL *, curl_easy_init, (void), ())                                          \
    X(LIB_CURL, CURLcode, curl_easy_pause, (CURL *h, int bitmask), (h, bitmask))             \
    X(LIB_CURL, const char *, curl_easy_strerror, (CURLcode code), (code))                   \
    X(LIB_CURL, time_t, curl_getdate, (const char *s, const time_t *unused), (s, unused))    \
    X(LIB_CURL, struct curl_slist *, curl_slist_append, (struct curl_slist *l, const char *s), \
      (l, s))                                                                                 \
    X(LIB_CURL, CURLM *, curl_multi_init, (void), ())                                        \
    X(LIB_CURL, CURLMcode, curl_multi_add_handle, (CURLM *m, CURL *h), (m, h))               \
    X(LIB_CURL, CURLMcode, curl_multi_remove_handle, (CURLM *m, CURL *h), (m, h))            \
    X(LIB_CURL, CURLMcode, curl_multi_assign, (CURLM *m, curl_socket_t s, void *p), (m, s, p)) \
    X(LIB_CURL, CURLMcode, curl_multi_socket_action,                                         \
      (CURLM *m, curl_socket_t s, int ev, int *running), (m, s, ev, running))                \
    X(LIB_CURL, CURLMsg *, curl_multi_info_read, (CURLM *m, int *left), (m, left))           \
    X(LIB_HIREDIS, redisAsyncContext *, redisAsyncConnect, (const char *ip, int port), (ip, port)) \
    X(LIB_HIREDIS, redisReader *, redisReaderCreate, (void), ())                             \
    X(LIB_HIREDIS, redisReader *, redisReaderCreateWithFunctions, (redisReplyObjectFunctions *fn), (fn)) \
    X(LIB_HIREDIS, int, redisReaderFeed, (redisReader *r, const char *buf, size_t len), (r, buf, len)) \
    X(LIB_HIREDIS, int, redisReaderGetReply, (redisReader *r, void **reply), (r, reply))     \
    X(LIB_HIREDIS, redisAsyncContext *, redisAsyncConnectUnix, (const char *path), (path))   \
    X(LIB_HIREDIS, int, redisAsyncSetConnectCallback,                                        \
      (redisAsyncContext *ac, redisConnectCallback *fn), (ac, fn))                           \
    X(LIB_HIREDIS, int, redisAsyncSetDisconnectCallback,                                     \
      (redisAsyncContext *ac, redisDisconnectCallback *fn), (ac, fn))

#define VOID_RETURNING(X)                                                                     \
    X(LIB_CURL, void, curl_easy_cleanup, (CURL *h), (h))                                     \
    X(LIB_CURL, void, curl_easy_reset, (CURL *h), (h))                                       \
    X(LIB_CURL, void, curl_slist_free_all, (struct curl_slist *l), (l))                      \
    X(LIB_HIREDIS, void, redisAsyncFree, (redisAsyncContext *ac), (ac))                      \
    X(LIB_HIREDIS, void, redisAsyncDisconnect, (redisAsyncContext *ac), (ac))                \
    X(LIB_HIREDIS, void, redisReaderFree, (redisReader *r), (r))                             \
    X(LIB_HIREDIS, void, freeReplyObject, (void *reply), (reply))                            \
    X(LIB_HIREDIS, void, redisAsyncHandleRead, (redisAsyncContext *ac), (ac))                \
    X(LIB_HIREDIS, void, redisAsyncHandleWrite, (redisAsyncContext *ac), (ac))

/* The variadic entry points are reached through these; see the stubs at the end. */
#define VARIADIC_TARGETS(X)                                                                   \
    X(LIB_CURL, CURLcode, curl_easy_setopt, (CURL *h, CURLoption o, ...), ())                \
    X(LIB_CURL, CURLcode, curl_easy_getinfo, (CURL *h, CURLINFO i, ...), ())                 \
    X(LIB_CURL, CURLMcode, curl_multi_setopt, (CURLM *m, CURLMoption o, ...), ())            \
    X(LIB_HIREDIS, int, redisvAsyncCommand,                                                   \
      (redisAsyncContext *ac, redisCallbackFn *fn, void *priv, const char *fmt, va_list ap), ())

#define DECLARE_POINTER(lib, ret, name, params, args) static ret(*p_##name) params;
RETURNING(DECLARE_POINTER)
VOID_RETURNING(DECLARE_POINTER)
VARIADIC_TARGETS(DECLARE_POINTER)

#define DEFINE_STUB(lib, ret, name, params, args) \
    ret name params { return p_##name args; }
#define DEFINE_VOID_STUB(lib, ret, name, params, args) \
    ret name params { p_##name args; }
RETURNING(DEFINE_STUB)
VOID_RETURNING(DEFINE_VOID_STUB)

struct symbol { enum lib lib; const char *name; void **slot; };
#define TABLE_ENTRY(lib, ret, name, params, args) { lib, #name, (void **)&p_##name },
static const struct symbol symbols[] = {
    RETURNING(TABLE_ENTRY) VOID_RETURNING(TABLE_ENTRY) VARIADIC_TARGETS(TABLE_ENTRY)
};

static bool loaded[LIB_COUNT];

/* hiredis calls its own exported functions through its PLT (redisReaderCreate calls
 * redisReaderCreateWithFunctions, the reader calls sdsnewlen...), and a client that carries
 * its own, newer hiredis exported from its executable (redis-cli does) would have them
 * bound to that one, another layout: RTLD_DEEPBIND keeps hiredis's references within
 * itself. Its libc calls then skip the hooks, which the engine does not need them for
 * (the Redis tier clears its fd from the table before hiredis closes it). The sanitizer
 * runtimes refuse RTLD_DEEPBIND: those builds go without. */
#if defined(__SANITIZE_ADDRESS__)
static const int deep_bind[LIB_COUNT] = { 0, 0 };
#else
static const int deep_bind[LIB_COUNT] = { 0, RTLD_DEEPBIND };
#endif

static int load(enum lib lib)
{
    if (loaded[lib])
        return 0;
    /* RTLD_LOCAL: the library's symbols stay out of the app's global scope. Its own calls
     * to connect() & co. still reach the hooks, as they must. */
    /* nor an app built with a sanitizer: its runtime ends the process at RTLD_DEEPBIND */
    bool sanitized = dlsym(RTLD_DEFAULT, "__asan_init") || dlsym(RTLD_DEFAULT, "__tsan_init")
                     || dlsym(RTLD_DEFAULT, "__msan_init");
    void *handle = dlopen(lib_names[lib], RTLD_NOW | RTLD_LOCAL | (sanitized ? 0 : deep_bind[lib]));
    if (!handle) {
        shim_log("cannot load %s: %s", lib_names[lib], dlerror());
        return -1;
    }
    for (size_t i = 0; i < sizeof symbols / sizeof symbols[0]; i++) {
        if (symbols[i].lib != lib)
            continue;
        void *sym = dlsym(handle, symbols[i].name);
        if (!sym) {
            shim_log("%s has no %s", lib_names[lib], symbols[i].name);
            return -1;
        }
        *symbols[i].slot = sym;
    }
    loaded[lib] = true;      /* the handle stays open for the life of the process */
    return 0;
}

int lazylib_load_hiredis(void)
{
    return load(LIB_HIREDIS);
}

int lazylib_load_curl(void)
{
    return load(LIB_CURL);
}

/*
 * libcurl's setopt/getinfo take one argument of a type fixed by the option number's
 * range (the CURLOPTTYPE_* bases, as libcurl itself decodes them), so it can be
 * re-passed with that type. Every function-pointer option travels as the generic
 * pointer-to-function type below; all of them share one representation on the ABIs
 * glibc supports, which libcurl relies on just the same.
 */
typedef void (*any_function)(void);

CURLcode curl_easy_setopt(CURL *h, CURLoption o, ...)
{
    va_list ap;
    va_start(ap, o);
    CURLcode rc;
    if (o < CURLOPTTYPE_OBJECTPOINT)
        rc = p_curl_easy_setopt(h, o, va_arg(ap, long));
    else if (o < CURLOPTTYPE_FUNCTIONPOINT)
        rc = p_curl_easy_setopt(h, o, va_arg(ap, void *));
    else if (o < CURLOPTTYPE_OFF_T)
        rc = p_curl_easy_setopt(h, o, va_arg(ap, any_function));
    else if (o < CURLOPTTYPE_BLOB)
        rc = p_curl_easy_setopt(h, o, va_arg(ap, curl_off_t));
    else
        rc = p_curl_easy_setopt(h, o, va_arg(ap, void *));
    va_end(ap);
    return rc;
}

CURLMcode curl_multi_setopt(CURLM *m, CURLMoption o, ...)
{
    va_list ap;
    va_start(ap, o);
    CURLMcode rc;
    if (o < CURLOPTTYPE_OBJECTPOINT)
        rc = p_curl_multi_setopt(m, o, va_arg(ap, long));
    else if (o < CURLOPTTYPE_FUNCTIONPOINT)
        rc = p_curl_multi_setopt(m, o, va_arg(ap, void *));
    else if (o < CURLOPTTYPE_OFF_T)
        rc = p_curl_multi_setopt(m, o, va_arg(ap, any_function));
    else
        rc = p_curl_multi_setopt(m, o, va_arg(ap, curl_off_t));
    va_end(ap);
    return rc;
}

CURLcode curl_easy_getinfo(CURL *h, CURLINFO i, ...)
{
    va_list ap;
    va_start(ap, i);
    CURLcode rc = p_curl_easy_getinfo(h, i, va_arg(ap, void *));   /* always a pointer */
    va_end(ap);
    return rc;
}

int redisAsyncCommand(redisAsyncContext *ac, redisCallbackFn *fn, void *priv, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = p_redisvAsyncCommand(ac, fn, priv, fmt, ap);
    va_end(ap);
    return rc;
}

int redisvAsyncCommand(redisAsyncContext *ac, redisCallbackFn *fn, void *priv, const char *fmt, va_list ap)
{
    return p_redisvAsyncCommand(ac, fn, priv, fmt, ap);
}
