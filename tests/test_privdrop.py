"""Rules read before privileges are dropped (issue 21, item 3): the rules file is read and
parsed in the library's constructor, so a master that starts as root and drops to `nobody`
(nginx, a program that calls setuid) runs shimmed with a rules file only root can read; a
process that cannot read it says so in one line on stderr and is listed by `httpshim stats`
as inert, with the reason. The rules file sits in a 0700 directory of root's."""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import pytest

from conftest import BUILD, SYS_PY, client_env, free_port, kill_group, run

HTTPSHIM = BUILD / "httpshim"
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a 0700 rules directory, a privilege drop)")


@pytest.fixture
def secret_rules(upstream):
    """A rules file in a 0700 directory of root's, outside pytest's own (0700) tree."""
    d = tempfile.mkdtemp(prefix="httpshim-secret-")
    os.chmod(d, 0o700)
    path = os.path.join(d, "rules.conf")
    with open(path, "w") as f:
        f.write("[upstream 127.0.0.1:%d]\ncache GET /custom* ttl=10m\n" % upstream.port)
    yield path
    shutil.rmtree(d, ignore_errors=True)


def stats_of(pid, user="nobody"):
    r = run([HTTPSHIM, "stats", "--json", "--user", user], shim=False)
    assert r.rc == 0, r.describe()
    doc = json.loads(r.out)
    return doc, [p for p in doc["processes"] if p["pid"] == pid], [p for p in doc["inert"] if p["pid"] == pid]


def wait_listening(port, proc, log):
    for _ in range(200):               # bounded: 10 s
        try:
            urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                "http://127.0.0.1:%d/nginx-alive" % port, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return                     # it answers
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    raise AssertionError("nginx did not start: %s" % open(log).read()[-2000:])


@pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed")
@pytest.mark.skipif(bool(os.environ.get("HTTPSHIM_TEST_PRELOAD")),
                    reason="nginx under the sanitizer runtime: its own exit-time leaks would be reported")
def test_nginx_workers_as_nobody_are_shimmed(upstream, secret_rules):
    """nginx: master as root, 2 workers as nobody, proxy_pass to the test upstream, no
    cache of its own. 6 GETs of one URL: with each worker's memory tier, the upstream sees
    at most 2 (one per worker), and the workers' stats sockets show the hits. Before the
    fix the workers read the rules at their first connect, as nobody, and were silently
    inert: 6 upstream requests."""

    d = tempfile.mkdtemp(prefix="httpshim-nginx-")
    os.chmod(d, 0o755)
    port = free_port()
    log = os.path.join(d, "error.log")
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write("user nobody nogroup;\nworker_processes 2;\npid %s/nginx.pid;\nerror_log %s info;\n"
                "events { worker_connections 256; }\n"
                "http {\n  access_log off;\n"
                "  client_body_temp_path %s/body; proxy_temp_path %s/proxy; fastcgi_temp_path %s/fcgi;\n"
                "  uwsgi_temp_path %s/uwsgi; scgi_temp_path %s/scgi;\n"
                "  server {\n    listen 127.0.0.1:%d;\n"
                "    location /custom { proxy_pass http://127.0.0.1:%d; proxy_http_version 1.1; }\n"
                "  }\n}\n" % (d, log, d, d, d, d, d, port, upstream.port))
    env = client_env(True, secret_rules)
    proc = subprocess.Popen(["nginx", "-p", d, "-c", os.path.join(d, "nginx.conf"), "-g", "daemon off;"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        wait_listening(port, proc, log)
        upstream.reset()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for i in range(6):
            body = opener.open("http://127.0.0.1:%d/custom/ngx?n=300&tag=nginx" % port, timeout=20).read()
            assert len(body) == 300
        seen = upstream.summary()["requests"]
        assert seen <= 2, "the workers were not shimmed: %d upstream requests for 6 GETs" % seen
        r = run([HTTPSHIM, "stats", "--json", "--user", "nobody"], shim=False)
        doc = json.loads(r.out)
        label = "127.0.0.1:%d" % upstream.port
        workers = [p for p in doc["processes"] if label in p["upstreams"] and p["upstreams"][label]["requests"]]
        assert workers and sum(p["upstreams"][label]["hits"] for p in workers) == 6 - seen, doc
        assert "httpshim:" not in open(log).read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        kill_group(proc.pid, quiet=True)
        proc.wait(timeout=15)
        shutil.rmtree(d, ignore_errors=True)


FETCH_AFTER_SETUID = (
    "import os, sys, json, urllib.request\n"
    "os.setgroups([]); os.setgid(%d); os.setuid(%d)\n"
    "o = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
    "for _ in range(2):\n"
    "    assert len(o.open(sys.argv[1], timeout=20).read()) == 200\n"
    "print(json.dumps({'engine': any(open(p).read().strip() == 'httpshim'\n"
    "      for p in __import__('glob').glob('/proc/self/task/*/comm'))}))\n" % (NOBODY, NOBODY))


def test_a_program_that_calls_setuid_before_connecting_is_shimmed(upstream, secret_rules):
    """As root, setuid(nobody), then two GETs of one URL: one upstream request (the second
    is a hit), nothing on stderr."""
    upstream.reset()
    r = run([SYS_PY, "-c", FETCH_AFTER_SETUID, upstream.url("/custom/setuid?n=200")], conf=secret_rules)
    assert r.rc == 0 and json.loads(r.out)["engine"] is True, r.describe()
    assert r.err == b"", r.describe()
    assert upstream.summary()["requests"] == 1


def test_a_process_that_cannot_read_the_rules_says_so_and_is_listed_inert(upstream, secret_rules):
    """Started as nobody: it cannot open the rules. One line on stderr names the file and
    the error; it runs unshimmed (2 upstream requests); `httpshim stats` lists it as inert
    with the reason, while it lives and after."""
    upstream.reset()
    code = ("import sys, time, urllib.request\n"
            "o = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
            "for _ in range(2):\n"
            "    assert len(o.open(sys.argv[1], timeout=20).read()) == 200\n"
            "print('fetched', flush=True)\n"
            "sys.stdin.read()\n")
    env = client_env(True, secret_rules)
    proc = subprocess.Popen(["setpriv", "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups",
                             SYS_PY, "-c", code, upstream.url("/custom/inert?n=200")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == b"fetched"
        assert upstream.summary()["requests"] == 2
        _, live, inert = stats_of(proc.pid)
        assert not live and len(inert) == 1, inert
        assert inert[0]["live"] is True and "Permission denied" in inert[0]["inert"], inert
        assert secret_rules in inert[0]["inert"]
        table = run([HTTPSHIM, "stats", "--user", "nobody"], shim=False)
        rows = [ln for ln in table.out.decode().splitlines() if ln.split()[:1] == [str(proc.pid)]]
        assert rows and "live" in rows[0] and "Permission denied" in rows[0], table.out.decode()
        proc.stdin.close()
        err = proc.stderr.read().decode()
        proc.wait(timeout=30)
        lines = err.splitlines()
        assert lines == ["httpshim: %s: Permission denied (the shim is inert in this process)" % secret_rules], lines
        _, _, inert = stats_of(proc.pid)
        assert len(inert) == 1 and inert[0]["live"] is False, inert
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        kill_group(proc.pid, quiet=True)
