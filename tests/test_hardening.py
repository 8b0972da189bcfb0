"""What the cache must never key or store wrongly (a per-process cache in a service that
serves many users is a shared cache, RFC 9111 3.5), and the environment read at load.

Every check runs its requests from ONE process (tests/pyclients/cacheclient.py, or
build/epollclient --count N): each process has its own memory tier.
"""

import pytest

from conftest import BUILD, require_build, run, write_rules
from test_cache import assert_body, assert_sources, get, hdr, log_desc, play, served, simple_conf


# ------------------------------------------------------------------ environment
def test_scrubbed_environment_still_shimmed(upstream, tmp_path):
    """A worker that calls clearenv() before its first connect keeps the configuration
    it was started with: three GETs of a cached path reach the upstream once."""
    require_build(BUILD / "epollclient")
    conf = simple_conf(tmp_path, upstream, "GET /bytes/* ttl=10m")
    r = run([BUILD / "epollclient", "--port", upstream.port, "--path", "/bytes/333", "--count", "3",
             "--keepalive", "--clearenv"], conf=conf)
    assert r.rc == 0, r.describe()
    assert upstream.stats()["requests"] == 1, \
        "after clearenv() the process must still be shimmed (two hits)\n" + log_desc(upstream)


# ------------------------------------------------------------------ response framing
def custom(query):
    return "/custom?" + query


MISFRAMED = {
    # id: (query, what the exchange does)
    "two-lengths-long-first": ("n=10&mode=none&h=Content-Length:10&h=Content-Length:5", "fails"),
    "two-lengths-short-first": ("n=10&mode=none&h=Content-Length:5&h=Content-Length:10", "fails"),
    "length-list-unequal": ("n=10&mode=none&h=Content-Length:10,%205", "fails"),
    "length-not-a-number": ("n=10&mode=none&h=Content-Length:1e1", "fails"),
    "te-gzip-chunked": ("n=10&mode=rawchunked&h=Transfer-Encoding:gzip,%20chunked", "fails"),
    "te-twice": ("n=10&mode=rawchunked&h=Transfer-Encoding:chunked&h=Transfer-Encoding:chunked", "fails"),
    "te-identity": ("n=10&mode=none&h=Transfer-Encoding:identity", "fails"),
    "length-then-chunked": ("n=10&mode=rawchunked&h=Content-Length:10&h=Transfer-Encoding:chunked", "relayed"),
    "chunked-then-length": ("n=10&mode=rawchunked&h=Transfer-Encoding:chunked&h=Content-Length:10", "relayed"),
}


@pytest.mark.parametrize("case", sorted(MISFRAMED))
def test_misframed_response_never_stored(case, upstream, tmp_path):
    """Two different lengths, a length with Transfer-Encoding, or a coding other than a
    single chunked: the response is never stored (each request reaches the upstream) and
    the app never gets a body cut to a guessed length."""
    query, outcome = MISFRAMED[case]
    conf = simple_conf(tmp_path, upstream)
    t = custom("tag=%s&%s" % (case, query))
    p = play(tmp_path, conf, [get(upstream, t), get(upstream, t)])
    assert upstream.stats()["requests"] == 2, \
        "a misframed response must never be stored\n" + log_desc(upstream) + "\n" + p.describe()
    for i, r in enumerate(p.resps):
        if outcome == "fails":
            assert r is not None and r["complete"] and r["status"] == 502 and hdr(r, "Connection") == "close", \
                "response #%d: an ambiguous body must not be relayed; the app hears a 502\n%s" % (i, p.describe())
        else:
            assert_body(p, i, 10)
    if outcome != "fails":
        assert served(p.resps[0]) != served(p.resps[1])


def test_repeated_equal_lengths_are_one_length(upstream, tmp_path):
    """`Content-Length: 10` twice (or as the list `10, 10`) is one length: stored."""
    conf = simple_conf(tmp_path, upstream)
    steps = []
    for tag, h in (("twice", "h=Content-Length:10&h=Content-Length:10"), ("list", "h=Content-Length:10,%2010")):
        t = custom("tag=%s&n=10&mode=none&%s" % (tag, h))
        steps += [get(upstream, t), get(upstream, t)]
    p = play(tmp_path, conf, steps)
    for i in range(4):
        assert_body(p, i, 10)
    assert_sources(p, upstream, "aabb")


