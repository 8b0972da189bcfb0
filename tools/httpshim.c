/* httpshim — the command line: `run` injects the library into a command (a container
 * entrypoint), `stats` reads and sums every live process's stats socket, `check`
 * validates a rules file, `purge` drops cache entries everywhere. Talks to the sockets
 * with libcurl (CURLOPT_UNIX_SOCKET_PATH), reads their JSON with jansson. Exit codes: 0 ok,
 * 1 failure, 2 usage. */
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

#ifndef HTTPSHIM_LIBDIR
#define HTTPSHIM_LIBDIR "/usr/local/lib/httpshim"
#endif
#define DEFAULT_CONF "/etc/httpshim/rules.conf"
#define MAX_PROCS 4096
#define RESPONSE_MAX (4 * 1024 * 1024)

static const char *conf_path(const char *opt)
{
    if (opt)
        return opt;
    const char *env = getenv("HTTPSHIM_CONF");
    return env && *env ? env : DEFAULT_CONF;
}

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

static int cmd_run(int argc, char **argv)
{
    const char *conf = NULL;
    int i = 1;
    for (; i < argc; i++) {
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        }
        if ((!strcmp(argv[i], "-c") || !strcmp(argv[i], "--config")) && i + 1 < argc)
            conf = argv[++i];
        else if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            printf("usage: httpshim run [-c FILE] -- CMD [ARGS...]\n"
                   "Runs CMD with the httpshim library preloaded (LD_PRELOAD, by absolute path) and\n"
                   "HTTPSHIM_CONF set to FILE (made absolute; default: keep $HTTPSHIM_CONF, else %s).\n"
                   "CMD is looked up on PATH; its exit status is httpshim's. 127: CMD not found,\n"
                   "126: CMD not executable, 1: the library was not found.\n", DEFAULT_CONF);
            return 0;
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
    if (old && *old && strstr(old, lib))
        preload = strdup(old);
    else if (old && *old && asprintf(&preload, "%s %s", lib, old) < 0)
        preload = NULL;
    else if (!old || !*old)
        preload = strdup(lib);
    if (!preload || setenv("LD_PRELOAD", preload, 1) != 0)
        return 1;
    free(preload);
    if (conf) {
        char abs[PATH_MAX];
        if (!realpath(conf, abs)) {
            fprintf(stderr, "httpshim run: %s: %s\n", conf, strerror(errno));
            return 1;
        }
        setenv("HTTPSHIM_CONF", abs, 1);
    }
    execvp(argv[i], argv + i);
    int err = errno;
    fprintf(stderr, "httpshim run: %s: %s\n", argv[i], strerror(err));
    return err == ENOENT ? 127 : 126;
}

/* ---- finding the processes ---- */

struct proc { int pid; char path[256]; };

/* Whose processes are looked at: the caller's own, or --user's (root may read any uid's
 * sockets; the library lets root in). */
static unsigned view_uid;

/* Lists the live processes' sockets for the config's stats_socket pattern; sockets of
 * dead processes are removed. */
static int find_processes(const char *pattern, struct proc *procs, int max)
{
    struct rules_socket_names names;
    if (rules_socket_names(pattern, view_uid, &names) != 0)
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

/* One request to one process's socket; NULL when it does not answer (it may have
 * just exited; a socket that refuses connections is a dead process's and is removed). */
static char *ask(const struct proc *p, const char *method, const char *target, size_t *len)
{
    CURL *c = curl_easy_init();
    if (!c)
        return NULL;
    char url[1024];
    snprintf(url, sizeof url, "http://localhost%s", target);
    struct response r = { 0 };
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_UNIX_SOCKET_PATH, p->path);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 3000L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &r);
    CURLcode rc = curl_easy_perform(c);
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(c);
    if (rc == CURLE_COULDNT_CONNECT)
        unlink(p->path);
    if (rc != CURLE_OK || status != 200) {
        free(r.data);
        return NULL;
    }
    *len = r.len;
    return r.data ? r.data : strdup("");
}

/* ---- the JSON answers (jansson) ---- */

/* One answer of a stats socket: any JSON value, NULL when malformed. */
static json_t *parse_answer(const char *text, size_t len)
{
    return json_loadb(text, len, JSON_DECODE_ANY, NULL);
}

/* The number under `key` of an object: 0 when absent or not a number. */
static double num(const json_t *obj, const char *key)
{
    return json_number_value(json_object_get(obj, key));
}

static json_t *sum_into(json_t *dst, json_t *src, bool in_buckets);

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
static json_t *sum_into(json_t *dst, json_t *src, bool in_buckets)
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
static json_t *integral_reals(json_t *j)
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
static void print_json(json_t *j)
{
    json_t *p = integral_reals(j);
    json_dumpf(p, stdout, JSON_COMPACT | JSON_ENCODE_ANY | JSON_REAL_PRECISION(9));
    if (p != j)
        json_decref(p);
}

/* ---- stats ---- */

/* The q-quantile of two histograms together (hits and misses), in seconds, interpolated
 * linearly within the bucket that holds it: -1 when empty, INFINITY beyond the last bound. */
static double quantile(const json_t *a, const json_t *b, double q)
{
    const json_t *ba = json_object_get(a, "buckets"), *bb = json_object_get(b, "buckets");
    double count = num(a, "count") + (a == b ? 0 : num(b, "count"));
    if (!ba || !bb || count <= 0)
        return -1;
    double below = 0, lower_bound = 0, target = q * count;
    for (size_t i = 0; i < json_array_size(ba) && i < json_array_size(bb); i++) {
        const json_t *pa = json_array_get(ba, i), *pb = json_array_get(bb, i);
        if (json_array_size(pa) < 2 || json_array_size(pb) < 2)
            return -1;
        double bound = json_number_value(json_array_get(pa, 0));
        double cum = json_number_value(json_array_get(pa, 1)) + (a == b ? 0 : json_number_value(json_array_get(pb, 1)));
        if (cum >= target && cum > below)
            return lower_bound + (bound - lower_bound) * (target - below) / (cum - below);
        below = cum;
        lower_bound = bound;
    }
    return INFINITY;
}

