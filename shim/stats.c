/* stats.c — owns the counters and latency histograms every subsystem bumps, the Redis
 * tier's included. */
#include "stats.h"
#include <string.h>
#include <time.h>

struct upstream_stats shim_stats[RULES_MAX_UPSTREAMS];
struct redis_counters shim_redis;
struct rule_stats shim_rule_stats[RULES_MAX_UPSTREAMS][RULES_MAX_CACHE_RULES];

const double stats_lat_bounds_s[STATS_LAT_BUCKETS] = {
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
    0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 10,
};


static int bucket(int64_t micros)
{
    int b = 0;
    while (b < STATS_LAT_BUCKETS && (double)micros / 1e6 > stats_lat_bounds_s[b])
        b++;
    return b;
}

void stats_observe_queue_wait(int upstream, int64_t micros)
{
    STAT_INC(upstream, queue_wait[bucket(micros)]);
    STAT_ADD(upstream, queue_wait_sum_us, (uint64_t)micros);
    uint64_t seen = atomic_load_explicit(&shim_stats[upstream].queue_wait_max_us, memory_order_relaxed);
    while ((uint64_t)micros > seen
           && !atomic_compare_exchange_weak(&shim_stats[upstream].queue_wait_max_us, &seen, (uint64_t)micros))
        ;
}

void stats_observe_redis(int64_t micros)
{
    atomic_fetch_add_explicit(&shim_redis.lat[bucket(micros)], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&shim_redis.lat_sum_us, (uint64_t)micros, memory_order_relaxed);
}

void stats_observe_latency(int upstream, bool hit, int64_t micros)
{
    int b = bucket(micros);
    if (hit) {
        STAT_INC(upstream, hit_lat[b]);
        STAT_ADD(upstream, hit_lat_sum_us, (uint64_t)micros);
    } else {
        STAT_INC(upstream, miss_lat[b]);
        STAT_ADD(upstream, miss_lat_sum_us, (uint64_t)micros);
    }
}

void stats_reset(void)
{
    memset(shim_stats, 0, sizeof shim_stats);
    memset(shim_rule_stats, 0, sizeof shim_rule_stats);
}
