/* cli_run.c — owns `httpshim run -- CMD`: finding the installed library and executing
 * CMD with it preloaded (a container entrypoint), CMD's exit status passed through. */
#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <pwd.h>
#include <limits.h>
#include <math.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "../shim/rules.h"
#include "../shim/exited.h"
#include "../shim/redis_value.h"
#include <fnmatch.h>
#include <hiredis/hiredis.h>
#include <jansson.h>

#include "cli.h"

/* ---- run ---- */

static int find_library(char *out, size_t n)
{
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len > 0) {
        exe[len] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = 0;
            static const char *const rel[] = { "/libhttpshim.so", "/../lib/httpshim/libhttpshim.so" };
            for (size_t i = 0; i < 2; i++) {
                char cand[PATH_MAX + 64];
                snprintf(cand, sizeof cand, "%s%s", exe, rel[i]);
                char real[PATH_MAX];
                if (realpath(cand, real) && access(real, R_OK) == 0) {
                    snprintf(out, n, "%s", real);
                    return 0;
                }
            }
        }
    }
    snprintf(out, n, "%s/libhttpshim.so", HTTPSHIM_LIBDIR);
    return access(out, R_OK);
}

/* Whether the LD_PRELOAD list (space- or colon-separated) names lib itself: not a name
 * that merely contains it (libhttpshim.so.bak). */
static bool preload_lists(const char *list, const char *lib)
{
    size_t n = strlen(lib);
    for (const char *p = list; (p = strstr(p, lib)); p += n)
        if ((p == list || p[-1] == ' ' || p[-1] == ':') && (p[n] == 0 || p[n] == ' ' || p[n] == ':'))
            return true;
    return false;
}

int cmd_run(int argc, char **argv)
{
    const char *conf = NULL;
    int i = 1;
    for (; i < argc; i++) {
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        }
        if (!strcmp(argv[i], "-c") || !strcmp(argv[i], "--config")) {
            if (i + 1 >= argc || !strcmp(argv[i + 1], "--")) {
                fprintf(stderr, "httpshim run: %s needs a FILE (usage: httpshim run [-c FILE] -- CMD [ARGS...])\n",
                        argv[i]);
                return 2;
            }
            conf = argv[++i];
        }
        else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            printf("usage: httpshim run [-c FILE] -- CMD [ARGS...]\n"
                   "Runs CMD with the httpshim library preloaded (LD_PRELOAD, by absolute path) and\n"
                   "HTTPSHIM_CONF set to FILE (made absolute; default: keep $HTTPSHIM_CONF, else %s).\n"
                   "CMD is looked up on PATH; its exit status is httpshim's. 127: CMD not found,\n"
                   "126: CMD not executable, 1: the library was not found.\n", DEFAULT_CONF);
            return 0;
        } else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "httpshim run: unknown option %s (usage: httpshim run [-c FILE] -- CMD [ARGS...])\n",
                    argv[i]);
            return 2;
        } else
            break;
    }
    if (i >= argc) {
        fprintf(stderr, "httpshim run: no command given (usage: httpshim run [-c FILE] -- CMD [ARGS...])\n");
        return 2;
    }
    char lib[PATH_MAX + 64];
    if (find_library(lib, sizeof lib) != 0) {
        fprintf(stderr, "httpshim run: cannot find libhttpshim.so (looked next to this program and in %s)\n",
                HTTPSHIM_LIBDIR);
        return 1;
    }
    const char *old = getenv("LD_PRELOAD");
    char *preload = NULL;
    if (old && *old && preload_lists(old, lib))
        preload = strdup(old);
    else if (old && *old && asprintf(&preload, "%s %s", lib, old) < 0)
        preload = NULL;
    else if (!old || !*old)
        preload = strdup(lib);
    if (!preload || setenv("LD_PRELOAD", preload, 1) != 0)
        return 1;
    free(preload);
    if (conf) {
        /* absolute, but not resolved: a link (a Kubernetes ConfigMap's rules.conf points
         * into a directory swapped on each update) is read again through the link by every
         * process the command starts later, not pinned to what it pointed at today */
        char abs[PATH_MAX], cwd[PATH_MAX];
        struct stat st;
        if (stat(conf, &st) != 0) {
            fprintf(stderr, "httpshim run: %s: %s\n", conf, strerror(errno));
            return 1;
        }
        if (conf[0] != '/' && (!getcwd(cwd, sizeof cwd)
                               || snprintf(abs, sizeof abs, "%s/%s", cwd, conf) >= (int)sizeof abs)) {
            fprintf(stderr, "httpshim run: %s: path too long\n", conf);
            return 1;
        }
        setenv("HTTPSHIM_CONF", conf[0] == '/' ? conf : abs, 1);
    }
    execvp(argv[i], argv + i);
    int err = errno;
    fprintf(stderr, "httpshim run: %s: %s\n", argv[i], strerror(err));
    return err == ENOENT ? 127 : 126;
}