/* Every duration in milliseconds, with the digits that matter. */
static void fmt_ms(char *out, size_t n, double seconds)
{
    double ms = seconds * 1e3;
    if (seconds < 0)
        snprintf(out, n, "-");
    else if (seconds == INFINITY)
        snprintf(out, n, ">10000ms");
    else
        snprintf(out, n, ms >= 100 ? "%.0fms" : ms >= 10 ? "%.1fms" : ms >= 1 ? "%.2fms" : "%.3fms", ms);
}

static void fmt_pct(char *out, size_t n, double part, double whole)
{
    snprintf(out, n, whole > 0 ? "%.1f" : "-", whole > 0 ? 100 * part / whole : 0);
}

static void fmt_age(char *out, size_t n, double s)
{
    if (s < 120)
        snprintf(out, n, "%.0fs", s);
    else if (s < 7200)
        snprintf(out, n, "%.0fm", s / 60);
    else if (s < 172800)
        snprintf(out, n, "%.1fh", s / 3600);
    else
        snprintf(out, n, "%.1fd", s / 86400);
}

/* What one look at the sockets found: each process's document (live ones answered now,
 * exited ones left a record), their sum, and when. */
struct snapshot {
    json_t **docs;
    double *exited_age;                /* per doc: seconds since it exited, -1 when live */
    int n, live, exited;
    json_t *inert;                     /* records of processes that run without the shim, and why */
    json_t *total;
    double at;                         /* CLOCK_MONOTONIC seconds */
};

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* A record an exited process left: its JSON, NULL when unreadable. */
static json_t *read_record(const char *path)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return NULL;
    char *text = malloc(RESPONSE_MAX);
    size_t len = text ? fread(text, 1, RESPONSE_MAX, f) : 0;
    fclose(f);
    json_t *j = text && len < RESPONSE_MAX ? parse_answer(text, len) : NULL;
    free(text);
    return j;
}

static void add_doc(struct snapshot *s, json_t *j, double exited_age)
{
    if (exited_age >= 0) {             /* an exited process holds nothing now: its gauges are 0 */
        static const char *const gauges[] = { "pool_idle", "pool_busy", "pool_waiting", "memory_entries",
                                               "memory_bytes" };
        json_t *ups = json_object_get(j, "upstreams");
        for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it))
            for (size_t g = 0; g < sizeof gauges / sizeof gauges[0]; g++)
                if (json_object_get(json_object_iter_value(it), gauges[g]))
                    json_object_set_new(json_object_iter_value(it), gauges[g], json_integer(0));
        if (json_object_get(json_object_get(j, "redis"), "connected"))
            json_object_set_new(json_object_get(j, "redis"), "connected", json_integer(0));
    }
    s->docs[s->n] = j;
    s->exited_age[s->n++] = exited_age;
    if (exited_age < 0)
        s->live++;
    else
        s->exited++;
    if (!s->total) {
        s->total = json_deep_copy(j);
    } else {
        json_t *r = sum_into(s->total, j, false);
        if (r != s->total) {
            json_decref(s->total);
            s->total = r;
        }
    }
}

/* The inert records beside pattern's sockets, each with "live": whether its process is. */
static void add_inert(struct snapshot *s, const char *pattern, bool live_only)
{
    static struct exited_record records[EXITED_KEEP];
    int m = exited_list(pattern, view_uid, INERT_SUFFIX, records, EXITED_KEEP);
    for (int i = 0; i < m && s->inert; i++) {
        bool live = kill(records[i].pid, 0) == 0 || errno == EPERM;
        json_t *j = !live_only || live ? read_record(records[i].path) : NULL;
        if (!j)
            continue;
        json_object_set_new(j, "live", json_boolean(live));
        json_array_append_new(s->inert, j);
    }
}

static void snapshot_take(struct snapshot *s, const char *pattern, bool live_only)
{
    static struct proc procs[MAX_PROCS];
    static struct exited_record records[EXITED_KEEP];
    memset(s, 0, sizeof *s);
    int n = find_processes(pattern, procs, MAX_PROCS);
    int m = live_only ? 0 : exited_list(pattern, view_uid, EXITED_SUFFIX, records, EXITED_KEEP);
    if (live_only)
        exited_list(pattern, view_uid, EXITED_SUFFIX, NULL, 0);   /* still pruned */
    s->inert = json_array();
    add_inert(s, pattern, live_only);
    if (strcmp(pattern, EXITED_DEFAULT_PATTERN))   /* where a process that read no rules leaves it */
        add_inert(s, EXITED_DEFAULT_PATTERN, live_only);
    s->docs = calloc((size_t)(n + m) + 1, sizeof *s->docs);
    s->exited_age = calloc((size_t)(n + m) + 1, sizeof *s->exited_age);
    s->at = mono_s();
    if (!s->docs || !s->exited_age)
        return;
    for (int i = 0; i < n; i++) {
        size_t len;
        char *text = ask(&procs[i], "GET", "/stats", &len);
        json_t *j = text ? parse_answer(text, len) : NULL;
        free(text);
        if (j)
            add_doc(s, j, -1);
    }
    time_t now = time(NULL);
    for (int i = 0; i < m; i++) {
        bool still_live = false;                 /* a pid reused, or its socket not gone yet */
        for (int k = 0; k < n && !still_live; k++)
            still_live = procs[k].pid == records[i].pid;
        json_t *j = still_live ? NULL : read_record(records[i].path);
        if (j)
            add_doc(s, j, difftime(now, records[i].mtime));
    }
}

static void snapshot_free(struct snapshot *s)
{
    for (int i = 0; i < s->n; i++)
        json_decref(s->docs[i]);
    free(s->docs);
    free(s->exited_age);
    json_decref(s->total);
    json_decref(s->inert);
    memset(s, 0, sizeof *s);
}

/* The longest pool-queue wait of upstream label across the processes (a maximum, not a sum). */
static double longest_wait(const struct snapshot *s, const char *label)
{
    double m = 0;
    for (int i = 0; i < s->n; i++) {
        double v = num(json_object_get(json_object_get(s->docs[i], "upstreams"), label), "queue_wait_max_seconds");
        m = v > m ? v : m;
    }
    return m;
}

