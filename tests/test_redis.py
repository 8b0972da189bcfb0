"""Real-client tests of httpshim's Redis cache tier (`cache = redis://...`).

Every test starts its own `redis-server` (loopback, no persistence, a temp dir), talks to
it with tests/pyclients/resp.py (a tiny RESP client: no redis module needed) and stops it
by its pid. The shimmed processes are tests/pyclients/redisload.py: long-lived, they make
the requests they are told to over stdin, check every body (pattern bytes, `X-Tag`),
time every request, and keep running so the test can read their stats socket (the
`"redis"` object of /stats). Whether a response came from a cache is read from the
upstream's request log; whether it came from Redis (not the process's own memory tier)
follows from using a NEW process, whose memory tier starts empty.

Interface under test (rules.conf [global]):
  cache = redis://[:password@]host:port/db | redis+unix:///path.sock
  redis_prefix = httpshim:   redis_timeout = 50ms   redis_max_object = 1MB
Keys: PREFIX + "v3:127.0.0.1:PORT:ROUTE:" + the SHA-256 hex of the internal key
"GET http://127.0.0.1:PORT/path?query\\nhost: 127.0.0.1:PORT" (+ "\\n"-separated extras),
ROUTE the matching rule's path glob; locks are that + ":lock". Values start with b"HSC1" +
version byte 3 and carry the internal key (`carried_key`); `SET key value PX ttl_ms`.
"""

import fnmatch
import json
import hashlib
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import (JsonLineProcess, BUILD, SANITIZER_SKIP, SYS_PY, Upstream, client_env, free_port,
                      PRELOAD, kill_group, pyclient, require_build, run, wait_until, write_rules)
from resp import Resp
from upstream import pattern
from test_stats import get_stats, wait_socket

HTTPSHIM = BUILD / "httpshim"
REDISLOAD = pyclient("redisload.py")
REDISPREFORK = pyclient("redisprefork.py")
PREFIX = "httpshim:"
MAGIC = b"HSC1\x05"
PRINTABLE_KEY = re.compile(rb"^[!-~]+$")
REDIS_KEYS = {"connected", "hits", "misses", "errors", "timeouts", "reconnects",
              "corrupt", "bytes_read", "bytes_written", "sets"}

# The failure-policy bound: a request waits at most redis_timeout on Redis, plus the
# upstream's own time (loopback, no delay: milliseconds; allowance 250 ms), plus a
# generous margin for a loaded 2-core machine. The point is "bounded, never hung".
REDIS_TIMEOUT_S = 0.050
UPSTREAM_ALLOWANCE_S = 0.250
MARGIN_S = 1.5
LATENCY_BOUND_S = REDIS_TIMEOUT_S + UPSTREAM_ALLOWANCE_S + MARGIN_S     # 1.8 s

KEY_WAIT = 5.0           # how long a fire-and-forget SET may take to show up in Redis


def need_python_clients():
    if "python3" in SANITIZER_SKIP:
        pytest.skip("python3 cannot run under the sanitizer runtime")


# ------------------------------------------------------------------ redis-server
class RedisServer(object):
    """One redis-server process on 127.0.0.1:PORT (and optionally a Unix socket).
    kill() / freeze() / thaw() / restart() act on it; shutdown() stops it by its pid."""

    def __init__(self, workdir, port=None, password=None, unix=None):
        if not shutil.which("redis-server"):
            pytest.fail("redis-server is not installed (tools/install-deps installs it)",
                        pytrace=False)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.unix = unix
        self.proc = None
        self.frozen = False
        self.starts = 0
        self.start()

    def client(self, db=0, timeout=5.0):
        return Resp(port=self.port, password=self.password, db=db, timeout=timeout)

    def start(self, timeout=15):
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
               "--daemonize", "no", "--logfile", "",
               "--enable-debug-command", "local"]   # (DEBUG PROTOCOL: every RESP3 type, for the tests)
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.unix:
            cmd += ["--unixsocket", self.unix, "--unixsocketperm", "700"]
        self.log = open(self.workdir / ("redis-%d.log" % self.starts), "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={k: v for k, v in os.environ.items()
                                          if k not in ("LD_PRELOAD", "HTTPSHIM_CONF")})
        self.frozen = False
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            if self.client(timeout=1.0).ping():
                return
            time.sleep(0.05)
        self.log.close()
        raise AssertionError("redis-server did not start on port %d: %s" % (
            self.port, (self.workdir / ("redis-%d.log" % self.starts)).read_text()[-2000:]))

    def restart(self):
        """Starts it again on the same port (empty: nothing persisted)."""
        self.start()

    def kill(self):
        """SIGKILL (a frozen server too) and reap it."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        self.frozen = False
        self.log.close()

    def freeze(self):
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self):
        os.kill(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    def shutdown(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)     # a stopped process ignores TERM
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        kill_group(self.proc.pid, quiet=True)
        self.log.close()

    # -- inspection
    def scan(self, match, db=0):
        return self.client(db=db).scan(match)

    def cmd(self, *args, db=0):
        return self.client(db=db).cmd(*args)

    def other_clients(self):
        """Connections to this server other than the one asking (CLIENT LIST)."""
        lines = self.cmd("CLIENT", "LIST").decode().splitlines()
        return [ln for ln in lines if ln.strip() and "cmd=client" not in ln]

    def get_calls(self):
        """How many GET commands this server has executed (INFO commandstats)."""
        info = self.cmd("INFO", "commandstats").decode()
        m = re.search(r"^cmdstat_get:calls=(\d+)", info, re.M)
        return int(m.group(1)) if m else 0


@pytest.fixture
def redis_servers(tmp_path):
    """redis_servers(**kw) starts a RedisServer; each is stopped (by pid) afterwards."""
    started = []

    def start(**kw):
        srv = RedisServer(tmp_path / ("redis%d" % len(started)), **kw)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.shutdown()


@pytest.fixture
def redis(redis_servers):
    return redis_servers()








@pytest.fixture
def cli():
    require_build(HTTPSHIM)
    return str(HTTPSHIM)


# ------------------------------------------------------------------ rules
def redis_url(srv, db=0):
    return "redis://127.0.0.1:%d/%d" % (srv if isinstance(srv, int) else srv.port, db)


def redis_conf(tmp, sockdir, url, blocks, extra=(), name="redis.conf"):
    """`blocks` is [(upstream or port, ["GET /glob ttl=..", ...]), ...]; `url` the cache
    line's value; `extra` more [global] lines."""
    lines = ["# written by tests/test_redis.py", "[global]", "pool_max_per_host = 4",
             "upstream_timeout  = 5s", "cache = %s" % url,
             "redis_timeout = %dms" % int(REDIS_TIMEOUT_S * 1000),
             "stats_socket = %s/s/%%p.sock" % sockdir] + list(extra)
    for up, rules in blocks:
        port = up if isinstance(up, int) else up.port
        lines += ["", "[upstream 127.0.0.1:%d]" % port] + ["cache %s" % r for r in rules]
    return write_rules(tmp, [], name=name, raw="\n".join(lines) + "\n")


def internal_key(up, target):
    """The library's own cache key of a GET the test clients send (`Host: 127.0.0.1:PORT`,
    no extras): what a value carries and what the Redis key's hash is of."""
    return "GET http://127.0.0.1:%d%s\nhost: 127.0.0.1:%d" % (up.port, target, up.port)


# the path globs these tests write rules with
ROUTES = ("/bytes/*", "/custom*")


def route_of(target):
    """The rule a target falls under, as rules.conf writes its glob (fnmatch: `*` crosses
    `/`, as in the library)."""
    path = target.split("?")[0]
    for glob in ROUTES:
        if fnmatch.fnmatchcase(path, glob):
            return glob
    raise AssertionError("no test rule matches %r" % target)


def key(up, target, prefix=PREFIX, route=None):
    """The Redis key of a GET the test clients send: PREFIX v3:HOST:PORT:ROUTE:SHA256HEX."""
    digest = hashlib.sha256(internal_key(up, target).encode()).hexdigest()
    return "%sv3:127.0.0.1:%d:%s:%s" % (prefix, up.port, route or route_of(target), digest)


def carried_key(value):
    """The internal key a value (version 5, 4 or 3) carries, or None: "HSC1" version flags
    status u16, stored_at and expires_at i64, reason_len u16, headers_len, body_len and
    key_len u32 (38 bytes), the tag (8 bytes, 32 in version 4), then the key."""
    if not value or len(value) < 38 or value[:4] != b"HSC1" or value[4] not in (3, 4, 5):
        return None
    tag = 32 if value[4] == 4 else 8
    (n,) = struct.unpack_from("<I", value, 34)
    start = 38 + tag
    return value[start:start + n] if start + n <= len(value) else None


def entries(srv, db=0, prefix=PREFIX):
    """{Redis key: internal key it carries} of every entry (not lock) in Redis."""
    out = {}
    for k in srv.scan(prefix + "v3:*", db=db):
        ik = carried_key(srv.cmd("GET", k, db=db))
        if ik is not None:
            out[k] = ik
    return out


