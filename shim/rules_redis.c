/* rules_redis.c — owns the forms of `cache = redis...` in rules.conf (a single Redis, a
 * Unix socket, Sentinel, Cluster, each with its user, password and database) and the
 * reading of the secret files beside them (redis_password_file, redis_secret_file). */
#include "rules.h"
#include "real.h"
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* "host:port", "[v6]:port" or "host" (default_port) of n bytes at s. */
static int parse_node(const char *s, size_t n, int default_port, struct redis_addr *node)
{
    char hp[300];
    if (n == 0 || n >= sizeof hp)
        return -1;
    memcpy(hp, s, n);
    hp[n] = 0;
    node->port = default_port;
    char *colon = strrchr(hp, ':');
    if (colon && !strchr(colon, ']')) {
        char *end;
        long port = strtol(colon + 1, &end, 10);
        if (*end || port <= 0 || port > 65535)
            return -1;
        node->port = (int)port;
        *colon = 0;
    }
    char *h = hp;
    if (*h == '[') {
        h++;
        char *close = strchr(h, ']');
        if (!close || close[1])
            return -1;
        *close = 0;
    }
    if (!*h || strlen(h) >= sizeof node->host)
        return -1;
    /* a host name or an address, nothing a resolver would be handed by mistake ("a b", "]") */
    for (const char *c = h; *c; c++)
        if (!(isalnum((unsigned char)*c) || *c == '.' || *c == '-' || *c == '_' || (h != hp && *c == ':')))
            return -1;
    snprintf(node->host, sizeof node->host, "%s", h);
    return 0;
}

static int parse_db(const char *s, int *db)
{
    char *end;
    long n = strtol(s, &end, 10);
    if (!*s || *end || n < 0 || n > 1000000)
        return -1;
    *db = (int)n;
    return 0;
}

/* "[[user]:password@]" or "password@" at the start of s (up to its last '@'): the user (an
 * ACL user; none: the default user) and the password kept, s moved past. A password here
 * and in redis_password_file is an error: which one was meant? */
static int parse_password(const char **s, struct shim_config *cfg)
{
    const char *at = strrchr(*s, '@');
    if (!at)
        return 0;
    const char *colon = memchr(*s, ':', (size_t)(at - *s));
    const char *pw = colon ? colon + 1 : *s;
    size_t user_len = colon ? (size_t)(colon - *s) : 0;
    if ((size_t)(at - pw) >= sizeof cfg->redis_password || user_len >= sizeof cfg->redis_user)
        return -1;
    if (at > pw) {
        if (cfg->redis_password_from_file)
            return -1;
        memcpy(cfg->redis_password, pw, (size_t)(at - pw));
        cfg->redis_password[at - pw] = 0;
    }
    memcpy(cfg->redis_user, *s, user_len);
    cfg->redis_user[user_len] = 0;
    *s = at + 1;
    return 0;
}

/* "h1[:p1],h2[:p2],..." of n bytes at s (default_port where none is said). */
static int parse_seeds(const char *s, size_t n, int default_port, struct shim_config *cfg)
{
    const char *end_all = s + n;
    for (const char *node = s; node < end_all;) {
        const char *comma = memchr(node, ',', (size_t)(end_all - node));
        const char *end = comma ? comma : end_all;
        if (cfg->n_redis_seeds == RULES_MAX_REDIS_SEEDS
            || parse_node(node, (size_t)(end - node), default_port, &cfg->redis_seeds[cfg->n_redis_seeds]) != 0)
            return -1;
        cfg->n_redis_seeds++;
        node = comma ? comma + 1 : end_all;
    }
    return cfg->n_redis_seeds ? 0 : -1;
}

/* redis-sentinel://[:password@]h1[:p1],h2[:p2],.../master[/db] (sentinels on 26379 unless
 * said): the password and the database are the master's. */
