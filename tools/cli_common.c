/* cli_common.c — owns what every httpshim command needs: the rules file's path and its
 * stats_socket pattern, finding the live processes' sockets (checked with SO_PEERCRED by
 * the library), asking one over HTTP (libcurl, CURLOPT_UNIX_SOCKET_PATH, answers capped
 * at RESPONSE_MAX), and summing their JSON documents (jansson). */
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
#include <sys/resource.h>
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

const char *conf_path(const char *opt)
{
    if (opt)
        return opt;
    const char *env = getenv("HTTPSHIM_CONF");
    return env && *env ? env : DEFAULT_CONF;
}

/* ---- finding the processes ---- */


/* Whose processes are looked at: the caller's own, or --user's (root may read any uid's
 * sockets; the library lets root in). */
unsigned view_uid;

/* Lists the live processes' sockets for the config's stats_socket pattern; sockets of
 * dead processes are removed. */
int find_processes(const char *pattern, struct proc *procs, int max)
{
    struct rules_socket_names names;
    if (rules_socket_names(pattern, view_uid, &names) != 0)
        return 0;
    /* only a directory no other user controls (as the library requires before it puts a
     * socket there), and only sockets of the user looked at: another user's socket under
     * a process's name would answer for it */
    struct stat dst;
    if (lstat(names.dir, &dst) != 0 || !exited_dir_trusted(&dst, view_uid))
        return 0;
    DIR *d = opendir(names.dir);
    if (!d)
        return 0;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) && n < max) {
        const char *nm = de->d_name;
        long pid = rules_socket_pid(&names, nm, "");
        if (pid <= 0)
            continue;
        char path[256];
        if ((size_t)snprintf(path, sizeof path, "%s/%s", names.dir, nm) >= sizeof path)
            continue;
        struct stat st;
        if (lstat(path, &st) != 0 || !S_ISSOCK(st.st_mode) || st.st_uid != view_uid)
            continue;                          /* not a socket of that user's: never asked, never removed */
        if (kill((pid_t)pid, 0) != 0 && errno == ESRCH) {
            unlink(path);                      /* a dead process's socket: clean it */
            continue;
        }
        procs[n].pid = (int)pid;
        snprintf(procs[n].path, sizeof procs[n].path, "%s", path);
        n++;
    }
    closedir(d);
    return n;
}

struct response { char *data; size_t len; bool overflow; };

static size_t collect(char *p, size_t size, size_t nmemb, void *ud)
{
    struct response *r = ud;
    size_t n = size * nmemb;
    if (r->len + n > RESPONSE_MAX) {
        r->overflow = true;
        return 0;
    }
    char *g = realloc(r->data, r->len + n + 1);
    if (!g)
        return 0;
    r->data = g;
    memcpy(r->data + r->len, p, n);
    r->len += n;
    r->data[r->len] = 0;
    return n;
}

static long long mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* How many sockets may be open at once: every process's, when the fd limit allows (the
 * soft limit raised towards the hard one), else as many as fit with room to spare. */
static int in_flight_max(int n)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return 16;
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (rlim_t)MAX_PROCS + 64
        && (rl.rlim_max == RLIM_INFINITY || rl.rlim_max > rl.rlim_cur)) {
        rlim_t want = (rlim_t)MAX_PROCS + 64;
        rl.rlim_cur = rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want ? rl.rlim_max : want;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    long room = rl.rlim_cur == RLIM_INFINITY ? n : (long)rl.rlim_cur - 64;
    return room < 16 ? 16 : room < n ? (int)room : n;
}

/* One transfer's handle, to procs[i]'s socket; its timeout is what is left of the deadline. */
static CURL *ask_start(CURLM *m, const struct proc *p, const char *url, const char *method, struct response *r,
                       long left_ms)
{
    CURL *c = curl_easy_init();
    if (!c)
        return NULL;
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_UNIX_SOCKET_PATH, p->path);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, left_ms > 0 ? left_ms : 1L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_FORBID_REUSE, 1L);     /* one socket each: none kept open after */
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(c, CURLOPT_PRIVATE, (void *)r);
    if (curl_multi_add_handle(m, c) != CURLM_OK) {
        curl_easy_cleanup(c);
        return NULL;
    }
    return c;
}

