/* rules.h — rules.conf: the parsed configuration and the upstream address table
 * (owned by rules.c). Shared by the preload library and the httpshim CLI. */
#ifndef HTTPSHIM_RULES_H
#define HTTPSHIM_RULES_H
#include <netdb.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#define RULES_MAX_UPSTREAMS     64
#define RULES_MAX_CACHE_RULES   64
#define RULES_MAX_ADDRS         32   /* per upstream: resolved at load + learned */
#define RULES_MAX_LIST          16   /* ignore_query / key_headers / status entries */
#define RULES_HOST_MAX          256
#define RULES_ERR_MAX           512
#define RULES_SECRET_MAX        1024
#define RULES_PASSWORD_MAX      128     /* a Redis password, its NUL included */
#define RULES_POOL_MAX          16384
#define RULES_PATH_MAX          512
#define RULES_FILE_MAX          (1 << 20)   /* bytes: read by every preloaded program at its start */

struct rules_addr { int family; uint8_t bytes[16]; };   /* AF_INET uses 4 bytes */

struct cache_rule {
    char method[16];
    char glob[512];
    int64_t ttl_ms;
    size_t n_ignore_query, n_key_headers, n_status;
    char ignore_query[RULES_MAX_LIST][64];
    char key_headers[RULES_MAX_LIST][64];
    int status[RULES_MAX_LIST];
    bool respect_cache_control;
    bool no_coalesce;              /* coalesce=off: concurrent misses each go upstream */
    /* how long past its TTL an entry is served at once while refreshed in the background,
     * and served when the upstream fails (0: not at all) */
    int64_t stale_while_revalidate_ms, stale_if_error_ms;
    int line;
};

enum upstream_tls { TLS_TUNNEL, TLS_INTERCEPT };
/* protocol = http | redis: what the app speaks to this upstream */
enum upstream_protocol { PROTO_HTTP, PROTO_REDIS };
#define RULES_REDIS_POOL_DEFAULT    4    /* server connections per upstream, protocol = redis */
#define RULES_REDIS_PINNED_DEFAULT  64   /* connections lent to one app connection at once */

struct upstream_rule {
    char host[RULES_HOST_MAX];     /* as written: a name or an IP literal */
    uint16_t port;
    char label[RULES_HOST_MAX + 8];    /* "host:port", "[v6]:port": how keys and stats name it */
    bool host_is_literal;
    /* tls = tunnel | intercept: what happens to TLS the app encrypts itself */
    enum upstream_tls tls;
    enum upstream_protocol protocol;
    unsigned pool_max;                 /* pool_max_per_host of this upstream alone; 0: [global]'s */
    unsigned redis_pinned_max;         /* protocol = redis: lent connections at most */
    bool redis_pinned_set;
    char tls_ca_file[RULES_PATH_MAX];  /* trusted for this upstream besides the system store */
    /* origin = https://HOST[:PORT]: the app's plain HTTP is carried to it over TLS */
    bool origin_https;
    char origin_host[RULES_HOST_MAX];
    uint16_t origin_port;
    int line;
    size_t n_cache_rules;
    struct cache_rule *cache_rules;   /* heap, n_cache_rules long; freed by rules_free */
    size_t n_addrs;                /* guarded by rules_addr_lock in rules.c */
    struct rules_addr addrs[RULES_MAX_ADDRS];
    /* an address its name resolved to that another section of the same port held already
     * (a literal, or a name resolved before): the address stays that section's */
    int shadowed_by_line;
    struct rules_addr shadowed;
};

enum cache_backend { CACHE_OFF, CACHE_MEMORY, CACHE_REDIS };
enum redis_mode { REDIS_SINGLE, REDIS_SENTINEL, REDIS_CLUSTER };
#define RULES_MAX_REDIS_SEEDS 8

