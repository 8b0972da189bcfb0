"""Stale serving and revalidation (issue 13, items 3 and 4): stale_while_revalidate (served
at once, one background refresh per key, on the pool), stale_if_error (served when the
upstream fails, times out or answers 5xx), the response's own RFC 5861 directives under
respect_cache_control, conditional refreshes whose 304 renews the entry (also in Redis),
and a client's own conditional GET answered 304 from a fresh entry. Each test's requests
come from one cacheclient.py process (one memory tier), in order; entries age on the
shim's test clock (advance), and real sleeps remain only where the upstream's own time
matters (a background refresh that takes a while)."""
import json
import time

from conftest import SYS_PY, jlines, pyclient, run
from test_cache import advance, assert_body, assert_sources, cache_conf, get, hdr, play, rq, conn, served, simple_conf, sleep
from test_redis import redis, redis_servers, redis_url  # noqa: F401,F811 (fixtures)


def upstream_log(up, tag):
    return [e for e in up.stats()["log"] if e.get("kind") == "http" and ("tag=%s" % tag) in (e["target"] or "")]


def header_of(entry, name):
    return [v for k, v in entry["headers"] if k.lower() == name.lower()]


def now_ms():
    return int(time.time() * 1000)


# ------------------------------------------------------------------ stale-while-revalidate
def test_stale_while_revalidate_serves_at_once_and_refreshes_once(upstream, tmp_path):
    """ttl=1s, stale_while_revalidate=30s, an upstream that takes 800 ms: after the TTL,
    three requests in a row are answered from the stale entry at once (its X-Served, and
    well before 800 ms), while one background refresh goes upstream; once it is back, the
    next request gets the refreshed entry."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=1s stale_while_revalidate=30s")
    t = "/custom/swr?tag=swr&n=500&delay=800"
    p = play(tmp_path, conf, [get(upstream, t), advance(1.5), get(upstream, t), get(upstream, t), get(upstream, t),
                              sleep(1.5), get(upstream, t)])
    for i in range(5):
        assert_body(p, i, 500)
    first = served(p.resps[0])
    assert [served(r) for r in p.resps[1:4]] == [first] * 3, p.describe()
    assert served(p.resps[4]) != first, "the refresh must have replaced the entry:\n" + p.describe()
    assert len(upstream_log(upstream, "swr")) == 2, upstream_log(upstream, "swr")


def test_a_ttl_of_half_a_minute_expires_on_the_test_clock(upstream, tmp_path):
    """ttl=30s: 20 s on, a hit; 40 s on, a miss. Each step moves the clock further than
    the stats socket gives a silent client (5 s): that timeout is on the real clock, or the
    client asking for the step would be dropped before its answer."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=30s")
    t = "/custom?tag=ttl30"
    p = play(tmp_path, conf, [get(upstream, t), advance(20), get(upstream, t), advance(20), get(upstream, t)])
    assert_sources(p, upstream, "aab")


def test_a_refresh_carries_the_requests_body(upstream, tmp_path):
    """A POST its rule caches, stale within stale_while_revalidate: the background refresh
    sends the same body (the key is made of it), so what it stores answers that body."""
    conf = simple_conf(tmp_path, upstream, "POST /custom* ttl=1s stale_while_revalidate=30s")
    t = "/custom/swrb?tag=swrb&n=100&delay=200"
    post = dict(method="POST", body="q=alpha")
    p = play(tmp_path, conf, [get(upstream, t, **post), advance(1.5), get(upstream, t, **post), sleep(1.0),
                              get(upstream, t, **post)])
    assert served(p.resps[1]) == served(p.resps[0]), p.describe()
    log = upstream_log(upstream, "swrb")
    assert served(p.resps[2]) != served(p.resps[0]), "the refresh must have replaced the entry:\n%s\n%s" % (
        p.describe(), log)
    assert [(e["method"], e["body_len"]) for e in log] == [("POST", 7)] * 2, log


