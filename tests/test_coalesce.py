"""Cache under concurrency, inside one process: one upstream fetch per key however many
requests ask at once (coalescing), hit-for-miss for keys that turn out uncacheable, the
waiters' timeout, and a leader whose app went away. Every burst comes from one client
process (poolclient.py: a thread per request), so it shares one memory tier and one set
of flights; the upstream counts what reached it."""
import hashlib
import json
import shutil
import subprocess
import time

import pytest

from conftest import SYS_PY, client_env, java_fetch, jlines, kill_group, pyclient, run, write_rules
from upstream import pattern
from test_redis import redis, redis_servers, redis_url  # noqa: F401,F811 (fixtures)

POOLCLIENT = pyclient("poolclient.py")


def conf_for(tmp, up, sockdir, rule="cache GET /custom* ttl=10m", extra=(), name="rules.conf"):
    lines = ["[global]", "upstream_timeout = 10s", "stats_socket = %s/%%p.sock" % sockdir]
    lines += list(extra) + ["", "[upstream 127.0.0.1:%d]" % up.port, rule]
    return write_rules(tmp, [], raw="\n".join(lines) + "\n", name=name)


def write_specs(tmp, specs):
    f = tmp / "burst.txt"
    f.write_text("\n".join(s if isinstance(s, str) else json.dumps(s) for s in specs) + "\n")
    return f


def burst(tmp, up, specs, gap_ms=0, timeout=30):
    """The burst without the shim: what the upstream sees direct."""
    cmd = [SYS_PY, POOLCLIENT, "--port", up.port, "--paths-file", write_specs(tmp, specs), "--gap-ms", gap_ms,
           "--timeout", timeout]
    r = run(cmd, shim=False, timeout=timeout + 60)
    lines = jlines(r.out)
    assert r.rc == 0 and lines and lines[-1].get("done"), r.describe()
    return [x for x in lines if "i" in x]


def burst_stats(tmp, conf, up, specs, sockdir, gap_ms=0, timeout=30):
    cmd = [SYS_PY, POOLCLIENT, "--port", up.port, "--paths-file", write_specs(tmp, specs), "--gap-ms", gap_ms,
           "--timeout", timeout,
           "--stats-socket", "%s/%%p.sock" % sockdir]
    r = run(cmd, conf=conf, timeout=timeout + 60)
    lines = jlines(r.out)
    assert r.rc == 0 and lines and lines[-1].get("done"), r.describe()
    st = [x["stats"] for x in lines if "stats" in x][0]
    return [x for x in lines if "i" in x], st["upstreams"]["127.0.0.1:%d" % up.port]


def upstream_requests(up, path_part):
    return [e for e in up.stats()["log"] if e.get("kind") == "http" and path_part in (e["target"] or "")]


def test_twenty_at_once_make_one_upstream_request(upstream, tmp_path, sockdir):
    """20 requests for one new key arrive together (the upstream takes 300 ms): the
    upstream gets one request, every client gets the same whole response, 19 of them
    counted as coalesced. Without the shim the same burst makes 20 upstream requests."""
    path = "/custom/geo?n=1200&delay=300&tag=burst"
    direct = burst(tmp_path, upstream, [path] * 20)
    assert all(x["status"] == 200 for x in direct), direct
    assert len(upstream_requests(upstream, "tag=burst")) == 20
    upstream.reset()
    reqs, u = burst_stats(tmp_path, conf_for(tmp_path, upstream, sockdir), upstream, [path] * 20, sockdir)
    # (the counters and the upstream's log with it: a request closed unanswered after
    # upstream_timeout was seen twice in many loaded runs and never alone; they tell a wait
    # in the pool queue from a transfer that hung)
    assert all(x["status"] == 200 and x["body_len"] == 1200 for x in reqs), \
        (reqs, u, upstream_requests(upstream, "tag=burst"), upstream.summary())
    assert len({x["body_sha256"] for x in reqs}) == 1, reqs
    assert len(upstream_requests(upstream, "tag=burst")) == 1, upstream_requests(upstream, "tag=burst")
    assert u["coalesced"] == 19 and u["hits"] == 19 and u["upstream_requests"] == 1, u
    assert u["stored"] == 1, u
    # each waiter was answered from the entry, with an Age, in its own connection semantics
    served = [x for x in reqs if "age" in x["headers"]]
    assert len(served) == 19 and all(x["headers"].get("connection") == "close" for x in served), reqs


