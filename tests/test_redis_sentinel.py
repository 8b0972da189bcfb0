"""The Redis tier behind Sentinel (issue 24): cache = redis-sentinel://... finds the
master through the sentinels, checks it with ROLE, and follows a failover. Every test
starts its own master, replica and three sentinels (redis-server --sentinel) on ports of
its own; the apps are long-lived statsapp.py processes (each its own memory tier), so a
hit in the second one can only come through Redis."""
import os
import re
import signal
import subprocess
import time

import pytest

from conftest import wait_until, free_port, require_build, run
from resp import Resp, RespError
from test_stats import App, apps, get_stats, get_metrics  # noqa: F401 (apps: a fixture)
from test_redis import REDIS_TIMEOUT_S

MASTER = "shimmaster"
HTTPSHIM = __import__("conftest").BUILD / "httpshim"


class Proc(object):
    """A redis-server (or sentinel) started here, stopped by its pid."""

    def __init__(self, argv, workdir):
        self.log = open(os.path.join(workdir, "log-%d" % free_port()), "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir,
                                     start_new_session=True)

    def kill(self, sig=signal.SIGKILL):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        self.log.close()


def wait(cond, timeout, what):
    return wait_until(cond, timeout, what, (OSError, ConnectionError, AssertionError, RespError))


class Fleet(object):
    """A master, a replica of it and three sentinels watching them."""

    def __init__(self, tmp, password=None, sentinel_password=None):
        """password: the master's and the replica's (requirepass, masterauth, the sentinels'
        auth-pass); sentinel_password: the sentinels' own requirepass."""
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.procs = []
        self.password, self.sentinel_password = password, sentinel_password
        self.ports = {"master": free_port(), "replica": free_port()}
        self.sentinels = [free_port() for _ in range(3)]
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no",
                  "--logfile", ""]
        if password:
            common += ["--requirepass", password, "--masterauth", password]
        self.master = self.server("master", common)
        self.replica = self.server("replica", common + ["--replicaof", "127.0.0.1", str(self.ports["master"])])
        for i, port in enumerate(self.sentinels):
            d = tmp / ("sentinel%d" % i)
            d.mkdir()
            conf = d / "sentinel.conf"
            text = ("port %d\nbind 127.0.0.1\ndir %s\n"
                    "sentinel monitor %s 127.0.0.1 %d 2\n"
                    "sentinel down-after-milliseconds %s 1000\n"
                    "sentinel failover-timeout %s 10000\n"
                    "sentinel parallel-syncs %s 1\n"
                    % (port, d, MASTER, self.ports["master"], MASTER, MASTER, MASTER))
            if password:
                text += "sentinel auth-pass %s %s\n" % (MASTER, password)
            if sentinel_password:
                # the sentinels talk to each other with it too
                text += "requirepass %s\nsentinel sentinel-pass %s\n" % (sentinel_password, sentinel_password)
            conf.write_text(text)
            self.procs.append(Proc(["redis-server", str(conf), "--sentinel"], str(d)))
        wait(lambda: self.redis(self.ports["replica"]).cmd("INFO", "replication").find(b"master_link_status:up") >= 0,
             20, "the replica to sync")
        for port in self.sentinels:
            wait(lambda p=port: self.sentinel(p).cmd("SENTINEL", "ckquorum", MASTER).startswith("OK"), 20,
                 "sentinel %d to see its quorum" % port)
            wait(lambda p=port: len(self.sentinel(p).cmd("SENTINEL", "replicas", MASTER)) >= 1, 20,
                 "sentinel %d to see the replica" % port)

    def redis(self, port):
        return Resp(port=port, password=self.password)

    def sentinel(self, port):
        return Resp(port=port, password=self.sentinel_password)

    def server(self, name, args):
        d = self.tmp / name
        d.mkdir()
        p = Proc(["redis-server", "--port", str(self.ports[name]), "--dir", str(d)] + args, str(d))
        self.procs.append(p)
        wait(lambda: self.redis(self.ports[name]).cmd("PING") == "PONG", 15, "%s to start" % name)
        return p

    def named_master(self):
        """What the first live sentinel names as master: a port."""
        for port in self.sentinels:
            try:
                host, mport = self.sentinel(port).cmd("SENTINEL", "get-master-addr-by-name", MASTER)
                return int(mport)
            except (OSError, ConnectionError, ValueError, TypeError, RespError):
                continue
        return None

    def url(self, db=0):
        pw = ":%s@" % self.password if self.password else ""
        return "redis-sentinel://%s%s/%s/%d" % (pw, ",".join("127.0.0.1:%d" % p for p in self.sentinels), MASTER, db)

    def stop(self):
        for p in self.procs:
            p.kill()