def test_refresh_happens_off_the_apps_connection(upstream, tmp_path):
    """The stale answer arrives long before the refresh could (the upstream takes 1.5 s):
    timed from the client, the stale request's connection (connect to EOF) takes well
    under a second."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=1s stale_while_revalidate=30s")
    t = "/custom/swrt?tag=swrt&n=100&delay=1500"
    p = play(tmp_path, conf, [get(upstream, t), advance(1.5), get(upstream, t)])
    assert served(p.resps[1]) == served(p.resps[0]), p.describe()
    took = p.conns[1]["seconds"]
    assert p.conns[0]["seconds"] >= 1.4 and took < 1.0, \
        "the stale request waited for the refresh (%.2f s)\n%s" % (took, p.describe())


def test_response_swr_under_respect_cache_control(upstream, tmp_path):
    """respect_cache_control=yes and no stale option on the rule: the response's own
    `max-age=1, stale-while-revalidate=30` lets it be served stale."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=10m respect_cache_control=yes")
    t = "/custom/rswr?tag=rswr&n=200&h=Cache-Control:max-age%3D1,stale-while-revalidate%3D30"
    p = play(tmp_path, conf, [get(upstream, t), advance(1.6), get(upstream, t), sleep(1.0), get(upstream, t)])
    assert served(p.resps[1]) == served(p.resps[0]), p.describe()
    assert served(p.resps[2]) != served(p.resps[0]), p.describe()


def test_must_revalidate_forbids_stale(upstream, tmp_path):
    """With respect_cache_control=yes, `must-revalidate` forbids stale serving even though
    the rule allows 30 s of it: the request after the TTL waits for a fresh fetch."""
    conf = simple_conf(tmp_path, upstream,
                       "GET /custom* ttl=10m respect_cache_control=yes stale_while_revalidate=30s stale_if_error=30s")
    t = "/custom/mr?tag=mr&n=200&h=Cache-Control:max-age%3D1,must-revalidate"
    p = play(tmp_path, conf, [get(upstream, t), advance(1.6), get(upstream, t)])
    assert served(p.resps[1]) != served(p.resps[0]), p.describe()
    assert len(upstream_log(upstream, "mr")) == 2


# ------------------------------------------------------------------ stale-if-error
def test_stale_if_error_on_5xx(upstream, tmp_path):
    """ttl=1s, stale_if_error=60s; the upstream answers 503 after its first answer: the
    request after the TTL gets the stale 200 (its X-Served), not the 503."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=1s stale_if_error=60s")
    t = "/custom/sie?tag=sie&n=300&fail_after=1"
    p = play(tmp_path, conf, [get(upstream, t), advance(1.6), get(upstream, t)])
    assert_body(p, 0, 300)
    assert_body(p, 1, 300)
    assert served(p.resps[1]) == served(p.resps[0]), p.describe()
    assert len(upstream_log(upstream, "sie")) == 2, "the upstream was asked, and failed"


def test_stale_if_error_on_a_dropped_connection(upstream, tmp_path):
    """The upstream closes without answering after its first answer: stale 200 again."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=1s stale_if_error=60s")
    t = "/custom/sied?tag=sied&n=300&drop_after=1"
    p = play(tmp_path, conf, [get(upstream, t), advance(1.6), get(upstream, t)])
    assert_body(p, 1, 300)
    assert served(p.resps[1]) == served(p.resps[0]), p.describe()


def test_stale_if_error_window_ends(upstream, tmp_path):
    """stale_if_error=1s: 2.5 s after the TTL the window has passed and the 503 reaches
    the client, as it would direct."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=1s stale_if_error=1s")
    t = "/custom/siew?tag=siew&n=300&fail_after=1"
    p = play(tmp_path, conf, [get(upstream, t), advance(3.5), get(upstream, t)])
    assert p.resps[1]["status"] == 503, p.describe()


def test_without_stale_options_errors_reach_the_client(upstream, tmp_path):
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=1s")
    t = "/custom/nos?tag=nos&n=300&fail_after=1"
    p = play(tmp_path, conf, [get(upstream, t), advance(1.6), get(upstream, t)])
    assert p.resps[1]["status"] == 503, p.describe()


def test_stale_if_error_for_coalesced_waiters(upstream, tmp_path, sockdir):
    """After the TTL, while the upstream answers 503, a burst of 8 for the key: they wait on
    one fetch, which fails; every client gets the stale 200, and the upstream saw one
    request for the burst."""
    path = "/custom/siec?tag=siec&n=400&delay=300&fail_at=%d" % (now_ms() + 1200)
    conf = cache_conf(tmp_path, [(upstream, ["GET /custom* ttl=1s stale_if_error=60s"])])
    f = tmp_path / "paths.txt"
    later = json.dumps({"path": path, "delay_ms": 1800})
    f.write_text("\n".join([path] + [later] * 8) + "\n")
    r = run([SYS_PY, pyclient("poolclient.py"), "--port", upstream.port, "--paths-file", f,
             "--timeout", 30], conf=conf, timeout=90)
    reqs = [x for x in jlines(r.out) if "i" in x]
    assert r.rc == 0 and len(reqs) == 9, r.describe()
    assert all(x["status"] == 200 and x["body_len"] == 400 for x in reqs), reqs
    assert len({x["headers"]["x-served"] for x in reqs}) == 1, reqs
    assert len(upstream_log(upstream, "siec")) == 2, upstream_log(upstream, "siec")


# ------------------------------------------------------------------ revalidation
def test_expired_entry_with_etag_is_revalidated(upstream, tmp_path):
    """ttl=1s, an ETag: after the TTL the refetch carries If-None-Match; the upstream's 304
    renews the entry, and the client gets the whole 200 from it (the original X-Served);
    the next request is a plain hit."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=1s")
    t = "/custom/etag?tag=etag&n=600&etag=v1"
    p = play(tmp_path, conf, [get(upstream, t), advance(1.6), get(upstream, t), get(upstream, t)])
    for i in range(3):
        assert_body(p, i, 600)
    assert served(p.resps[1]) == served(p.resps[0]) == served(p.resps[2]), p.describe()
    assert hdr(p.resps[1], "ETag") == '"v1"'
    log = upstream_log(upstream, "etag")
    assert len(log) == 2, log
    assert header_of(log[0], "If-None-Match") == [] and header_of(log[1], "If-None-Match") == ['"v1"'], log