/* The counter `key` of upstream `label` per second between two snapshots. */
static double rate(const struct snapshot *now, const struct snapshot *before, const char *label, const char *key)
{
    double dt = now->at - before->at;
    const json_t *a = json_object_get(json_object_get(now->total, "upstreams"), label);
    const json_t *b = json_object_get(json_object_get(before->total, "upstreams"), label);
    double d = num(a, key) - num(b, key);
    return dt > 0 && d > 0 ? d / dt : 0;
}

static void print_inert(const struct snapshot *s);

static void print_table(const struct snapshot *s, const struct snapshot *before)
{
    json_t *total = s->total, *ups = json_object_get(total, "upstreams");
    printf("httpshim: %d live process%s, %d exited in the last %d min, %zu inert%s\n", s->live,
           s->live == 1 ? "" : "es", s->exited, EXITED_MAX_AGE_S / 60, json_array_size(s->inert),
           before ? "" : "  (--live: live ones only)");
    if (!total) {
        print_inert(s);
        return;
    }
    const json_t *redis = json_object_get(total, "redis");
    if (num(redis, "configured") > 0) {
        double connected = 0, live_redis = 0;
        for (int i = 0; i < s->n; i++)
            if (s->exited_age[i] < 0) {
                const json_t *r = json_object_get(s->docs[i], "redis");
                live_redis += num(r, "configured") > 0;
                connected += num(r, "connected") > 0;
            }
        char p50[32], p99[32];
        const json_t *lat = json_object_get(redis, "latency_seconds");
        fmt_ms(p50, sizeof p50, quantile(lat, lat, 0.5));
        fmt_ms(p99, sizeof p99, quantile(lat, lat, 0.99));
        printf("REDIS  %s (%.0f of %.0f live processes)  hits %.0f  misses %.0f  errors %.0f  timeouts %.0f  "
               "p50 %s  p99 %s\n", live_redis == 0 ? "no live process" : connected == live_redis ? "connected"
               : connected == 0 ? "DISCONNECTED" : "PARTLY CONNECTED", connected, live_redis, num(redis, "hits"),
               num(redis, "misses"), num(redis, "errors"), num(redis, "timeouts"), p50, p99);
    } else {
        printf("REDIS  not configured\n");
    }
    printf("\n%-24s %9s %6s %8s %9s %6s %8s %8s %8s %8s %8s %7s %9s %9s", "UPSTREAM", "REQUESTS", "HIT%", "HITS",
           "COALESCED", "STALE", "UP.REQS", "CLIENT", "UPSTREAM", "SAVED", "TUNNELS", "ERRORS", "p50", "p99");
    if (before)
        printf(" %8s %8s %9s", "REQ/s", "HITS/s", "UP.REQ/s");
    printf("\n%-24s %9s %6s %8s %9s %6s %8s %8s %8s %8s %8s %7s %9s %9s\n", "", "", "", "", "", "", "", "CONNS",
           "CONNS", "CONNS", "", "", "", "");
    for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it)) {
        const char *label = json_object_iter_key(it);
        const json_t *u = json_object_iter_value(it), *err = json_object_get(u, "errors");
        double req = num(u, "requests"), client = num(u, "client_connections"), tunnels = num(u, "tunnels");
        /* a tunnel opens an upstream connection of its own for each client connection */
        double saved = client - num(u, "upstream_conns_opened") - tunnels;
        char hitpct[16], p50[32], p99[32];
        fmt_pct(hitpct, sizeof hitpct, num(u, "hits"), req);
        const json_t *hl = json_object_get(u, "hit_latency_seconds"), *ml = json_object_get(u, "miss_latency_seconds");
        fmt_ms(p50, sizeof p50, quantile(hl, ml, 0.5));
        fmt_ms(p99, sizeof p99, quantile(hl, ml, 0.99));
        printf("%-24s %9.0f %6s %8.0f %9.0f %6.0f %8.0f %8.0f %8.0f %8.0f %8.0f %7.0f %9s %9s", label, req, hitpct,
               num(u, "hits"), num(u, "coalesced"), num(u, "stale_while_revalidate") + num(u, "stale_if_error"),
               num(u, "upstream_requests"), client, num(u, "upstream_conns_opened"), saved > 0 ? saved : 0, tunnels,
               num(err, "upstream") + num(err, "app") + num(err, "tunnel"), p50, p99);
        if (before)
            printf(" %8.1f %8.1f %9.1f", rate(s, before, label, "requests"), rate(s, before, label, "hits"),
                   rate(s, before, label, "upstream_requests"));
        printf("\n");
    }
    /* the pool: connections now, the requests that waited in the queue for one, and the
     * app's connects that failed while it was cold */
    printf("\n%-24s %9s %9s %9s %9s %9s %10s %10s %9s %9s\n", "POOL", "IDLE", "BUSY", "WAITING", "WAITED", "TIMEOUTS",
           "WAIT p99", "LONGEST", "REFUSED", "CONN.ERR");
    for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it)) {
        const json_t *u = json_object_iter_value(it), *qw = json_object_get(u, "queue_wait_seconds");
        char p99[32], longest[32];
        fmt_ms(p99, sizeof p99, quantile(qw, qw, 0.99));
        fmt_ms(longest, sizeof longest, longest_wait(s, json_object_iter_key(it)));
        double other = num(u, "connect_timeout") + num(u, "connect_unreachable") + num(u, "connect_other");
        printf("%-24s %9.0f %9.0f %9.0f %9.0f %9.0f %10s %10s %9.0f %9.0f\n", json_object_iter_key(it),
               num(u, "pool_idle"), num(u, "pool_busy"), num(u, "pool_waiting"), num(u, "queue_waits"),
               num(u, "queue_timeouts"), p99, longest, num(u, "connect_refused"), other);
    }
    /* what was not answered as HTTP, and why; and what failed */
    printf("\n%-24s %9s %9s %9s %9s %9s %9s %9s %9s\n", "TUNNELS", "ALL", "TLS", "NOT.HTTP", "TOO.LARGE", "OTHER",
           "ERR.UP", "ERR.APP", "ERR.TUN");
    for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it)) {
        const json_t *u = json_object_iter_value(it), *err = json_object_get(u, "errors");
        printf("%-24s %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f\n", json_object_iter_key(it), num(u, "tunnels"),
               num(u, "tunnels_tls"), num(u, "tunnels_not_http"), num(u, "tunnels_too_large"), num(u, "tunnels_other"),
               num(err, "upstream"), num(err, "app"), num(err, "tunnel"));
    }
    /* TLS the app encrypts itself: terminated here, or tunnelled (with every other tunnel) and why */
    printf("\n%-24s %9s %9s %9s %9s %9s %9s %9s %9s %9s\n", "TLS", "INTERCEPT", "HS.FAIL", "TUNNELS", "NOT.CONF",
           "NO.MARK", "CL.CERT", "UNVERIF.", "UNREAD.", "UP.REFUSE");
    for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it)) {
        const json_t *u = json_object_iter_value(it);
        printf("%-24s %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f\n", json_object_iter_key(it),
               num(u, "tls_intercepted"), num(u, "tls_handshake_failures"), num(u, "tunnels"),
               num(u, "tls_tunnel_not_configured"), num(u, "tls_tunnel_no_mark"), num(u, "tls_tunnel_client_cert"),
               num(u, "tls_tunnel_unverified"), num(u, "tls_tunnel_unreadable"), num(u, "tls_upstream_verify_failed"));
    }
    printf("\n%-8s %-16s %8s %-11s %9s %9s %7s %9s %9s\n", "PID", "COMMAND", "UPTIME", "STATE", "REQUESTS", "HITS",
           "HIT%", "CLIENT", "UPSTREAM");
    for (int i = 0; i < s->n; i++) {
        double req = 0, hits = 0, cc = 0, uc = 0;
        json_t *pu = json_object_get(s->docs[i], "upstreams");
        for (void *it = json_object_iter(pu); it; it = json_object_iter_next(pu, it)) {
            const json_t *u = json_object_iter_value(it);
            req += num(u, "requests");
            hits += num(u, "hits");
            cc += num(u, "client_connections");
            uc += num(u, "upstream_conns_opened");
        }
        char hitpct[16], up[32], state[32], age[32], comm[17];
        fmt_pct(hitpct, sizeof hitpct, hits, req);
        fmt_age(up, sizeof up, num(s->docs[i], "uptime_seconds"));
        fmt_age(age, sizeof age, s->exited_age[i]);
        snprintf(state, sizeof state, s->exited_age[i] < 0 ? "live" : "exited %s", age);
        const char *c = json_string_value(json_object_get(s->docs[i], "comm"));
        snprintf(comm, sizeof comm, "%s", c && *c ? c : "?");
        printf("%-8.0f %-16s %8s %-11s %9.0f %9.0f %7s %9.0f %9.0f\n", num(s->docs[i], "pid"), comm, up, state, req,
               hits, hitpct, cc, uc);
    }
    print_inert(s);
}