@pytest.fixture
def fleet(tmp_path):
    if not __import__("shutil").which("redis-server"):
        pytest.fail("redis-server is not installed (tools/install-deps installs it)", pytrace=False)
    f = Fleet(tmp_path / "fleet")
    yield f
    f.stop()


def conf_for(tmp, sockdir, url, upstream, extra=()):
    lines = ["[global]", "cache = %s" % url, "redis_timeout = %dms" % int(REDIS_TIMEOUT_S * 1000),
             "stats_socket = %s/s/%%p.sock" % sockdir] + list(extra) + ["",
             "[upstream 127.0.0.1:%d]" % upstream.port, "cache GET /bytes/* ttl=10m"]
    path = tmp / "sentinel.conf"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def up_count(upstream, path):
    return sum(1 for e in upstream.stats()["log"] if e.get("target") == path)


def test_a_sentinel_that_names_a_dead_master_is_passed_over(fleet, upstream, tmp_path, sockdir, apps):
    """A fourth sentinel, listed first, that watches the master name on a port where nothing
    runs (stale, or partitioned: it keeps naming it, having no replica to promote): the
    connection to what it names fails, and the next sentinel is asked. Before, the same one
    was asked again and again, and no process ever shared (an adversarial pass: 70 151 of
    70 151 requests went upstream). No failover is counted, and the master's node line has
    none of the dead address's errors."""
    d = tmp_path / "stale"
    d.mkdir()
    port, dead = free_port(), free_port()
    (d / "sentinel.conf").write_text("port %d\nbind 127.0.0.1\ndir %s\nsentinel monitor %s 127.0.0.1 %d 1\n"
                                     % (port, d, MASTER, dead))
    fleet.procs.append(Proc(["redis-server", str(d / "sentinel.conf"), "--sentinel"], str(d)))
    wait(lambda: fleet.sentinel(port).cmd("SENTINEL", "get-master-addr-by-name", MASTER)[1] == str(dead).encode(),
         15, "the stale sentinel to name the dead port")
    url = "redis-sentinel://%s/%s/0" % (",".join("127.0.0.1:%d" % p for p in [port] + fleet.sentinels), MASTER)
    (tmp_path / "d").mkdir()
    conf = conf_for(tmp_path / "d", sockdir, url, upstream)
    with open(conf) as f:              # (a lookup past 50 ms on a loaded machine skips the write after it)
        text = f.read()
    with open(conf, "w") as f:
        f.write(text.replace("redis_timeout = %dms" % int(REDIS_TIMEOUT_S * 1000), "redis_timeout = 1s"))
    a, b = apps(conf, sockdir), apps(conf, sockdir)
    a.get(upstream.port, "/bytes/900", length=900)
    b.get(upstream.port, "/bytes/901", length=901)
    for app in (a, b):
        wait(lambda app=app: get_stats(app.sock)["redis"]["connected"] == 1, 20, "the tier to connect")
    a.get(upstream.port, "/bytes/1777", length=1777)
    master = Resp(port=fleet.ports["master"])
    wait(lambda: master.cmd("DBSIZE") > 0, 5, "a's entry in the real master")
    time.sleep(0.1)
    b.get(upstream.port, "/bytes/1777", length=1777)
    assert up_count(upstream, "/bytes/1777") == 1, "b did not share through the real master"
    assert get_stats(b.sock)["redis"]["master"] == "127.0.0.1:%d" % fleet.ports["master"]
    # no failover happened, and the real master never failed: the refused connects were the
    # dead address's (before, each process counted one failover, and the dead address's
    # errors were listed under the master's: found by an acceptance pass)
    for app in (a, b):
        r = get_stats(app.sock)["redis"]
        assert r["failovers"] == 0 and r["errors"] >= 1, r
        assert [n["errors"] for n in r["nodes"] if n["address"] == r["master"]] == [0], r
    chk = run([HTTPSHIM, "check", "--connect", conf], shim=False, timeout=60)   # (it asks the same way)
    assert chk.rc == 0 and (b"is 127.0.0.1:%d" % fleet.ports["master"]) in chk.out, chk.describe()


