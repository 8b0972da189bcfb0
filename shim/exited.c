/* exited.c — owns the records that processes leave when they exit: their final counters,
 * one small JSON file beside their stats socket (the socket's name + ".exited"), so that
 * `httpshim stats` still counts a process that ran and left before anyone asked (a curl
 * in a shell loop). Bounded by number and age: each writer and each reader prunes what is
 * beyond EXITED_KEEP or older than EXITED_MAX_AGE_S. Shared by the library (writes at
 * exit) and the CLI (lists, reads, prunes). Its writes go through stdio, never through the
 * library's own write/close hooks. */
#include "exited.h"
#include "real.h"
#include "rules.h"
#include <dirent.h>
#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int by_age(const void *a, const void *b)
{
    const struct exited_record *x = a, *y = b;
    return x->mtime < y->mtime ? 1 : x->mtime > y->mtime ? -1 : 0;   /* newest first */
}

int exited_list(const char *pattern, unsigned uid, struct exited_record *out, int max)
{
    struct rules_socket_names n;
    if (rules_socket_names(pattern, uid, &n) != 0)
        return 0;
    DIR *d = opendir(n.dir);
    if (!d)
        return 0;
    struct exited_record *found = calloc(EXITED_SCAN_MAX, sizeof *found);
    if (!found) {
        closedir(d);
        return 0;
    }
    int count = 0;
    time_t now = time(NULL);
    struct dirent *de;
    for (int scanned = 0; (de = readdir(d)) && scanned < 100000; scanned++) {
        int pid = rules_socket_pid(&n, de->d_name, ".exited");
        struct stat st;
        char path[sizeof found[0].path];
        if (!pid || (size_t)snprintf(path, sizeof path, "%s/%s", n.dir, de->d_name) >= sizeof path
            || lstat(path, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != uid)
            continue;
        if (now - st.st_mtime > EXITED_MAX_AGE_S || count == EXITED_SCAN_MAX) {
            unlink(path);              /* too old, or beyond what anyone keeps */
            continue;
        }
        found[count].pid = pid;
        found[count].mtime = st.st_mtime;
        memcpy(found[count].path, path, sizeof path);
        count++;
    }
    closedir(d);
    qsort(found, (size_t)count, sizeof found[0], by_age);
    int kept = 0;
    for (int i = 0; i < count; i++) {
        if (i >= EXITED_KEEP) {
            unlink(found[i].path);
            continue;
        }
        if (out && kept < max)
            out[kept++] = found[i];
    }
    free(found);
    return kept;
}

int exited_write(const char *socket_path, const char *json, size_t len)
{
    char path[EXITED_PATH_MAX], tmp[EXITED_PATH_MAX + 8];
    if ((size_t)snprintf(path, sizeof path, "%s.exited", socket_path) >= sizeof path
        || (size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
        return -1;
    unlink(tmp);                       /* a dead writer's leftover */
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return -1;
    FILE *f = fdopen(fd, "w");
    if (!f) {
        syscall(SYS_close, fd);
        unlink(tmp);
        return -1;
    }
    bool ok = fwrite(json, 1, len, f) == len;
    if (real_fclose(f) != 0 || !ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}
