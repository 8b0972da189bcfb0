"""What a process trusts of what Redis holds: entry times range-checked, values that
carry another key than the one asked for refused, and, with `redis_secret_file`, entries
authenticated with HMAC-SHA256 over the whole value, the key it carries included (version
4), so that whoever can write to Redis cannot make a process serve anything. Each test
starts its own redis-server (see test_redis.py) and uses NEW processes to read what
another wrote.

Version 4 layout: "HSC1" 04 flags status:u16 stored_at:i64 expires_at:i64 reason_len:u16
headers_len:u32 body_len:u32 key_len:u32 | tag (32 bytes) | key | reason | headers | body,
where tag = HMAC-SHA256(secret, value[:38] + value[70:]) and key is the internal cache key
(not the Redis key). Version 3 is the same with an 8-byte tag, SHA-256(value[46:])[:8].
"""

import hashlib
import hmac
import struct
import time

import pytest

from conftest import run, write_rules
from test_redis import (HTTPSHIM, KEY_WAIT, MAGIC, PREFIX, carried_key, cli, clients, entries,  # noqa: F401
                        internal_key, key, log_desc, redis, redis_conf, redis_servers, redis_url, rq,
                        upstream_hits, wait_entries, wait_keys)

MAGIC2 = b"HSC1\x04"
SECRET = b"fleet-secret-\x01\x02 with bytes"


def v5_checksum(v):
    return v[:38] + hashlib.sha256(v[:38] + v[46:]).digest()[:8] + v[46:]


def v4_tag(secret, v):
    return hmac.new(secret, v[:38] + v[70:], hashlib.sha256).digest()


def resign(secret, v):
    return v[:38] + v4_tag(secret, v) + v[70:]


def times(v):
    return struct.unpack_from("<qq", v, 8)


def with_times(v, stored_at, expires_at):
    return v[:8] + struct.pack("<qq", stored_at, expires_at) + v[24:]


def secret_conf(tmp, sockdir, srv, up, secret=SECRET, name="redis.conf"):
    extra = []
    if secret is not None:
        path = tmp / (name + ".secret")
        path.write_bytes(secret + b"\n")
        extra = ["redis_secret_file = %s" % path]
    return redis_conf(tmp, sockdir, redis_url(srv), [(up, ["GET /bytes/* ttl=10m", "GET /custom* ttl=10m"])],
                      extra=extra, name=name)


def wait_replaced(srv, k, bad):
    deadline = time.time() + KEY_WAIT
    now = bad
    while now == bad and time.time() < deadline:
        time.sleep(0.05)
        now = srv.cmd("GET", k)
    return now


# ------------------------------------------------------------------ forged times
NOW_MS = lambda: int(time.time() * 1000)  # noqa: E731
FORGED_TIMES = {
    # name: (stored_at, expires_at) from now in ms
    "stored-in-the-future": lambda n: (n + 3600 * 1000, n + 7200 * 1000),
    "stored-ancient": lambda n: (n - 20 * 366 * 24 * 3600 * 1000, n + 600 * 1000),
    "stored-at-minimum": lambda n: (-(1 << 63), n + 600 * 1000),
    "expires-before-stored": lambda n: (n - 1000, n - 5000),
    "expires-at-maximum": lambda n: (n - 1000, (1 << 63) - 1),
}


@pytest.mark.parametrize("case", sorted(FORGED_TIMES))
def test_forged_time_with_valid_checksum_is_corrupt(case, upstream, redis, sockdir, tmp_path, clients):
    """The checksum covers the payload, not the times: a value whose stored-at or
    expires-at is implausible is corrupt (deleted, counted) and never served, and no Age
    is computed from it (signed overflow under UBSan)."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /bytes/* ttl=10m"])])
    path = "/bytes/1500"
    clients(conf, sockdir).get([rq(upstream, path)])
    k = wait_keys(redis, key(upstream, path))[0]
    v = redis.cmd("GET", k)
    assert v.startswith(MAGIC)
    bad = v5_checksum(with_times(v, *FORGED_TIMES[case](NOW_MS())))
    redis.cmd("SET", k, bad, "PX", 600000)
    p2 = clients(conf, sockdir)
    p2.get([rq(upstream, path)])
    assert upstream_hits(upstream, path) == 2, "a forged time must be a miss: " + log_desc(upstream)
    st = p2.redis()
    assert st["corrupt"] >= 1 and st["hits"] == 0, st
    now = wait_replaced(redis, k, bad)
    assert now != bad, "the forged value is still in Redis"


def test_plausible_clock_skew_accepted(upstream, redis, sockdir, tmp_path, clients):
    """A writer whose clock runs a minute ahead is not corrupt: its entry is served."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /bytes/* ttl=10m"])])
    path = "/bytes/1501"
    clients(conf, sockdir).get([rq(upstream, path)])
    k = wait_keys(redis, key(upstream, path))[0]
    v = redis.cmd("GET", k)
    n = NOW_MS()
    redis.cmd("SET", k, v5_checksum(with_times(v, n + 60 * 1000, n + 660 * 1000)), "PX", 600000)
    p2 = clients(conf, sockdir)
    p2.get([rq(upstream, path)])
    assert upstream_hits(upstream, path) == 1, log_desc(upstream)
    assert p2.redis()["hits"] == 1