def test_entries_are_shared_through_the_master_and_across_a_failover(fleet, upstream, tmp_path, sockdir, apps):
    """Two processes share entries through the master the sentinels name; the master is
    killed; while the sentinels promote the replica every request is answered right (the
    tier fails open), and within 2 s of the promotion both processes share entries again
    through the new master; their stats name it and count the failover."""
    (tmp_path / "d").mkdir()
    conf = conf_for(tmp_path / "d", sockdir, fleet.url(), upstream)
    a, b = apps(conf, sockdir), apps(conf, sockdir)
    old = fleet.ports["master"]

    def fetch(app, i):
        # each key its own length: another key's entry would be seen
        app.get(upstream.port, "/bytes/%d" % (1000 + i), length=1000 + i)

    def shared(i):
        """a fetches key i (from the upstream), then b: true when b's came from Redis."""
        fetch(a, i)
        path = "/bytes/%d" % (1000 + i)
        master = Resp(port=fleet.named_master())
        wait(lambda: master.cmd("DBSIZE") > 0 and up_count(upstream, path) == 1, 5, "a's entry")
        time.sleep(0.1)                # its SET is on its way (a's engine wrote it before answering)
        fetch(b, i)
        return up_count(upstream, path) == 1

    # the engines start with the first request; the tier is usable once the sentinels have
    # named the master and ROLE confirmed it
    a.get(upstream.port, "/bytes/900", length=900)
    b.get(upstream.port, "/bytes/901", length=901)
    for app in (a, b):
        wait(lambda app=app: get_stats(app.sock)["redis"]["connected"] == 1, 20, "the tier to connect")
    for i in range(0, 5):
        assert shared(i), "key %d was fetched twice before any failover" % i
    for app in (a, b):
        r = get_stats(app.sock)["redis"]
        assert r["mode"] == "sentinel" and r["master"] == "127.0.0.1:%d" % old and r["connected"] == 1, r

    require_build(HTTPSHIM)
    r = run([HTTPSHIM, "check", "--connect", conf], shim=False, timeout=30)
    assert r.rc == 0 and (b"master %s is 127.0.0.1:%d" % (MASTER.encode(), old)) in r.out \
        and b"ROLE master" in r.out, r.describe()

    fleet.master.kill()
    killed = time.time()
    i, promoted, resumed = 5, None, None
    while time.time() - killed < 45:
        fetch(a, i)                     # every request answered, right, throughout
        fetch(b, i)
        i += 1
        if promoted is None and fleet.named_master() == fleet.ports["replica"]:
            promoted = time.time()
        if promoted is not None:
            try:
                if shared(i):
                    resumed = time.time()
                    break
            except AssertionError:
                pass
            i += 1
        time.sleep(0.05)
    assert promoted is not None, "the sentinels never promoted the replica"
    assert resumed is not None and resumed - promoted <= 2.5, (promoted - killed, resumed and resumed - promoted)
    print("failover: promoted %.2f s after the kill, shared again %.2f s later" % (promoted - killed, resumed - promoted))
    for app in (a, b):
        r = get_stats(app.sock)["redis"]
        assert r["master"] == "127.0.0.1:%d" % fleet.ports["replica"] and r["failovers"] >= 1, r
    r = run([HTTPSHIM, "check", "--connect", conf], shim=False, timeout=30)
    assert r.rc == 0 and (b"is 127.0.0.1:%d" % fleet.ports["replica"]) in r.out, r.describe()
    table = run([HTTPSHIM, "stats", "-c", conf, "--live"], shim=False, timeout=30)
    assert table.rc == 0 and (b"mode sentinel  server 127.0.0.1:%d" % fleet.ports["replica"]) in table.out \
        and int(re.search(rb"failovers (\d+)", table.out).group(1)) >= 2, table.describe()
    prom = get_metrics(a.sock)
    prom = prom.decode() if isinstance(prom, bytes) else str(prom)
    assert "httpshim_redis_failovers_total" in prom and 'mode="sentinel"' in prom, prom[:3000]


