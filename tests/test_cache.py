"""Real-client tests of httpshim's in-process cache (the memory tier).

The cache lives in each client process, so every "the second request is a hit" check
runs several requests from ONE process: tests/pyclients/cacheclient.py (a scripted
raw-socket client, one connection per step), curl with several URLs, or
build/epollclient --count N. Whether a response came from the cache is read from the
upstream (its request counter and log) and from the `X-Served` header of
tests/upstream.py's /custom path: a per-server counter, so a replayed response carries
the same value and a fresh one a new value.
"""

import hashlib
import itertools
import json
import re
from pathlib import Path

import pytest

from conftest import (SYS_PY, ROOT, Upstream, hop_by_hop, jlines, pyclient,
                      run, write_rules)
from upstream import geo_document, pattern
from rawclient import parse_responses

CURL = ["curl", "-s", "-S", "--max-time", "20"]
TTL_SLEEP = 1.6          # past a 1 s lifetime, with margin for a slow machine


# ------------------------------------------------------------------ fixtures




# ------------------------------------------------------------------ rules
def cache_conf(tmp, blocks, cache="memory", memory_max=None, max_object=None,
               name="cache.conf"):
    """A rules file: `blocks` is [(upstream or port, ["GET /glob ttl=..", ...]), ...]."""
    lines = ["# written by tests/test_cache.py", "[global]", "pool_max_per_host = 4",
             "upstream_timeout  = 5s", "cache = %s" % cache]
    if cache.startswith("redis"):
        # (these tests are about what the tier keeps, not its failure bound: a first lookup
        # past the default 50 ms, on a loaded machine at the suite's start, failed open and
        # went upstream: test_stale.py's stale Redis entry, in a CI run)
        lines.append("redis_timeout = 1s")
    if memory_max:
        lines.append("memory_max = %s" % memory_max)
    if max_object:
        lines.append("max_object = %s" % max_object)
    for up, rules in blocks:
        port = up if isinstance(up, int) else up.port
        lines += ["", "[upstream 127.0.0.1:%d]" % port] + ["cache %s" % r for r in rules]
    return write_rules(tmp, [], name=name, raw="\n".join(lines) + "\n")


def simple_conf(tmp, up, *rules, **kw):
    return cache_conf(tmp, [(up, list(rules) or ["GET /custom* ttl=10m"])], **kw)


# ------------------------------------------------------------------ requests
def rq(up, target, method="GET", headers=(), version="HTTP/1.1", close=True, body=None,
       host=None):
    """One request for cacheclient.py. close: HTTP/1.1 sends `Connection: close`;
    HTTP/1.0 sends `Connection: keep-alive` unless close. host=False: no Host line."""
    lines = ["%s %s %s" % (method, target, version)]
    if host is not False and "host" not in [h.split(":", 1)[0].strip().lower() for h in headers]:
        lines.append("Host: %s" % (host or "127.0.0.1:%d" % up.port))
    lines += list(headers)
    if version == "HTTP/1.1" and close:
        lines.append("Connection: close")
    if version == "HTTP/1.0" and not close:
        lines.append("Connection: keep-alive")
    if body is not None:
        lines.append("Content-Length: %d" % len(body))
    return {"raw": "\r\n".join(lines) + "\r\n\r\n" + (body or ""), "method": method,
            "port": up.port, "close": close}


def conn(*reqs, mode="sequential", wait_eof=None):
    """One connection carrying `reqs` (all to the same upstream)."""
    if wait_eof is None:
        wait_eof = reqs[-1]["close"]
    return {"port": reqs[0]["port"], "mode": mode, "wait_eof": wait_eof,
            "requests": [{"raw": r["raw"], "method": r["method"]} for r in reqs]}


def get(up, target, **kw):
    """A connection of its own carrying one request (Connection: close)."""
    return conn(rq(up, target, **kw))


def sleep(s=TTL_SLEEP):
    return {"sleep": s}


def advance(s):
    """Moves the client process's test clock (HTTPSHIM_TEST_CLOCK=1) s seconds forward."""
    return {"advance": s}


class Play(object):
    """What one cacheclient.py process saw: .conns (one report per connection) and
    .resps (the responses, one per request, None where none arrived)."""

    def __init__(self, conns, steps, result):
        self.conns = conns
        self.result = result
        self.resps = []
        for c in conns:
            n = len(steps[c["step"]]["requests"])
            rs = c["responses"][:n]
            rs = [r if "garbage" not in r else None for r in rs]
            self.resps += rs + [None] * (n - len(rs))

    def describe(self):
        rows = []
        for i, r in enumerate(self.resps):
            if r is None:
                rows.append("  #%d: no response" % i)
                continue
            rows.append("  #%d: %s %s len=%s complete=%s X-Served=%s X-Tag=%s Age=%s" % (
                i, r["version"], r["status"], r["body_len"], r["complete"], served(r),
                hdr(r, "X-Tag"), hdr(r, "Age")))
        bad = [c for c in self.conns if c["timed_out"] or c["connect"] != "ok" or
               any("garbage" in x for x in c["responses"])]
        return "\n".join(rows) + ("\nbad connections: %s" % bad if bad else "") + \
            "\n" + self.result.describe()


_SPEC_IDS = itertools.count()


def play(tmp, conf, steps, shim=True, timeout=20):
    """Runs the steps in one cacheclient.py process (with the shim unless shim=False)."""
    spec = Path(tmp) / ("spec%d.json" % next(_SPEC_IDS))
    spec.write_text(json.dumps({"host": "127.0.0.1", "timeout": timeout,
                                "steps": steps}))
    n_conns = len([s for s in steps if "port" in s])
    clock = {"HTTPSHIM_TEST_CLOCK": "1"} if any("advance" in s for s in steps) else None
    r = run([SYS_PY, pyclient("cacheclient.py"), "--spec", spec], shim=shim, conf=conf,
            timeout=60 + timeout * n_conns, env=clock)
    lines = jlines(r.out)
    done = [x for x in lines if x.get("done")]
    assert r.rc == 0 and done, r.describe()
    if shim:
        assert done[0]["engine"] is True, "client not diverted:\n" + r.describe()
    return Play([x for x in lines if "step" in x], steps, r)


# ------------------------------------------------------------------ response checks
def hdrs(resp, name):
    return [v for k, v in resp["headers"] if k.lower() == name.lower()]


def hdr(resp, name):
    v = hdrs(resp, name)
    return v[0] if v else None


def served(resp):
    return hdr(resp, "X-Served") if resp else None


def sha(n):
    return hashlib.sha256(pattern(n)).hexdigest()


def assert_body(p, i, n, status=200):
    r = p.resps[i]
    assert r is not None and r["complete"] and r["status"] == status and \
        r["body_len"] == n and r["body_sha256"] == sha(n), \
        "response #%d: want a complete %d with %d pattern bytes\n%s" % (i, status, n,
                                                                        p.describe())


def upstream_log(up):
    return [e for e in up.stats()["log"] if e.get("kind") == "http"]


def log_desc(up):
    st = up.stats()
    return "upstream requests=%d connections=%d log=%s" % (
        st["requests"], st["connections"],
        [(e.get("method"), e.get("target")) for e in st["log"]])


def assert_sources(p, up, want, complete=True, upstream_requests=None):
    """want: one letter per response; equal letters must carry the same X-Served (one
    came from the cache), different letters different ones (separate upstream
    fetches). The upstream must have seen one request per distinct letter."""
    got = [served(r) for r in p.resps]
    detail = "want sources %s, got X-Served %s\n%s\n%s" % (
        want, got, log_desc(up), p.describe())
    assert len(got) == len(want) and None not in got, detail
    if complete:
        assert all(r["complete"] for r in p.resps), detail
    for i in range(len(want)):
        for j in range(i + 1, len(want)):
            same_w, same_g = want[i] == want[j], got[i] == got[j]
            assert same_w == same_g, "responses #%d and #%d: %s\n%s" % (
                i, j, "should be one response replayed from the cache" if same_w else
                "must not share a cache entry", detail)
    n = len(set(want)) if upstream_requests is None else upstream_requests
    assert up.stats()["requests"] == n, "upstream should have seen %d requests\n%s" % (
        n, detail)