struct shim_config {
    char path[4096];
    unsigned pool_max_per_host;        /* connections to one upstream, in use + idle */
    unsigned pool_idle_max;            /* idle connections kept, per upstream */
    int64_t pool_queue_timeout_ms;     /* the longest a request waits for a connection */
    int64_t pool_idle_timeout_ms;
    int64_t upstream_timeout_ms;
    /* one upstream fetch per key: how long a request waits on another's fetch of it, how
     * long a key that turned out uncacheable skips the waiting, how long a Redis lock on a
     * key lives */
    bool coalesce;
    bool fastpath;                     /* memory hits answered on the app's own thread */
    int64_t busy_poll_us;              /* the engine polls this long for an event due soon (0: never) */
    int64_t coalesce_timeout_ms, uncacheable_ttl_ms, redis_lock_ttl_ms;
    enum cache_backend cache;
    int64_t memory_max;
    int64_t max_object;
    char stats_socket[256];        /* pattern: %p pid, %u uid, %% a percent sign */
    /* cache = redis://[:password@]host:port/db or redis+unix:///path (memory stays L1), or
     * redis-sentinel://[:password@]h1:p1,h2:p2/master[/db]: the master the sentinels name,
     * or redis-cluster://[:password@]h1:p1,h2:p2: the masters of a cluster, by key slot */
    enum redis_mode redis_mode;
    struct redis_addr { char host[256]; int port; } redis_seeds[RULES_MAX_REDIS_SEEDS];   /* the sentinels, or cluster nodes */
    size_t n_redis_seeds;
    char redis_master_name[128];
    char redis_host[256];
    int redis_port;
    char redis_unix[108];
    char redis_user[64];               /* an ACL user: AUTH user password; "": AUTH password */
    char redis_password[RULES_PASSWORD_MAX];            /* from the URL, or redis_password_file */
    char redis_sentinel_password[RULES_PASSWORD_MAX];   /* redis_sentinel_password_file: AUTH to the sentinels */
    bool redis_password_from_file;
    int redis_db;
    char redis_prefix[64];
    int64_t redis_timeout_ms;
    int64_t redis_max_object;
    /* redis_secret_file: the fleet's shared secret; entries are then HMAC-authenticated */
    unsigned char redis_secret[RULES_SECRET_MAX];
    size_t redis_secret_len;
    size_t n_upstreams;
    struct upstream_rule upstreams[RULES_MAX_UPSTREAMS];
};

typedef int (*rules_resolver)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

/* A named upstream whose name resolved to an address another section of its port holds:
 * writes what to say (its FILE:LINE is the caller's) and answers true. */
bool rules_shadowed(struct shim_config *cfg, size_t upstream, char *why, size_t cap);

/* Parses `path` into `cfg` (defaults first). On error returns -1 and writes
 * "FILE:LINE: what is wrong" into err. A missing file is -1 with errno ENOENT and err "". */
int rules_load(const char *path, struct shim_config *cfg, char err[RULES_ERR_MAX]);
/* rules_redis.c: one of the cache = redis... URL forms into cfg; -1: not one. */
int rules_parse_redis_url(const char *url, struct shim_config *cfg);
/* The secret in path: its bytes less trailing whitespace, 1 to cap bytes, into out and
 * *len; -1 with "key path: why" in err. */
int rules_read_secret_file(const char *key, const char *path, unsigned char *out, size_t cap, size_t *len,
                           char *err, size_t err_cap);
/* pool_max_per_host for this upstream: its own, else (HTTP) the [global] one, else
 * (Redis) RULES_REDIS_POOL_DEFAULT. */
unsigned rules_pool_max(const struct shim_config *cfg, const struct upstream_rule *u);
/* The [global] keys, from the one table that defaults, reads and names them: the i-th
 * key's name and its default (NULL: none), or NULL past the last. */
size_t rules_global_keys(void);
const char *rules_global_key(size_t i, const char **default_value);
/* Resolves every upstream host name with `resolve` (the real getaddrinfo). */
void rules_free(struct shim_config *cfg);
void rules_resolve_all(struct shim_config *cfg, rules_resolver resolve);
/* Index of the upstream whose host:port the address matches, or -1. IPv4-mapped IPv6
 * addresses match their IPv4 form. */
int rules_match_addr(struct shim_config *cfg, const struct sockaddr *sa, socklen_t len);
/* The app resolved `name` to these addresses: remember them for every rule naming it. */
void rules_learn(struct shim_config *cfg, const char *name, int family, const void *addr_bytes);
bool rules_name_is_listed(const struct shim_config *cfg, const char *name);
bool rules_has_named_upstreams(const struct shim_config *cfg);   /* any not an IP literal */
/* A copy of an upstream's addresses as they are now (the app's lookups and the background
 * resolution add to them from other threads), at most max: how many. */
size_t rules_addrs_of(const struct shim_config *cfg, size_t upstream, struct rules_addr *out, size_t max);
bool rules_named_upstream_port(const struct shim_config *cfg, unsigned port);   /* one on this port (0: any) */
/* The address lists' lock, held across a fork (the atfork handlers). */
void rules_atfork_prepare(void);
void rules_atfork_release(void);

/* Expands a stats_socket pattern for this pid and uid; -1 if it does not fit. */
int rules_expand_socket_path(const char *pattern, int pid, unsigned uid, char *out, size_t cap);
/* A stats_socket pattern as files to look for: their directory, and the name's parts
 * before and after the pid. -1 if it does not fit. */
struct rules_socket_names { char dir[512]; char prefix[128]; char suffix[128]; };
int rules_socket_names(const char *pattern, unsigned uid, struct rules_socket_names *n);
/* The pid in a file name of that pattern followed by `tail` ("" for the sockets), else 0. */
int rules_socket_pid(const struct rules_socket_names *n, const char *name, const char *tail);
int64_t rules_parse_duration_ms(const char *s, bool *ok);
int64_t rules_parse_size(const char *s, bool *ok);
#endif
