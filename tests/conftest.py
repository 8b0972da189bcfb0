"""Fixtures and helpers for the httpshim real-client suite.

Run:  /usr/bin/python3 -m pytest -q -p no:cacheprovider tests

- The tree is built once per session with `make -C ROOT`; a failed build makes every
  test that needs the library (or build/epollclient) fail with make's output.
- `upstream` (per test, fresh counters) is a tests/upstream.py process started once per
  module; `Upstream.stats()` reads its control port.
- `run(cmd, shim=..., conf=..., timeout=...)` runs a client, returns (rc, stdout, stderr)
  with `.timed_out`; a process still running at the timeout is killed by its process
  group id (it was started in its own session) and rc is None.
"""

import atexit
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(os.path.abspath(__file__)).parent.parent
TESTS = ROOT / "tests"
# `make test-asan` points these at the sanitizer build and puts the sanitizer runtimes
# ahead of the library in LD_PRELOAD (they must be the first objects loaded).
BUILD = ROOT / os.environ.get("HTTPSHIM_TEST_BUILD", "build")
LIB = BUILD / "libhttpshim.so"
PRELOAD = " ".join(os.environ.get("HTTPSHIM_TEST_PRELOAD", "").split() + [str(LIB)])
EPOLLCLIENT = BUILD / "epollclient"
PYCLIENTS = TESTS / "pyclients"
UPSTREAM_PY = TESTS / "upstream.py"
SYS_PY = "/usr/bin/python3"

sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(PYCLIENTS))

DEFAULT_TEST_TIMEOUT = 240

# Variables that would change how clients behave; never inherited by a client.
_SCRUB = ("LD_PRELOAD", "HTTPSHIM_CONF", "HTTPSHIM_DEBUG", "http_proxy", "HTTP_PROXY",
          "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY",
          "CURL_HOME", "WGETRC", "PYTHONSTARTUP", "PYTHONPATH")