def e2e(resp, drop=("age",)):
    """End-to-end headers as a sorted list (hop-by-hop and `drop` left out)."""
    return sorted((k.lower(), v) for k, v in resp["headers"]
                  if not hop_by_hop(k) and k.lower() not in drop)


def assert_age(resp, detail="", upstream_age=0):
    ages = hdrs(resp, "Age")
    assert len(ages) == 1 and ages[0].isdigit() and upstream_age <= int(ages[0]) < upstream_age + 100, \
        "a hit carries exactly one Age header, the shim's own (seconds since stored, plus the Age " \
        "the upstream's answer came with: %d); got %s\n%s" % (upstream_age, ages, detail)


# ================================================================== tests
def test_second_get_is_a_hit(upstream, tmp_path):
    """The second identical GET (own connection, same process) never reaches the
    upstream; it replays the status, end-to-end headers and body with an Age header."""
    conf = simple_conf(tmp_path, upstream)
    t = ("/custom?tag=basic&n=5000&h=Content-Type:text/plain&h=ETag:%22v1%22"
         "&h=Cache-Control:public%2C%20max-age%3D600&h=X-Multi:a&h=X-Multi:b"
         "&h=Age:1000&h=Keep-Alive:timeout%3D5")
    p = play(tmp_path, conf, [get(upstream, t), get(upstream, t), get(upstream, t)])
    assert_sources(p, upstream, "aaa")
    miss, hit = p.resps[0], p.resps[1]
    for i in range(3):
        assert_body(p, i, 5000)
    log = upstream_log(upstream)
    assert [(e["method"], e["target"]) for e in log] == [("GET", t)], log_desc(upstream)
    assert upstream.stats()["connections"] == 1, \
        "a hit opened an upstream connection: " + log_desc(upstream)
    assert e2e(hit) == e2e(miss), \
        "the hit's end-to-end headers differ from the original response's:\n%s\n%s" % (
            e2e(hit), e2e(miss))
    assert hdrs(hit, "X-Multi") == ["a", "b"] and hdrs(hit, "Content-Length") == ["5000"]
    assert not hdrs(hit, "Transfer-Encoding") and not hdrs(hit, "Keep-Alive"), hit
    assert hit["version"] == "HTTP/1.1" and hit["status"] == 200, hit
    assert [v.lower() for v in hdrs(hit, "Connection")] == ["close"], \
        "an HTTP/1.1 request with Connection: close gets Connection: close: %s" % hit
    for r in p.resps[1:]:
        assert_age(r, p.describe(), upstream_age=1000)
    assert all(c["eof"] for c in p.conns), "connections not closed after " \
        "Connection: close\n" + p.describe()


def test_random_pipelines_answer_as_direct(upstream, tmp_path):
    """10 seeds x 80 turns of 1 to 3 requests in one write (tests/pyclients/httpdiff.py):
    cacheable GETs framed by length and by chunks, HEADs, statuses, conditional GETs, Vary,
    trailers, no-store, and what the cache passes by (POST and PUT with every body framing,
    Expect, DELETE, OPTIONS), HTTP/1.1 and 1.0: under the shim, with every GET path
    cached, each response the app reads equal to direct's, and fewer upstream requests."""
    cmd = [SYS_PY, pyclient("httpdiff.py"), "--port", upstream.port, "--seeds", "1-10", "--steps", "80"]
    direct = run(cmd, shim=False, timeout=120)
    sent = upstream.stats()["requests"]
    upstream.reset()
    conf = simple_conf(tmp_path, upstream, "GET /bytes/* ttl=10m", "GET /chunked/* ttl=10m",
                       "GET /custom* ttl=10m", "GET /status/* ttl=10m")
    shimmed = run(cmd, conf=conf, timeout=120)
    assert direct.rc == 0 and shimmed.rc == 0, (direct.describe(), shimmed.describe())
    d, s = jlines(direct.out), jlines(shimmed.out)
    assert len(d) == 10, direct.describe()
    for a, b in zip(d, s):
        for k, (x, y) in enumerate(zip(a["log"], b["log"])):
            assert x == y, "seed %d turn %d:\ndirect: %s\nshim:   %s" % (a["seed"], k, x, y)
    assert len(s) == len(d) and [len(x["log"]) for x in s] == [len(x["log"]) for x in d]
    assert upstream.stats()["requests"] < sent * 0.85, (sent, upstream.summary())   # (1059 of 1430)


def test_curl_repeated_url_is_a_hit(upstream, tmp_path):
    """curl URL URL URL (one process, one kept-alive connection): one upstream request,
    three identical bodies."""
    conf = simple_conf(tmp_path, upstream)
    url = upstream.url("/custom?tag=curl&n=20000")
    cmd = ["curl"]
    for i in range(3):
        cmd += (["--next"] if i else []) + CURL[1:] + [
            "-D", tmp_path / ("h%d" % i), "-o", tmp_path / ("b%d" % i), url]
    r = run(cmd, shim=True, conf=conf)
    assert r.rc == 0, r.describe()
    bodies = [(tmp_path / ("b%d" % i)).read_bytes() for i in range(3)]
    heads = [(tmp_path / ("h%d" % i)).read_text() for i in range(3)]
    assert bodies == [pattern(20000)] * 3, [len(b) for b in bodies]
    st = upstream.stats()
    assert st["requests"] == 1, "%s\n%s" % (log_desc(upstream), heads)
    xs = [[ln for ln in h.splitlines() if ln.lower().startswith("x-served:")] for h in heads]
    assert xs[0] == xs[1] == xs[2] and xs[0], heads
    assert "age:" in heads[1].lower() and "age:" in heads[2].lower(), heads


def test_ttl_expiry_refetches(upstream, tmp_path):
    """ttl=1s expires (a refetch), while the next rule's ttl=10m does not: the first
    matching rule wins, and `*` crosses `/`."""
    conf = simple_conf(tmp_path, upstream, "GET /custom/short* ttl=1s",
                       "GET /custom/* ttl=10m")
    short, deep = "/custom/short?tag=ttl&n=300", "/custom/long/x/y?tag=deep&n=300"
    p = play(tmp_path, conf, [get(upstream, short), get(upstream, short),
                              get(upstream, deep), get(upstream, deep), advance(TTL_SLEEP),
                              get(upstream, short), get(upstream, short),
                              get(upstream, deep)])
    assert_sources(p, upstream, "aabbccb")
    for i in range(7):
        assert_body(p, i, 300)
    age = hdr(p.resps[6], "Age")
    assert age is not None and age.isdigit() and 1 <= int(age) < 100, \
        "Age of a hit stored %.1f s earlier (test clock): %s\n%s" % (TTL_SLEEP, age, p.describe())


def test_ignore_query(upstream, tmp_path):
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=10m ignore_query=sign,ts")
    targets = ["/custom?tag=q&sign=1",               # a: miss
               "/custom?sign=2&tag=q&ts=7",          # a: only ignored params differ
               "/custom?tag=q",                      # a: none of them at all
               "/custom?tag=q&sign",                 # a: an ignored name without a value
               "/custom?tag=q&signx=1",              # b: not an ignored name
               "/custom?tag=q&other=1&sign=5",       # c: another param differs
               "/custom?tag=q&ts=3&other=1",         # c
               "/custom?tag=q&other=2"]              # d
    p = play(tmp_path, conf, [get(upstream, t) for t in targets])
    assert_sources(p, upstream, "aaaabccd")
    got = [e["target"] for e in upstream_log(upstream)]
    assert got == [targets[0], targets[4], targets[5], targets[7]], \
        "the upstream must get the request target as sent (ignored params included): %s" \
        % got