@pytest.mark.skipif(not shutil.which("javac"), reason="no JDK")
def test_a_jvm_burst_makes_one_upstream_request_per_key(upstream, tmp_path, sockdir):
    """The JDK's HttpClient (NIO: non-blocking sockets on its own selector thread) asks for
    5 new keys 10 times each, all 50 at once, then HttpURLConnection (blocking sockets)
    asks for them again in the same JVM: 100 upstream requests direct; through the shim 5
    (one fetch per key), every body whole, over at most pool_max_per_host connections."""
    keys = [(1000 + k, "/custom/jvm?n=%d&delay=300&tag=jvm%d" % (1000 + k, k)) for k in range(5)] * 10
    conf = conf_for(tmp_path, upstream, sockdir, extra=["pool_max_per_host = 4"])
    r = run(java_fetch("java-httpclient", "--concurrent", "--then-urlconnection",
                       *[upstream.url(p) for _, p in keys]), conf=conf, timeout=120)
    recs = jlines(r.out)
    assert r.rc == 0 and len(recs) == 100, r.describe()
    want = [hashlib.sha256(pattern(n)).hexdigest() for n, _ in keys] * 2
    assert [(x["status"], x["sha256"]) for x in recs] == [(200, w) for w in want], recs
    got = upstream_requests(upstream, "tag=jvm")
    assert len(got) == 5, "one fetch per key, the rest answered from it: %s" % [e["target"] for e in got]
    assert upstream.stats()["peak"] <= 4, upstream.summary()


def test_waiters_get_their_own_http_version_and_method(upstream, tmp_path, sockdir):
    """Waiters on one flight: an HTTP/1.0 GET is answered in HTTP/1.0 and a HEAD gets the
    head alone, both from the one upstream fetch."""
    path = "/custom/v?n=700&delay=300&tag=versions"
    specs = [path, {"path": path, "version": "1.0"}, {"path": path, "method": "HEAD"}, path]
    reqs, u = burst_stats(tmp_path, conf_for(tmp_path, upstream, sockdir), upstream, specs, sockdir, gap_ms=80)
    by = {x["i"]: x for x in reqs}
    assert by[1]["version"] == "HTTP/1.0" and by[1]["status"] == 200 and by[1]["body_len"] == 700, by[1]
    assert by[2]["status"] == 200 and by[2]["body_len"] == 0 and by[2]["headers"]["content-length"] == "700", by[2]
    assert by[0]["body_len"] == 700 and by[3]["body_len"] == 700
    assert len(upstream_requests(upstream, "tag=versions")) == 1, upstream.stats()["log"]
    assert u["coalesced"] == 3, u


def test_uncacheable_releases_waiters_then_hit_for_miss(upstream, tmp_path, sockdir):
    """The response turns out not storable (Set-Cookie). The first burst's waiters are
    released when the leader's head arrives and fetch in parallel: about two upstream
    latencies in all, not ten. The key is then hit-for-miss: a second burst from the same
    process, 1.2 s later, goes upstream at once, each request one upstream latency."""
    path = "/custom/hfm?n=300&delay=500&tag=hfm&h=Set-Cookie:a%3Db"
    lines = [path] * 10 + ["/custom/filler?n=1&tag=filler"] * 10 + [path] * 10
    reqs, u = burst_stats(tmp_path, conf_for(tmp_path, upstream, sockdir), upstream, lines, sockdir, gap_ms=60)
    first, second = reqs[:10], reqs[20:]
    assert all(x["status"] == 200 for x in reqs), reqs
    assert len(upstream_requests(upstream, "tag=hfm")) == 20
    assert u["coalesced"] == 0 and u["not_stored"]["set_cookie"] >= 10, u
    assert max(x["ms"] for x in first) < 500 * 3, [round(x["ms"]) for x in first]
    # the waiters that joined in the leader's first 200 ms waited for its head, then 500:
    # 940, 880, 820 ms (which request leads is whichever reaches the engine first: on a
    # loaded machine the second may overtake the first; and the gaps between requests
    # stretch: 917, 857, 797 ms seen; and 811, 751, 690 in a loaded CI run, the later
    # joins late): each well past one upstream latency, as no request fetching alone is
    assert sum(x["ms"] > 500 + 150 for x in first) >= 3, [round(x["ms"]) for x in first]
    assert max(x["ms"] for x in second) < 500 + 300, [round(x["ms"]) for x in second]


