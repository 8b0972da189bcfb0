/* replay_main.c — runs a fuzz harness without libFuzzer: every file named on the command
 * line, and every regular file (not starting with '.') directly inside every directory
 * named, is read into an exactly sized heap buffer and passed to LLVMFuzzerTestOneInput
 * once, in name order. Built with the normal compiler (and $(SAN) in the sanitizer build),
 * so `make test` replays the committed corpora without clang. A broken invariant aborts
 * inside the harness; an unreadable input is exit 1. Last line: "replay: N inputs ran".
 * -v first: each input's path goes to stderr before it runs (which one failed). */
#include "fuzz.h"
#include <dirent.h>
#include <stdbool.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define REPLAY_MAX_INPUT (64u << 20)   /* larger files are refused, not truncated */
#define REPLAY_MAX_FILES 100000        /* per directory */

static bool verbose;

static int run_file(const char *path, unsigned long *ran)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    if (!S_ISREG(st.st_mode) || st.st_size < 0 || (unsigned long long)st.st_size > REPLAY_MAX_INPUT) {
        fprintf(stderr, "replay: %s: not a regular file of at most %u bytes\n", path, REPLAY_MAX_INPUT);
        close(fd);
        return -1;
    }
    size_t size = (size_t)st.st_size, done = 0;
    uint8_t *data = malloc(size ? size : 1);
    if (!data) {
        fprintf(stderr, "replay: %s: out of memory\n", path);
        close(fd);
        return -1;
    }
    while (done < size) {              /* each pass reads at least one byte or stops */
        ssize_t n = read(fd, data + done, size - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            fprintf(stderr, "replay: %s: short read\n", path);
            free(data);
            close(fd);
            return -1;
        }
        done += (size_t)n;
    }
    close(fd);
    if (verbose) {
        fprintf(stderr, "replay: %s\n", path);
        fflush(stderr);
    }
    /* exactly the file's bytes (an empty file: size 0, a valid one-byte allocation) */
    LLVMFuzzerTestOneInput(data, size);
    free(data);
    (*ran)++;
    return 0;
}

static int skip_hidden(const struct dirent *d) { return d->d_name[0] != '.'; }

static int run_dir(const char *dir, unsigned long *ran)
{
    struct dirent **names;
    int n = scandir(dir, &names, skip_hidden, alphasort);
    if (n < 0) {
        fprintf(stderr, "replay: %s: %s\n", dir, strerror(errno));
        return -1;
    }
    int rc = n > REPLAY_MAX_FILES ? -1 : 0;
    if (rc)
        fprintf(stderr, "replay: %s: more than %d files\n", dir, REPLAY_MAX_FILES);
    for (int i = 0; i < n; i++) {
        char path[4096];
        struct stat st;
        int len = snprintf(path, sizeof path, "%s/%s", dir, names[i]->d_name);
        if (!rc && (len < 0 || (size_t)len >= sizeof path)) {
            fprintf(stderr, "replay: %s/%s: path too long\n", dir, names[i]->d_name);
            rc = -1;
        }
        if (!rc && stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
            free(names[i]);
            continue;                  /* no recursion: a corpus is flat */
        }
        if (!rc && run_file(path, ran) != 0)
            rc = -1;
        free(names[i]);
    }
    free(names);
    return rc;
}

int main(int argc, char **argv)
{
    unsigned long ran = 0;
    int rc = 0, first = 1;
    if (argc > 1 && !strcmp(argv[1], "-v")) {
        verbose = true;
        first = 2;
    }
    if (argc <= first) {
        fprintf(stderr, "usage: %s [-v] CORPUS-DIR-OR-FILE...\n", argv[0]);
        return 2;
    }
    for (int i = first; i < argc && rc == 0; i++) {
        struct stat st;
        if (stat(argv[i], &st) == 0 && S_ISDIR(st.st_mode))
            rc = run_dir(argv[i], &ran);
        else
            rc = run_file(argv[i], &ran);
    }
#if defined(__SANITIZE_ADDRESS__)
    const char *built = " (asan)";
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
    const char *built = " (asan)";
#else
    const char *built = "";
#endif
#else
    const char *built = "";
#endif
    printf("replay: %lu inputs ran%s\n", ran, built);
    return rc ? 1 : 0;
}