def wait_entries(srv, internal_glob, n=1, timeout=KEY_WAIT, db=0):
    """Polls until at least n entries carry an internal key matching internal_glob
    (fnmatch); returns their Redis keys (bytes), sorted."""
    deadline = time.time() + timeout
    while True:
        found = sorted(k for k, ik in entries(srv, db=db).items()
                       if fnmatch.fnmatchcase(ik.decode(errors="replace"), internal_glob))
        if len(found) >= n or time.time() > deadline:
            break
        time.sleep(0.05)
    assert len(found) >= n, "want %d entries carrying a key matching %r within %.0f s, got %r; every key: %r" % (
        n, internal_glob, timeout, found, srv.scan("*", db=db)[:20])
    return found


def wait_keys(srv, match, n=1, timeout=KEY_WAIT, db=0, what=""):
    """Polls SCAN until at least n entry keys match (bounded); returns them (bytes). A
    fetch's lock ("...:lock") is not an entry and is gone when its fetch ends, so it is
    never counted or returned, even when the pattern would match it."""
    deadline = time.time() + timeout
    while True:
        keys = [k for k in srv.scan(match, db=db) if not k.endswith(b":lock")]
        if len(keys) >= n or time.time() > deadline:
            break
        time.sleep(0.05)
    assert len(keys) >= n, "%s: want %d key(s) matching %r in Redis within %.0f s, got %r" \
        "; every key: %r" % (what or "fire-and-forget SET", n, match, timeout, keys,
                             srv.scan("*", db=db)[:20])
    return keys


def has_entry(srv, internal_glob):
    return any(fnmatch.fnmatchcase(ik.decode(errors="replace"), internal_glob) for ik in entries(srv).values())


def wait_gone(srv, k, timeout=KEY_WAIT):
    deadline = time.time() + timeout
    while srv.cmd("EXISTS", k) and time.time() < deadline:
        time.sleep(0.05)
    assert not srv.cmd("EXISTS", k), "key %r still in Redis after %.0f s (PTTL %s)" % (
        k, timeout, srv.cmd("PTTL", k))


# ------------------------------------------------------------------ shimmed clients
class Proc(JsonLineProcess):
    """A shimmed child speaking JSON lines on stdout; stopped by its pid."""

    def __init__(self, cmd, conf, env=None):
        need_python_clients()
        JsonLineProcess.__init__(self, cmd, client_env(True, conf, env))


class Client(Proc):
    """A running tests/pyclients/redisload.py: one process, one memory tier."""

    def __init__(self, conf, sockdir, env=None):
        Proc.__init__(self, [SYS_PY, REDISLOAD], conf, env)
        self.sock = "%s/s/%d.sock" % (sockdir, self.pid)
        try:
            hello = self.read()
            assert hello.get("ready") and hello["pid"] == self.pid, hello
        except BaseException:
            self.stop()
            raise

    def get(self, reqs, timeout=20, on_result=None, check=True, pace_ms=0):
        """Runs the requests; returns the per-request reports. check: all must be ok."""
        self.send({"op": "get", "reqs": reqs, "timeout": timeout, "pace_ms": pace_ms})
        reps = []
        while True:
            rep = self.read(timeout=timeout + 30)
            if rep.get("done"):
                break
            reps.append(rep)
            if on_result:
                on_result(rep)
        assert len(reps) == len(reqs), (reps, self.describe())
        if check:
            bad = [r for r in reps if not r["ok"]]
            assert not bad, "failed requests: %s\n%s" % (bad, self.describe())
        return reps

    def stats(self):
        wait_socket(self.sock)
        return get_stats(self.sock)

    def redis(self):
        doc = self.stats()
        assert "redis" in doc, "/stats has no top-level \"redis\" object: %s" % (
            json.dumps(doc)[:1500])
        r = doc["redis"]
        assert REDIS_KEYS <= set(r), "redis stats keys missing: %s (have %s)" % (
            sorted(REDIS_KEYS - set(r)), sorted(r))
        for k in REDIS_KEYS:
            assert isinstance(r[k], int) and r[k] >= 0, (k, r)
        assert r["connected"] in (0, 1), r
        return r


@pytest.fixture
def clients():
    """clients(conf, sockdir) starts a redisload.py (shimmed); all stopped at the end."""
    started = []

    def start(conf, sockdir):
        c = Client(conf, sockdir)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def rq(up, path, n=None, tag=None, status=200, headers=None, body=None):
    """One request for redisload.py. n: the body must be pattern(n); for /bytes/N it
    defaults to N. body: the request's own (a GET with one, here)."""
    if n is None:
        m = re.match(r"/bytes/(\d+)$", path)
        n = int(m.group(1)) if m else None
    r = {"port": up.port, "path": path, "n": n, "tag": tag, "status": status, "headers": headers or {}}
    if body is not None:
        r["body"] = body
    return r


def upstream_hits(up, target):
    """How many requests for exactly `target` the upstream has served."""
    return len([e for e in up.stats()["log"]
                if e.get("kind") == "http" and e.get("target") == target])


def log_desc(up):
    st = up.stats()
    return "upstream requests=%d log=%s" % (
        st["requests"], [(e.get("method"), e.get("target")) for e in st["log"]
                         if e.get("kind") == "http"])


# ================================================================== 1. shared entry
def test_second_process_served_from_redis(upstream, redis, sockdir, tmp_path, clients):
    """Process 1's miss is written to Redis; process 2 (empty memory tier) is served from
    Redis with zero upstream requests, and promotes the entry into its memory tier (its
    second GET does not ask Redis again)."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /bytes/* ttl=10m"])])
    path = "/bytes/1200"
    p1 = clients(conf, sockdir)
    p1.get([rq(upstream, path)])
    assert upstream_hits(upstream, path) == 1, log_desc(upstream)
    keys = wait_keys(redis, PREFIX + "*")
    assert keys == [key(upstream, path).encode()], \
        "the Redis key must be PREFIX + 'v3:HOST:PORT:ROUTE:' + the key's SHA-256: got %r" % keys
    value = redis.cmd("GET", keys[0])
    assert value.startswith(MAGIC), "value must start with HSC1 + version 5: %r" % value[:40]
    assert carried_key(value) == internal_key(upstream, path).encode(), value[:120]
    assert len(value) > 1200, "the value must hold the whole 1200-byte body: %d bytes" % len(value)
    r1 = p1.redis()
    assert r1["connected"] == 1 and r1["misses"] >= 1 and r1["sets"] == 1, r1
    assert r1["bytes_written"] >= 1200, r1

    gets_before = redis.get_calls()
    p2 = clients(conf, sockdir)
    reps = p2.get([rq(upstream, path), rq(upstream, path)])
    assert upstream_hits(upstream, path) == 1, \
        "process 2 must be served from Redis, not the upstream: " + log_desc(upstream)
    assert all(len(r["age"]) == 1 and r["age"][0].isdigit() for r in reps), \
        "a cache hit carries exactly one Age header: %s" % reps
    r2 = p2.redis()
    assert r2["hits"] == 1 and r2["misses"] == 0 and r2["corrupt"] == 0, \
        "process 2: one Redis hit, then a memory hit (the entry promoted): %s" % r2
    assert r2["bytes_read"] >= 1200 and r2["sets"] == 0, r2
    assert redis.get_calls() - gets_before == 1, \
        "process 2's two GETs must ask Redis once (the hit is promoted to memory): " \
        "Redis executed %d GET commands" % (redis.get_calls() - gets_before)


# ================================================================== 2. TTL in Redis
def test_redis_ttl_matches_rule(upstream, redis, sockdir, tmp_path, clients):
    """SET ... PX ttl: the key's PTTL is the rule's ttl (10m); with
    respect_cache_control=yes a shorter max-age wins in Redis too."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [
        (upstream, ["GET /bytes/* ttl=10m",
                    "GET /custom* ttl=10m respect_cache_control=yes"])])
    cc = "/custom?tag=cc&n=300&h=Cache-Control:max-age%3D120"
    p = clients(conf, sockdir)
    p.get([rq(upstream, "/bytes/1300"), rq(upstream, cc, n=300, tag="cc")])
    k = wait_keys(redis, key(upstream, "/bytes/1300"))[0]
    pttl = redis.cmd("PTTL", k)
    assert 590000 <= pttl <= 600000, "PTTL %d, want the rule's 10m (590000..600000)" % pttl
    k2 = wait_keys(redis, key(upstream, cc))[0]
    pttl2 = redis.cmd("PTTL", k2)
    assert 110000 <= pttl2 <= 120000, \
        "PTTL %d, want max-age=120 (110000..120000): the shorter lifetime wins" % pttl2