def test_coalesce_off_per_rule(upstream, tmp_path, sockdir):
    """coalesce=off on the rule: the burst makes one upstream request per client, and the
    first response is still stored."""
    path = "/custom/off?n=100&delay=300&tag=off"
    conf = conf_for(tmp_path, upstream, sockdir, rule="cache GET /custom* ttl=10m coalesce=off")
    reqs, u = burst_stats(tmp_path, conf, upstream, [path] * 10, sockdir)
    assert all(x["status"] == 200 for x in reqs), reqs
    assert len(upstream_requests(upstream, "tag=off")) == 10
    assert u["coalesced"] == 0 and u["stored"] >= 1, u


def test_coalesce_off_globally(upstream, tmp_path, sockdir):
    path = "/custom/goff?n=100&delay=300&tag=goff"
    conf = conf_for(tmp_path, upstream, sockdir, extra=["coalesce = off"])
    reqs, u = burst_stats(tmp_path, conf, upstream, [path] * 8, sockdir)
    assert len(upstream_requests(upstream, "tag=goff")) == 8 and u["coalesced"] == 0, u


def test_waiters_time_out_and_fetch_on_their_own(upstream, tmp_path, sockdir):
    """coalesce_timeout 300 ms, an upstream that takes 1.5 s: the waiters stop waiting at
    300 ms and fetch on their own (so every client is answered, in about 1.8 s at most),
    counted as coalesce timeouts, and only the leader stores."""
    path = "/custom/slow?n=100&delay=1500&tag=slow"
    conf = conf_for(tmp_path, upstream, sockdir, extra=["coalesce_timeout = 300ms"])
    reqs, u = burst_stats(tmp_path, conf, upstream, [path] * 6, sockdir)
    assert all(x["status"] == 200 and x["body_len"] == 100 for x in reqs), reqs
    assert len(upstream_requests(upstream, "tag=slow")) == 6
    assert u["coalesce_timeouts"] == 5 and u["coalesced"] == 0 and u["stored"] == 1, u
    assert max(x["ms"] for x in reqs) < 1500 + 300 + 1000, [round(x["ms"]) for x in reqs]


def test_leader_whose_app_left_keeps_fetching(upstream, tmp_path, sockdir):
    """Five requests wait on the first one's fetch, then its client closes (300 ms in,
    before the upstream answers). The fetch goes on for the five: one upstream request,
    five whole answers."""
    path = "/custom/left?n=5000&delay=500&tag=left"
    # the waiters start 100 ms after the leader, so a loaded machine cannot make one of
    # them the leader (then the abandoning request would be a waiter, and four the hits)
    specs = [{"path": path, "abandon": True, "abandon_after_ms": 300}] + [{"path": path, "delay_ms": 100}] * 5
    reqs, u = burst_stats(tmp_path, conf_for(tmp_path, upstream, sockdir), upstream, specs, sockdir, gap_ms=20)
    rest = [x for x in reqs if x["i"] > 0]
    assert all(x["status"] == 200 and x["body_len"] == 5000 for x in rest), reqs
    assert len(upstream_requests(upstream, "tag=left")) == 1, upstream.stats()["log"]
    # every one of the five is a hit; a waiter the machine delays past the store is a plain
    # hit rather than a coalesced one (coalesced waiters count as hits too): the same one fetch
    assert u["hits"] == 5 and 1 <= u["coalesced"] <= 5 and u["stored"] == 1, u


def test_failed_leader_hands_nothing_partial(upstream, tmp_path, sockdir):
    """The upstream promises 4000 bytes and closes after 2000: no waiter gets a partial
    body from the leader's fetch; each is released to fetch on its own (and fails the same
    way, as it would direct), and nothing is stored."""
    path = "/custom/trunc?n=4000&delay=300&mode=truncate&tag=trunc"
    reqs, u = burst_stats(tmp_path, conf_for(tmp_path, upstream, sockdir), upstream, [path] * 5, sockdir)
    assert not [x for x in reqs if x["status"] == 200 and x["body_len"] == 4000], reqs
    assert u["stored"] == 0 and u["coalesced"] == 0, u
    assert len(upstream_requests(upstream, "tag=trunc")) == 5, upstream.stats()["log"]