def test_a_query_is_keyed_as_the_upstream_receives_it(upstream, tmp_path):
    """An empty parameter or a bare `?` makes a target of its own (an upstream that signs or
    logs its query tells them apart): each is fetched once, then each is a hit on its own
    answer, never on another target's."""
    conf = simple_conf(tmp_path, upstream)
    targets = ["/custom?tag=e&n=7", "/custom?tag=e&&n=7", "/custom?tag=e&n=7&", "/custom?&tag=e&n=7",
               "/custom/e?", "/custom/e"]
    p = play(tmp_path, conf, [get(upstream, t) for t in targets + targets])
    assert_sources(p, upstream, "abcdefabcdef")
    assert [e["target"] for e in upstream_log(upstream)] == targets


def test_a_precondition_on_the_upstreams_state_is_the_upstreams_to_answer(upstream, tmp_path):
    """If-Match and If-Unmodified-Since ask about the upstream's current state (a 412 is its
    to say): such a GET is never answered from the cache, nor is its answer stored."""
    conf = simple_conf(tmp_path, upstream)
    t = "/custom?tag=pre&etag=v1&lm=Mon,%2001%20Jan%202024%2000:00:00%20GMT"
    p = play(tmp_path, conf, [get(upstream, t), get(upstream, t, headers=['If-Match: "other"']),
                              get(upstream, t, headers=["If-Unmodified-Since: Sun, 31 Dec 2023 00:00:00 GMT"]),
                              get(upstream, t)])
    assert_sources(p, upstream, "abca")


def test_authorization_never_shared(upstream, tmp_path):
    conf = simple_conf(tmp_path, upstream)
    t = "/custom?tag=auth"

    def g(auth):
        return get(upstream, t, headers=["Authorization: %s" % auth] if auth else [])

    p = play(tmp_path, conf, [g("Bearer alpha"), g("Bearer beta"), g("Bearer alpha"),
                              g(None), g(None), g("Bearer beta"), g("bearer alpha")])
    assert_sources(p, upstream, "abaccbd")
    auths = [[v for k, v in e["headers"] if k.lower() == "authorization"]
             for e in upstream_log(upstream)]
    assert auths == [["Bearer alpha"], ["Bearer beta"], [], ["bearer alpha"]], auths


def test_key_headers(upstream, tmp_path):
    conf = simple_conf(tmp_path, upstream,
                       "GET /custom* ttl=10m key_headers=Accept-Language")
    t = "/custom?tag=lang"

    def g(*h):
        return get(upstream, t, headers=list(h))

    p = play(tmp_path, conf, [g("Accept-Language: en"), g("Accept-Language: fr"),
                              g("Accept-Language: en"), g(), g(),
                              g("accept-language: en"), g("Accept-Language: fr"),
                              g("Accept-Language: de")])
    assert_sources(p, upstream, "abaccabd")


def test_host_header_does_not_pick_the_entry(upstream, upstream_b, tmp_path):
    """The key starts with the rule's host:port, then the request's own authority: a
    request to A that claims `Host: B` is stored under A (for that authority), never
    where a request to B would find it, and a later request to B is answered by B."""
    rule = ["GET /custom* ttl=10m"]
    conf = cache_conf(tmp_path, [(upstream, rule), (upstream_b, rule)])
    t = "/custom?tag=spoof&n=700"
    a_host, b_host = "127.0.0.1:%d" % upstream.port, "127.0.0.1:%d" % upstream_b.port
    p = play(tmp_path, conf, [get(upstream, t, host=b_host),    # 0: to A, Host: B
                              get(upstream_b, t),                # 1: to B
                              get(upstream, t),                  # 2: to A, Host: A
                              get(upstream_b, t, host=a_host),   # 3: to B, Host: A
                              get(upstream, t, host=b_host),     # 4: #0's entry
                              get(upstream_b, t)])               # 5: #1's entry
    detail = "%s\nA: %s\nB: %s" % (p.describe(), log_desc(upstream), log_desc(upstream_b))
    for i in range(6):
        assert_body(p, i, 700)
    assert upstream_b.stats()["requests"] == 2, \
        "B's responses must come from B (never A's entries)\n" + detail
    assert upstream.stats()["requests"] == 2, detail
    xs = [served(r) for r in p.resps]
    # each server numbers its own responses; tell them apart by which upstream logged what
    assert xs[4] == xs[0] and xs[5] == xs[1], detail
    assert xs[2] != xs[0] and xs[3] != xs[1], detail


def test_authority_joins_the_key(upstream, tmp_path):
    """Name-based virtual hosts behind one address do not share entries: the Host header
    (case and the default port normalised) and an absolute-form target's authority are
    part of the key."""
    conf = simple_conf(tmp_path, upstream)
    t = "/custom?tag=vhost"
    p = play(tmp_path, conf, [get(upstream, t, host="api.example"),          # a
                              get(upstream, t, host="www.example"),          # b
                              get(upstream, t, host="API.Example:80"),       # a
                              get(upstream, "http://www.example" + t,
                                  host="www.example"),                       # b (absolute-form)
                              get(upstream, t, host="api.example:8080")])    # c
    assert_sources(p, upstream, "ababc")


def test_an_absolute_target_that_disagrees_with_its_request_is_not_cached(upstream, tmp_path):
    """An absolute-form target whose authority is not the Host header's (the upstream
    answers by the Host it is sent), one with another scheme than the connection's, or one
    carrying userinfo: neither stored nor answered from the cache. Before, `GET
    http://victim.example/x` with `Host: attacker.example` stored the attacker's answer
    under victim.example, for every later `Host: victim.example` request."""
    conf = simple_conf(tmp_path, upstream)
    t = "/custom?tag=auth"
    p = play(tmp_path, conf, [get(upstream, "http://victim.example" + t, host="attacker.example"),   # a
                              get(upstream, t, host="victim.example"),                                # b
                              get(upstream, "http://bob:pw@victim.example" + t, host="victim.example"),   # c
                              get(upstream, t, host="victim.example")])                               # b
    assert_sources(p, upstream, "abcb")
    q = play(tmp_path, conf, [get(upstream, "https://victim.example" + t, host="victim.example")])
    assert q.resps[0]["status"] == 404, q.describe()   # the upstream's own answer, not the stored 200


def test_a_request_without_host_is_never_keyed_by_an_authority_it_does_not_send(upstream, tmp_path):
    """HTTP/1.0 may leave Host out. Such a request is neither stored nor answered from the
    cache, and an absolute target's authority goes upstream as its Host (what the upstream
    answers for, direct). Before, `GET http://victim.example/x HTTP/1.0` went upstream with
    libcurl's Host (the upstream's own address) and its answer was stored under victim.example,
    for every later `Host: victim.example` request; and an origin-form one was stored under an
    empty Host, for a later `Host:` (found by an adversarial pass)."""
    conf = simple_conf(tmp_path, upstream)
    t = "/custom?tag=nohost"
    p = play(tmp_path, conf, [get(upstream, "http://victim.example" + t, version="HTTP/1.0", host=False),   # a
                              get(upstream, t, host="victim.example"),                                     # b
                              get(upstream, t, version="HTTP/1.0", host=False),                            # c
                              get(upstream, t, headers=["Host:"]),                                         # d
                              get(upstream, t, host="victim.example")])                                    # b
    assert_sources(p, upstream, "abcdb")
    sent = [dict((k.lower(), v) for k, v in e["headers"]) for e in upstream.stats()["log"] if e.get("method")]
    assert sent[0].get("host") == "victim.example", sent