/* Processes the shim did nothing in, and why (their rules could not be read). */
#define INERT_ROWS_MAX 8
static void print_inert(const struct snapshot *s)
{
    if (!json_array_size(s->inert))
        return;
    printf("\nINERT: the shim did nothing in these processes\n%-8s %-16s %-6s %s\n", "PID", "COMMAND", "STATE",
           "WHY");
    /* live ones first, then the newest gone: a screenful, so that --watch keeps the table
     * above it in view however many short-lived processes left a record */
    size_t shown = 0, n = json_array_size(s->inert);
    for (int live = 1; live >= 0; live--)
        for (size_t i = 0; i < n && shown < INERT_ROWS_MAX; i++) {
            const json_t *r = json_array_get(s->inert, i);
            if (json_is_true(json_object_get(r, "live")) != (live == 1))
                continue;
            const char *c = json_string_value(json_object_get(r, "comm"));
            const char *why = json_string_value(json_object_get(r, "inert"));
            printf("%-8.0f %-16.16s %-6s %s\n", num(r, "pid"), c && *c ? c : "?", live ? "live" : "gone",
                   why ? why : "?");
            shown++;
        }
    if (shown < n)
        printf("... and %zu more (httpshim stats --json lists them all)\n", n - shown);
}

/* Per cache rule: which one pays off, which never hits. */
static void print_rules(const struct snapshot *s)
{
    json_t *ups = json_object_get(s->total, "upstreams");
    printf("%-24s %-40s %9s %9s %7s\n", "UPSTREAM", "RULE", "REQUESTS", "HITS", "HIT%");
    for (void *it = json_object_iter(ups); it; it = json_object_iter_next(ups, it)) {
        const json_t *rules = json_object_get(json_object_iter_value(it), "rules");
        for (size_t i = 0; i < json_array_size(rules); i++) {
            const json_t *r = json_array_get(rules, i);
            const char *text = json_string_value(json_object_get(r, "rule"));
            char hitpct[16];
            fmt_pct(hitpct, sizeof hitpct, num(r, "hits"), num(r, "requests"));
            printf("%-24s %-40s %9.0f %9.0f %7s\n", json_object_iter_key(it), text ? text : "?", num(r, "requests"),
                   num(r, "hits"), hitpct);
        }
    }
}