def test_vary_mismatch_fetches_on_its_own(upstream, tmp_path, sockdir):
    """The response varies on Accept-Language: a waiter with the leader's language is
    served from the flight, one with another language fetches its own."""
    path = "/custom/vary?n=200&delay=300&tag=vary&h=Vary:Accept-Language"
    specs = [{"path": path, "headers": {"Accept-Language": "en"}},
             {"path": path, "headers": {"Accept-Language": "en"}},
             {"path": path, "headers": {"Accept-Language": "de"}}]
    reqs, u = burst_stats(tmp_path, conf_for(tmp_path, upstream, sockdir), upstream, specs, sockdir, gap_ms=80)
    assert all(x["status"] == 200 for x in reqs), reqs
    got = upstream_requests(upstream, "tag=vary")
    langs = sorted(v for e in got for k, v in e["headers"] if k.lower() == "accept-language")
    assert langs == ["de", "en"], got
    assert u["coalesced"] == 1, u


def test_burst_with_the_redis_tier(upstream, redis, tmp_path, sockdir):  # noqa: F811
    """With the Redis tier, the burst's requests ask Redis (a miss), then wait on one
    flight: one upstream request, and the entry is in Redis afterwards."""
    path = "/custom/rt?n=800&delay=300&tag=redisburst"
    conf = conf_for(tmp_path, upstream, sockdir, extra=[
        "cache = %s" % redis_url(redis), "redis_timeout = 500ms"])
    reqs, u = burst_stats(tmp_path, conf, upstream, [path] * 20, sockdir)
    assert all(x["status"] == 200 and x["body_len"] == 800 for x in reqs), reqs
    assert len(upstream_requests(upstream, "tag=redisburst")) == 1
    assert u["coalesced"] == 19, u
    assert len(redis.scan("httpshim:*")) == 1


# ------------------------------------------------------------------ across processes
def redis_conf(tmp, up, sockdir, srv, extra=()):
    return conf_for(tmp, up, sockdir, extra=["cache = %s" % redis_url(srv), "redis_timeout = 500ms"] + list(extra))


def processes_at_once(tmp, conf, up, specs, sockdir, n, timeout=30):
    """n poolclient processes started together, each sending specs concurrently; their
    (requests, upstream stats, redis stats)."""
    f = write_specs(tmp, specs)
    cmd = [SYS_PY, POOLCLIENT, "--port", str(up.port), "--paths-file", str(f), "--timeout", str(timeout),
           "--stats-socket", "%s/%%p.sock" % sockdir]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client_env(True, conf),
                              start_new_session=True) for _ in range(n)]
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout + 60)
            lines = jlines(o)
            assert p.returncode == 0 and lines and lines[-1].get("done"), (p.returncode, o, e)
            st = [x["stats"] for x in lines if "stats" in x][0]
            out.append(([x for x in lines if "i" in x], st["upstreams"]["127.0.0.1:%d" % up.port], st["redis"]))
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p.pid)
                p.wait(30)
    return out


def test_burst_across_processes_makes_one_upstream_request(upstream, redis, tmp_path, sockdir):  # noqa: F811
    """Four processes, five concurrent requests each, for one new key (the upstream takes
    500 ms): one process takes the key's Redis lock and fetches; the others find it held,
    poll, and serve the entry it stored. The upstream gets one request; the lock is gone
    afterwards; each process's hits and misses add up to its requests. Without coalescing
    (coalesce = off) the same run makes 20."""
    path = "/custom/xp?n=900&delay=500&tag=xp"
    res = processes_at_once(tmp_path, redis_conf(tmp_path, upstream, sockdir, redis), upstream, [path] * 5, sockdir, 4)
    reqs = [x for r, _, _ in res for x in r]
    assert len(reqs) == 20 and all(x["status"] == 200 and x["body_len"] == 900 for x in reqs), reqs
    assert len({x["body_sha256"] for x in reqs}) == 1
    assert len(upstream_requests(upstream, "tag=xp")) == 1, upstream.stats()["log"]
    assert sum(rd["lock_waits"] for _, _, rd in res) == 3, [rd for _, _, rd in res]
    assert sum(rd["locks"] for _, _, rd in res) >= 4, [rd for _, _, rd in res]
    # every request but the fetch's is a hit served by that fetch, in-process or across:
    # coalesced; a miss is a request that went upstream (each waiter counted as a miss and
    # then a hit before, hits + misses 23 for 20 requests)
    us = [{k: u[k] for k in ("requests", "hits", "misses", "coalesced")} for _, u, _ in res]
    assert sum(u["coalesced"] for u in us) == 19 and sum(u["hits"] for u in us) == 19, us
    assert sum(u["misses"] for u in us) == 1 and all(u["hits"] + u["misses"] == u["requests"] for u in us), us
    assert redis.scan("httpshim:*:lock") == [], "the lock must be released after the store"
    upstream.reset()
    off = redis_conf(tmp_path, upstream, sockdir, redis, extra=["coalesce = off"])
    path2 = "/custom/xp2?n=900&delay=500&tag=xpoff"
    res = processes_at_once(tmp_path, off, upstream, [path2] * 5, sockdir, 4)
    assert len(upstream_requests(upstream, "tag=xpoff")) == 20