/* What a finished (or given up) transfer came to. A socket that refuses is a dead
 * process's only when the process is gone: a live one may just have its backlog full
 * (stopped, or many asking at once), and keeps it. */
static void ask_finish(CURLM *m, CURL *c, CURLcode rc, const struct proc *p, struct response *r, struct answer *a)
{
    long status = 0, request_size = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(c, CURLINFO_REQUEST_SIZE, &request_size);
    curl_multi_remove_handle(m, c);
    curl_easy_cleanup(c);
    if (rc == CURLE_COULDNT_CONNECT && kill((pid_t)p->pid, 0) != 0 && errno == ESRCH)
        unlink(p->path);
    if (rc == CURLE_OK && status == 200) {
        a->outcome = ASK_ANSWERED;
        a->body = r->data ? r->data : strdup("");
        a->len = r->len;
        return;
    }
    free(r->data);
    /* timed out with the request written: it waits in the socket for the process (a
     * purge is done when a stopped process runs again), so it is not "unreached" */
    a->outcome = rc == CURLE_OPERATION_TIMEDOUT && status == 0 ? (request_size > 0 ? ASK_SILENT : ASK_UNREACHED)
                 : rc == CURLE_COULDNT_CONNECT ? ASK_UNREACHED : ASK_FAILED;
}

/* Every socket asked at once (curl's multi interface: non-blocking connects, one poll),
 * under ONE deadline: asked one after another, each stopped process cost its own 3 s
 * timeout (100 stopped: 5 minutes for an operator's glance). Answers stay capped at
 * RESPONSE_MAX each; sockets in flight at the fd limit's room. */
void ask_all(const struct proc *procs, int n, const char *method, const char *target, struct answer *out)
{
    for (int i = 0; i < n; i++)
        out[i] = (struct answer){ .outcome = ASK_UNREACHED };
    if (n <= 0)
        return;
    char url[1024];
    snprintf(url, sizeof url, "http://localhost%s", target);
    struct response *rs = calloc((size_t)n, sizeof *rs);
    CURL **hs = calloc((size_t)n, sizeof *hs);
    CURLM *m = rs && hs ? curl_multi_init() : NULL;
    long long deadline = mono_ms() + ASK_DEADLINE_MS;
    int max = in_flight_max(n), next = 0, open = 0;
    while (m) {
        long long left = deadline - mono_ms();
        for (; next < n && open < max && left > 0; next++)
            if ((hs[next] = ask_start(m, &procs[next], url, method, &rs[next], (long)left)))
                open++;
        int running = 0;
        curl_multi_perform(m, &running);
        CURLMsg *msg;
        int queued;
        while ((msg = curl_multi_info_read(m, &queued))) {
            if (msg->msg != CURLMSG_DONE)
                continue;
            CURL *c = msg->easy_handle;
            CURLcode rc = msg->data.result;
            char *priv = NULL;
            curl_easy_getinfo(c, CURLINFO_PRIVATE, &priv);
            struct response *r = (struct response *)(void *)priv;
            int i = (int)(r - rs);
            ask_finish(m, c, rc, &procs[i], r, &out[i]);
            hs[i] = NULL;
            open--;
        }
        /* curl times each transfer out at the deadline; a little past it, whatever is
         * still open is given up here, so that nothing outlasts the deadline by much */
        if ((!open && (next == n || left <= 0)) || left < -500)
            break;
        curl_multi_wait(m, NULL, 0, left > 100 ? 100 : left > 0 ? (int)left : 10, NULL);
    }
    for (int i = 0; i < n && hs; i++)
        if (hs[i])
            ask_finish(m, hs[i], CURLE_OPERATION_TIMEDOUT, &procs[i], &rs[i], &out[i]);
    if (m)
        curl_multi_cleanup(m);
    free(hs);
    free(rs);
}