/* Sums Prometheus samples with the same name and labels; comments kept once. */
static void print_prometheus_sum(char **texts, int n)
{
    struct sample { char *key; double value; bool comment; } *s = NULL;
    size_t ns = 0, cap = 0;
    for (int i = 0; i < n; i++) {
        if (!texts[i])
            continue;
        char *save = NULL;
        for (char *line = strtok_r(texts[i], "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
            bool comment = line[0] == '#';
            char *sp = comment ? NULL : strrchr(line, ' ');
            if (!comment && !sp)
                continue;
            if (sp)
                *sp = 0;
            size_t k = 0;
            while (k < ns && (s[k].comment != comment || strcmp(s[k].key, line)))
                k++;
            if (k == ns) {
                if (ns == cap) {
                    cap = cap ? cap * 2 : 256;
                    struct sample *g = realloc(s, cap * sizeof *s);
                    if (!g)
                        break;
                    s = g;
                }
                s[ns].key = strdup(line);
                s[ns].value = 0;
                s[ns].comment = comment;
                ns++;
            }
            if (sp)
                s[k].value += strtod(sp + 1, NULL);
        }
    }
    for (size_t k = 0; k < ns; k++) {
        if (s[k].comment)
            printf("%s\n", s[k].key);
        else if (s[k].value == (double)(long long)s[k].value)
            printf("%s %lld\n", s[k].key, (long long)s[k].value);
        else
            printf("%s %.6f\n", s[k].key, s[k].value);
        free(s[k].key);
    }
    free(s);
}

static void print_prometheus(const char *pattern)
{
    static struct proc procs[MAX_PROCS];
    int n = find_processes(pattern, procs, MAX_PROCS);
    char **texts = calloc((size_t)n + 1, sizeof *texts);
    for (int i = 0; i < n && texts; i++) {
        size_t len;
        texts[i] = ask(&procs[i], "GET", "/metrics", &len);
    }
    if (texts)
        print_prometheus_sum(texts, n);
    for (int i = 0; i < n && texts; i++)
        free(texts[i]);
    free(texts);
}

static void print_snapshot_json(const struct snapshot *s)
{
    printf("{\"total\":");
    if (s->total) {
        json_t *ups = json_object_get(s->total, "upstreams");
        printf("{\"processes\":%d,\"exited\":%d,\"inert\":%zu,\"stats_refused\":%.0f,\"upstreams\":", s->live,
               s->exited, json_array_size(s->inert), num(s->total, "stats_refused"));
        if (ups)
            print_json(ups);
        else
            printf("{}");
        json_t *redis = json_object_get(s->total, "redis");
        if (redis) {
            printf(",\"redis\":");
            print_json(redis);
        }
        printf("}");
    } else {
        printf("{\"processes\":0,\"exited\":0,\"inert\":%zu,\"upstreams\":{}}", json_array_size(s->inert));
    }
    printf(",\"processes\":[");
    for (int i = 0; i < s->n; i++) {
        printf("%s", i ? "," : "");
        print_json(s->docs[i]);
    }
    printf("],\"inert\":");
    print_json(s->inert);
    printf("}\n");
}

static int load_pattern(const char *conf, char *pattern, size_t n)
{
    struct shim_config *cfg = calloc(1, sizeof *cfg);
    char err[RULES_ERR_MAX];
    if (!cfg)
        return -1;
    int rc = rules_load(conf, cfg, err);
    if (rc != 0 && err[0]) {
        fprintf(stderr, "httpshim: %s\n", err);
        free(cfg);
        return -1;
    }
    snprintf(pattern, n, "%s", cfg->stats_socket);    /* defaults when the file is missing */
    rules_free(cfg);
    free(cfg);
    return 0;
}

static int parse_user(const char *text, unsigned *uid)
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

static volatile sig_atomic_t stop_watching;
static void on_stop(int sig) { (void)sig; stop_watching = 1; }

static int cmd_stats(int argc, char **argv)
{
    static const struct option opts[] = {
        { "json", no_argument, NULL, 'j' }, { "prometheus", no_argument, NULL, 'p' },
        { "rules", no_argument, NULL, 'r' }, { "live", no_argument, NULL, 'l' },
        { "watch", required_argument, NULL, 'w' }, { "config", required_argument, NULL, 'c' },
        { "user", required_argument, NULL, 'u' }, { "help", no_argument, NULL, 'h' }, { 0, 0, 0, 0 } };
    int format = 't', c;
    double watch = 0;
    bool live_only = false;
    const char *conf = NULL;
    optind = 1;
    while ((c = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
        if (c == 'j' || c == 'p' || c == 'r')
            format = c;
        else if (c == 'l')
            live_only = true;
        else if (c == 'w')
            watch = atof(optarg);
        else if (c == 'c')
            conf = optarg;
        else if (c == 'u') {
            if (parse_user(optarg, &view_uid) != 0) {
                fprintf(stderr, "httpshim stats: no such user: %s\n", optarg);
                return 2;
            }
        } else if (c == 'h') {
            printf("usage: httpshim stats [-c FILE] [--json|--prometheus|--rules] [--live] [--watch SECONDS]\n"
                   "                      [--user NAME|UID]\n"
                   "Reads every live process's stats socket (the stats_socket of FILE, default\n"
                   "$HTTPSHIM_CONF or %s) and the final counters that processes which exited\n"
                   "in the last %d minutes left beside theirs, sums them and prints a table: Redis,\n"
                   "per upstream (requests, hits, connections saved, tunnels, errors, latency), the\n"
                   "pool, tunnels by reason, TLS, then one row per process. --live: live processes\n"
                   "only. --rules: requests and hits per cache rule. --json: {\"total\": {...},\n"
                   "\"processes\": [{\"pid\": N, \"exited\": false, ...}]}. --prometheus: the summed\n"
                   "/metrics text of the live processes. --watch: again every SECONDS, with rates;\n"
                   "redrawn in place on a terminal. --user: another user's processes (root; e.g.\n"
                   "the workers a master runs as nobody). Processes that could not read their rules\n"
                   "are listed as INERT, with why (their records are beside the default socket path,\n"
                   "%s). Sockets of dead processes are removed.\n",
                   DEFAULT_CONF, EXITED_MAX_AGE_S / 60, EXITED_DEFAULT_PATTERN);
            return 0;
        } else
            return 2;
    }
    char pattern[256];
    if (load_pattern(conf_path(conf), pattern, sizeof pattern) != 0)
        return 1;
    bool tty = isatty(STDOUT_FILENO);
    struct snapshot before = { 0 };
    bool have_before = false;
    if (watch > 0) {
        signal(SIGINT, on_stop);
        signal(SIGTERM, on_stop);
    }
    do {
        if (format == 'p') {
            print_prometheus(pattern);
        } else {
            struct snapshot now;
            snapshot_take(&now, pattern, live_only);
            if (watch > 0 && format == 't') {
                if (tty)
                    printf("\033[H\033[J");
                else
                    printf("--- %.0f\n", (double)time(NULL));
            }
            if (format == 'j')
                print_snapshot_json(&now);
            else if (!now.total && !json_array_size(now.inert))
                printf("no httpshim processes, live or recently exited (sockets: %s)\n", pattern);
            else if (format == 'r')
                print_rules(&now);
            else
                print_table(&now, have_before ? &before : NULL);
            if (have_before)
                snapshot_free(&before);
            before = now;
            have_before = true;
        }
        fflush(stdout);
        for (double slept = 0; watch > 0 && slept < watch && !stop_watching; slept += 0.05)
            usleep(50000);
    } while (watch > 0 && !stop_watching);
    if (have_before)
        snapshot_free(&before);
    return 0;
}

/* ---- check ---- */

static int cmd_check(int argc, char **argv)
{
    if (argc > 1 && (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))) {
        printf("usage: httpshim check [FILE]\nValidates a rules file (default $HTTPSHIM_CONF or %s) and prints\n"
               "each upstream with the addresses it resolves to and each rule as understood.\n"
               "Exit 0 when valid, 1 with FILE:LINE messages when not.\n", DEFAULT_CONF);
        return 0;
    }
    const char *path = argc > 1 ? argv[1] : conf_path(NULL);
    struct shim_config *cfg = calloc(1, sizeof *cfg);
    char err[RULES_ERR_MAX];
    if (!cfg)
        return 1;
    if (rules_load(path, cfg, err) != 0) {
        if (err[0])
            fprintf(stderr, "%s\n", err);
        else
            fprintf(stderr, "%s: %s\n", path, strerror(errno));
        free(cfg);
        return 1;
    }
    printf("%s: ok\n", path);
    printf("global: pool_max_per_host=%u pool_idle_max=%u pool_queue_timeout=%lldms pool_idle_timeout=%lldms "
           "upstream_timeout=%lldms cache=%s memory_max=%lld max_object=%lld stats_socket=%s\n",
           cfg->pool_max_per_host, cfg->pool_idle_max, (long long)cfg->pool_queue_timeout_ms,
           (long long)cfg->pool_idle_timeout_ms, (long long)cfg->upstream_timeout_ms,
           cfg->cache == CACHE_OFF ? "off" : cfg->cache == CACHE_REDIS ? "redis" : "memory", (long long)cfg->memory_max, (long long)cfg->max_object,
           cfg->stats_socket);
    printf("coalescing: coalesce=%s coalesce_timeout=%lldms uncacheable_ttl=%lldms redis_lock_ttl=%lldms\n",
           cfg->coalesce ? "on" : "off", (long long)cfg->coalesce_timeout_ms, (long long)cfg->uncacheable_ttl_ms,
           (long long)cfg->redis_lock_ttl_ms);
    /* an app that speaks TLS to the upstream itself is tunnelled unless intercepted */
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const struct upstream_rule *u = &cfg->upstreams[i];
        if (u->n_cache_rules && u->tls == TLS_TUNNEL && !u->origin_https && (u->port == 443 || u->port == 8443))
            fprintf(stderr, "%s:%d: warning: cache rules on %s:%u are never used if the app speaks TLS to it "
                            "itself: those connections are tunnelled (set tls = intercept)\n",
                    path, u->cache_rules[0].line, u->host, u->port);
    }
    rules_resolve_all(cfg, getaddrinfo);
    for (size_t i = 0; i < cfg->n_upstreams; i++) {
        const struct upstream_rule *u = &cfg->upstreams[i];
        printf("upstream %s:%u (line %d) ->", u->host, u->port, u->line);
        if (!u->n_addrs)
            printf(" (does not resolve now; addresses the app resolves are learned at run time)");
        for (size_t k = 0; k < u->n_addrs; k++) {
            char ip[INET6_ADDRSTRLEN];
            inet_ntop(u->addrs[k].family, u->addrs[k].bytes, ip, sizeof ip);
            printf(" %s", ip);
        }
        printf("\n");
        if (u->origin_https)
            printf("  origin https://%s:%u%s%s\n", u->origin_host, u->origin_port, u->tls_ca_file[0] ? " tls_ca_file=" : "",
                   u->tls_ca_file);
        if (u->tls == TLS_INTERCEPT)
            printf("  tls intercept%s%s\n", u->tls_ca_file[0] ? " tls_ca_file=" : "", u->tls_ca_file);
        for (size_t k = 0; k < u->n_cache_rules; k++) {
            const struct cache_rule *r = &u->cache_rules[k];
            printf("  line %d: cache %s %s ttl=%lldms status=", r->line, r->method, r->glob, (long long)r->ttl_ms);
            for (size_t s = 0; s < r->n_status; s++)
                printf("%s%d", s ? "," : "", r->status[s]);
            if (r->n_ignore_query) {
                printf(" ignore_query=");
                for (size_t s = 0; s < r->n_ignore_query; s++)
                    printf("%s%s", s ? "," : "", r->ignore_query[s]);
            }
            if (r->n_key_headers) {
                printf(" key_headers=");
                for (size_t s = 0; s < r->n_key_headers; s++)
                    printf("%s%s", s ? "," : "", r->key_headers[s]);
            }
            printf(" respect_cache_control=%s", r->respect_cache_control ? "yes" : "no");
            if (r->no_coalesce)
                printf(" coalesce=off");
            if (r->stale_while_revalidate_ms)
                printf(" stale_while_revalidate=%lldms", (long long)r->stale_while_revalidate_ms);
            if (r->stale_if_error_ms)
                printf(" stale_if_error=%lldms", (long long)r->stale_if_error_ms);
            printf("\n");
        }
    }
    rules_free(cfg);
    free(cfg);
    return 0;
}