# ------------------------------------------------------------------ authenticated entries
def test_authenticated_entries_shared(upstream, redis, sockdir, tmp_path, clients):
    """With a secret, values are version 4 with an HMAC over the value and the key it
    carries; a second process holding the secret is served from them."""
    conf = secret_conf(tmp_path, sockdir, redis, upstream)
    path = "/bytes/1600"
    clients(conf, sockdir).get([rq(upstream, path)])
    k = wait_keys(redis, key(upstream, path))[0]
    v = redis.cmd("GET", k)
    assert v.startswith(MAGIC2), v[:40]
    assert v[38:70] == v4_tag(SECRET, v), "the tag must be HMAC-SHA256(secret, header || key || payload)"
    assert carried_key(v) == internal_key(upstream, path).encode(), v[:120]
    assert SECRET not in v
    p2 = clients(conf, sockdir)
    p2.get([rq(upstream, path)])
    assert upstream_hits(upstream, path) == 1, "the second process must be served from Redis: " + \
        log_desc(upstream)
    assert p2.redis()["hits"] == 1


def _forge(case, redis, k, v, other_k):
    if case == "checksummed":           # what anyone can write: a valid plain checksum
        w = b"HSC1\x05" + v[5:38] + b"\0" * 8 + v[70:]
        return k, v5_checksum(w)
    if case == "tampered-body":
        return k, v[:-1] + bytes([v[-1] ^ 1])
    if case == "tampered-status":
        return k, v[:6] + struct.pack("<H", 203) + v[8:]
    if case == "tampered-times":
        n = NOW_MS()
        return k, with_times(v, n - 1000, n + 3600 * 1000)
    if case == "wrong-secret":
        return k, resign(b"another secret", v)
    if case == "moved-to-another-key":  # a genuine value, under a key it was not made for
        return other_k, v
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["checksummed", "tampered-body", "tampered-status", "tampered-times",
                                  "wrong-secret", "moved-to-another-key"])
def test_unauthenticated_value_not_served(case, upstream, redis, sockdir, tmp_path, clients):
    """With a secret, a value not signed by it under its own key is a miss: never served,
    deleted (or replaced by the upstream's answer), counted as unauthenticated."""
    conf = secret_conf(tmp_path, sockdir, redis, upstream)
    path, other = "/bytes/1700", "/bytes/1701"
    clients(conf, sockdir).get([rq(upstream, path)])
    k = wait_keys(redis, key(upstream, path))[0]
    v = redis.cmd("GET", k)
    assert v.startswith(MAGIC2)
    target_k, bad = _forge(case, redis, k, v, key(upstream, other).encode())
    redis.cmd("SET", target_k, bad, "PX", 600000)
    p2 = clients(conf, sockdir)
    want = other if target_k != k else path
    reps = p2.get([rq(upstream, want)])     # the client checks the body is pattern(N) of its own path
    assert reps[0]["ok"]
    assert upstream_hits(upstream, want) == (1 if want == other else 2), \
        "the forged value must be a miss: " + log_desc(upstream)
    st = p2.redis()
    assert st["unauthenticated"] >= 1 and st["hits"] == 0, st
    assert wait_replaced(redis, target_k, bad) != bad, "the unauthenticated value is still in Redis"


def test_fleet_member_without_the_secret(upstream, redis, sockdir, tmp_path, clients):
    """One process lacks the secret: it cannot use the fleet's entries (a miss, not a
    corruption: it leaves them alone), and what it writes is ignored by the others.
    Every request is answered correctly; nothing crashes."""
    with_secret = secret_conf(tmp_path, sockdir, redis, upstream, name="with.conf")
    without = secret_conf(tmp_path, sockdir, redis, upstream, secret=None, name="without.conf")
    path = "/bytes/1800"
    clients(with_secret, sockdir).get([rq(upstream, path)])
    k = wait_keys(redis, key(upstream, path))[0]
    assert redis.cmd("GET", k).startswith(MAGIC2)
    lone = clients(without, sockdir)
    lone.get([rq(upstream, path)])
    assert upstream_hits(upstream, path) == 2, log_desc(upstream)
    st = lone.redis()
    assert st["corrupt"] == 0 and st["unauthenticated"] == 0 and st["hits"] == 0, st
    # the lone process wrote a plain entry over it; a secret-holder ignores and replaces it
    deadline = time.time() + KEY_WAIT
    while time.time() < deadline and not (redis.cmd("GET", k) or b"").startswith(MAGIC):
        time.sleep(0.05)
    assert (redis.cmd("GET", k) or b"").startswith(MAGIC), "the lone process's write did not arrive"
    p3 = clients(with_secret, sockdir)
    p3.get([rq(upstream, path)])
    assert upstream_hits(upstream, path) == 3, log_desc(upstream)
    assert p3.redis()["unauthenticated"] >= 1