def test_header_lines_are_keyed_apart_from_one_joined_line(upstream, tmp_path):
    """A key header said on two lines (`X-Tenant: a`, `X-Tenant: b`) is not the same request
    as one line `X-Tenant: a, b`: an upstream that takes a singleton header's last line
    answers b for the first. Before, both were keyed as "a, b" and shared an entry."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=10m key_headers=X-Tenant")
    t = "/custom?tag=lines"
    p = play(tmp_path, conf, [get(upstream, t, headers=["X-Tenant: a", "X-Tenant: b"]),
                              get(upstream, t, headers=["X-Tenant: a, b"]),
                              get(upstream, t, headers=["X-Tenant: a", "X-Tenant: b"])])
    assert_sources(p, upstream, "aba")


def test_an_authority_ends_at_a_query_or_a_fragment(upstream, tmp_path):
    """`http://h#f/custom` has the authority h and no path ('#' ends the authority, RFC 3986
    3.2): it names no path a rule caches. Before, the key's path began at the first '/' after
    "://", so it was stored as /custom under h#f and served to a later `GET /custom` with
    that Host, though the upstream was asked for something else."""
    conf = simple_conf(tmp_path, upstream)
    p = play(tmp_path, conf, [get(upstream, "http://h#f/custom?tag=auth", host="h#f"),
                              get(upstream, "/custom?tag=auth", host="h#f"),
                              get(upstream, "/custom?tag=auth", host="h#f")])
    assert_sources(p, upstream, "abb")


@pytest.mark.parametrize("path", ["/custom/public/../me", "/custom/public/%2e%2e/me", "/custom/public/x/../../me",
                                  "/custom/public/./me", "/custom/public%2f..%2fme", "/custom/public/..\\me",
                                  "/custom/public/..;x/me"])
def test_a_path_with_dot_segments_is_not_cached(path, upstream, tmp_path):
    """A dot-segment (or an encoded dot or slash) takes a request out of the path its rule's
    glob names, where the upstream resolves it (nginx serves `/public/../api/me` as
    `/api/me`, which no rule lists and which may answer per user): such a request is
    forwarded, never stored or answered from the cache. Before, two users' requests for
    `/public/../api/me` got the first one's answer."""
    conf = simple_conf(tmp_path, upstream, "GET /custom/public/* ttl=10m")
    p = play(tmp_path, conf, [get(upstream, path + "?n=10", headers=["X-Token: alice"]),
                              get(upstream, path + "?n=10", headers=["X-Token: bob"])])
    assert_sources(p, upstream, "ab")
    q = play(tmp_path, conf, [get(upstream, "/custom/public/me?n=10"), get(upstream, "/custom/public/me?n=10")])
    assert [served(r) for r in q.resps][0] == served(q.resps[1]), q.describe()   # (the plain path is cached)


