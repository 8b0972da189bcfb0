/* exited.c — owns the records that processes leave beside their stats sockets: the final
 * counters of one that exits, one small JSON file (the socket's name + ".exited"), so that
 * `httpshim stats` still counts a process that ran and left before anyone asked (a curl
 * in a shell loop); and why a process runs inert (its rules could not be read: ".inert"
 * beside the default socket path, the only one it can know), so that the operator sees it.
 * Bounded by number and age: each writer and each reader prunes what is beyond
 * EXITED_KEEP or older than EXITED_MAX_AGE_S. Shared by the library (writes) and the CLI
 * (lists, reads, prunes). Its writes go through stdio, never through the
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

/* Sorts newest first and unlinks the records beyond EXITED_KEEP; how many are left. */
static int keep_newest(struct exited_record *found, int count)
{
    qsort(found, (size_t)count, sizeof found[0], by_age);
    for (int i = EXITED_KEEP; i < count; i++)
        unlink(found[i].path);
    return count < EXITED_KEEP ? count : EXITED_KEEP;
}

int exited_list(const char *pattern, unsigned uid, const char *suffix, struct exited_record *out, int max)
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
        int pid = rules_socket_pid(&n, de->d_name, suffix);
        struct stat st;
        char path[sizeof found[0].path];
        if (!pid || (size_t)snprintf(path, sizeof path, "%s/%s", n.dir, de->d_name) >= sizeof path
            || lstat(path, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != uid)
            continue;
        if (now - st.st_mtime > EXITED_MAX_AGE_S) {
            unlink(path);              /* too old */
            continue;
        }
        if (count == EXITED_SCAN_MAX)  /* full: the newest EXITED_KEEP stay, whatever readdir's order */
            count = keep_newest(found, count);
        found[count].pid = pid;
        found[count].mtime = st.st_mtime;
        memcpy(found[count].path, path, sizeof path);
        count++;
    }
    closedir(d);
    count = keep_newest(found, count);
    int kept = 0;
    for (int i = 0; i < count; i++)
        if (out && kept < max)
            out[kept++] = found[i];
    free(found);
    return kept;
}

int exited_write(const char *socket_path, const char *suffix, const char *json, size_t len)
{
    char path[EXITED_PATH_MAX], tmp[EXITED_PATH_MAX + 8];
    if ((size_t)snprintf(path, sizeof path, "%s%s", socket_path, suffix) >= sizeof path
        || (size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
        return -1;
    unlink(tmp);                       /* a dead writer's leftover */
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return -1;
    FILE *f = real_fdopen(fd, "w");
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

bool exited_dir_trusted(const struct stat *st, unsigned uid)
{
    if (!S_ISDIR(st->st_mode))
        return false;
    if ((st->st_uid == uid || st->st_uid == 0) && !(st->st_mode & 022))
        return true;
    return st->st_uid == 0 && (st->st_mode & S_ISVTX);
}

int exited_prepare_dir(const char *socket_path)
{
    char dir[EXITED_PATH_MAX];
    if ((size_t)snprintf(dir, sizeof dir, "%s", socket_path) >= sizeof dir) {
        errno = ENAMETOOLONG;
        return -1;
    }
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir)
        return 0;
    *slash = 0;
    if (mkdir(dir, 0700) == 0)
        return 0;
    /* an existing one is used as it is, never chmod'ed (the app or the system may depend
     * on it), only when no one else can replace our files in it: ours or root's, and not
     * writable by others — or root's with the sticky bit (/tmp itself). A sticky directory
     * of another user is that user's: its owner may remove anything in it (and put a
     * socket of its own under our name for the CLI to believe) */
    struct stat st;
    if (errno != EEXIST || lstat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return -1;
    if (exited_dir_trusted(&st, (unsigned)getuid()) || exited_dir_trusted(&st, (unsigned)geteuid()))
        return 0;
    errno = EPERM;
    return -1;
}

void exited_json_escape(const char *in, size_t in_len, char *out, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < in_len && k + 7 < n; i++) {
        unsigned char ch = (unsigned char)in[i];
        if (ch == '"' || ch == '\\') {
            out[k++] = '\\';
            out[k++] = (char)ch;
        } else if (ch < 0x20 || ch >= 0x7f) {
            k += (size_t)snprintf(out + k, n - k, "\\u%04x", ch);
        } else {
            out[k++] = (char)ch;
        }
    }
    out[k] = 0;
}

size_t exited_read_self(const char *file, char *out, size_t n)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/self/%s", file);
    FILE *f = fopen(path, "re");
    size_t got = f ? fread(out, 1, n - 1, f) : 0;
    if (f)
        real_fclose(f);
    while (got && (out[got - 1] == '\n' || out[got - 1] == 0))
        got--;
    for (size_t i = 0; i < got; i++)
        if (out[i] == 0)
            out[i] = ' ';
    out[got] = 0;
    return got;
}

unsigned long long exited_start_ticks(int pid)
{
    char path[64], stat[1024];
    snprintf(path, sizeof path, pid ? "/proc/%d/stat" : "/proc/self/stat", pid);
    FILE *f = fopen(path, "re");
    size_t n = f ? fread(stat, 1, sizeof stat - 1, f) : 0;
    if (f)
        real_fclose(f);
    stat[n] = 0;
    const char *after = strrchr(stat, ')');   /* (a command name may hold spaces and parentheses) */
    unsigned long long ticks = 0;
    /* after the name: the state (field 3) ... the start time (field 22) */
    if (!after || sscanf(after + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d %*d %*d %llu",
                         &ticks) != 1)
        return 0;
    return ticks;
}

int exited_write_inert(const char *reason)
{
    char socket_path[EXITED_PATH_MAX];
    if (rules_expand_socket_path(EXITED_DEFAULT_PATTERN, (int)getpid(), (unsigned)getuid(), socket_path,
                                 sizeof socket_path) != 0
        || exited_prepare_dir(socket_path) != 0)
        return -1;
    exited_list(EXITED_DEFAULT_PATTERN, (unsigned)getuid(), INERT_SUFFIX, NULL, 0);   /* bounded */
    char raw[256], comm[256 * 6 + 8], cmdline[256 * 6 + 8], why[512 * 6 + 8], json[sizeof comm * 2 + sizeof why + 128];
    size_t got = exited_read_self("comm", raw, sizeof raw);
    exited_json_escape(raw, got, comm, sizeof comm);
    got = exited_read_self("cmdline", raw, sizeof raw);
    exited_json_escape(raw, got, cmdline, sizeof cmdline);
    exited_json_escape(reason, strnlen(reason, 512), why, sizeof why);
    int n = snprintf(json, sizeof json,
                     "{\"pid\":%d,\"comm\":\"%s\",\"cmdline\":\"%s\",\"started_unix\":%lld,\"start_ticks\":%llu,"
                     "\"inert\":\"%s\",\"upstreams\":{}}\n", (int)getpid(), comm, cmdline, (long long)time(NULL),
                     exited_start_ticks(0), why);
    if (n < 0 || (size_t)n >= sizeof json)
        return -1;
    return exited_write(socket_path, INERT_SUFFIX, json, (size_t)n);
}