void say_failed(const char *cmd, int count, const char *pids)
{
    if (count)
        fprintf(stderr, "httpshim %s: %d process%s answered with an error (a socket busy with other clients, too "
                        "large an answer, or one that is not JSON), left out:%s\n", cmd, count,
                count == 1 ? "" : "es", pids);
}

int pids_with(const struct proc *procs, const struct answer *answers, int n, unsigned what, char *buf, size_t size)
{
    int count = 0;
    size_t at = 0;
    buf[0] = 0;
    for (int i = 0; i < n; i++) {
        if (!(what & (1u << answers[i].outcome)))
            continue;
        count++;
        int w = at < size ? snprintf(buf + at, size - at, " %d", procs[i].pid) : 0;
        if (w > 0 && at + (size_t)w < size)
            at += (size_t)w;
        else if (at < size) {          /* as many as fit, then "...": the count says how many */
            buf[at] = 0;
            if (at + 5 < size)
                snprintf(buf + at, size - at, " ...");
            at = size;
        }
    }
    return count;
}

/* ---- the JSON answers (jansson) ---- */

/* One answer of a stats socket: any JSON value, NULL when malformed. */
json_t *parse_answer(const char *text, size_t len)
{
    return json_loadb(text, len, JSON_DECODE_ANY, NULL);
}

/* The number under `key` of an object: 0 when absent or not a number. */
double num(const json_t *obj, const char *key)
{
    return json_number_value(json_object_get(obj, key));
}

json_t *sum_into(json_t *dst, json_t *src, bool in_buckets);

/* Integers add up as integers (as reals past the json_int_t range), anything else as reals.
 * Returns what takes dst's place: dst itself, or a new real when dst was an integer. */
static json_t *sum_numbers(json_t *dst, const json_t *src)
{
    json_int_t sum;
    if (json_is_integer(dst) && json_is_integer(src)
        && !__builtin_add_overflow(json_integer_value(dst), json_integer_value(src), &sum)) {
        json_integer_set(dst, sum);
        return dst;
    }
    double total = json_number_value(dst) + json_number_value(src);
    if (json_is_real(dst)) {
        json_real_set(dst, total);
        return dst;
    }
    json_t *r = json_real(total);
    return r ? r : dst;
}

/* Members of the same key are summed. The keys dst lacks are copied in front of its own
 * members, the last of them first: the order the CLI has always printed them in. */
static void sum_object(json_t *dst, json_t *src)
{
    size_t n = json_object_size(src), fresh = 0;
    const char **keys = n ? malloc(n * sizeof *keys) : NULL;
    for (void *it = json_object_iter(src); it; it = json_object_iter_next(src, it)) {
        const char *key = json_object_iter_key(it);
        json_t *d = json_object_get(dst, key);
        if (!d) {
            if (keys)
                keys[fresh++] = key;
            continue;
        }
        json_t *v = json_object_iter_value(it);
        if (!strcmp(key, "queue_wait_max_seconds")) {    /* a maximum */
            if (json_number_value(v) > json_number_value(d))
                json_object_set_new(dst, key, json_real(json_number_value(v)));
            continue;
        }
        if (!strcmp(key, "line") || !strcmp(key, "pid") || !strcmp(key, "started_unix") || !strcmp(key, "uptime_seconds"))
            continue;                  /* a process's own, not a count */
        json_t *r = sum_into(d, v, !strcmp(key, "buckets"));
        if (r != d)
            json_object_set_new(dst, key, r);
    }
    json_t *kept = fresh ? json_copy(dst) : NULL;      /* shallow: dst's members, in order */
    if (kept) {
        json_object_clear(dst);
        while (fresh-- > 0)
            json_object_set_new(dst, keys[fresh], json_deep_copy(json_object_get(src, keys[fresh])));
        json_object_update(dst, kept);
        json_decref(kept);
    }
    free(keys);
}