static int parse_sentinel_url(const char *s, struct shim_config *cfg)
{
    if (parse_password(&s, cfg) != 0)
        return -1;
    const char *slash = strchr(s, '/');
    if (!slash || parse_seeds(s, (size_t)(slash - s), 26379, cfg) != 0)
        return -1;
    const char *name = slash + 1, *db = strchr(name, '/');
    size_t name_len = db ? (size_t)(db - name) : strlen(name);
    if (name_len == 0 || name_len >= sizeof cfg->redis_master_name)
        return -1;
    for (size_t i = 0; i < name_len; i++)
        if (name[i] <= ' ' || name[i] > '~')
            return -1;
    memcpy(cfg->redis_master_name, name, name_len);
    cfg->redis_master_name[name_len] = 0;
    if (db && db[1] && parse_db(db + 1, &cfg->redis_db) != 0)
        return -1;
    cfg->redis_mode = REDIS_SENTINEL;
    return 0;
}

/* redis-cluster://[:password@]h1[:p1],h2[:p2],...[/]: nodes to learn the cluster's slot
 * map from (any of its nodes will do; more, for when some are down). A cluster has one
 * database: no /db. */
static int parse_cluster_url(const char *s, struct shim_config *cfg)
{
    if (parse_password(&s, cfg) != 0)
        return -1;
    size_t n = strlen(s);
    if (n && s[n - 1] == '/')
        n--;
    if (memchr(s, '/', n) || parse_seeds(s, n, 6379, cfg) != 0)
        return -1;
    cfg->redis_mode = REDIS_CLUSTER;
    return 0;
}

/* redis://[:password@]host:port[/db], redis+unix:///path/to.sock, or a sentinel URL */
int rules_parse_redis_url(const char *url, struct shim_config *cfg)
{
    cfg->redis_port = 6379;
    cfg->redis_db = 0;
    cfg->redis_mode = REDIS_SINGLE;
    cfg->n_redis_seeds = 0;
    if (!strncmp(url, "redis+unix://", 13)) {
        const char *path = url + 13;
        if (path[0] != '/' || strlen(path) >= sizeof cfg->redis_unix)
            return -1;
        snprintf(cfg->redis_unix, sizeof cfg->redis_unix, "%s", path);
        return 0;
    }
    if (!strncmp(url, "redis-sentinel://", 17))
        return parse_sentinel_url(url + 17, cfg);
    if (!strncmp(url, "redis-cluster://", 16))
        return parse_cluster_url(url + 16, cfg);
    if (strncmp(url, "redis://", 8))
        return -1;
    const char *s = url + 8;
    if (parse_password(&s, cfg) != 0)
        return -1;
    const char *slash = strchr(s, '/');
    struct redis_addr node;
    if (parse_node(s, slash ? (size_t)(slash - s) : strlen(s), 6379, &node) != 0)
        return -1;
    snprintf(cfg->redis_host, sizeof cfg->redis_host, "%s", node.host);
    cfg->redis_port = node.port;
    if (slash && slash[1] && parse_db(slash + 1, &cfg->redis_db) != 0)
        return -1;
    return 0;
}

int rules_read_secret_file(const char *key, const char *path, unsigned char *out, size_t cap, size_t *len,
                           char *err, size_t err_cap)
{
    /* a regular file only, opened without waiting: a FIFO (or /dev/stdin) named here was
     * read in every preloaded program's constructor, which then waited forever for a
     * writer, or ate the program's own input as the secret */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        int e = fd < 0 ? errno : 0;
        if (fd >= 0)
            real_close(fd);
        snprintf(err, err_cap, "%s %s: %s", key, path, e ? strerror(e) : "not a regular file");
        return -1;
    }
    FILE *f = real_fdopen(fd, "rb");
    if (!f) {
        snprintf(err, err_cap, "%s %s: %s", key, path, strerror(errno));
        real_close(fd);
        return -1;
    }
    unsigned char buf[RULES_SECRET_MAX + 1];
    if (cap > RULES_SECRET_MAX)
        cap = RULES_SECRET_MAX;
    size_t n = fread(buf, 1, sizeof buf, f);
    int failed = ferror(f) ? errno : 0;
    real_fclose(f);
    int rc = -1;
    while (n && isspace(buf[n - 1]))
        n--;
    if (failed)
        snprintf(err, err_cap, "%s %s: %s", key, path, strerror(failed));
    else if (n == 0)
        snprintf(err, err_cap, "%s %s is empty", key, path);
    else if (n > cap)
        snprintf(err, err_cap, "%s %s: longer than %zu bytes", key, path, cap);
    else {
        memcpy(out, buf, n);
        *len = n;
        rc = 0;
    }
    memset(buf, 0, sizeof buf);
    return rc;
}