def test_empty_vary_header(upstream, tmp_path):
    """`Vary:` with an empty value varies on nothing: stored and served (the sanitizer run
    checks the empty value never reaches memcpy with a NULL pointer)."""
    conf = simple_conf(tmp_path, upstream)
    t = custom("tag=emptyvary&n=50&h=Vary:")
    p = play(tmp_path, conf, [get(upstream, t), get(upstream, t)])
    assert_body(p, 0, 50)
    assert_body(p, 1, 50)
    assert_sources(p, upstream, "aa")


# ------------------------------------------------------------------ credentials
def test_every_authorization_line_keys(upstream, tmp_path):
    """Each Authorization line joins the key's hash, in order."""
    conf = simple_conf(tmp_path, upstream)
    t = custom("tag=auth2")

    def g(*auths):
        return get(upstream, t, headers=["Authorization: %s" % a for a in auths])

    p = play(tmp_path, conf, [g("Bearer alice", "Bearer mallory"), g("Bearer alice"),
                              g("Bearer alice", "Bearer mallory"), g("Bearer mallory", "Bearer alice"),
                              g("Bearer alice")])
    assert_sources(p, upstream, "abacb")


def test_cookie_requests_not_cached_by_default(upstream, tmp_path):
    """A request with a Cookie is neither served from nor stored in the cache unless the
    rule keys on Cookie."""
    conf = simple_conf(tmp_path, upstream)
    t = custom("tag=cookie")

    def g(cookie=None):
        return get(upstream, t, headers=["Cookie: %s" % cookie] if cookie else [])

    p = play(tmp_path, conf, [g("session=alice"), g("session=bob"), g(), g("session=alice"), g()])
    assert_sources(p, upstream, "abcdc")


def test_cookie_keyed_when_the_rule_says_so(upstream, tmp_path):
    """key_headers=Cookie: each cookie value gets its own entry (hashed into the key)."""
    conf = simple_conf(tmp_path, upstream, "GET /custom* ttl=10m key_headers=Cookie")
    t = custom("tag=cookiekey")

    def g(cookie=None):
        return get(upstream, t, headers=["Cookie: %s" % cookie] if cookie else [])

    p = play(tmp_path, conf, [g("session=alice"), g("session=bob"), g("session=alice"), g(), g(),
                              g("session=bob")])
    assert_sources(p, upstream, "abaccb")


def test_two_host_headers_not_cached(upstream, tmp_path):
    """Two Host lines make the authority ambiguous: such a request is never cached."""
    conf = simple_conf(tmp_path, upstream)
    t = custom("tag=twohosts")
    h = ["Host: a.example", "Host: b.example"]
    p = play(tmp_path, conf, [get(upstream, t, headers=h), get(upstream, t, headers=h)])
    assert upstream.stats()["requests"] == 2 or all(r is None or r["status"] == 400 for r in p.resps), \
        log_desc(upstream) + "\n" + p.describe()


def test_userinfo_is_never_cached(upstream, tmp_path):
    """An absolute-form target with userinfo (`http://user:pw@h/x`) carries credentials of
    its own: it is neither stored nor answered from the entry of `http://h/x` (two users'
    requests would otherwise share one answer), and no password is ever part of a key."""
    conf = simple_conf(tmp_path, upstream)
    t = "/custom?tag=userinfo"
    p = play(tmp_path, conf, [get(upstream, "http://user:SECRET@www.example" + t, host="www.example"),
                              get(upstream, "http://www.example" + t, host="www.example"),
                              get(upstream, "http://other:PW@www.example" + t, host="www.example"),
                              get(upstream, "http://www.example" + t, host="www.example")])
    assert_sources(p, upstream, "abcb")


def test_v4_mapped_upstream_literal_matches(upstream, tmp_path):
    """An upstream written as an IPv4-mapped IPv6 literal matches connects to its IPv4
    address (found by fuzz_rules: it loaded but never matched)."""
    require_build(BUILD / "epollclient")
    conf = write_rules(tmp_path, [], raw="[global]\npool_max_per_host = 4\n\n[upstream [::ffff:127.0.0.1]:%d]\n"
                       "cache GET /bytes/* ttl=10m\n" % upstream.port)
    r = run([BUILD / "epollclient", "--port", upstream.port, "--path", "/bytes/321", "--count", "2",
             "--keepalive"], conf=conf)
    assert r.rc == 0, r.describe()
    assert upstream.stats()["requests"] == 1, "the second GET must be a hit\n" + log_desc(upstream)