/* Elements are summed by position, as far as both arrays go. Inside a "buckets" array
 * each element is a [bound, count] pair: the bound stays, the counts add up. */
static void sum_array(json_t *dst, json_t *src, bool in_buckets)
{
    size_t n = json_array_size(dst) < json_array_size(src) ? json_array_size(dst) : json_array_size(src);
    for (size_t i = 0; i < n; i++) {
        json_t *arr = dst, *d = json_array_get(dst, i), *s = json_array_get(src, i);
        size_t slot = i;
        if (in_buckets && json_is_array(d)) {
            if (json_array_size(d) < 2 || json_array_size(s) < 2)
                continue;
            arr = d, slot = 1;
            d = json_array_get(d, 1), s = json_array_get(s, 1);
        }
        json_t *r = sum_into(d, s, false);
        if (r != d)
            json_array_set_new(arr, slot, r);
    }
}

/* Adds src into dst: numbers summed, objects merged by key, arrays by position; values of
 * other types, or of different types, stay dst's. Returns what takes dst's place. */
json_t *sum_into(json_t *dst, json_t *src, bool in_buckets)
{
    if (json_is_number(dst) && json_is_number(src))
        return sum_numbers(dst, src);
    if (json_is_object(dst) && json_is_object(src))
        sum_object(dst, src);
    else if (json_is_array(dst) && json_is_array(src))
        sum_array(dst, src, in_buckets);
    return dst;
}

/* Integral reals below 1e15 become integers, printed without decimals ("sum":0.000000 is
 * printed 0); other reals print with 9 significant digits. Returns what takes j's place. */
json_t *integral_reals(json_t *j)
{
    if (json_is_real(j)) {
        double v = json_real_value(j);
        json_t *i = v == floor(v) && fabs(v) < 1e15 ? json_integer((json_int_t)v) : NULL;
        return i ? i : j;
    }
    for (void *it = json_object_iter(j); it; it = json_object_iter_next(j, it)) {
        json_t *v = json_object_iter_value(it), *r = integral_reals(v);
        if (r != v)
            json_object_iter_set_new(j, it, r);
    }
    for (size_t i = 0; i < json_array_size(j); i++) {
        json_t *v = json_array_get(j, i), *r = integral_reals(v);
        if (r != v)
            json_array_set_new(j, i, r);
    }
    return j;
}

/* Prints j compactly on stdout (integral reals of it become integers). */
void print_json(json_t *j)
{
    json_t *p = integral_reals(j);
    json_dumpf(p, stdout, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(9));
    if (p != j)
        json_decref(p);
}

int load_pattern(const char *conf, char *pattern, size_t n)
{
    struct shim_config *cfg = calloc(1, sizeof *cfg);
    char err[RULES_ERR_MAX];
    if (!cfg)
        return -1;
    int rc = rules_load(conf, cfg, err);
    int why = errno;
    /* only the default file may be missing (then the default sockets); a file named by -c or
     * HTTPSHIM_CONF that cannot be read is not quietly swapped for the defaults */
    if (rc != 0 && (err[0] || strcmp(conf, DEFAULT_CONF) || why != ENOENT)) {
        if (err[0])
            fprintf(stderr, "httpshim: %s\n", err);
        else
            fprintf(stderr, "httpshim: %s: %s\n", conf, strerror(why));
        free(cfg);
        return -1;
    }
    snprintf(pattern, n, "%s", cfg->stats_socket);    /* defaults when the file is missing */
    rules_free(cfg);
    free(cfg);
    return 0;
}

int parse_user(const char *text, unsigned *uid)
{
    char *end;
    unsigned long n = strtoul(text, &end, 10);
    if (*text && !*end && n < 0xffffffffUL) {
        *uid = (unsigned)n;
        return 0;
    }
    const struct passwd *pw = getpwnam(text);
    if (!pw)
        return -1;
    *uid = (unsigned)pw->pw_uid;
    return 0;
}