def test_sentinels_with_a_password_of_their_own(tmp_path, upstream, sockdir, apps):
    """Sentinels with requirepass (as well as a master with one): with the sentinels'
    password in redis_sentinel_password_file the tier finds the master and two processes
    share an entry; without it the sentinels refuse, the tier fails open (every request
    answered) and the refusals are counted. `httpshim check --connect` logs in the same way."""
    if not __import__("shutil").which("redis-server"):
        pytest.fail("redis-server is not installed (tools/install-deps installs it)", pytrace=False)
    fleet = Fleet(tmp_path / "fleet", password="master-pw", sentinel_password="sentinel-pw")
    try:
        pw = tmp_path / "sentinel.password"
        pw.write_text("sentinel-pw\n")
        (tmp_path / "d").mkdir()
        conf = conf_for(tmp_path / "d", sockdir, fleet.url(), upstream,
                        extra=["redis_sentinel_password_file = %s" % pw])
        a, b = apps(conf, sockdir), apps(conf, sockdir)
        a.get(upstream.port, "/bytes/3000", length=3000)
        for app in (a, b):
            app.get(upstream.port, "/bytes/3001", length=3001)
            wait(lambda app=app: get_stats(app.sock)["redis"]["connected"] == 1, 20, "the tier to connect")
        a.get(upstream.port, "/bytes/3002", length=3002)
        master = fleet.redis(fleet.named_master())
        wait(lambda: master.cmd("DBSIZE") >= 1 and up_count(upstream, "/bytes/3002") == 1, 5, "a's entry")
        time.sleep(0.1)
        b.get(upstream.port, "/bytes/3002", length=3002)
        assert up_count(upstream, "/bytes/3002") == 1, "b did not find a's entry through the master"
        require_build(HTTPSHIM)
        r = run([HTTPSHIM, "check", "--connect", conf], shim=False, timeout=30)
        assert r.rc == 0 and b"ROLE master" in r.out, r.describe()
        assert b"sentinel-pw" not in r.out + r.err and b"master-pw" not in r.out + r.err, r.describe()

        (tmp_path / "e").mkdir()
        bare = conf_for(tmp_path / "e", sockdir, fleet.url(), upstream)
        c = apps(bare, sockdir)
        for i in range(3):
            c.get(upstream.port, "/bytes/%d" % (3100 + i), length=3100 + i)
        st = wait(lambda: (lambda s: s if s["sentinel_errors"] >= 1 else None)(get_stats(c.sock)["redis"]), 10,
                  "the sentinels' refusals counted")
        assert st["connected"] == 0, st
        r = run([HTTPSHIM, "check", "--connect", bare], shim=False, timeout=30)
        assert r.rc != 0 and b"NOAUTH" in r.out + r.err, r.describe()
    finally:
        fleet.stop()


def test_no_sentinel_answers_fails_open(upstream, tmp_path, sockdir, apps):
    """Sentinels that are not there: every request goes upstream and is answered, none
    waits longer than the tier allows, and the stats count the sentinel errors."""
    (tmp_path / "d").mkdir()
    url = "redis-sentinel://127.0.0.1:%d,127.0.0.1:%d/%s/0" % (free_port(), free_port(), MASTER)
    conf = conf_for(tmp_path / "d", sockdir, url, upstream)
    a = apps(conf, sockdir)
    t0 = time.time()
    for i in range(5):
        a.get(upstream.port, "/bytes/%d" % (2000 + i), length=2000 + i)
        a.get(upstream.port, "/bytes/%d" % (2000 + i), length=2000 + i)   # a memory hit
    assert time.time() - t0 < 10
    r = wait(lambda: (lambda s: s if s["sentinel_errors"] >= 1 else None)(get_stats(a.sock)["redis"]), 10,
             "sentinel errors counted")
    assert r["connected"] == 0 and r["mode"] == "sentinel" and r["master"] == "", r


def test_check_reads_sentinel_urls(tmp_path):
    """`httpshim check` takes the sentinel URL forms and refuses broken ones, without
    repeating a password."""
    require_build(HTTPSHIM)
    for url, ok in (("redis-sentinel://10.0.0.1:26379,10.0.0.2/mymaster/2", True),
                    ("redis-sentinel://:s3cret@10.0.0.1/mymaster", True),
                    ("redis-sentinel://10.0.0.1:26379", False),
                    ("redis-sentinel:///mymaster", False),
                    ("redis-sentinel://:s3cret@10.0.0.1:99999/mymaster", False),
                    ("redis-sentinel://10.0.0.1/my master/0", False)):
        path = tmp_path / "c.conf"
        path.write_text("[global]\ncache = %s\n" % url)
        r = run([HTTPSHIM, "check", path], shim=False)
        assert (r.rc == 0) == ok, (url, r.describe())
        assert b"s3cret" not in r.out + r.err, r.describe()