def test_an_expired_variant_is_revalidated_and_renewed_behind_its_vary_marker(upstream, tmp_path):
    """A `Vary` response with an ETag, ttl=1s: past the TTL the request that selects the
    variant still finds it through the marker that names the Vary headers, sends
    If-None-Match, and the 304 renews both, so the next expiry is revalidated again (the
    marker used to expire with the TTL alone: every request past it was a whole refetch)."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=1s")
    t = "/custom/varyetag?tag=varyetag&n=600&etag=v1&h=Vary:Accept-Encoding"
    g = get(upstream, t, headers=["Accept-Encoding: gzip"])
    p = play(tmp_path, conf, [g, advance(1.6), g, g, advance(1.6), g])
    for i in range(4):
        assert_body(p, i, 600)
    assert len({served(r) for r in p.resps}) == 1, p.describe()
    log = upstream_log(upstream, "varyetag")
    assert [header_of(e, "If-None-Match") for e in log] == [[], ['"v1"'], ['"v1"']], log


def test_expired_entry_with_last_modified_is_revalidated(upstream, tmp_path):
    lm = "Tue, 01 Dec 2026 10:00:00 GMT"
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=1s")
    t = "/custom/lm?tag=lm&n=600&lm=" + lm.replace(" ", "%20").replace(",", "%2C")
    p = play(tmp_path, conf, [get(upstream, t), advance(1.6), get(upstream, t)])
    assert_body(p, 1, 600)
    assert served(p.resps[1]) == served(p.resps[0]), p.describe()
    log = upstream_log(upstream, "lm")
    assert header_of(log[1], "If-Modified-Since") == [lm], log


def test_background_refresh_is_conditional(upstream, tmp_path):
    """The background refresh of a stale-while-revalidate entry carries its ETag; the 304
    renews the entry in place (the same X-Served afterwards, no second body fetched)."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=1s stale_while_revalidate=30s")
    t = "/custom/swre?tag=swre&n=300&etag=e7"
    p = play(tmp_path, conf, [get(upstream, t), advance(1.5), get(upstream, t), sleep(0.8), get(upstream, t)])
    assert served(p.resps[0]) == served(p.resps[1]) == served(p.resps[2]), p.describe()
    log = upstream_log(upstream, "swre")
    assert len(log) == 2 and header_of(log[1], "If-None-Match") == ['"e7"'], log


def test_client_conditional_get_answered_304(upstream, tmp_path):
    """A fresh entry with an ETag and a Last-Modified: If-None-Match naming it gets 304 from
    the cache (ETag, no body); another tag gets the 200; If-Modified-Since at or after the
    Last-Modified gets 304; If-None-Match: * gets 304 for an entry without an ETag too (RFC
    9110 13.1.2: any current representation); the upstream saw one request for each."""
    lm = "Tue, 01 Dec 2026 10:00:00 GMT"
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=10m")
    t = "/custom/cond?tag=cond&n=700&etag=abc&lm=" + lm.replace(" ", "%20").replace(",", "%2C")
    t2 = "/custom/cond?tag=anystar&n=70"
    p = play(tmp_path, conf, [
        get(upstream, t),
        conn(rq(upstream, t, headers=['If-None-Match: "abc"'])),
        conn(rq(upstream, t, headers=['If-None-Match: W/"zzz", W/"abc"'])),
        conn(rq(upstream, t, headers=['If-None-Match: "other"'])),
        conn(rq(upstream, t, headers=["If-Modified-Since: " + lm])),
        conn(rq(upstream, t, headers=["If-Modified-Since: Mon, 30 Nov 2026 10:00:00 GMT"])),
        get(upstream, t2),
        conn(rq(upstream, t2, headers=["If-None-Match: *"])),
    ])
    assert_body(p, 0, 700)
    r = p.resps[7]                     # (* is any current representation, with an ETag or not)
    assert r["status"] == 304 and r["body_len"] == 0 and hdr(r, "ETag") is None, p.describe()
    assert len(upstream_log(upstream, "anystar")) == 1
    for i in (1, 2, 4):
        r = p.resps[i]
        assert r["status"] == 304 and r["body_len"] == 0 and hdr(r, "ETag") == '"abc"', p.describe()
        assert hdr(r, "Content-Length") is None, p.describe()
    assert_body(p, 3, 700)
    assert_body(p, 5, 700)
    assert len(upstream_log(upstream, "cond")) == 1