def test_an_expires_in_the_past_with_an_invalid_date_is_not_stored(upstream, tmp_path):
    """respect_cache_control: `Expires` in the past with a `Date` that does not parse is
    measured from the time the response arrived (RFC 9110 6.6.1): already expired, not
    stored. Before, the invalid Date counted as 1970 and the entry lived the rule's ttl."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=10m respect_cache_control=yes")
    t = "/custom?h=Expires:Thu,%2001%20Jan%202000%2000:00:00%20GMT&h=Date:garbage&tag=exp"
    p = play(tmp_path, conf, [get(upstream, t), get(upstream, t)])
    assert_sources(p, upstream, "ab")


def test_a_length_with_white_space_before_its_colon_is_never_believed(upstream, tmp_path):
    """`Content-Length : 3` (RFC 9112 5.1 forbids the white space; libcurl does not frame
    by it): the exchange fails, so the app never reads the 3 bytes it names and then the
    rest as the answer to its next request, and nothing is stored. Before, the app's next
    request on the connection was answered by bytes the upstream chose (`X-Smuggled`), and
    a body cut at 3 bytes was cached for everyone."""
    conf = simple_conf(tmp_path, upstream, "GET /odd/* ttl=10m")
    keep = conn(rq(upstream, "/odd/spacedlength", close=False), rq(upstream, "/custom/next?n=5"))
    p = play(tmp_path, conf, [keep, get(upstream, "/odd/spacedlength")])
    smuggled = [r for r in p.resps if r and hdr(r, "X-Smuggled")]
    assert not smuggled, p.describe()
    assert all(r is None or r["body_len"] != 3 for r in p.resps), p.describe()
    assert len([e for e in upstream_log(upstream) if e["target"] == "/odd/spacedlength"]) == 2, log_desc(upstream)


def test_header_lines_that_are_not_fields_are_dropped_not_fatal(upstream, tmp_path):
    """Field names that are not tokens (a space, parentheses): lenient clients and libcurl
    take the response; the shim drops those lines (never relayed) and the response still
    reaches the app, unstored. Before, the exchange failed and the app saw an empty reply.
    (A line without any colon libcurl refuses itself: the exchange fails, as curl's does.)"""
    conf = simple_conf(tmp_path, upstream, "GET /odd/* ttl=10m")
    p = play(tmp_path, conf, [get(upstream, "/odd/badname"), get(upstream, "/odd/badname")])
    assert [r and (r["status"], r["body_len"]) for r in p.resps] == [(200, 5), (200, 5)], p.describe()
    assert served(p.resps[0]) != served(p.resps[1]), p.describe()
    assert not any(hdr(r, "Bad Name") for r in p.resps), p.describe()


def test_a_post_is_never_sent_twice(upstream, tmp_path):
    """A POST on a pooled connection that the upstream closes without answering: libcurl
    would send it again on a new connection, and the upstream would act on it twice (a
    payment charged twice). The app sees its connection end unanswered, as direct, and the
    upstream receives the POST once. A GET is still retried (idempotent)."""
    conf = simple_conf(tmp_path, upstream, "GET /nothing ttl=1m")
    steps = [get(upstream, "/custom/warm?n=5"), sleep(0.2),
             get(upstream, "/custom/pay?drop_after=0&tag=p1", method="POST", body="amount=1000")]
    for shim in (False, True):
        upstream.reset()
        p = play(tmp_path, conf, steps, shim=shim)
        posts = [e for e in upstream_log(upstream) if e["method"] == "POST"]
        assert len(posts) == 1, (shim, log_desc(upstream))
        assert p.resps[1] is None, p.describe()


def test_an_upstream_caches_age_counts(upstream, tmp_path):
    """An upstream that is itself a cache says how old its answer is (Age: 100): a hit's
    Age counts it (RFC 9111 4.2.3), and with respect_cache_control the entry lives only what
    is left of its max-age (103 - 100 s), not the whole of it. (The Age was dropped: hits
    said Age: 0, and the entry lived 103 s more.)"""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=10m respect_cache_control=yes")
    aged = "/custom?tag=aged&h=Age:100&h=Cache-Control:max-age%3D103"
    young = "/custom?tag=young&h=Cache-Control:max-age%3D103"
    p = play(tmp_path, conf, [get(upstream, aged), get(upstream, young), get(upstream, aged), advance(5),
                              get(upstream, aged), get(upstream, young)])
    assert_sources(p, upstream, "abacb")
    assert 100 <= int(hdr(p.resps[2], "age")) < 110, p.describe()
    assert 5 <= int(hdr(p.resps[4], "age")) < 15, p.describe()


def test_a_request_saying_no_store_is_not_stored(upstream, tmp_path):
    """`Cache-Control: no-store` on a request: its response is not stored (RFC 9111
    5.2.1.5: MUST NOT), while an entry stored for another request may still answer it."""
    conf = simple_conf(tmp_path, upstream)
    t = "/custom?tag=reqns"
    ns = dict(headers=["Cache-Control: max-age=0, No-Store"])
    p = play(tmp_path, conf, [get(upstream, t, **ns), get(upstream, t), get(upstream, t, **ns), get(upstream, t)])
    assert_sources(p, upstream, "abbb")


def test_a_range_request_goes_to_the_upstream(upstream, tmp_path):
    """A request with a Range header is neither answered from a stored whole nor stored:
    it gets the upstream's 206 as direct would, and the entry stays for whole requests. A
    curl resuming a download (-C) in the same process as the whole fetch gets its 206 and
    the right bytes (from a stored whole it would have got a 200 and exit 33)."""
    conf = simple_conf(tmp_path, upstream, "GET /range/* ttl=10m")
    t = "/range/1000"
    p = play(tmp_path, conf, [get(upstream, t), get(upstream, t, headers=["Range: bytes=400-"]), get(upstream, t)])
    assert_sources(p, upstream, "aba")
    assert [(r["status"], r["body_len"]) for r in p.resps] == [(200, 1000), (206, 600), (200, 1000)], p.describe()
    upstream.reset()
    full, part = tmp_path / "full", tmp_path / "part"
    part.write_bytes(b"x" * 400)
    url = "http://127.0.0.1:%d%s" % (upstream.port, t)
    r = run(CURL + ["-o", full, url, "--next"] + CURL[1:] + ["-C", "400", "-o", part, url], conf=conf)
    assert r.rc == 0, r.describe()
    assert part.read_bytes() == b"x" * 400 + full.read_bytes()[400:], r.describe()
    ranges = [[v for k, v in e["headers"] if k.lower() == "range"] for e in upstream.stats()["log"]]
    assert ranges == [[], ["bytes=400-"]], upstream.stats()["log"]


def test_a_request_body_is_part_of_the_key(upstream, tmp_path):
    """A GET that carries its query in its body (a search API's) and a POST its rule
    names: two bodies never share an entry, the same body again is a hit, and each body
    reaches the upstream. (The key once left the body out: the second body got the first
    body's answer.)"""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=10m", "POST /custom* ttl=10m")
    g, po = "/custom?tag=gbody", "/custom?tag=pbody"
    p = play(tmp_path, conf, [get(upstream, g, body='{"q":"a"}'),                  # a
                              get(upstream, g, body='{"q":"b"}'),                  # b
                              get(upstream, g, body='{"q":"a"}'),                  # a
                              get(upstream, g),                                    # c: no body
                              get(upstream, po, method="POST", body="x=1"),        # d
                              get(upstream, po, method="POST", body="x=22"),       # e
                              get(upstream, po, method="POST", body="x=1")])       # d
    assert_sources(p, upstream, "abacded")
    sent = [(e["method"], e["body_len"]) for e in upstream.stats()["log"]]
    assert sent == [("GET", 9), ("GET", 9), ("GET", 0), ("POST", 3), ("POST", 4)], sent


# ------------------------------------------------------------------ never stored
NEVER = {
    # id: (request kwargs, conf kwargs, want status)
    "post": (dict(target="/custom?tag=post", method="POST", body="a=1"), {}, 200),
    "status-500": (dict(target="/custom?tag=s&status=500"), {}, 500),
    "status-404": (dict(target="/custom?tag=s&status=404"), {}, 404),
    "no-store": (dict(target="/custom?tag=ns&h=Cache-Control:no-store"), {}, 200),
    "no-store-mixed": (dict(target="/custom?tag=ns&h=Cache-Control:max-age%3D600%2C%20"
                                   "NO-STORE"), {}, 200),
    "private": (dict(target="/custom?tag=pr&h=Cache-Control:private%2C%20max-age%3D600"),
                {}, 200),
    "set-cookie": (dict(target="/custom?tag=sc&h=Set-Cookie:sid%3D1%3B%20Path%3D%2F"),
                   {}, 200),
    "set-cookie-lower": (dict(target="/custom?tag=sc&h=set-cookie:sid%3D1"), {}, 200),
    "vary-star": (dict(target="/custom?tag=vs&h=Vary:*"), {}, 200),
    "vary-list-star": (dict(target="/custom?tag=vs&h=Vary:Accept%2C%20*"), {}, 200),
    "over-max-object": (dict(target="/custom?tag=big&n=20000"), dict(max_object="16KB"),
                        200),
    "over-max-object-chunked": (dict(target="/custom?tag=big&n=20000&mode=chunked"),
                                dict(max_object="16KB"), 200),
    "close-delimited": (dict(target="/custom?tag=cl&mode=close&n=3000"), {}, 200),
    "truncated": (dict(target="/custom?tag=tr&mode=truncate&n=10000"), {}, 200),
    "bad-chunk": (dict(target="/custom?tag=bc&mode=badchunk&n=10000"), {}, 200),
    "trailers": (dict(target="/custom?tag=tf&mode=chunked&n=3000&t=X-Sum:1"), {}, 200),
}


def test_odd_response_heads_are_relayed_as_a_proxy_must(upstream, tmp_path):
    """Heads a client takes though no server should send them reach the app as a proxy
    must forward them (RFC 9112 5.1, 5.2): obsolete line folding joined with one space,
    white space before a colon removed, a status past 599 as sent. Each used to fail the
    exchange (the app's connection closed before an answer: curl exit 52, where direct it
    exits 0). A folded response is never stored: the second line of its Cache-Control said
    `private`; the others are, as any."""
    conf = simple_conf(tmp_path, upstream, "GET /odd/* ttl=10m status=200,599")
    steps = [get(upstream, "/odd/fold"), get(upstream, "/odd/fold"), get(upstream, "/odd/spacename"),
             get(upstream, "/odd/spacename"), get(upstream, "/odd/status600")]
    p = play(tmp_path, conf, steps)
    assert_sources(p, upstream, "abccd")
    fold, spaced, beyond = p.resps[0], p.resps[2], p.resps[4]
    assert hdrs(fold, "X-Folded") == ["first second third"] and hdrs(fold, "Cache-Control") == \
        ["max-age=60, private"], fold
    assert ["X-Spaced", "v"] in spaced["headers"], spaced
    assert (beyond["status"], beyond["reason"], beyond["body_len"]) == (600, "Beyond", 5), beyond
    for kind in ("fold", "spacename", "status600"):
        got = {}
        for shim in (False, True):
            r = run(CURL + ["-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                            "http://127.0.0.1:%d/odd/%s" % (upstream.port, kind)], shim=shim, conf=conf)
            got[shim] = (r.rc, r.out)
        assert got[True] == got[False] == (0, b"%d 5" % (600 if kind == "status600" else 200)), (kind, got)


def test_trailers_reach_the_app_as_direct(upstream, tmp_path):
    """A chunked response's trailer fields reach an HTTP/1.1 app as they do direct (its
    `TE: trailers` said again on the upstream hop, with `Connection: TE`), whatever the
    chunk sizes; an HTTP/1.0 app gets the whole body close-delimited and no trailers, as
    direct. Such a response is never stored: a hit could not carry them. (The trailers
    were once dropped, and the body stored without them.)"""
    conf = simple_conf(tmp_path, upstream)
    t = "/custom/tf?mode=chunked&n=70000&t=X-Checksum:abc123&t=X-Count:2"
    steps = [get(upstream, t, headers=["TE: trailers"]), get(upstream, t, headers=["TE: trailers"]),
             get(upstream, t, version="HTTP/1.0")]
    want = [["X-Checksum", "abc123"], ["X-Count", "2"]]
    seen = {}
    for shim in (False, True):
        upstream.reset()
        p = play(tmp_path, conf, steps, shim=shim)
        assert [(r["status"], r["body_len"], r.get("trailers")) for r in p.resps] == \
            [(200, 70000, want), (200, 70000, want), (200, 70000, None)], p.describe()
        seen[shim] = [r["body_sha256"] for r in p.resps]
        sent = [[v for k, v in e["headers"] if k.lower() == "te"] for e in upstream.stats()["log"]]
        assert sent == [["trailers"], ["trailers"], []], upstream.stats()["log"]
    assert seen[True] == seen[False]
    assert upstream.stats()["requests"] == 3
    # curl, which prints what it received with --raw
    raws = {}
    for shim in (False, True):
        r = run(CURL + ["-i", "--raw", "-H", "TE: trailers", "http://127.0.0.1:%d%s" % (upstream.port, t)],
                shim=shim, conf=conf)
        assert r.rc == 0, r.describe()
        rs = parse_responses(r.out, ["GET"], eof=True)
        raws[shim] = (rs[0]["status"], rs[0]["body"], rs[0].get("trailers"))
    assert raws[True] == raws[False] and raws[True][2] == want, raws


@pytest.mark.parametrize("case", sorted(NEVER))
def test_never_stored(case, upstream, tmp_path):
    """Two identical requests -> two upstream requests. A cacheable control path in the
    same process proves the rule matches and the cache works there."""
    kw, conf_kw, status = NEVER[case]
    conf = simple_conf(tmp_path, upstream, **conf_kw)
    kw = dict(kw)
    t = kw.pop("target")
    ctl = "/custom?tag=control"
    p = play(tmp_path, conf, [get(upstream, t, **kw), get(upstream, ctl),
                              get(upstream, t, **kw), get(upstream, ctl)])
    broken = case in ("truncated", "bad-chunk")
    assert_sources(p, upstream, "acbc", complete=not broken)
    assert [r["status"] for r in p.resps] == [status, 200, status, 200], p.describe()
    if broken:
        for i in (0, 2):
            r = p.resps[i]
            assert not r["complete"] and r["body_len"] < 10000, \
                "a truncated upstream body must reach the client truncated\n" + p.describe()
        assert p.conns[0]["eof"] and p.conns[2]["eof"], p.describe()
    else:
        m = re.search(r"[?&]n=(\d+)", t)
        n = int(m.group(1)) if m else 100
        assert_body(p, 0, n, status)
        assert_body(p, 2, n, status)
    for i in (0, 2):
        assert not hdrs(p.resps[i], "Age"), "a forwarded response has no Age of the " \
            "shim's\n" + p.describe()


def test_truncated_like_direct_with_curl(upstream, tmp_path):
    """curl sees the same truncation with and without the shim (exit 18, same bytes),
    and nothing is stored."""
    conf = simple_conf(tmp_path, upstream)
    url = upstream.url("/custom?tag=trc&mode=truncate&n=100000")
    d = run(CURL + ["-o", tmp_path / "direct", url], shim=False)
    assert d.rc == 18, d.describe()
    upstream.reset()
    s = run(CURL + ["-o", tmp_path / "s1", url, "-o", tmp_path / "s2", url], shim=True,
            conf=conf)
    assert s.rc == 18, "curl through the shim: " + s.describe()
    want = (tmp_path / "direct").read_bytes()
    assert want == pattern(100000)[:50000]
    for f in ("s1", "s2"):
        got = (tmp_path / f).read_bytes()
        assert got == want, "%s: %d bytes, direct %d" % (f, len(got), len(want))
    assert upstream.stats()["requests"] == 2, log_desc(upstream)


def test_chunked_response_stored_and_served_with_length(upstream, tmp_path):
    conf = simple_conf(tmp_path, upstream)
    t = "/custom?tag=ch&mode=chunked&n=30000"
    p = play(tmp_path, conf, [get(upstream, t), get(upstream, t)])
    assert_sources(p, upstream, "aa")
    assert_body(p, 0, 30000)
    assert_body(p, 1, 30000)
    hit = p.resps[1]
    assert hdrs(hit, "Content-Length") == ["30000"] and not hdrs(hit, "Transfer-Encoding"), \
        hit
    assert e2e(hit, drop=("age", "content-length")) == \
        e2e(p.resps[0], drop=("age", "content-length"))


def test_status_list(upstream, tmp_path):
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=10m status=200,404")
    nf, err, ok = ("/custom?tag=nf&status=404&n=50", "/custom?tag=e&status=500",
                   "/custom?tag=ok&n=60")
    p = play(tmp_path, conf, [get(upstream, nf), get(upstream, nf), get(upstream, err),
                              get(upstream, err), get(upstream, ok), get(upstream, ok)])
    assert_sources(p, upstream, "aabcdd")
    assert_body(p, 0, 50, 404)
    assert_body(p, 1, 50, 404)
    assert p.resps[1]["reason"] == p.resps[0]["reason"] == "Not Found", p.describe()
    assert [r["status"] for r in p.resps] == [404, 404, 500, 500, 200, 200]


def test_a_listed_204_is_stored_and_served_without_a_length(upstream, tmp_path):
    """`status=204`: a 204 has no body whatever its head says (RFC 9112 6.3), so one sent
    without a Content-Length (as RFC 9110 wants) is whole. It was taken for a body the
    close delimits and never stored. Its hit says no Content-Length either."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=10m status=200,204")
    t = "/custom?tag=nc&status=204&n=0"
    p = play(tmp_path, conf, [get(upstream, t), get(upstream, t)])
    assert_sources(p, upstream, "aa")
    assert [r["status"] for r in p.resps] == [204, 204] and p.resps[1]["body_len"] == 0, p.describe()
    assert hdr(p.resps[1], "Content-Length") is None, p.describe()


def test_respect_cache_control(upstream, tmp_path):
    conf = simple_conf(tmp_path, upstream,
                       "GET /custom/rcc* ttl=10m respect_cache_control=yes",
                       "GET /custom/plain* ttl=10m respect_cache_control=no",
                       "GET /custom/default* ttl=10m")
    r_max = "/custom/rcc?h=Cache-Control:max-age%3D1"                    # R: 1 s
    r_smax = "/custom/rcc?h=Cache-Control:max-age%3D600%2C%20s-maxage%3D1"  # S: 1 s
    r_long = "/custom/rcc?tag=long"                                      # L: the rule's
    r_noc = "/custom/rcc?h=Cache-Control:no-cache"                       # never stored
    r_exp = "/custom/rcc?h=Expires:Thu%2C%2001%20Jan%201970%2000:00:00%20GMT"  # stale
    p_max = "/custom/plain?h=Cache-Control:max-age%3D1"                  # P: ignored
    p_nos = "/custom/plain?h=Cache-Control:no-store"                     # never stored
    d_nos = "/custom/default?h=Cache-Control:no-store"                   # never stored
    # each second request right after its first: well inside the 1 s lifetimes
    order = [r_max, r_max, r_smax, r_smax, r_long, r_long, p_max, p_max,
             r_noc, r_noc, r_exp, r_exp, p_nos, p_nos, d_nos, d_nos]
    steps = [get(upstream, t) for t in order] + [advance(TTL_SLEEP)] + \
        [get(upstream, t) for t in (r_max, r_smax, r_long, p_max)]
    p = play(tmp_path, conf, steps)
    assert_sources(p, upstream, "RRSSLLPP" "nNeExXyY" "rsLP")
    for i in (-2, -1):
        age = hdr(p.resps[i], "Age")
        assert age is not None and age.isdigit() and int(age) >= 1, \
            "Age of a hit stored %.1f s earlier (test clock): %s\n%s" % (TTL_SLEEP, age, p.describe())


def test_heads_that_say_more_than_a_stored_answer_may_keep(upstream, tmp_path):
    """Found by an adversarial pass. A lifetime said twice (`max-age=0, max-age=100`, on one
    line or two) under respect_cache_control was stored for the last one, 100 s: RFC 9111
    4.2.1 allows the first occurrence or "stale", and the least of them is one of those.
    A response whose Connection header names a field (`Connection: X-Secret`, then
    `X-Secret: s1`) was stored with the field and replayed it on every hit: such a field is
    for that one connection (RFC 9110 7.6.1), so it is relayed, as direct, and never stored
    (`not_stored.hop_fields`). Apache's `Connection: Upgrade` beside its Upgrade offer names
    only a hop-by-hop field: stored, as before."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=10m respect_cache_control=yes")
    one_line = "/custom?tag=d1&h=Cache-Control:max-age%3D0%2C%20max-age%3D100"
    two_lines = "/custom?tag=d2&h=Cache-Control:max-age%3D0&h=Cache-Control:max-age%3D100"
    both_long = "/custom?tag=d3&h=Cache-Control:max-age%3D100%2C%20max-age%3D600"
    named = "/custom?tag=cn&h=Connection:X-Secret&h=X-Secret:s1"
    upgrade = "/custom?tag=up&h=Upgrade:h2c&h=Connection:Upgrade"
    p = play(tmp_path, conf, [get(upstream, t) for t in
                              (one_line, one_line, two_lines, two_lines, both_long, both_long, named, named,
                               upgrade, upgrade)])
    assert_sources(p, upstream, "aAbBccdDee")
    assert hdrs(p.resps[6], "X-Secret") == ["s1"], p.describe()


def test_vary_accept_encoding(upstream, tmp_path):
    conf = simple_conf(tmp_path, upstream)
    t = "/custom?tag=vary&h=Vary:Accept-Encoding&n=400"

    def g(*h):
        return get(upstream, t, headers=list(h))

    p = play(tmp_path, conf, [g("Accept-Encoding: gzip"), g("Accept-Encoding: br"),
                              g("Accept-Encoding: gzip")])
    assert_sources(p, upstream, "aba")
    ae = [[v for k, v in e["headers"] if k.lower() == "accept-encoding"]
          for e in upstream_log(upstream)]
    assert ae == [["gzip"], ["br"]], ae


def test_vary_variant_not_served_to_other_values(upstream, tmp_path):
    """A stored variant is never served to a request whose Vary'd header differs
    (absent counts as a value)."""
    conf = simple_conf(tmp_path, upstream)
    t = "/custom?tag=vary2&h=Vary:Accept-Encoding%2C%20X-Flavour"

    def g(*h):
        return get(upstream, t, headers=list(h))

    p = play(tmp_path, conf, [g("Accept-Encoding: gzip", "X-Flavour: a"),
                              g("Accept-Encoding: gzip", "X-Flavour: a"),
                              g("Accept-Encoding: gzip", "X-Flavour: b"),
                              g("Accept-Encoding: gzip"),
                              g()])
    got = [served(r) for r in p.resps]
    assert got[1] == got[0], "same variant: a hit\n" + p.describe()
    for i in (2, 3, 4):
        assert got[i] not in got[:i], "request #%d has other Vary'd values but got a " \
            "stored variant\n%s" % (i, p.describe())


def test_a_coded_body_without_vary_is_kept_per_accept_encoding(upstream, tmp_path):
    """An upstream that compresses for a client asking for gzip but does not say `Vary:
    Accept-Encoding` (nginx's gzip_vary is off by default): its gzip body is never served
    to a request with another Accept-Encoding (no header at all is one), which gets its own
    fetch; a request with the same one hits, and the stored headers are the upstream's."""
    conf = simple_conf(tmp_path, upstream)
    t = "/custom?tag=coded&h=Content-Encoding:gzip&n=300"
    plain = "/custom?tag=uncoded&n=300"

    def g(path, *h):
        return get(upstream, path, headers=list(h))

    p = play(tmp_path, conf, [g(t, "Accept-Encoding: gzip"), g(t), g(t, "Accept-Encoding: gzip"), g(t),
                              g(t, "Accept-Encoding: br"),
                              g(plain, "Accept-Encoding: gzip"), g(plain), g(plain, "Accept-Encoding: br")])
    assert_sources(p, upstream, "abab" "c" "ddd")
    assert all("vary" not in (k.lower() for k, _ in r["headers"]) for r in p.resps), p.describe()


def test_a_forward_proxy_in_the_rules_gets_its_credentials_and_keeps_users_apart(upstream, tmp_path):
    """An app that talks to a forward proxy the rules list (absolute-form requests, as
    curl -x sends them): the proxy gets the app's Proxy-Authorization (dropping it made an
    authenticating proxy answer 407 to everything), and its answers are cached per
    credential, so one user's never serves another's; the proxy's 407 challenge reaches
    the app with its Proxy-Authenticate."""
    conf = simple_conf(tmp_path, upstream)
    t = "http://api.example/custom?tag=viaproxy&n=200"
    alice, bob = "Proxy-Authorization: Basic YWxpY2U6YQ==", "Proxy-Authorization: Basic Ym9iOmI="

    def g(*h):
        return get(upstream, t, headers=["Host: api.example"] + list(h))

    p = play(tmp_path, conf, [g(alice), g(alice), g(bob), g(bob), g()])
    assert_sources(p, upstream, "aabbc")
    sent = [[v for k, v in e["headers"] if k.lower() == "proxy-authorization"] for e in upstream_log(upstream)]
    assert sent == [["Basic YWxpY2U6YQ=="], ["Basic Ym9iOmI="], []], sent
    challenge = "/custom?tag=challenge&status=407&h=Proxy-Authenticate:Basic%20realm%3D%22egress%22&n=10"
    heads = {}
    for shim in (False, True):
        q = play(tmp_path, conf, [get(upstream, challenge)], shim=shim)
        heads[shim] = (q.resps[0]["status"], hdr(q.resps[0], "Proxy-Authenticate"))
    assert heads[True] == heads[False] == (407, 'Basic realm="egress"'), heads


def test_lru_eviction(upstream, tmp_path):
    """memory_max = 64KB, ~10 KB bodies: filling past the cap evicts the least recently
    USED entry (an early entry read again survives, the next oldest goes)."""
    conf = simple_conf(tmp_path, upstream, memory_max="64KB")
    t = ["/custom?tag=lru%d&n=10000" % i for i in range(8)]
    steps = [get(upstream, t[i]) for i in range(5)] + [get(upstream, t[0])] + \
        [get(upstream, t[i]) for i in range(5, 8)] + \
        [get(upstream, t[7]), get(upstream, t[0]), get(upstream, t[1])]
    p = play(tmp_path, conf, steps)
    #            0..4   0    5..7  7    0    1 (evicted: refetched)
    assert_sources(p, upstream, "abcde" "a" "fgh" "h" "a" "B")
    for i in range(len(steps)):
        assert_body(p, i, 10000)


def test_object_over_memory_max_not_stored(upstream, tmp_path):
    """An object under max_object but over memory_max is not stored, and does not flush
    what is cached."""
    conf = simple_conf(tmp_path, upstream, memory_max="64KB", max_object="1MB")
    small, big = "/custom?tag=small&n=1000", "/custom?tag=big&n=100000"
    p = play(tmp_path, conf, [get(upstream, small), get(upstream, big),
                              get(upstream, big), get(upstream, small)])
    assert_sources(p, upstream, "abca")
    assert_body(p, 2, 100000)


def test_head_after_get_is_a_hit(upstream, tmp_path):
    conf = simple_conf(tmp_path, upstream)
    t = "/custom?tag=head&n=7777"
    p = play(tmp_path, conf, [
        get(upstream, t, method="HEAD"),    # miss: forwarded ...
        get(upstream, t, method="HEAD"),    # ... and not stored
        get(upstream, t),                   # GET miss: the full body, stored
        get(upstream, t, method="HEAD"),    # hit
        conn(rq(upstream, t, method="HEAD", close=False), rq(upstream, t),
             mode="pipeline"),              # HEAD hit then GET hit on one connection
    ])
    assert_sources(p, upstream, "abcccc")
    assert [(e["method"]) for e in upstream_log(upstream)] == ["HEAD", "HEAD", "GET"], \
        log_desc(upstream)
    assert_body(p, 2, 7777)
    assert_body(p, 5, 7777)
    for i in (3, 4):
        r = p.resps[i]
        assert r["status"] == 200 and r["body_len"] == 0 and \
            hdrs(r, "Content-Length") == ["7777"], \
            "HEAD hit #%d: want 200, Content-Length: 7777, no body\n%s" % (i, p.describe())
        assert_age(r, p.describe())
    # no body bytes after the HEAD answers: exactly one response on the HEAD-only
    # connection, exactly two on the HEAD+GET one, and nothing unparsable
    assert len(p.conns[3]["responses"]) == 1 and p.conns[3]["eof"], p.conns[3]
    assert len(p.conns[4]["responses"]) == 2, p.conns[4]


def test_pipelined_hit_miss_hit_in_order(upstream, tmp_path):
    conf = simple_conf(tmp_path, upstream)
    a, b = "/custom?tag=A&n=3000", "/custom?tag=B&n=5000"
    p = play(tmp_path, conf, [
        get(upstream, a),
        conn(rq(upstream, a, close=False), rq(upstream, b, close=False), rq(upstream, a),
             mode="pipeline"),
    ])
    assert_sources(p, upstream, "aaba")
    assert [hdr(r, "X-Tag") for r in p.resps] == ["A", "A", "B", "A"], p.describe()
    for i, n in enumerate([3000, 3000, 5000, 3000]):
        assert_body(p, i, n)
    assert len(p.conns[1]["responses"]) == 3 and p.conns[1]["eof"], p.conns[1]


def test_http10_client_epollclient(upstream, tmp_path, epollclient):
    t = "/custom?tag=e10&n=2500"
    conf = simple_conf(tmp_path, upstream)
    cmd = [epollclient, "--port", upstream.port, "--path", t, "--http10", "--count", 3,
           "--timeout", 20000, "--out", "-"]
    s = run(cmd, shim=True, conf=conf)
    assert s.rc == 0 and s.out == pattern(2500) * 3, s.describe()
    assert upstream.stats()["requests"] == 1, log_desc(upstream)


def test_http10_client_raw(upstream, tmp_path):
    """A 1.0 client gets `HTTP/1.0 200`, Content-Length, and the close after the hit;
    with Connection: keep-alive the hit says so and the connection stays usable."""
    t = "/custom?tag=r10&n=2000"
    conf = simple_conf(tmp_path, upstream)
    p = play(tmp_path, conf, [
        get(upstream, t, version="HTTP/1.0"),                       # miss
        get(upstream, t, version="HTTP/1.0"),                       # hit, then close
        conn(rq(upstream, t, version="HTTP/1.0", close=False),      # hit, kept alive
             rq(upstream, t, version="HTTP/1.0")),                  # hit, then close
    ])
    assert_sources(p, upstream, "aaaa")
    for i in range(4):
        assert_body(p, i, 2000)
        r = p.resps[i]
        assert r["version"] == "HTTP/1.0" and hdrs(r, "Content-Length") == ["2000"] and \
            not hdrs(r, "Transfer-Encoding"), "#%d: %s" % (i, r)
    hit = p.resps[1]
    assert_age(hit, p.describe())
    assert "keep-alive" not in [v.lower() for v in hdrs(hit, "Connection")], hit
    assert p.conns[1]["eof"] and len(p.conns[1]["responses"]) == 1, \
        "the connection must close after a 1.0 response without keep-alive: %s" % p.conns[1]
    assert [v.lower() for v in hdrs(p.resps[2], "Connection")] == ["keep-alive"], \
        "a 1.0 keep-alive request needs Connection: keep-alive in the answer: %s" % \
        p.resps[2]
    assert p.conns[2]["eof"] and len(p.conns[2]["responses"]) == 2, p.conns[2]


def test_cache_off(upstream, tmp_path):
    conf = simple_conf(tmp_path, upstream, cache="off")
    t = "/custom?tag=off"
    p = play(tmp_path, conf, [get(upstream, t), get(upstream, t), get(upstream, t)])
    assert_sources(p, upstream, "abc")
    assert not any(hdrs(r, "Age") for r in p.resps), p.describe()


def test_keepalive_connection_survives_hits(upstream, tmp_path):
    """Hits and misses in turn on one kept-alive connection."""
    conf = simple_conf(tmp_path, upstream)
    a, b = "/custom?tag=A&n=1500", "/custom?tag=B&n=2500"
    p = play(tmp_path, conf, [conn(rq(upstream, a, close=False),     # miss
                                   rq(upstream, a, close=False),     # hit
                                   rq(upstream, b, close=False),     # miss after a hit
                                   rq(upstream, a, close=False),     # hit
                                   rq(upstream, b, close=False),     # hit after a hit
                                   rq(upstream, a))])                # hit, then close
    assert_sources(p, upstream, "aababa")
    for i, n in enumerate([1500, 1500, 2500, 1500, 2500, 1500]):
        assert_body(p, i, n)
    for r in p.resps[:-1]:
        assert "close" not in [v.lower() for v in hdrs(r, "Connection")], r
    assert p.conns[0]["eof"] and len(p.conns[0]["responses"]) == 6, p.conns[0]


@pytest.mark.parametrize("mode", ["--keepalive", "--pipeline", "--conn-per-request"])
def test_many_hits_one_upstream_request(mode, upstream, tmp_path, epollclient):
    t = "/custom?tag=many&n=100"
    conf = simple_conf(tmp_path, upstream)
    cmd = [epollclient, "--port", upstream.port, "--path", t, mode, "--count", 2000,
           "--timeout", 20000, "--out", "-"]
    s = run(cmd, shim=True, conf=conf, timeout=180)
    assert not s.timed_out and s.rc == 0, s.describe()
    assert s.out == pattern(100) * 2000, "got %d bytes" % len(s.out)
    st = upstream.stats()
    assert st["requests"] == 1 and st["connections"] == 1, log_desc(upstream)


def test_geo_lookups_demo_client(upstream, tmp_path):
    """tools/demo-client.py (urllib, one connection per request, a fresh `sign` each
    time) against /v3/ip/ADDR with the demo's rule: one upstream request per address."""
    conf = simple_conf(tmp_path, upstream, "GET /v3/ip/* ttl=10m ignore_query=sign")
    addrs = ["8.8.8.8", "1.1.1.1", "9.9.9.9"]
    cmd = [SYS_PY, ROOT / "tools" / "demo-client.py", upstream.url(""), 3] + addrs
    d = run(cmd, shim=False)
    assert d.rc == 0, d.describe()
    assert upstream.stats()["requests"] == 9
    upstream.reset()
    s = run(cmd, shim=True, conf=conf)
    assert s.rc == 0, s.describe()
    log = upstream_log(upstream)
    assert sorted(e["target"].split("?")[0] for e in log) == \
        sorted("/v3/ip/%s" % a for a in addrs), log_desc(upstream)
    doc = json.loads(geo_document("8.8.8.8"))
    assert doc["ip"] == "8.8.8.8" and 1000 <= len(geo_document("8.8.8.8")) <= 1400


def test_a_connection_header_never_takes_host_and_never_keys_what_the_upstream_did_not_see(upstream, tmp_path):
    """`Connection: close, host` named Host as hop-by-hop: it was dropped, libcurl sent its
    own (the rule's address), a name-based upstream answered for another site, and the
    cache stored that answer under the app's Host for every later request of it. Host now
    always goes; and a request whose Connection names a header (its value never reaches the
    upstream: Authorization, a key header, one a Vary names) is neither stored nor answered
    from the cache. An HTTP/1.0 request without Host goes upstream as HTTP/1.1, with one."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=10m key_headers=X-Tenant")
    t = "/custom?tag=conn"
    p = play(tmp_path, conf, [get(upstream, t, host="shop.example", headers=["Connection: host"]),   # a
                              get(upstream, t, host="shop.example"),                                  # b
                              get(upstream, t, host="shop.example"),                                  # b
                              get(upstream, t + "2", headers=["X-Tenant: one", "Connection: x-tenant"]),   # c
                              get(upstream, t + "2", headers=["X-Tenant: one"]),                      # d
                              get(upstream, t + "2", headers=["X-Tenant: one"]),                      # d
                              get(upstream, "/custom?tag=ten", version="HTTP/1.0", host=False)])         # e
    assert_sources(p, upstream, "abbcdde")
    log = [e for e in upstream.stats()["log"] if e.get("kind") == "http"]
    hosts = [[v for k, v in e["headers"] if k.lower() == "host"] for e in log]
    assert hosts[:2] == [["shop.example"], ["shop.example"]], hosts
    tenants = [[v for k, v in e["headers"] if k.lower() == "x-tenant"] for e in log]
    assert tenants[2:4] == [[], ["one"]], tenants
    assert log[4]["version"] == "HTTP/1.1" and hosts[4] == ["127.0.0.1:%d" % upstream.port], log[4]