/* ---- purge ---- */

static void url_encode(const char *in, char *out, size_t n)
{
    size_t k = 0;
    for (; *in && k + 4 < n; in++) {
        unsigned char c = (unsigned char)*in;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || strchr("-_.~/*", c))
            out[k++] = (char)c;
        else
            k += (size_t)snprintf(out + k, n - k, "%%%02X", c);
    }
    out[k] = 0;
}

/* Whether a cache key ("GET http://host:port/path?query\n...") is for this upstream
 * (empty: any) and its path matches the glob — the same test the stats socket applies. */
static bool key_matches(const char *key, size_t len, const char *upstream, const char *glob)
{
    const char *end = key + len;
    const char *p = memmem(key, len, "://", 3);
    if (!p)
        return false;
    p += 3;
    const char *slash = memchr(p, '/', (size_t)(end - p));
    if (!slash)
        return false;
    if (*upstream && ((size_t)(slash - p) != strlen(upstream) || strncasecmp(p, upstream, (size_t)(slash - p))))
        return false;
    char path[4096];
    size_t n = 0;
    while (slash + n < end && slash[n] != '?' && slash[n] != '\n' && n < sizeof path - 1)
        n++;
    memcpy(path, slash, n);
    path[n] = 0;
    return fnmatch(glob, path, 0) == 0;
}