def _real_python(cmd):
    try:
        out = subprocess.run([cmd, "-c", "import sys; print(sys.executable)"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             timeout=60, check=True).stdout.decode().strip()
        return out or None
    except (OSError, subprocess.SubprocessError):
        return None


def _pythons():
    """/usr/bin/python3 and the `python3` first on PATH (pyenv), resolved to the real
    interpreter binary (not a pyenv shell shim), deduplicated."""
    found = [SYS_PY]
    other = shutil.which("python3")
    if other:
        real = _real_python(other)
        if real and os.path.realpath(real) != os.path.realpath(SYS_PY):
            found.append(real)
    return found


PYTHONS = _pythons()


# ------------------------------------------------------------------------ build
_BUILD = {}


def build_once():
    if "rc" not in _BUILD and os.environ.get("HTTPSHIM_TEST_BUILT") == "1":
        # `make test` / `make test-asan` built everything (with the right flags) before
        # starting the workers: none of them runs make again, alongside the others
        _BUILD.update(rc=0, out="built by make before the run")
    if "rc" not in _BUILD:
        try:
            p = subprocess.run(["make", "-C", str(ROOT), "BUILD=%s" % BUILD, "test-bins"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=900)
            _BUILD["rc"] = p.returncode
            _BUILD["out"] = p.stdout.decode(errors="replace")
        except subprocess.TimeoutExpired as e:
            _BUILD["rc"] = "timeout"
            _BUILD["out"] = (e.stdout or b"").decode(errors="replace")
    return _BUILD


def require_build(artifact=LIB):
    b = build_once()
    if b["rc"] != 0 or not Path(artifact).exists():
        pytest.fail("`make -C %s` failed (rc=%s) or %s missing:\n%s"
                    % (ROOT, b["rc"], artifact, b["out"][-6000:]), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def build():
    """Build once per session, before any test."""
    b = build_once()
    if b["rc"] != 0:
        sys.stderr.write("\n*** make -C %s FAILED (rc=%s):\n%s\n"
                         % (ROOT, b["rc"], b["out"][-4000:]))
    return b


# The longest tests (3-9 s each, mostly waiting on servers they kill and restart) go
# first, dealt evenly: pytest-xdist hands each worker a first chunk of consecutive tests
# (a quarter of its share), then more as it drains. One of them started last decided when
# the whole run ended; all of them in the first worker's chunk kept it busy 83 s while the
# other five had finished at 55.
SLOW_FIRST = ("test_redis_killed_frozen_restarted_during_run", "test_slots_move_while_traffic_runs",
              "test_an_upstream_closing_an_idle_pooled_connection_is_heard", "test_redis_killed_and_restarted",
              "test_sentinels_with_a_password_of_their_own", "test_entries_are_shared_through_the_master",
              "test_random_pipelines_of_connection_state_answer_as_direct", "test_a_master_gone_fails_open",
              "test_silent_stats_client_does_not_stall_app", "java-httpclient", "test_a_jvm_burst",
              "test_redis_keeps_stale_entries_for_the_window", "test_promoted_entry_keeps_remaining_ttl",
              "test_stopped_processes_cost_one_timeout", "test_a_post_on_a_new_connection_never_meets",
              "test_a_sentinel_that_names_a_dead_master_is_passed_over")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT))
    slow = [it for it in items if any(s in it.nodeid for s in SLOW_FIRST)]
    rest = [it for it in items if not any(s in it.nodeid for s in SLOW_FIRST)]
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    chunk = max(len(items) // max(workers, 1) // 4, 2)    # (xdist's LoadScheduling first chunk)
    order = []
    for w in range(workers):
        mine = slow[w::workers]
        take = max(chunk - len(mine), 0) if w < workers - 1 else 0
        order += mine + rest[:take]
        rest = rest[take:]
    items[:] = order + rest


# ------------------------------------------------------------------------ running
class Result(tuple):
    """(rc, stdout, stderr) plus .timed_out; rc is None after a timeout."""

    def __new__(cls, rc, out, err, timed_out=False, cmd=None):
        self = tuple.__new__(cls, (rc, out, err))
        self.timed_out = timed_out
        self.cmd = cmd
        return self

    rc = property(lambda self: self[0])
    out = property(lambda self: self[1])
    err = property(lambda self: self[2])

    def describe(self):
        return "cmd=%s\nrc=%s timed_out=%s\nstdout=%r\nstderr=%r" % (
            " ".join(map(str, self.cmd or []))[:600], self[0], self.timed_out,
            self[1][-400:], self[2][-3000:])


def client_env(shim, conf=None, extra=None):
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if shim:
        require_build()
        assert conf is not None, "a shimmed run needs a rules file path"
        env["LD_PRELOAD"] = PRELOAD
        env["HTTPSHIM_CONF"] = str(conf)
    if extra:
        env.update(extra)
    return env


# Programs the sanitizer run cannot preload into: with the ASan runtime preloaded, glibc's
# setlocale lock deadlocks in programs that use locales (curl and wget at startup, even
# without the shim; python and coreutils at exit, in the p11-kit destructor that libcurl's
# dependencies bring in), and the JVM takes SIGSEGV on purpose (its safepoints and null
# checks), which the ASan runtime reports as a crash. The sanitizer run therefore drives
# the library with the C client.
SANITIZER_SKIP = set(os.environ.get("HTTPSHIM_TEST_SKIP_CLIENTS", "").split())


def run(cmd, shim=True, conf=None, timeout=60, env=None, input=None, cwd=None):
    """Run `cmd` (list) with or without the shim; returns Result(rc, out, err)."""
    cmd = [str(c) for c in cmd]
    target, preloaded = cmd[0], shim
    if os.path.basename(cmd[0]) == "httpshim" and "--" in cmd[:-1]:
        target, preloaded = cmd[cmd.index("--") + 1], True   # `httpshim run -- CMD` preloads CMD
    if preloaded and os.path.basename(target) in SANITIZER_SKIP:
        pytest.skip("%s cannot run under the sanitizer runtime" % os.path.basename(target))
    e = client_env(shim, conf, env)
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e,
                         cwd=str(cwd) if cwd else None, start_new_session=True)
    try:
        out, err = p.communicate(input=input, timeout=timeout)
        return Result(p.returncode, out, err, cmd=cmd)
    except subprocess.TimeoutExpired:
        kill_group(p.pid)
        try:
            out, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = b"", b""
        return Result(None, out, err, timed_out=True, cmd=cmd)
    finally:
        if p.poll() is None:
            kill_group(p.pid)
            p.wait(timeout=30)
        # Children a client left behind in its session (process group == its pid).
        kill_group(p.pid, quiet=True)


def kill_group(pgid, quiet=False):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if not quiet:
            pass


def pyclient(name):
    return str(PYCLIENTS / name)


_java_classes = []


def java_fetch(client, *args):
    """The command that runs tests/java/JavaFetch.java with the stack `client` names,
    compiled once per test process. The JDK refuses to send a Connection header unless
    told it may (the pooling test sends Connection: close, as every other client does)."""
    if not _java_classes:
        d = tempfile.mkdtemp(prefix="httpshim-java-")
        atexit.register(shutil.rmtree, d, True)
        r = run(["javac", "-d", d, TESTS / "java" / "JavaFetch.java"], shim=False, timeout=120)
        assert r.rc == 0, r.describe()
        _java_classes.append(d)
    return ["java", "-Xshare:auto", "-XX:TieredStopAtLevel=1",
            "-Dsun.net.http.allowRestrictedHeaders=true",
            "-Djdk.httpclient.allowRestrictedHeaders=connection",
            "-cp", _java_classes[0], "JavaFetch", "--lib", client.split("-", 1)[1]] + [str(a) for a in args]


def jlines(out):
    """Parse JSON lines from a client's stdout."""
    res = []
    for line in out.decode(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{") or line.startswith("["):
            res.append(json.loads(line))
    return res


# ------------------------------------------------------------------------ rules
def write_rules(directory, upstreams, pool_max=4, idle="60s", timeout="5s",
                extra_global="", name="rules.conf", raw=None):
    """Write a rules file; `upstreams` are ints (127.0.0.1:PORT) or 'host:port'."""
    path = Path(directory) / name
    if raw is not None:
        path.write_text(raw)
        return str(path)
    lines = ["# written by tests/conftest.py", "[global]",
             "pool_max_per_host = %d" % pool_max,
             "pool_idle_timeout = %s" % idle,
             "upstream_timeout  = %s" % timeout]
    if extra_global:
        lines.append(extra_global)
    for u in upstreams:
        hp = "127.0.0.1:%d" % u if isinstance(u, int) else u
        lines += ["", "[upstream %s]" % hp]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def free_port(host="127.0.0.1"):
    """A port nothing listens on (bound then released; nothing else here binds it)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------- a server of the test's own
class _TcpServer(object):
    def __init__(self):
        self.connections = 0


@contextmanager
def tcp_server(serve):
    """A listener on 127.0.0.1 whose every connection runs serve(conn) on a thread of its
    own (the connection closed after): .port, .connections (accepted so far). Stopped on
    exit: the accept is woken by a shutdown (a close alone leaves it waiting)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    state = _TcpServer()
    state.port = srv.getsockname()[1]
    stop = threading.Event()

    def one(conn):
        with conn:
            try:
                serve(conn)
            except OSError:
                pass

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            state.connections += 1
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield state
    finally:
        stop.set()
        try:
            srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        srv.close()
        t.join(5)


# ------------------------------------------------------------------------ upstream
class Upstream(object):
    """tests/upstream.py in a process of its own; with tls=(chain, key) it serves HTTPS."""

    def __init__(self, workdir, python=SYS_PY, host="127.0.0.1", tls=None, port=0, tls_args=()):
        self.workdir = Path(workdir)
        self.tls = tls
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        pf = self.workdir / "port"
        cf = self.workdir / "cport"
        for f in (pf, cf):
            if f.exists():
                f.unlink()
        self.log = open(self.workdir / "upstream.log", "wb")
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        self.proc = subprocess.Popen(
            [python, str(UPSTREAM_PY), "--port-file", str(pf),
             "--control-port-file", str(cf), "--host", host, "--port", str(port)]
            + (["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])] if tls else []) + [str(a) for a in tls_args],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            if pf.exists() and cf.exists():
                break
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if not (pf.exists() and cf.exists()):
            self.stop()
            raise RuntimeError("upstream did not start: %s"
                               % (self.workdir / "upstream.log").read_text()[-2000:])
        self.port = int(pf.read_text())
        self.cport = int(cf.read_text())
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def url(self, path="/", host=None):
        h = host or ("[%s]" % self.host if ":" in self.host else self.host)
        return "%s://%s:%d%s" % ("https" if self.tls else "http", h, self.port, path)

    def _control(self, method, path):
        req = urllib.request.Request("http://127.0.0.1:%d%s" % (self.cport, path),
                                     method=method, data=b"" if method == "POST" else None)
        with self._opener.open(req, timeout=30) as r:
            return json.loads(r.read().decode())

    def stats(self):
        return self._control("GET", "/stats")

    def reset(self):
        assert self.proc.poll() is None, "upstream died: %s" % (
            (self.workdir / "upstream.log").read_text()[-2000:])
        return self._control("POST", "/reset")

    def summary(self, st=None):
        st = st or self.stats()
        return {k: st[k] for k in ("connections", "open", "peak", "requests")}

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                kill_group(self.proc.pid)
                self.proc.wait(timeout=15)
        kill_group(self.proc.pid, quiet=True)
        self.log.close()


@pytest.fixture(scope="module")
def upstream_server(tmp_path_factory):
    u = Upstream(tmp_path_factory.mktemp("upstream"))
    yield u
    u.stop()


@pytest.fixture
def upstream(upstream_server):
    upstream_server.reset()
    return upstream_server


@pytest.fixture(scope="module")
def upstream_b_server(tmp_path_factory):
    """A second upstream (its own process and port)."""
    u = Upstream(tmp_path_factory.mktemp("upstream-b"))
    yield u
    u.stop()


@pytest.fixture
def upstream_b(upstream_b_server):
    upstream_b_server.reset()
    return upstream_b_server


@pytest.fixture
def sockdir():
    """A short private directory under /tmp for stats sockets (Unix socket paths are
    limited to 107 bytes) and, where a process of another uid must read it, rules files."""
    d = tempfile.mkdtemp(prefix="hs", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def rules(tmp_path, upstream):
    """A rules file listing the test upstream, pool_max_per_host = 4."""
    return write_rules(tmp_path, [upstream.port])


@pytest.fixture
def lib():
    require_build()
    return str(LIB)


@pytest.fixture
def epollclient():
    require_build(EPOLLCLIENT)
    return str(EPOLLCLIENT)


def hop_by_hop(name):
    n = name.lower()
    return n in ("connection", "keep-alive", "te", "trailer", "upgrade",
                 "transfer-encoding", "proxy-connection")


class JsonLineProcess(object):
    """A long-lived child that answers JSON lines on stdout (tests/pyclients/statsapp.py,
    redisload.py): started in its own session, stopped by its pid."""

    NAME = "client"

    def __init__(self, argv, env, cwd=None):
        self.argv = [str(a) for a in argv]
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=env, start_new_session=True,
                                     cwd=str(cwd) if cwd else None)
        self.pid = self.proc.pid
        self.fd = self.proc.stdout.fileno()
        self.buf = b""

    def describe(self):
        self.err.seek(0)
        return "cmd=%s pid=%d rc=%s stderr=%r" % (" ".join(self.argv)[:300], self.pid,
                                                  self.proc.poll(), self.err.read()[-3000:])

    def read(self, timeout=60):
        deadline = time.time() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError("%s did not answer within %.0f s (hung?): %s"
                                     % (self.NAME, timeout, self.describe()))
            r, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if r:
                data = os.read(self.fd, 65536)
                if not data:
                    self.proc.wait(timeout=30)
                    raise AssertionError("%s exited: %s" % (self.NAME, self.describe()))
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line.decode())

    def send(self, obj):
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        kill_group(self.pid, quiet=True)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.err.close()


def wait_until(cond, timeout, what, swallow=(OSError, ConnectionError, AssertionError)):
    """cond() until it returns something true (which is returned), at most `timeout` s;
    the exceptions in `swallow` count as not yet."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            v = cond()
            if v:
                return v
        except swallow:
            pass
        time.sleep(0.05)
    raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))


def strace_calls(log, main_pid=None):
    """System calls by name in an `strace -f -o` log, split into the process's own (main)
    thread and the others (the engine): {"app": {name: n}, "engine": {name: n}}."""
    out = {"app": {}, "engine": {}}
    lines = log.read_text().splitlines()
    first = None
    for ln in lines:
        m = re.match(r"^(\d+)\s+(?:<\.\.\. )?([a-z_0-9]+)[( ]", ln)
        if not m or "resumed>" in ln or ln.rstrip().endswith("+++") or "--- SIG" in ln:
            continue
        tid, name = int(m.group(1)), m.group(2)
        first = first or tid
        side = out["app"] if tid == first else out["engine"]
        side[name] = side.get(name, 0) + 1
    return out