# ================================================================== 3. Redis expiry
def test_expired_in_redis_refetched_by_new_process(upstream, redis, sockdir, tmp_path,
                                                   clients):
    """ttl=1s: Redis expires the key; a new process then goes to the upstream."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /bytes/* ttl=1s"])])
    path = "/bytes/1400"
    clients(conf, sockdir).get([rq(upstream, path)])
    k = wait_keys(redis, key(upstream, path))[0]
    pttl = redis.cmd("PTTL", k)
    assert 0 < pttl <= 1000 or pttl == -2, \
        "PTTL %d, want at most the rule's 1 s (-1: no expiry set)" % pttl
    wait_gone(redis, k)
    clients(conf, sockdir).get([rq(upstream, path)])
    assert upstream_hits(upstream, path) == 2, \
        "after Redis expired the entry, a new process must refetch: " + log_desc(upstream)


def test_promoted_entry_keeps_remaining_ttl(upstream, redis, sockdir, tmp_path, clients):
    """A Redis hit is promoted to memory with the REMAINING TTL (PTTL), not the rule's
    full ttl: once Redis has expired it, the process's memory copy is expired too."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /bytes/* ttl=3s"])])
    path = "/bytes/1500"
    clients(conf, sockdir).get([rq(upstream, path)])
    k = wait_keys(redis, key(upstream, path))[0]
    p2 = clients(conf, sockdir)              # started (and idle) before the wait
    deadline = time.time() + 5
    while redis.cmd("PTTL", k) > 1500 and time.time() < deadline:
        time.sleep(0.02)
    left = redis.cmd("PTTL", k)
    assert 300 < left <= 1500, "PTTL %d: too late to test the promotion (slow machine?)" % left
    p2.get([rq(upstream, path)])
    assert upstream_hits(upstream, path) == 1, "a Redis hit expected: " + log_desc(upstream)
    assert p2.redis()["hits"] == 1
    wait_gone(redis, k)
    time.sleep(0.3)
    p2.get([rq(upstream, path)])
    assert upstream_hits(upstream, path) == 2, \
        "the promoted memory copy outlived the Redis entry (promoted with the full ttl " \
        "instead of the remaining %d ms?): %s" % (left, log_desc(upstream))