/* s as a SCAN MATCH pattern that matches only itself (a prefix or an IPv6 literal may
 * hold * ? [ ] \), appended at out[*n]; false when it does not fit. */
static bool match_literal(const char *s, char *out, size_t cap, size_t *n)
{
    for (; *s; s++) {
        if (strchr("*?[]\\", *s) && *n + 1 < cap)
            out[(*n)++] = '\\';
        if (*n + 1 >= cap)
            return false;
        out[(*n)++] = *s;
    }
    out[*n] = 0;
    return true;
}

struct purge_pass {
    redisContext *rc;
    const char *upstream, *glob;  /* as the user gave them; upstream "" for any */
    size_t prefix_len;
    bool by_value;                /* new-format keys: read the key each value carries */
    long long unlinked;
    bool failed;
};

/* Whether a new-format key is to go: with GLOB `*` every key the scan found (its
 * pattern named the upstream), else those whose value's head (`head`, a GETRANGE reply)
 * carries an internal key that matches. A lock (":lock") holds a token, not a value: it
 * goes only with `*`, and otherwise expires within redis_lock_ttl. */
static bool new_key_goes(const struct purge_pass *p, const redisReply *head)
{
    if (!strcmp(p->glob, "*"))
        return true;
    const char *internal;
    size_t internal_len;
    return head && head->type == REDIS_REPLY_STRING
           && redis_value_key((const unsigned char *)head->str, (size_t)head->len, &internal, &internal_len)
           && key_matches(internal, internal_len, p->upstream, p->glob);
}

/* Old-format keys, "<prefix>GET http://..." and "<prefix>lock:GET http://...", written
 * before keys were hashed: matched on their own text until they expire. */
static bool old_key_goes(const struct purge_pass *p, const redisReply *key)
{
    return (size_t)key->len >= p->prefix_len
           && key_matches(key->str + p->prefix_len, (size_t)key->len - p->prefix_len, p->upstream, p->glob);
}

/* One batch of SCAN's keys: decides (with the values' heads, pipelined, for a glob
 * purge of new-format keys) and UNLINKs those that go, in one command. */
static void purge_batch(struct purge_pass *p, const redisReply *keys)
{
    size_t n = keys->elements;
    if (!n)
        return;
    bool read_heads = p->by_value && strcmp(p->glob, "*");
    redisReply **heads = calloc(n, sizeof *heads);
    const char **argv = calloc(n + 1, sizeof *argv);
    size_t *argl = calloc(n + 1, sizeof *argl);
    if (!heads || !argv || !argl) {
        p->failed = true;
        goto out;
    }
    if (read_heads) {
        /* only the head of each value: the key it carries, never the body */
        for (size_t i = 0; i < n; i++)
            if (redisAppendCommand(p->rc, "GETRANGE %b 0 %d", keys->element[i]->str, (size_t)keys->element[i]->len,
                                   (int)REDIS_VALUE_KEY_SPAN - 1) != REDIS_OK) {
                p->failed = true;      /* the connection is not used again */
                goto out;
            }
        for (size_t i = 0; i < n; i++) {
            void *reply = NULL;
            if (redisGetReply(p->rc, &reply) != REDIS_OK) {
                p->failed = true;
                goto out;
            }
            heads[i] = reply;
        }
    }
    size_t argc = 0;
    argv[argc] = "UNLINK";
    argl[argc++] = 6;
    for (size_t i = 0; i < n; i++) {
        const redisReply *k = keys->element[i];
        if (k->type != REDIS_REPLY_STRING)
            continue;
        if (p->by_value ? new_key_goes(p, heads[i]) : old_key_goes(p, k)) {
            argv[argc] = k->str;
            argl[argc++] = (size_t)k->len;
        }
    }
    if (argc > 1) {
        redisReply *u = redisCommandArgv(p->rc, (int)argc, argv, argl);
        if (u && u->type == REDIS_REPLY_INTEGER)
            p->unlinked += u->integer;
        else
            p->failed = true;
        if (u)
            freeReplyObject(u);
    }
out:
    for (size_t i = 0; heads && i < n; i++)
        if (heads[i])
            freeReplyObject(heads[i]);
    free(heads);
    free(argv);
    free(argl);
}

/* A SCAN walk (never KEYS) over pattern, batch by batch. */
static void purge_scan(struct purge_pass *p, const char *pattern)
{
    char cursor[32] = "0";
    for (int round = 0; round < 1000000 && !p->failed; round++) {
        redisReply *r = redisCommand(p->rc, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
        if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2 || r->element[0]->type != REDIS_REPLY_STRING
            || r->element[1]->type != REDIS_REPLY_ARRAY) {
            if (r)
                freeReplyObject(r);
            p->failed = true;
            break;
        }
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        purge_batch(p, r->element[1]);
        freeReplyObject(r);
        if (!strcmp(cursor, "0"))
            break;
    }
}

/* SCAN + UNLINK over the prefix; -1 when Redis cannot be reached. Keys are
 * <prefix>v3:<host>:<port>:<route>:<hash>[:lock] (shim/cache_redis.c): with --upstream
 * the scan asks only for that upstream's; a GLOB other than `*` is matched against the
 * internal key each value carries. Keys of the old, unhashed format are matched on their
 * own text, so that they can still be purged during their TTL. */