BAD_SECRETS = {
    "missing": None,
    "empty": b"",
    "only-newline": b"\n",
    "directory": "dir",
}


@pytest.mark.parametrize("case", sorted(BAD_SECRETS))
def test_bad_secret_file_is_a_config_error(case, cli, upstream, tmp_path):  # noqa: F811
    """An unreadable or empty redis_secret_file names file:line (`httpshim check`), and a
    shimmed process prints the same line and runs without the shim."""
    path = tmp_path / "secret"
    content = BAD_SECRETS[case]
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    lines = ["[global]", "cache = redis://127.0.0.1:1/0", "pool_max_per_host = 4",
             "redis_secret_file = %s" % path, "", "[upstream 127.0.0.1:%d]" % upstream.port,
             "cache GET /bytes/* ttl=1m"]
    conf = write_rules(tmp_path, [], raw="\n".join(lines) + "\n")
    r = run([cli, "check", conf], shim=False)
    assert r.rc == 1 and r.err.decode().startswith("%s:4: redis_secret_file %s" % (conf, path)), r.describe()
    r = run(["/bin/sh", "-c", "exec true"], conf=conf)
    assert r.rc == 0, r.describe()


def test_good_secret_file_checks(cli, tmp_path):  # noqa: F811
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    conf = write_rules(tmp_path, [], raw="[global]\ncache = redis://127.0.0.1:1/0\nredis_secret_file = %s\n\n"
                       "[upstream 127.0.0.1:8080]\ncache GET /x* ttl=1m\n" % path)
    r = run([cli, "check", conf], shim=False)
    assert r.rc == 0, r.describe()


def test_cookie_keyed_entry_hides_the_cookie(upstream, redis, sockdir, tmp_path, clients):
    """key_headers=Cookie keys on a hash of the cookie: the cookie itself is nowhere in
    Redis, and another process with the same cookie is served from Redis."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis),
                      [(upstream, ["GET /custom* ttl=10m key_headers=Cookie"])])
    t = "/custom?tag=ck&n=300"

    def g(cookie):
        return rq(upstream, t, n=300, tag="ck", headers={"Cookie": cookie})

    first = clients(conf, sockdir).get([g("session=ALICE-SECRET-1")])
    wait_entries(redis, internal_key(upstream, t) + "*")
    for k in redis.scan("*"):
        assert b"ALICE-SECRET" not in k, "the raw cookie is in a Redis key: %r" % k
    for k, carried in entries(redis).items():
        assert b"ALICE-SECRET" not in carried, "the raw cookie is in the key a value carries: %r" % carried
    second = clients(conf, sockdir).get([g("session=BOB"), g("session=ALICE-SECRET-1")])
    assert second[1]["served"] == first[0]["served"] and second[0]["served"] != first[0]["served"], \
        log_desc(upstream)
    assert upstream_hits(upstream, t) == 2, log_desc(upstream)


def test_userinfo_never_in_a_redis_key(upstream, redis, sockdir, tmp_path, clients):
    """A password in an absolute-form target's userinfo never reaches Redis: such a request
    is not cached at all; the same path without it is, under a key without it."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /custom* ttl=10m"])])
    t = "/custom?tag=ui&n=200"
    clients(conf, sockdir).get([rq(upstream, "http://user:PASSWORD-9@127.0.0.1:%d%s" % (upstream.port, t), n=200,
                                   tag="ui"),
                                rq(upstream, "http://127.0.0.1:%d%s" % (upstream.port, t), n=200, tag="ui")])
    deadline = time.time() + KEY_WAIT
    keys = []
    while time.time() < deadline and not keys:
        keys = redis.scan(PREFIX + "*")
        time.sleep(0.05)
    assert keys, "the entry never reached Redis"
    for k in keys:
        assert b"password" not in k.lower(), k
        assert b"password" not in (carried_key(redis.cmd("GET", k)) or b"").lower(), k
