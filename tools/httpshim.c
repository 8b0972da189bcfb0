/* httpshim — the command line: `run` injects the library into a command (a container
 * entrypoint), `stats` reads and sums every live process's stats socket, `check`
 * validates a rules file, `purge` drops cache entries everywhere (one file each:
 * cli_*.c). Exit codes: 0 ok, 1 failure, 2 usage. */
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

static void usage(FILE *f)
{
    fprintf(f, "usage: httpshim COMMAND [ARGS]\n\n"
               "  run [-c FILE] -- CMD [ARGS]   run CMD with the shim preloaded (container entrypoint)\n"
               "  stats [-c FILE] [--json|--prometheus|--rules] [--live] [--watch S] [--user NAME|UID]\n"
               "                                summed counters of every process\n"
               "  check [--connect] [FILE]      validate a rules file and show how it is understood\n"
               "  check --defaults              every [global] key with its default\n"
               "  purge [-c FILE] [--upstream H:P] [GLOB]   drop cache entries in every live process\n\n"
               "COMMAND --help tells more. Exit codes: 0 ok, 1 failure, 2 usage error;\n"
               "run passes CMD's exit status through.\n");
}

int main(int argc, char **argv)
{
    view_uid = (unsigned)getuid();
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "run"))
        return cmd_run(argc - 1, argv + 1);
    if (!strcmp(cmd, "check"))
        return cmd_check(argc - 1, argv + 1);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    int rc = 2;
    if (!strcmp(cmd, "stats"))
        rc = cmd_stats(argc - 1, argv + 1);
    else if (!strcmp(cmd, "purge"))
        rc = cmd_purge(argc - 1, argv + 1);
    else {
        fprintf(stderr, "httpshim: unknown command '%s'\n", cmd);
        usage(stderr);
    }
    curl_global_cleanup();
    return rc;
}