static long long purge_redis(const struct shim_config *cfg, const char *upstream, const char *glob)
{
    /* the upstream as the rules spell it, which is how the library writes it in keys */
    char label[RULES_HOST_MAX + 16];
    snprintf(label, sizeof label, "%s", upstream);
    for (size_t i = 0; *upstream && i < cfg->n_upstreams; i++) {
        const struct upstream_rule *u = &cfg->upstreams[i];
        char l[RULES_HOST_MAX + 16];
        snprintf(l, sizeof l, strchr(u->host, ':') ? "[%s]:%u" : "%s:%u", u->host, u->port);
        if (!strcasecmp(l, upstream))
            snprintf(label, sizeof label, "%s", l);
    }
    char new_pattern[2 * (sizeof cfg->redis_prefix + sizeof label) + 16], old_pattern[2 * sizeof cfg->redis_prefix + 16];
    size_t nn = 0, on = 0;
    if (!match_literal(cfg->redis_prefix, new_pattern, sizeof new_pattern, &nn)
        || !match_literal(REDIS_KEY_FORMAT_TAG, new_pattern, sizeof new_pattern, &nn)
        || (*upstream && (!match_literal(label, new_pattern, sizeof new_pattern, &nn)
                          || !match_literal(":", new_pattern, sizeof new_pattern, &nn)))
        || nn + 2 > sizeof new_pattern || !match_literal(cfg->redis_prefix, old_pattern, sizeof old_pattern, &on)
        || on + sizeof "* http://*" > sizeof old_pattern) {
        fprintf(stderr, "httpshim purge: --upstream is too long\n");
        return -1;
    }
    memcpy(new_pattern + nn, "*", 2);
    memcpy(old_pattern + on, "* http://*", sizeof "* http://*");   /* old keys: "METHOD http://..." */

    struct timeval tv = { 2, 0 };
    redisContext *rc = cfg->redis_unix[0] ? redisConnectUnixWithTimeout(cfg->redis_unix, tv)
                                          : redisConnectWithTimeout(cfg->redis_host, cfg->redis_port, tv);
    if (!rc || rc->err) {
        fprintf(stderr, "httpshim purge: redis: %s\n", rc ? rc->errstr : "out of memory");
        if (rc)
            redisFree(rc);
        return -1;
    }
    redisSetTimeout(rc, tv);
    redisReply *r;
    if (cfg->redis_password[0] && (r = redisCommand(rc, "AUTH %s", cfg->redis_password)))
        freeReplyObject(r);
    if (cfg->redis_db && (r = redisCommand(rc, "SELECT %d", cfg->redis_db)))
        freeReplyObject(r);
    struct purge_pass p = { .rc = rc, .upstream = upstream, .glob = glob, .prefix_len = strlen(cfg->redis_prefix),
                            .by_value = true };
    purge_scan(&p, new_pattern);
    if (!p.failed) {
        p.by_value = false;
        purge_scan(&p, old_pattern);
    }
    if (p.failed)
        fprintf(stderr, "httpshim purge: redis: %s\n", rc->err ? rc->errstr : "unexpected reply");
    redisFree(rc);
    return p.failed && !p.unlinked ? -1 : p.unlinked;
}

static int cmd_purge(int argc, char **argv)
{
    static const struct option opts[] = {
        { "upstream", required_argument, NULL, 'u' }, { "config", required_argument, NULL, 'c' },
        { "help", no_argument, NULL, 'h' }, { 0, 0, 0, 0 } };
    const char *upstream = "", *conf = NULL;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "u:c:h", opts, NULL)) != -1) {
        if (c == 'u')
            upstream = optarg;
        else if (c == 'c')
            conf = optarg;
        else if (c == 'h') {
            printf("usage: httpshim purge [-c FILE] [--upstream HOST:PORT] [GLOB]\n"
                   "Drops cache entries whose path matches GLOB (default: all) in every live\n"
                   "process, and in Redis (SCAN + UNLINK) when the rules use it, optionally only\n"
                   "for one upstream. Prints how many were dropped.\n");
            return 0;
        } else
            return 2;
    }
    const char *glob = optind < argc ? argv[optind] : "*";
    char pattern[256];
    if (load_pattern(conf_path(conf), pattern, sizeof pattern) != 0)
        return 1;
    static struct proc procs[MAX_PROCS];
    int n = find_processes(pattern, procs, MAX_PROCS);
    char eu[512], eg[1024], target[1700];
    url_encode(upstream, eu, sizeof eu);
    url_encode(glob, eg, sizeof eg);
    snprintf(target, sizeof target, "/purge?upstream=%s&glob=%s", eu, eg);
    double purged = 0;
    int answered = 0, failed = 0;
    for (int i = 0; i < n; i++) {
        size_t len;
        char *text = ask(&procs[i], "POST", target, &len);
        json_t *j = text ? parse_answer(text, len) : NULL;
        const json_t *error = json_object_get(j, "error");
        if (j && !error) {
            purged += num(j, "purged");
            answered++;
        } else if (j) {
            const char *msg = json_string_value(error);
            fprintf(stderr, "httpshim purge: pid %d: %s\n", procs[i].pid, msg ? msg : "(null)");
            failed++;
        }
        json_decref(j);
        free(text);
    }
    struct shim_config *cfg = calloc(1, sizeof *cfg);
    char err[RULES_ERR_MAX];
    long long in_redis = 0;
    bool redis = cfg && rules_load(conf_path(conf), cfg, err) == 0 && cfg->cache == CACHE_REDIS;
    if (redis && (in_redis = purge_redis(cfg, upstream, glob)) < 0)
        failed++;
    if (cfg)
        rules_free(cfg);
    free(cfg);
    if (redis)
        printf("purged %.0f entries in %d processes and %lld keys in Redis\n", purged, answered,
               in_redis < 0 ? 0 : in_redis);
    else
        printf("purged %.0f entries in %d processes\n", purged, answered);
    return failed ? 1 : 0;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: httpshim COMMAND [ARGS]\n\n"
               "  run [-c FILE] -- CMD [ARGS]   run CMD with the shim preloaded (container entrypoint)\n"
               "  stats [--json|--prometheus|--rules] [--live] [--watch S]   summed counters of every process\n"
               "  check [FILE]                  validate a rules file and show how it is understood\n"
               "  purge [--upstream H:P] [GLOB] drop cache entries in every live process\n\n"
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