# ================================================================== 4. prefork
def test_prefork_workers_share_entries(upstream, redis, sockdir, tmp_path):
    """A parent that already used the shim (engine, Redis connection) forks 4 workers;
    worker 1 fetches, the 3 others (at once) are served from Redis: one upstream request.
    Each worker has its own Redis connection (a shared one would garble replies)."""
    need_python_clients()
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /bytes/* ttl=10m"])])
    path, warm = "/bytes/1600", "/bytes/77"
    p = Proc([SYS_PY, REDISPREFORK, "--port", upstream.port, "--path", path, "--n", 1600,
              "--children", 4, "--warm", warm], conf)
    try:
        lines = []
        while not any("first" in x for x in lines):
            lines.append(p.read(timeout=60))
        parent = [x["parent"] for x in lines if "parent" in x]
        assert parent and parent[0]["warm"] == "ok", (lines, p.describe())
        first = [x for x in lines if "child" in x]
        assert len(first) == 1 and first[0]["ok"] and first[0]["child"] == 0, \
            (lines, p.describe())
        assert upstream_hits(upstream, path) == 1, log_desc(upstream)
        wait_keys(redis, key(upstream, path), what="worker 1's entry")
        p.send({"go": True})
        while not any("report" in x for x in lines):
            lines.append(p.read(timeout=60))
        rc = p.proc.wait(timeout=30)
        desc = p.describe()
    finally:
        p.stop()
    workers = [x for x in lines if "child" in x]
    assert rc == 0 and len(workers) == 4 and all(w["ok"] for w in workers), \
        "every worker must get the right body: %s\n%s" % (lines, desc)
    assert upstream_hits(upstream, path) == 1, \
        "workers 2-4 must be served from Redis (one upstream request in all): " + \
        log_desc(upstream)
    assert upstream_hits(upstream, warm) == 1, log_desc(upstream)


def test_thousands_of_writes_keep_flowing(upstream, redis, sockdir, tmp_path):
    """Every SET's reply frees its in-flight slot: 3 000 distinct misses in one process
    all reach Redis (the slots of unanswered-for writes once ran out at 1 024, after
    which lookups and writes were skipped until the stall detector dropped the link)."""
    require_build(BUILD / "epollclient")
    n = 3000
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /bytes/* ttl=10m"])])
    def connections_received():
        info = redis.cmd("INFO", "stats").decode()
        return int(re.search(r"^total_connections_received:(\d+)", info, re.M).group(1))
    before = connections_received()
    r = run([BUILD / "epollclient", "--port", upstream.port, "--path", "/bytes/100", "--unique",
             "--keepalive", "--count", n], conf=conf, timeout=180)
    assert r.rc == 0, r.describe()
    assert connections_received() - before == 2, \
        "the shim must have used one Redis connection (never dropped as stalled)"
    assert upstream.stats()["requests"] == n
    deadline = time.time() + KEY_WAIT
    while int(redis.cmd("DBSIZE")) < n and time.time() < deadline:
        time.sleep(0.05)
    assert int(redis.cmd("DBSIZE")) == n, "keys in Redis: %s of %d" % (redis.cmd("DBSIZE"), n)


def test_short_lived_processes_share_through_redis(upstream, redis, sockdir, tmp_path):
    """curl exits as soon as it has its body; the write to Redis must not be lost with it
    (exit waits, at most redis_timeout, for what the process owes Redis). A second round
    of curls is then served from Redis: no upstream request."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /bytes/* ttl=10m"])])
    sizes = [100, 1200, 65536, 300000, 700000]
    for rnd in (1, 2):
        for n in sizes:
            r = run(["curl", "-s", "-S", "--max-time", "20", "-o", "-",
                     "http://127.0.0.1:%d/bytes/%d" % (upstream.port, n)], conf=conf)
            assert r.rc == 0 and r.out == pattern(n), r.describe()
        if rnd == 1:
            assert upstream.stats()["requests"] == len(sizes)
            assert int(redis.cmd("DBSIZE")) == len(sizes), \
                "every short-lived process's entry must be in Redis when it has exited"
    assert upstream.stats()["requests"] == len(sizes), "round 2 must come from Redis"


def test_checksums_are_sha256_of_the_payload(upstream, redis, sockdir, tmp_path, clients):
    """The checksum field is the first 8 bytes of SHA-256 (the shim's own implementation)
    of every byte of the value but its own (version 5: the fixed fields too), for payload
    lengths across every padding case of a block."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /bytes/* ttl=10m"])])
    sizes = list(range(0, 140)) + [1000, 4096, 65536, 300000]
    reps = clients(conf, sockdir).get([rq(upstream, "/bytes/%d" % n) for n in sizes], check=False)
    assert all(r["ok"] for r in reps), [r for r in reps if not r["ok"]][:5]
    keys = wait_keys(redis, PREFIX + "v3:127.0.0.1:%d:/bytes/[*]:*" % upstream.port, n=len(sizes))
    checked = set()
    for k in keys:
        v = redis.cmd("GET", k)
        assert v.startswith(MAGIC) and len(v) > 46, v[:60]
        assert hashlib.sha256(v[:38] + v[46:]).digest()[:8] == v[38:46], \
            "checksum of %r (%d payload bytes)" % (k, len(v) - 46)
        checked.add(len(v) - 46)
    assert len(checked) == len(sizes), sorted(checked)


# ================================================================== 5. corrupt values
def _flip(v, i):
    return v[:i] + bytes([v[i] ^ 0xFF]) + v[i + 1:]


CORRUPT = {
    # name: how the stored value v is replaced (SET with the same PX) or modified
    "flip-middle-byte": lambda v: ("SETRANGE", len(v) // 2, bytes([v[len(v) // 2] ^ 0xFF])),
    "flip-last-byte": lambda v: ("SETRANGE", len(v) - 1, bytes([v[-1] ^ 0xFF])),
    "flip-length-byte": lambda v: ("SET", _flip(v, 6)),
    "garbage": lambda v: ("SET", b"this is not an httpshim entry" * 10),
    "truncated": lambda v: ("SET", v[:len(v) - 7]),
    "magic-only": lambda v: ("SET", MAGIC),
    "future-version": lambda v: ("SET", v[:4] + b"\x06" + v[5:]),
    # the fixed fields before the checksum: a damaged status was served until version 5
    "status-to-101": lambda v: ("SETRANGE", 6, b"\x65\x00"),
    "status-to-204": lambda v: ("SETRANGE", 6, b"\xcc\x00"),
    "status-to-203": lambda v: ("SETRANGE", 6, b"\xcb\x00"),
    "stored-at-changed": lambda v: ("SETRANGE", 9, bytes([v[9] ^ 0x01])),
    "old-version": lambda v: ("SET", v[:4] + b"\x01" + v[5:]),
    "empty": lambda v: ("SET", b""),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_value_not_served(case, upstream, redis, sockdir, tmp_path, clients):
    """A value that fails to decode or to checksum is a miss: the new process gets the
    upstream's body, counts it as corrupt, and the corrupt value is deleted or replaced."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /bytes/* ttl=10m"])])
    path = "/bytes/1700"
    clients(conf, sockdir).get([rq(upstream, path)])
    k = wait_keys(redis, key(upstream, path))[0]
    v = redis.cmd("GET", k)
    assert v.startswith(MAGIC), v[:40]
    op = CORRUPT[case](v)
    if op[0] == "SETRANGE":
        redis.cmd("SETRANGE", k, op[1], op[2])
    else:
        redis.cmd("SET", k, op[1], "PX", 600000)
    bad = redis.cmd("GET", k)
    assert bad != v

    p2 = clients(conf, sockdir)
    reps = p2.get([rq(upstream, path)], check=False)
    assert reps[0]["ok"], "the corrupt Redis value must never be served: %s\n%s" % (
        reps, p2.describe())
    assert upstream_hits(upstream, path) == 2, \
        "the corrupt value must count as a miss (upstream request): " + log_desc(upstream)
    deadline = time.time() + KEY_WAIT
    now = bad
    while now == bad and time.time() < deadline:
        time.sleep(0.05)
        now = redis.cmd("GET", k)
    assert now != bad, "the corrupt value is still in Redis after %.0f s" % KEY_WAIT
    assert now is None or now.startswith(MAGIC), now[:40]
    st = p2.redis()
    assert st["corrupt"] >= 1 and st["hits"] == 0, \
        "a value that does not decode must be counted as corrupt: %s" % st
    # and the process is still fine: a second GET (its memory tier) works
    p2.get([rq(upstream, path)])
    assert upstream_hits(upstream, path) == 2, log_desc(upstream)


def test_a_version_3_entry_is_another_versions(upstream, redis, sockdir, tmp_path, clients):
    """Version 3 checksummed only what follows its checksum, so a damaged status or time
    was served. Such an entry (written before 2026-12-07) is now another version's: a
    miss, neither served nor counted as corrupt, replaced by the version 5 write."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /bytes/* ttl=10m"])])
    path = "/bytes/1900"
    clients(conf, sockdir).get([rq(upstream, path)])
    k = wait_keys(redis, key(upstream, path))[0]
    v = redis.cmd("GET", k)
    old = v[:4] + b"\x03" + v[5:38]
    old += hashlib.sha256(v[46:]).digest()[:8] + v[46:]
    redis.cmd("SET", k, old, "PX", 600000)
    p2 = clients(conf, sockdir)
    assert p2.get([rq(upstream, path)])[0]["ok"]
    assert upstream_hits(upstream, path) == 2, log_desc(upstream)
    st = p2.redis()
    assert st["corrupt"] == 0 and st["hits"] == 0, st
    deadline = time.time() + KEY_WAIT
    while (redis.cmd("GET", k) or b"").startswith(b"HSC1\x03") and time.time() < deadline:
        time.sleep(0.05)
    assert (redis.cmd("GET", k) or b"").startswith(MAGIC), "the version 5 write did not replace it"


# ================================================================== 6. Redis unreachable
@pytest.mark.parametrize("case", ["refused", "frozen", "wrong-password", "no-such-database"])
def test_redis_unavailable_at_start(case, upstream, redis_servers, sockdir, tmp_path,
                                   clients):
    """Nothing listens on the configured port, or Redis is frozen (SIGSTOP: the TCP
    connect succeeds, nothing answers), or it refuses the credentials, or the database
    (99 of 16: before, its SELECT's error was ignored and every lookup, lock and write ran
    in database 0, someone else's keyspace): requests succeed
    through the upstream within the latency bound, and the memory tier still works within
    the process. When Redis comes up (or is thawed) later, the process connects (backoff
    capped at 2 s) and writes new entries to it."""
    srv = None
    if case == "refused":
        port = free_port()
        url = redis_url(port)
    elif case == "frozen":
        srv = redis_servers()
        srv.freeze()
        url = redis_url(srv)
    elif case == "no-such-database":
        srv = redis_servers()
        url = redis_url(srv, 99)
        # an entry in database 0, which a lookup queued behind the refused SELECT must not find
        writer = redis_conf(tmp_path, sockdir, redis_url(srv), [(upstream, ["GET /bytes/* ttl=10m"])], name="db0.conf")
        clients(writer, sockdir).get([rq(upstream, "/bytes/1800")])
        wait_keys(srv, key(upstream, "/bytes/1800"))
    else:
        srv = redis_servers(password="right-one")
        url = "redis://:wrong-one@127.0.0.1:%d/0" % srv.port
    db0_keys = srv.scan("*") if srv and case == "no-such-database" else []
    conf = redis_conf(tmp_path, sockdir, url, [(upstream, ["GET /bytes/* ttl=10m"])])
    p = clients(conf, sockdir)
    reps = p.get([rq(upstream, "/bytes/1800"), rq(upstream, "/bytes/1800"),
                  rq(upstream, "/bytes/1801"), rq(upstream, "/bytes/1801")])
    slow = [r for r in reps if r["ms"] > LATENCY_BOUND_S * 1000]
    assert not slow, "over the %.2f s bound: %s" % (LATENCY_BOUND_S, slow)
    assert upstream_hits(upstream, "/bytes/1800") == 1 + len(db0_keys) and \
        upstream_hits(upstream, "/bytes/1801") == 1, \
        "the memory tier must still serve repeats: " + log_desc(upstream)
    st = p.redis()
    assert st["hits"] == 0, st
    if case in ("wrong-password", "no-such-database"):
        assert srv.scan("*") == db0_keys, "nothing can be written without the password, or in database 0"
        assert st["connected"] == 0 or st["errors"] >= 1, \
            "a refused AUTH or SELECT must show in the stats (connected 0 or errors): %s" % st
        said = p.describe().count("refused the login" if case == "wrong-password" else "refused SELECT 99")
        assert said == 1, "a refused login or database is said once on stderr: " + p.describe()
        return
    if case == "refused":
        assert st["connected"] == 0 and st["sets"] == 0, st
        srv = redis_servers(port=port)
    else:
        srv.thaw()
    deadline = time.time() + 8
    i = 0
    while time.time() < deadline and not srv.scan(PREFIX + "*"):
        reps = p.get([rq(upstream, "/bytes/%d" % (1900 + i))])
        assert reps[0]["ms"] < LATENCY_BOUND_S * 1000, reps
        i += 1
        time.sleep(0.2)
    assert srv.scan(PREFIX + "*"), \
        "Redis became available but the process never wrote to it in 8 s " \
        "(%d requests made): %s" % (i, p.redis())
    # (a lookup past redis_timeout on a loaded sanitizer run drops the connection and
    # makes a new one, as for a frozen server: connected again within a moment)
    wait_until(lambda: p.redis()["connected"] == 1, 5, "the tier connected to the thawed Redis")


# ================================================================== 7. chaos run
def load_requests(up, n):
    """A mix over a few paths: repeated cacheable (ttl=1s and ttl=10m), unique cacheable
    (always a memory miss: a Redis lookup and a SET), uncacheable with a rule (status 500:
    a Redis lookup, never stored), and paths no rule matches."""
    reqs = []
    for i in range(n):
        k = i % 5
        if k == 0:
            reqs.append(rq(up, "/bytes/%d" % (1000 + (i // 5) % 4)))
        elif k == 1:
            m = 200 + i % 50
            reqs.append(rq(up, "/custom?tag=u%d&n=%d" % (i, m), n=m, tag="u%d" % i))
        elif k == 2:
            reqs.append(rq(up, "/chunked/%d" % (300 + i % 7), n=300 + i % 7))
        elif k == 3:
            reqs.append(rq(up, "/custom?tag=s500&status=500&n=50", n=50, tag="s500",
                           status=500))
        else:
            m = 400 + i % 3
            reqs.append(rq(up, "/custom?tag=rep%d&n=%d" % (i % 3, m), n=m,
                           tag="rep%d" % (i % 3)))
    return reqs


# (request index, action). After a restart the driver waits (up to RECONNECT_WAIT) for
# the process to connect again, so the next freeze finds a live connection.
# (a frozen Redis costs a lookup redis_timeout: a frozen phase of 60 requests lasts ~2 s)
CHAOS = [(100, "kill"), (200, "restart"), (350, "freeze"), (410, "thaw"),
         (510, "freeze"), (570, "kill"), (650, "restart")]
PACE_MS = 5              # 900 requests: every phase spans half a second or more
RECONNECT_WAIT = 4.0     # backoff is capped at 2 s


@pytest.mark.timeout(200)
def test_redis_killed_frozen_restarted_during_run(upstream, redis, sockdir, tmp_path,
                                                  clients):
    """900 sequential requests (one connection each) from one long-lived process while
    a driver thread kills, freezes (SIGSTOP), thaws and restarts Redis: zero failed
    requests, every body right, every latency under LATENCY_BOUND_S; after each restart
    the process connects again (within RECONNECT_WAIT) and writes to Redis again."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [
        (upstream, ["GET /bytes/* ttl=1s", "GET /custom* ttl=10m"])])
    p = clients(conf, sockdir)
    reqs = load_requests(upstream, 900)
    progress = [0]
    cond = threading.Condition()
    abort = threading.Event()
    timeline, driver_errors = [], []

    def wait_reconnect():
        deadline = time.time() + RECONNECT_WAIT
        t0 = time.time()
        while time.time() < deadline and not abort.is_set():
            if redis.other_clients():
                return "reconnected after %.0f ms" % ((time.time() - t0) * 1000)
            time.sleep(0.02)
        driver_errors.append("the process did not reconnect within %.0f s of the restart "
                             "at request %d" % (RECONNECT_WAIT, progress[0]))
        return "NOT reconnected"

    def driver():
        try:
            for at, action in CHAOS:
                with cond:
                    deadline = time.time() + 120
                    while progress[0] < at and not abort.is_set() and time.time() < deadline:
                        cond.wait(0.5)
                    if abort.is_set() or progress[0] < at:
                        return
                    seen = progress[0]
                t0 = time.time()
                getattr(redis, action)()
                note = ""
                if action == "restart":
                    note = ", " + wait_reconnect()
                timeline.append("%s at request %d (%.0f ms%s)" % (
                    action, seen, (time.time() - t0) * 1000, note))
        except Exception as e:  # noqa: BLE001
            driver_errors.append("%s: %r" % (timeline, e))

    def on_result(rep):
        with cond:
            progress[0] = rep["i"] + 1
            cond.notify_all()

    t = threading.Thread(target=driver, daemon=True)
    t.start()
    try:
        reps = p.get(reqs, timeout=20, on_result=on_result, check=False, pace_ms=PACE_MS)
    finally:
        abort.set()
        t.join(30)
    if redis.frozen:
        redis.thaw()

    def events_near(i):
        return [e for e in timeline if abs(int(e.split(" at request ")[1].split()[0]) - i) < 60]

    failed = [r for r in reps if not r["ok"]]
    assert not failed, "%d of %d requests failed (events: %s):\n%s" % (
        len(failed), len(reps), timeline,
        "\n".join("  #%d %s: %s (%.0f ms) near %s" % (r["i"], r["path"], r.get("why"),
                                                     r["ms"], events_near(r["i"]))
                  for r in failed[:15]))
    slow = sorted(reps, key=lambda r: -r["ms"])[:5]
    assert slow[0]["ms"] < LATENCY_BOUND_S * 1000, \
        "a request took %.0f ms, over the bound %.0f ms (redis_timeout %d ms + upstream " \
        "%d ms + margin %d ms); slowest: %s; events: %s" % (
            slow[0]["ms"], LATENCY_BOUND_S * 1000, REDIS_TIMEOUT_S * 1000,
            UPSTREAM_ALLOWANCE_S * 1000, MARGIN_S * 1000,
            ["#%d %s %.0f ms near %s" % (r["i"], r["path"], r["ms"], events_near(r["i"]))
             for r in slow], timeline)
    assert not t.is_alive() and not driver_errors, "driver: %s; events: %s" % (
        driver_errors, timeline)
    assert len(timeline) == len(CHAOS), \
        "the run ended before every event happened: %s" % timeline
    # the memory tier never suffered: each long-ttl repeated path fetched exactly once
    for j in range(3):
        target = "/custom?tag=rep%d&n=%d" % (j, 400 + j)
        assert upstream_hits(upstream, target) == 1, (target, log_desc(upstream)[:3000])

    # reconnect to the restarted (empty) Redis: new entries show up there again
    deadline = time.time() + 8
    extra, j = [], 0
    while time.time() < deadline and not has_entry(redis, internal_key(upstream, "/custom?tag=rc*")):
        batch = [rq(upstream, "/custom?tag=rc%d&n=%d" % (j + x, 100 + x), n=100 + x,
                    tag="rc%d" % (j + x)) for x in range(5)]
        extra += p.get(batch, check=False)
        j += 5
        time.sleep(0.2)
    assert all(r["ok"] for r in extra), [r for r in extra if not r["ok"]]
    assert max([r["ms"] for r in extra] or [0]) < LATENCY_BOUND_S * 1000, extra
    st = p.redis()
    print("chaos events: %s; slowest %s ms; redis stats %s" % (
        timeline, [r["ms"] for r in slow], st))
    assert has_entry(redis, internal_key(upstream, "/custom?tag=rc*")), \
        "after the restart the process never wrote to Redis again (%d more requests " \
        "over 8 s): %s" % (len(extra), st)
    assert st["connected"] == 1, st
    assert st["timeouts"] >= 1, "Redis was frozen while lookups were made: %s" % st
    assert st["reconnects"] >= 1, "Redis was restarted twice: %s" % st


# ================================================================== 8. purge
def purge(cli, conf, *args):
    r = run([cli, "purge", "-c", conf] + list(args), shim=False)
    assert r.rc == 0, r.describe()
    m = re.match(r"purged (\d+) entries in (\d+) processes and (\d+) keys in Redis$",
                 r.out.decode().strip())
    assert m, "want 'purged N entries in M processes and K keys in Redis':\n" + r.describe()
    return tuple(int(x) for x in m.groups())


def test_purge_deletes_redis_keys(cli, upstream, upstream_b, redis, sockdir, tmp_path,
                                  clients):
    """`httpshim purge` deletes the matching keys in Redis too (and only those: other
    upstreams, other paths, other prefixes stay) and counts them."""
    A, B = upstream, upstream_b
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [
        (A, ["GET /bytes/* ttl=10m"]), (B, ["GET /bytes/* ttl=10m"])])
    p1, p2 = clients(conf, sockdir), clients(conf, sockdir)
    p1.get([rq(A, "/bytes/100"), rq(A, "/bytes/200"), rq(B, "/bytes/100")])
    wait_keys(redis, PREFIX + "*", n=3)
    p2.get([rq(A, "/bytes/100")])                        # a Redis hit, promoted
    assert upstream_hits(A, "/bytes/100") == 1, log_desc(A)
    wait_socket(p1.sock)
    wait_socket(p2.sock)
    foreign = [b"other:GET http://127.0.0.1:%d/bytes/100" % A.port, b"httpshim-x:1",
               b"unrelated"]
    for f in foreign:
        redis.cmd("SET", f, b"keep me")

    assert purge(cli, conf, "--upstream", "127.0.0.1:%d" % B.port) == (1, 2, 1)
    assert redis.scan(PREFIX + "*") == sorted([key(A, "/bytes/100").encode(),
                                               key(A, "/bytes/200").encode()])
    assert purge(cli, conf, "/bytes/1*") == (2, 2, 1)
    assert redis.scan(PREFIX + "*") == [key(A, "/bytes/200").encode()]
    p1.stop()
    p2.stop()
    assert purge(cli, conf) == (0, 0, 1), "no process left; Redis still purged"
    assert redis.scan(PREFIX + "*") == [], "SCAN still finds the prefix after a purge"
    for f in foreign:
        assert redis.cmd("GET", f) == b"keep me", "purge deleted %r" % f
    clients(conf, sockdir).get([rq(A, "/bytes/200")])
    assert upstream_hits(A, "/bytes/200") == 2, \
        "a purged entry must not be served from Redis: " + log_desc(A)


def old_format_key(up, target, lock=False):
    """A key as the library wrote them before keys were hashed (its TTL may still run)."""
    return ("%s%sGET http://127.0.0.1:%d%s\nhost: 127.0.0.1:%d"
            % (PREFIX, "lock:" if lock else "", up.port, target, up.port)).encode()


def old_format_value(body=b"old"):
    """A version 1 value (no key in it): "HSC1" 1 flags status times lengths, SHA-256[:8]."""
    now = int(time.time() * 1000)
    payload = b"OK" + body
    head = b"HSC1\x01\x00" + struct.pack("<HqqHII", 200, now, now + 600000, 2, 0, len(body))
    return head + hashlib.sha256(payload).digest()[:8] + payload


def test_purge_new_and_old_format_keys(cli, upstream, upstream_b, redis, sockdir, tmp_path, clients):
    """`httpshim purge --upstream A GLOB` deletes A's new-format entries whose value
    carries a matching path (B's, and A's other paths, stay) and the old-format keys of A
    that match, locks included; `--upstream B` alone deletes every B key, old or new."""
    A, B = upstream, upstream_b
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [
        (A, ["GET /bytes/* ttl=10m"]), (B, ["GET /bytes/* ttl=10m"])])
    p1 = clients(conf, sockdir)
    p1.get([rq(A, "/bytes/100"), rq(A, "/bytes/150"), rq(A, "/bytes/200"), rq(B, "/bytes/100"),
            rq(B, "/bytes/160")])
    wait_keys(redis, PREFIX + "v3:*", n=5)
    wait_socket(p1.sock)
    old = {"A160": old_format_key(A, "/bytes/160"), "A180-lock": old_format_key(A, "/bytes/180", lock=True),
           "A300": old_format_key(A, "/bytes/300"), "B170": old_format_key(B, "/bytes/170")}
    for name, k in old.items():
        redis.cmd("SET", k, b"token-1" if name.endswith("lock") else old_format_value(), "PX", 600000)

    assert purge(cli, conf, "--upstream", "127.0.0.1:%d" % A.port, "/bytes/1*") == (2, 1, 4)
    assert redis.scan("*") == sorted([key(A, "/bytes/200").encode(), key(B, "/bytes/100").encode(),
                                      key(B, "/bytes/160").encode(), old["A300"], old["B170"]])
    p2 = clients(conf, sockdir)
    p2.get([rq(A, "/bytes/100"), rq(A, "/bytes/200")])
    assert upstream_hits(A, "/bytes/100") == 2 and upstream_hits(A, "/bytes/200") == 1, log_desc(A)
    wait_keys(redis, key(A, "/bytes/100"), what="the refetched entry")

    assert purge(cli, conf, "--upstream", "127.0.0.1:%d" % B.port) == (2, 2, 3)
    assert redis.scan("*") == sorted([key(A, "/bytes/100").encode(), key(A, "/bytes/200").encode(),
                                      old["A300"]])


def test_purge_takes_the_prefix_literally(cli, upstream, redis, sockdir, tmp_path, clients):
    """A redis_prefix holding SCAN pattern characters ("h[s]*:") is matched as written:
    a key that the unescaped pattern would also match stays."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /bytes/* ttl=10m"])],
                      extra=["redis_prefix = h[s]*:"])
    p = clients(conf, sockdir)
    p.get([rq(upstream, "/bytes/100")])
    wait_keys(redis, r"h\[s\]\*:v3:*")
    wait_socket(p.sock)
    lookalike = "hsX:v3:127.0.0.1:%d:/bytes/*:%s" % (upstream.port, "0" * 64)
    redis.cmd("SET", lookalike, b"keep me")
    assert purge(cli, conf, "--upstream", "127.0.0.1:%d" % upstream.port) == (1, 1, 1)
    assert redis.scan("*") == [lookalike.encode()]


# ================================================================== 9. keys operators can handle
def tool_env():
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "HTTPSHIM_CONF")}


def shell(cmd, timeout=30):
    """A shell pipeline of redis-cli and friends, unshimmed; its stdout."""
    if not shutil.which("redis-cli"):
        pytest.fail("redis-cli is not installed (tools/install-deps installs it)", pytrace=False)
    p = subprocess.run(["/bin/sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env(),
                       timeout=timeout)
    assert p.returncode == 0, "%s: rc %d\n%s\n%s" % (cmd, p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    return p.stdout


def test_redis_keys_are_printable_and_scan_deletable(upstream, redis, sockdir, tmp_path, clients):
    """Every key in Redis (entries, a Vary marker and its variant, an entry keyed on a hash
    of Authorization, a lock while its fetch runs) is printable ASCII without spaces,
    PREFIX v3:HOST:PORT:ROUTE:SHA256 of the key its value carries (ROUTE the rule's glob),
    locks with ":lock" after it; so `redis-cli --scan --pattern ... | xargs redis-cli del`
    deletes one upstream's entries (another upstream's stay), and the next request is a
    miss."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, list(r + " ttl=10m" for r in
                                                                          ("GET /bytes/*", "GET /custom*")))])
    slow = "/custom?tag=lk&n=40&delay=1500"
    vary = "/custom?tag=kv&n=60&h=Vary:Accept-Language"
    reqs = [rq(upstream, "/bytes/100"), rq(upstream, "/bytes/2000"), rq(upstream, "/custom?tag=k1&n=50", n=50, tag="k1"),
            rq(upstream, vary, n=60, tag="kv", headers={"Accept-Language": "de"}),
            rq(upstream, "/custom?tag=ka&n=70", n=70, tag="ka", headers={"Authorization": "Bearer two words"})]
    holder, p = clients(conf, sockdir), clients(conf, sockdir)
    slow_failed = []

    def fetch_slow():
        try:
            holder.get([rq(upstream, slow, n=40, tag="lk")])
        except Exception as e:  # noqa: BLE001 (reported by the main thread)
            slow_failed.append(repr(e))

    fetching = threading.Thread(target=fetch_slow, daemon=True)
    fetching.start()
    lock = (key(upstream, slow) + ":lock").encode()
    deadline = time.time() + 1.4
    while not redis.cmd("EXISTS", lock) and time.time() < deadline:
        time.sleep(0.01)
    during = redis.scan("*")
    assert lock in during, "the slow fetch's lock must be %r: keys %r" % (lock, during)
    p.get(reqs)
    fetching.join(30)
    assert not fetching.is_alive() and not slow_failed, slow_failed
    wait_keys(redis, PREFIX + "*", n=7, what="5 entries, a Vary marker's variant and the slow one")
    wait_gone(redis, lock)

    port = upstream.port
    listed = [k for k in shell("redis-cli -p %d --scan" % redis.port).split(b"\n") if k]
    shape = re.compile(rb"^httpshim:v3:127\.0\.0\.1:%d:(/bytes/\*|/custom\*):[0-9a-f]{64}$" % port)
    assert len(listed) == 7 and all(PRINTABLE_KEY.match(k) and shape.match(k) for k in listed), listed
    assert PRINTABLE_KEY.match(lock) and re.match(shape.pattern[:-1] + rb":lock$", lock), lock
    for target in ("/bytes/100", "/bytes/2000", "/custom?tag=k1&n=50", vary, slow):
        assert key(upstream, target).encode() in listed, (target, listed)
    for k in listed:     # each key is the hash of the internal key its value carries
        carried = carried_key(redis.cmd("GET", k))
        assert carried and k.endswith(b":" + hashlib.sha256(carried).hexdigest().encode()), (k, carried)
        path = "/" + carried.split(b"\n")[0].decode().split("/", 3)[3]     # "GET http://H:P/path?q"
        assert k.split(b":")[4].decode() == route_of(path), (k, carried)

    other = "httpshim:v3:127.0.0.1:%d:/bytes/*:%s" % (port + 1, "0" * 64)
    redis.cmd("SET", other, b"another upstream's")
    deleted = shell("redis-cli -p %d --scan --pattern 'httpshim:v3:127.0.0.1:%d:*' | xargs redis-cli -p %d del"
                    % (redis.port, port, redis.port))
    assert int(deleted.strip() or 0) == 7, deleted
    assert redis.scan("*") == [other.encode()], redis.scan("*")
    clients(conf, sockdir).get([rq(upstream, "/bytes/100")])
    assert upstream_hits(upstream, "/bytes/100") == 2, "deleted by pattern, then a miss: " + log_desc(upstream)


# ================================================================== more of the interface
@pytest.mark.parametrize("case", ["password", "acl-user-password-file", "unix-socket", "db-3", "prefix"])
def test_url_forms(case, upstream, redis_servers, sockdir, tmp_path, clients):
    """redis://:password@host:port/db, an ACL user in the URL with its password in
    redis_password_file, redis+unix:///path, a db number, redis_prefix."""
    extra, prefix, db = [], PREFIX, 0
    if case == "password":
        srv = redis_servers(password="pw-42")
        url = "redis://:pw-42@127.0.0.1:%d/0" % srv.port
    elif case == "acl-user-password-file":
        # the default user's password is not the shim's: only `AUTH shimuser <file's>` can
        # write, and only under the prefix that user is allowed
        srv = redis_servers(password="admin-only")
        assert srv.cmd("ACL", "SETUSER", "shimuser", "on", ">from-the-file", "~%s*" % PREFIX, "+@all") == "OK"
        pw = tmp_path / "redis.password"
        pw.write_text("from-the-file\n")
        pw.chmod(0o600)
        url = "redis://shimuser:@127.0.0.1:%d/0" % srv.port
        extra = ["redis_password_file = %s" % pw]
    elif case == "unix-socket":
        sock = os.path.join(sockdir, "redis.sock")
        srv = redis_servers(unix=sock)
        url = "redis+unix://" + sock
    elif case == "db-3":
        srv, db = redis_servers(), 3
        url = redis_url(srv, 3)
    else:
        srv, prefix = redis_servers(), "t1:"
        url = redis_url(srv)
        extra = ["redis_prefix = t1:"]
    conf = redis_conf(tmp_path, sockdir, url, [(upstream, ["GET /bytes/* ttl=10m"])],
                      extra=extra)
    path = "/bytes/2100"
    clients(conf, sockdir).get([rq(upstream, path)])
    keys = wait_keys(srv, key(upstream, path, prefix=prefix), db=db)
    assert keys == [key(upstream, path, prefix=prefix).encode()], keys
    if db:
        assert srv.scan("*", db=0) == [], "keys written to db 0, not db %d" % db
    if prefix != PREFIX:
        assert srv.scan(PREFIX + "*") == [], "redis_prefix ignored"
    p2 = clients(conf, sockdir)
    p2.get([rq(upstream, path)])
    assert upstream_hits(upstream, path) == 1, log_desc(upstream)
    assert p2.redis()["hits"] == 1


def test_only_storable_entries_reach_redis(upstream, redis, sockdir, tmp_path, clients):
    """Nothing goes to Redis that the memory tier would not store, nor bodies over
    redis_max_object (the memory tier still keeps those). SETs go out in order on one
    connection, so once the last (storable) request's key shows up, the earlier ones
    would have too."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [
        (upstream, ["GET /bytes/* ttl=10m", "GET /custom* ttl=10m"])],
        extra=["redis_max_object = 16KB"])
    never = [rq(upstream, "/bytes/20000"),
             rq(upstream, "/custom?tag=ns&n=300&h=Cache-Control:no-store", n=300, tag="ns"),
             rq(upstream, "/custom?tag=pr&n=300&h=Cache-Control:private", n=300, tag="pr"),
             rq(upstream, "/custom?tag=e&n=300&status=500", n=300, tag="e", status=500),
             rq(upstream, "/custom?tag=sc&n=300&h=Set-Cookie:a%3D1", n=300, tag="sc"),
             rq(upstream, "/custom?tag=cl&n=300&mode=close", n=300, tag="cl")]
    p = clients(conf, sockdir)
    p.get(never + [rq(upstream, "/bytes/300")])
    wait_keys(redis, key(upstream, "/bytes/300"), what="the storable sentinel")
    time.sleep(0.3)
    keys = redis.scan(PREFIX + "*")
    assert [k for k in keys if not k.endswith(b":lock")] == [key(upstream, "/bytes/300").encode()], \
        "only /bytes/300 may be in Redis: %s" % keys
    # (the other keys' locks say their answers could not be stored: hit-for-miss for the fleet)
    assert all(redis.cmd("GET", k) == b"uncacheable" for k in keys if k.endswith(b":lock")), keys
    p.get([rq(upstream, "/bytes/20000")])
    assert upstream_hits(upstream, "/bytes/20000") == 1, \
        "over redis_max_object but under max_object: the memory tier keeps it: " + \
        log_desc(upstream)
    st = p.redis()
    assert st["sets"] == 1, st


def test_credentials_kept_apart(upstream, redis, sockdir, tmp_path, clients):
    """Across processes too, two credentials never share an entry (the key carries a hash
    of Authorization) and the raw credential is nowhere in Redis."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis),
                      [(upstream, ["GET /custom* ttl=10m"])])
    secret = "Bearer alpha-SECRET-7"
    a = "/custom?tag=auth&n=500"

    def g(auth=None):
        return rq(upstream, a, n=500, tag="auth",
                  headers={"Authorization": auth} if auth else {})

    first = clients(conf, sockdir).get([g(secret)])
    keys = wait_entries(redis, internal_key(upstream, a) + "*")
    for k in redis.scan("*"):
        assert b"alpha-SECRET" not in k, "the raw credential is in a Redis key: %r" % k
        assert b"alpha-SECRET" not in (redis.cmd("GET", k) or b""), k
    assert key(upstream, a).encode() not in keys, \
        "an entry for a request with Authorization stored under the bare key: %r" % keys
    second = clients(conf, sockdir).get([g("Bearer beta"), g(), g(secret)])
    served = [r["served"] for r in second]
    detail = "X-Served first %s, second %s\n%s" % (first[0]["served"], served,
                                                   log_desc(upstream))
    assert served[2] == first[0]["served"], "the same credential: a Redis hit\n" + detail
    assert len({first[0]["served"], served[0], served[1]}) == 3, \
        "another credential or none must not get alpha's entry\n" + detail
    assert upstream_hits(upstream, a) == 3, detail


def test_request_bodies_kept_apart(upstream, redis, sockdir, tmp_path, clients):
    """Across processes too, a GET that carries its query in its body is one entry per
    body (the key carries the body's SHA-256): another process gets the same body's entry
    from Redis, and another body's never."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /custom* ttl=10m"])])
    a = "/custom?tag=qbody&n=300"

    def g(body):
        return rq(upstream, a, n=300, tag="qbody", body=body)

    first = clients(conf, sockdir).get([g('{"q":"alpha"}')])
    wait_entries(redis, internal_key(upstream, a) + "*")
    second = clients(conf, sockdir).get([g('{"q":"beta"}'), g('{"q":"alpha"}')])
    served = [r["served"] for r in second]
    detail = "X-Served first %s, second %s\n%s" % (first[0]["served"], served, log_desc(upstream))
    assert served[1] == first[0]["served"], "the same body: a Redis hit\n" + detail
    assert served[0] != first[0]["served"], "another body must not get alpha's entry\n" + detail
    assert upstream_hits(upstream, a) == 2, detail


def test_vary_entries_shared_per_variant(upstream, redis, sockdir, tmp_path, clients):
    """A `Vary: Accept-Language` response: a new process asking with the same value is
    served from Redis (the key carries the Vary values), one asking with another value
    never gets that entry."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis),
                      [(upstream, ["GET /custom* ttl=10m"])])
    v = "/custom?tag=vary&n=600&h=Vary:Accept-Language"

    def g(lang):
        return rq(upstream, v, n=600, tag="vary", headers={"Accept-Language": lang})

    p1 = clients(conf, sockdir)
    first = p1.get([g("en"), g("en")])
    assert upstream_hits(upstream, v) == 1, "the memory tier keeps Vary entries: " + \
        log_desc(upstream)
    p1.get([rq(upstream, "/custom?tag=sentinel&n=10", n=10, tag="sentinel")])
    wait_keys(redis, key(upstream, "/custom?tag=sentinel&n=10"), what="the storable sentinel")
    second = clients(conf, sockdir).get([g("fr"), g("en")])
    served = [r["served"] for r in second]
    detail = "X-Served first %s, second %s; Redis keys %r\n%s" % (
        first[0]["served"], served, redis.scan("*"), log_desc(upstream))
    assert served[0] != first[0]["served"], "Accept-Language: fr got en's entry\n" + detail
    assert served[1] == first[0]["served"] and upstream_hits(upstream, v) == 2, \
        "a new process asking with the same Accept-Language must be served from Redis " \
        "(Vary values in the key)\n" + detail


GOOD_REDIS_GLOBALS = ["cache = redis://:pw@127.0.0.1:6390/2", "redis_prefix = app1:",
                      "redis_timeout = 80ms", "redis_max_object = 512KB", "memory_max = 8MB"]
BAD_REDIS = {
    "port-out-of-range": "cache = redis://127.0.0.1:99999/0",
    "bad-timeout": "redis_timeout = soon",
    "bad-max-object": "redis_max_object = huge",
    "unknown-scheme": "cache = mongodb://127.0.0.1:27017/0",
    "prefix-with-space": "redis_prefix = my app:",
    "password-file-missing": "redis_password_file = /nonexistent/redis.password",
}


@pytest.mark.parametrize("case", ["good"] + sorted(BAD_REDIS))
def test_check_redis_settings(case, cli, tmp_path):
    """`httpshim check` accepts the Redis settings and names the line of a bad one."""
    lines = ["[global]", "pool_max_per_host = 4"]
    lines += GOOD_REDIS_GLOBALS if case == "good" else ["", BAD_REDIS[case]]
    lines += ["", "[upstream 127.0.0.1:8080]", "cache GET /x* ttl=1m"]
    conf = write_rules(tmp_path, [], raw="\n".join(lines) + "\n")
    r = run([cli, "check", conf], shim=False)
    if case == "good":
        assert r.rc == 0 and r.out.decode().startswith("%s: ok" % conf), r.describe()
    else:
        assert r.rc == 1 and r.err.decode().startswith("%s:4: " % conf), r.describe()



def test_check_says_who_logs_in_never_with_what(cli, tmp_path):
    """`httpshim check` names the user and where the password comes from (the URL or
    redis_password_file; the sentinels' own), and never prints a password."""
    pw = tmp_path / "pw"
    pw.write_text("file-secret\n")
    cases = (
        (["cache = redis://:url-secret@127.0.0.1:6390/0"], ["redis login: password from the URL"]),
        (["cache = redis://app:@127.0.0.1:6390/0", "redis_password_file = %s" % pw],
         ["redis login: user app, password from redis_password_file"]),
        (["cache = redis-sentinel://127.0.0.1:26379/mymaster/0", "redis_sentinel_password_file = %s" % pw],
         ["redis login: no password", "redis sentinels login: password from redis_sentinel_password_file"]),
    )
    for lines, want in cases:
        raw = "\n".join(["[global]"] + lines + ["", "[upstream 127.0.0.1:8080]", "cache GET /x* ttl=1m"]) + "\n"
        conf = write_rules(tmp_path, [], raw=raw)
        r = run([cli, "check", conf], shim=False)
        out = r.out.decode()
        assert r.rc == 0 and all(w in out.splitlines() for w in want), r.describe()
        assert "secret" not in out + r.err.decode(), r.describe()


def test_redis_host_name_resolved_off_the_engine(upstream, redis, sockdir, tmp_path):
    """cache = redis://NAME:PORT where NAME takes 2 s to resolve (tests/clients/slowdns.c,
    preloaded after the shim, answers *.slow.test with 127.0.0.1 after SLOWDNS_MS): the
    requests made meanwhile are answered at once — the engine never waits on a resolver —
    and once the name has resolved the tier connects and writes entries."""
    slowdns = BUILD / "slowdns.so"
    require_build(slowdns)
    conf = redis_conf(tmp_path, sockdir, "redis://redis.slow.test:%d/0" % redis.port,
                      [(upstream, ["GET /bytes/* ttl=10m"])])
    p = Client(conf, sockdir, env={"LD_PRELOAD": PRELOAD + " " + str(slowdns), "SLOWDNS_MS": "2000"})
    try:
        t0 = time.time()
        reps = p.get([rq(upstream, "/bytes/%d" % (2300 + i)) for i in range(5)])
        assert time.time() - t0 < 1.5 and all(r["ms"] < LATENCY_BOUND_S * 1000 for r in reps), \
            "requests waited on the name: %s" % [r["ms"] for r in reps]
        assert redis.scan(PREFIX + "*") == [], "connected before the name could have resolved"
        deadline, i = time.time() + 10, 0
        while time.time() < deadline and not redis.scan(PREFIX + "*"):
            reps = p.get([rq(upstream, "/bytes/%d" % (2400 + i))])
            assert reps[0]["ms"] < LATENCY_BOUND_S * 1000, reps
            i += 1
            time.sleep(0.2)
        assert redis.scan(PREFIX + "*"), "the tier never connected once the name resolved: %s" % p.redis()
        assert p.redis()["connected"] == 1
    finally:
        p.stop()


ONE_GET = """
import sys, urllib.request
print(len(urllib.request.urlopen(sys.argv[1], timeout=10).read()))
"""


def test_short_lived_processes_share_through_a_redis_named_by_host_name(upstream, redis, sockdir, tmp_path):
    """cache = redis://localhost:PORT: three processes one after another, each a single GET
    (as curl or a cron job): the first fetches and writes the entry, the others find it.
    Before, a process's first lookups came before the name had resolved (it is asked on a
    thread when the engine starts) and missed at once, and its entry was not written: every
    process went upstream (an adversarial pass: 5 of 5). They now wait for the name, within
    redis_timeout."""
    conf = redis_conf(tmp_path, sockdir, "redis://localhost:%d/0" % redis.port, [(upstream, ["GET /bytes/* ttl=10m"])])
    text = open(conf).read()           # (a loaded machine may take more than 50 ms to name it)
    open(conf, "w").write(text.replace("redis_timeout = %dms" % int(REDIS_TIMEOUT_S * 1000), "redis_timeout = 1s"))
    url = "http://127.0.0.1:%s/bytes/2650" % upstream.port
    for _ in range(3):
        r = run([SYS_PY, "-c", ONE_GET, url], conf=conf, timeout=30)
        assert r.rc == 0 and r.out.strip() == b"2650", r.describe()
    assert upstream_hits(upstream, "/bytes/2650") == 1, log_desc(upstream)


def test_redis_host_name_that_does_not_resolve(upstream, sockdir, tmp_path):
    """cache = redis://NAME:PORT where NAME does not resolve (slowdns.c: *.fail.test): every
    request is answered at once through the upstream, the failure is said once on stderr
    (the name is asked again every second, not said again), and the stats count it."""
    slowdns = BUILD / "slowdns.so"
    require_build(slowdns)
    conf = redis_conf(tmp_path, sockdir, "redis://redis.fail.test:6379/0", [(upstream, ["GET /bytes/* ttl=10m"])])
    p = Client(conf, sockdir, env={"LD_PRELOAD": PRELOAD + " " + str(slowdns)})
    try:
        t0 = time.time()
        for i in range(8):
            reps = p.get([rq(upstream, "/bytes/%d" % (2500 + i))])
            assert reps[0]["ms"] < LATENCY_BOUND_S * 1000, reps
            time.sleep(0.3)
        assert time.time() - t0 < 10
        st = p.redis()
        assert st["connected"] == 0 and st["errors"] >= 1, st
        assert p.describe().count("redis host redis.fail.test did not resolve") == 1, p.describe()
    finally:
        p.stop()


def test_redis_login_settings_are_never_ignored(cli, tmp_path):
    """A password file for a Redis that is not configured, a sentinels' password without
    sentinels, a user without a password: each refused, naming its line."""
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    cases = (
        (["redis_password_file = %s" % pw], 2, "redis_password_file is set but cache is not a Redis URL"),
        (["cache = redis://127.0.0.1:6390/0", "redis_sentinel_password_file = %s" % pw], 3,
         "redis_sentinel_password_file is set but cache is not a redis-sentinel:// URL"),
        (["cache = redis://app:@127.0.0.1:6390/0"], 2, "cache: a user without a password"),
    )
    for lines, at, why in cases:
        raw = "\n".join(["[global]"] + lines + ["", "[upstream 127.0.0.1:8080]", "cache GET /x* ttl=1m"]) + "\n"
        conf = write_rules(tmp_path, [], raw=raw)
        r = run([cli, "check", conf], shim=False)
        assert r.rc == 1 and r.err.decode().startswith("%s:%d: %s" % (conf, at, why)), r.describe()


def test_password_in_url_and_file_is_refused(cli, tmp_path):
    """A password in the cache URL and in redis_password_file: which one was meant? The
    rules are refused, naming the line, and the password is not echoed."""
    pw = tmp_path / "pw"
    pw.write_text("secret-b\n")
    for lines, at in (([ "cache = redis://:secret-a@127.0.0.1:6390/0", "redis_password_file = %s" % pw], 3),
                      (["redis_password_file = %s" % pw, "cache = redis://:secret-a@127.0.0.1:6390/0"], 3)):
        raw = "\n".join(["[global]"] + lines + ["", "[upstream 127.0.0.1:8080]", "cache GET /x* ttl=1m"]) + "\n"
        conf = write_rules(tmp_path, [], raw=raw)
        r = run([cli, "check", conf], shim=False)
        err = r.err.decode()
        assert r.rc == 1 and err.startswith("%s:%d: " % (conf, at)), r.describe()
        assert "secret-a" not in err and "secret-b" not in err, err


@pytest.mark.parametrize("prefix", ["my app:", "tab\there:", "caf\u00e9:", "bell\x07:"])
def test_redis_prefix_must_be_printable(prefix, cli, upstream, tmp_path):
    """A redis_prefix with a space, a control or a non-ASCII byte would put it in every
    Redis key: the rules are refused, naming the line (`httpshim check`), and a shimmed
    process runs without the shim."""
    lines = ["[global]", "cache = redis://127.0.0.1:1/0", "redis_prefix = %s" % prefix, "",
             "[upstream 127.0.0.1:%d]" % upstream.port, "cache GET /bytes/* ttl=1m"]
    conf = write_rules(tmp_path, [], raw="\n".join(lines) + "\n")
    r = run([cli, "check", conf], shim=False)
    assert r.rc == 1 and r.err.decode().startswith("%s:3: redis_prefix: byte " % conf), r.describe()
    r = run(["/bin/sh", "-c", "exec true"], conf=conf)
    assert r.rc == 0, r.describe()


def test_a_value_past_what_the_tier_stores_is_never_read_whole(upstream, redis, sockdir, tmp_path, clients):
    """60 MB written by someone else under the key of a GET (redis_max_object is 1 MB):
    the lookup's connection is dropped once the reply grows past what the tier could have
    stored, the app's request goes upstream with the right body, and the process never
    holds the value (its peak memory stays far below it). Before, the engine read, copied
    and checked the whole value (three times its size in memory, and the engine busy
    meanwhile, past redis_timeout)."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /custom* ttl=10m"])])
    target = "/custom?tag=huge&n=100"
    redis.cmd("SET", key(upstream, target), b"HSC1" + b"\0" * (60 << 20))
    p = clients(conf, sockdir)
    p.get([rq(upstream, target, n=100, tag="huge")])
    assert upstream_hits(upstream, target) == 1, log_desc(upstream)
    with open("/proc/%d/status" % p.pid) as f:
        hwm_kb = int(re.search(r"^VmHWM:\s+(\d+)", f.read(), re.M).group(1))
    assert hwm_kb < 110 * 1024, "peak memory %d kB for a 60 MB value never read whole" % hwm_kb   # (read whole: 180 MB)
    wait_until(lambda: p.redis()["errors"] >= 1, 10, "the dropped connection counted as an error")


def test_a_frozen_redis_costs_a_miss_one_redis_timeout(upstream, redis, sockdir, tmp_path, clients):
    """Redis frozen (SIGSTOP): its connection still looks up, so a miss waits out its
    lookup (redis_timeout) and must not then wait again for the cross-process lock on the
    same frozen server: the lock is asked only of a server whose lookups are answered.
    Before, every miss during a freeze took twice redis_timeout."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /custom* ttl=10m"])])
    Path(conf).write_text(Path(conf).read_text().replace("redis_timeout = 50ms", "redis_timeout = 1s"))
    p = clients(conf, sockdir)
    p.get([rq(upstream, "/custom?tag=warm&n=10", n=10, tag="warm")])
    redis.freeze()
    try:
        reps = p.get([rq(upstream, "/custom?tag=frozen%d&n=10" % i, n=10, tag="frozen%d" % i) for i in range(4)])
    finally:
        redis.thaw()
    took = [r["ms"] for r in reps]
    # one 1 s wait each (two: 2 s); the slack is a loaded machine's (400 ms with 250 of
    # slack took 870 in a CI run under the sanitizers)
    assert all(t < 1600 for t in took), took