SCATTERED = r"""
import random, sys, threading, time, urllib.request
port, keys, seed, start = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
random.seed(seed)
def go(k, at):
    time.sleep(max(0, at - time.time()))
    urllib.request.urlopen("http://127.0.0.1:%d/custom/sc?tag=sc-%d&n=300&delay=150" % (port, k), timeout=20).read()
ts = [threading.Thread(target=go, args=(k, start + random.uniform(0, 0.4))) for k in range(keys)]
[t.start() for t in ts]
[t.join() for t in ts]
"""


def test_a_lookup_just_before_the_entry_lands_does_not_fetch_again(upstream, redis, tmp_path, sockdir):  # noqa: F811
    """Eight processes ask each of 60 keys once, at random moments over 0.4 s (the upstream
    takes 150 ms): one upstream request per key. A process whose lookup missed just
    before the lock's holder stored the entry and let go of the lock took the free lock
    and fetched the key again (2 to 22 keys twice per run, found with gunicorn workers);
    the lock's script now answers that the entry is there, fresh, and the process reads it."""
    conf = redis_conf(tmp_path, upstream, sockdir, redis)
    start = time.time() + 1.0
    procs = [subprocess.Popen([SYS_PY, "-c", SCATTERED, str(upstream.port), "60", str(i), repr(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client_env(True, conf),
                              start_new_session=True) for i in range(8)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p.pid)
                p.wait(30)
    fetched = upstream_requests(upstream, "tag=sc-")
    twice = sorted({e["target"] for e in fetched if sum(1 for x in fetched if x["target"] == e["target"]) > 1})
    assert len(fetched) == 60, "%d upstream requests for 60 keys; fetched twice: %s" % (len(fetched), twice)


def test_a_variant_found_through_the_lock_is_never_served_to_another_variant(upstream, redis, tmp_path,  # noqa: F811
                                                                             sockdir):
    """Three processes, eight concurrent requests each, for one new key whose answer
    varies on X-V (the upstream takes 300 ms and echoes X-V back as X-Echo); the values
    alternate a, b, none, c. A process that waited on another's Redis lock found the one
    variant that process stored and gave it to every request waiting in it: "a" got "b"'s
    body (found by an adversarial pass). Every answer is now its own request's variant."""
    path = "/custom/vl?n=300&delay=300&tag=vl&echo=X-V&h=Vary:X-V"
    specs = [{"path": path, "headers": {"X-V": v}} if v else path for v in ("a", "b", None, "c") * 2]
    res = processes_at_once(tmp_path, redis_conf(tmp_path, upstream, sockdir, redis), upstream, specs, sockdir, 3)
    got = [(x["i"], x["status"], x["headers"].get("x-echo")) for r, _, _ in res for x in r]
    want = [(i, 200, v or "-") for _ in range(3) for i, v in enumerate(("a", "b", None, "c") * 2)]
    assert sorted(got) == sorted(want), got
    assert sum(rd["lock_waits"] for _, _, rd in res) >= 1, [rd for _, _, rd in res]


def test_lock_of_a_dead_holder_costs_at_most_its_ttl(upstream, redis, tmp_path, sockdir):  # noqa: F811
    """A lock another (dead) process took 1 s ago with PX 1500 sits on the key: the request
    polls until it expires, then takes the lock and fetches. It is answered within the
    lock's remaining time plus the fetch, not after coalesce_timeout (5 s)."""
    path = "/custom/dead?n=100&delay=100&tag=dead"
    conf = redis_conf(tmp_path, upstream, sockdir, redis)
    # find the key the shim uses: one request, then drop the entry and put a lock there
    reqs, _ = burst_stats(tmp_path, conf, upstream, [path], sockdir)
    keys = [k for k in redis.scan("httpshim:*") if not k.endswith(b":lock")]
    assert len(keys) == 1, keys
    key = keys[0]
    redis.cmd("DEL", key)
    redis.cmd("SET", key + b":lock", b"dead-process-token", "PX", "1500")
    upstream.reset()
    reqs, u = burst_stats(tmp_path, conf, upstream, [path], sockdir)
    assert reqs[0]["status"] == 200, reqs
    assert 1000 < reqs[0]["ms"] < 1500 + 1500, reqs
    assert len(upstream_requests(upstream, "tag=dead")) == 1


def test_lock_held_past_coalesce_timeout_fetches_itself(upstream, redis, tmp_path, sockdir):  # noqa: F811
    """A lock that outlives coalesce_timeout (400 ms here): the request stops polling at
    400 ms and fetches itself; the foreign lock is left alone (compare-and-delete)."""
    path = "/custom/held?n=100&delay=50&tag=held"
    conf = redis_conf(tmp_path, upstream, sockdir, redis, extra=["coalesce_timeout = 400ms"])
    burst_stats(tmp_path, conf, upstream, [path], sockdir)
    keys = [k for k in redis.scan("httpshim:*") if not k.endswith(b":lock")]
    key = keys[0]
    redis.cmd("DEL", key)
    redis.cmd("SET", key + b":lock", b"someone-else", "PX", "60000")
    upstream.reset()
    reqs, u = burst_stats(tmp_path, conf, upstream, [path], sockdir)
    assert reqs[0]["status"] == 200 and 350 < reqs[0]["ms"] < 400 + 1500, reqs
    assert len(upstream_requests(upstream, "tag=held")) == 1
    assert redis.cmd("GET", key + b":lock") == b"someone-else"


def test_redis_down_keeps_in_process_coalescing(upstream, redis, tmp_path, sockdir):  # noqa: F811
    """Redis stopped: a burst in one process still makes one upstream request."""
    conf = redis_conf(tmp_path, upstream, sockdir, redis)
    redis.shutdown()
    path = "/custom/down?n=300&delay=300&tag=down"
    reqs, u = burst_stats(tmp_path, conf, upstream, [path] * 10, sockdir)
    assert all(x["status"] == 200 and x["body_len"] == 300 for x in reqs), reqs
    assert len(upstream_requests(upstream, "tag=down")) == 1
    assert u["coalesced"] == 9, u


def test_an_unstorable_answer_releases_the_other_processes_at_once(upstream, redis, tmp_path, sockdir):  # noqa: F811
    """Eight processes ask at once for a new key whose answer cannot be stored (it sets a
    cookie; the upstream takes 300 ms): the holder of the key's lock leaves it saying so,
    and the others fetch at once, as direct. Before, each waited for the lock and took it
    after the one before had let go: 0.3 to 3 s, a staircase of fetches."""
    path = "/custom/uns?n=200&delay=300&tag=uns&h=Set-Cookie:a%3Db"
    conf = redis_conf(tmp_path, upstream, sockdir, redis)
    res = processes_at_once(tmp_path, conf, upstream, [path], sockdir, 8)
    reqs = [x for r, _, _ in res for x in r]
    assert len(reqs) == 8 and all(x["status"] == 200 and x["body_len"] == 200 for x in reqs), reqs
    assert max(x["ms"] for x in reqs) < 1200, sorted(x["ms"] for x in reqs)
    assert len(upstream_requests(upstream, "tag=uns")) == 8
    assert sum(rd["lock_uncacheable"] for _, _, rd in res) >= 1, [rd for _, _, rd in res]


def test_an_expired_entry_kept_in_redis_is_fetched_once_across_processes(upstream, redis, tmp_path, sockdir):  # noqa: F811
    """An entry past its TTL that Redis still keeps (for stale_if_error here; an ETag's
    revalidation the same), then six processes at once: one fetches, the others wait for
    its answer. The waiters took the expired entry they polled for the answer, found it
    expired, and each fetched: six upstream requests where a true miss made one."""
    path = "/custom/exp?n=300&delay=300&tag=exp"
    conf = conf_for(tmp_path, upstream, sockdir, rule="cache GET /custom* ttl=1s stale_if_error=60s",
                    extra=["cache = %s" % redis_url(redis), "redis_timeout = 500ms"], name="exp.conf")
    burst_stats(tmp_path, conf, upstream, [path], sockdir)
    time.sleep(1.3)
    upstream.reset()
    res = processes_at_once(tmp_path, conf, upstream, [path], sockdir, 6)
    reqs = [x for r, _, _ in res for x in r]
    assert len(reqs) == 6 and all(x["status"] == 200 and x["body_len"] == 300 for x in reqs), reqs
    assert len(upstream_requests(upstream, "tag=exp")) == 1, upstream.stats()["log"]