# ------------------------------------------------------------------ Redis keeps stale entries
def entries_for(redis, text):
    """The Redis entries whose cache key (carried inside the value; the key's name is a
    hash) contains text."""
    return [k for k in redis.scan("httpshim:*") if not k.endswith(b":lock") and text in (redis.cmd("GET", k) or b"")]


def test_redis_keeps_stale_entries_for_the_window(upstream, redis, tmp_path):  # noqa: F811
    """With the Redis tier, an entry is written with PX = TTL + the stale window, and its
    fresh-until time in the value: a second process, after the TTL, gets it stale at once
    (and refreshes it)."""
    conf = cache_conf(tmp_path, [(upstream, ["GET /custom* ttl=2s stale_while_revalidate=60s"])],
                      cache=redis_url(redis))
    t = "/custom/rs?tag=rs&n=400"
    p1 = play(tmp_path, conf, [get(upstream, t)])
    keys = entries_for(redis, b"tag=rs")
    assert len(keys) == 1, keys
    pttl = int(redis.cmd("PTTL", keys[0]))
    assert 55000 < pttl <= 62000, pttl
    time.sleep(2.5)
    p2 = play(tmp_path, conf, [get(upstream, t), sleep(1.0)])
    assert served(p2.resps[0]) == served(p1.resps[0]), p2.describe()
    assert len(upstream_log(upstream, "rs")) == 2, "a background refresh after the stale answer"


def test_304_renews_the_redis_copy(upstream, redis, tmp_path):  # noqa: F811
    """Redis tier, ttl=2s, an ETag: after the TTL a process revalidates (If-None-Match, 304)
    and the renewed entry is written back: its PTTL is a fresh TTL + the revalidation
    window again, and a new process then gets it as a plain fresh hit (no upstream
    request)."""
    conf = cache_conf(tmp_path, [(upstream, ["GET /custom* ttl=2s"])], cache=redis_url(redis))
    t = "/custom/r304?tag=r304&n=300&etag=rv"
    p1 = play(tmp_path, conf, [get(upstream, t)])
    key = entries_for(redis, b"tag=r304")[0]
    time.sleep(2.3)
    p2 = play(tmp_path, conf, [get(upstream, t)])
    assert served(p2.resps[0]) == served(p1.resps[0]), p2.describe()
    log = upstream_log(upstream, "r304")
    assert len(log) == 2 and header_of(log[1], "If-None-Match") == ['"rv"'], log
    pttl = int(redis.cmd("PTTL", key))
    assert 3000 < pttl <= 4000, "renewed: ttl 2 s + kept 2 s more for the next revalidation, got %d" % pttl
    p3 = play(tmp_path, conf, [get(upstream, t)])
    assert served(p3.resps[0]) == served(p1.resps[0]) and len(upstream_log(upstream, "r304")) == 2, p3.describe()


def test_the_test_clock_is_off_without_its_variable(upstream, tmp_path):
    """Without HTTPSHIM_TEST_CLOCK=1 a process's stats socket has no /test/clock (404): no
    one can age another process's entries."""
    import pathlib
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=1s")
    t = "/custom/clockoff?tag=clockoff&n=100"
    spec = pathlib.Path(tmp_path) / "clockoff.json"
    spec.write_text(json.dumps({"host": "127.0.0.1", "timeout": 20,
                                "steps": [get(upstream, t), advance(5), get(upstream, t)]}))
    r = run([SYS_PY, pyclient("cacheclient.py"), "--spec", spec], conf=conf, timeout=60)
    assert r.rc != 0 and b"test clock not advanced" in r.err and b"404" in r.err, r.describe()
