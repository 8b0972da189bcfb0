"""The operator's view (issue 16): `httpshim stats` answers "is it working, what did it save,
what is wrong" at a glance — the table's numbers are the JSON's, exited processes count
(a curl in a shell loop), --watch shows rates and redraws in place, Redis down shows in
the table, per-rule hit rates, and the monitoring kit in docs/ only uses metrics /metrics
serves."""
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, SANITIZER_SKIP, run, tcp_server, write_rules
from test_stats import cli_env
from test_redis import redis, redis_conf, redis_servers, redis_url  # noqa: F401 (fixtures)
from test_stats import App, HTTPSHIM, apps, cli, get_stats, label, settled_stats, stats_conf, wait_socket  # noqa: F401

CURL = ["curl", "-s", "-o", "/dev/null", "-o", "/dev/null"]


def table(cli, conf, *extra):
    r = run([cli, "stats", "-c", conf] + list(extra), shim=False)
    assert r.rc == 0, r.describe()
    return r.out.decode()


def rows_after(text, head):
    """The rows of the section whose header line starts with `head`: {first word: fields}."""
    lines = text.splitlines()
    at = [i for i, ln in enumerate(lines) if ln.split()[:1] == [head]]
    assert at, "no %s section in:\n%s" % (head, text)
    out = {}
    for ln in lines[at[0] + 1:]:
        if not ln.strip():
            break
        f = ln.split()
        out.setdefault(f[0], f[1:])
    return lines[at[0]].split()[1:], out


def test_table_numbers_equal_the_json(upstream, sockdir, tmp_path, apps, cli):
    """A known run in one live process: every number of its upstream row, its pool row, its
    tunnel row and its process row is the JSON's; quantiles are in milliseconds."""
    conf = stats_conf(tmp_path, sockdir, [(upstream, ["GET /bytes/* ttl=10m"])])
    app = apps(conf, sockdir)
    app.get(upstream.port, "/bytes/100", n=4)           # 1 miss, 3 hits
    app.get(upstream.port, "/echo", n=2)                # not cacheable
    wait_socket(app.sock)
    settled_stats(app.sock)
    doc = json.loads(run([cli, "stats", "-c", conf, "--json"], shim=False).out.decode())
    u = doc["total"]["upstreams"][label(upstream)]
    text = table(cli, conf)
    assert "1 live process, 0 exited" in text and "REDIS  not configured" in text, text
    head, rows = rows_after(text, "UPSTREAM")
    assert head[:12] == ["REQUESTS", "HIT%", "HITS", "COALESCED", "STALE", "UP.REQS", "CLIENT", "UPSTREAM", "SAVED",
                         "TUNNELS", "ERRORS", "p50"], head
    row = rows[label(upstream)]
    saved = max(0, u["client_connections"] - u["upstream_conns_opened"] - u["tunnels"])
    want = [u["requests"], "%.1f" % (100.0 * u["hits"] / u["requests"]), u["hits"], u["coalesced"],
            u["stale_while_revalidate"] + u["stale_if_error"], u["upstream_requests"], u["client_connections"],
            u["upstream_conns_opened"], saved, u["tunnels"], sum(u["errors"].values())]
    assert row[:11] == [str(x) for x in want], (row, want)
    assert u["requests"] == 6 and u["hits"] == 3 and u["client_connections"] == 6 and saved > 0, u
    assert all(re.match(r"^\d+(\.\d+)?ms$", q) for q in row[11:13]), row
    head, rows = rows_after(text, "POOL")
    assert head[:5] == ["IDLE", "BUSY", "WAITING", "WAITED", "TIMEOUTS"], head
    assert rows[label(upstream)][:5] == [str(u[k]) for k in ("pool_idle", "pool_busy", "pool_waiting", "queue_waits",
                                                             "queue_timeouts")], rows
    head, rows = rows_after(text, "TUNNELS")
    assert rows[label(upstream)][:5] == [str(u[k]) for k in ("tunnels", "tunnels_tls", "tunnels_not_http",
                                                             "tunnels_too_large", "tunnels_other")], rows
    head, rows = rows_after(text, "PID")
    assert head[:4] == ["COMMAND", "UPTIME", "STATE", "REQUESTS"] and head[-2:] == ["POLLING", "PAID%"], head
    prow = rows[str(app.pid)]
    assert prow[0] == "python3" and prow[2] == "live" and prow[3] == "6" and prow[4] == "3", prow
    proc = [p for p in doc["processes"] if p["pid"] == app.pid][0]["engine"]
    # (the engine's loop moves on between the JSON and the table: its polling time only grows)
    assert re.match(r"^\d+\.\d{3}s$", prow[-2]) and float(prow[-2][:-1]) >= round(proc["poll_seconds"], 3) - 0.001, \
        (prow, proc)
    assert prow[-1] == "-" or 0 <= float(prow[-1]) <= 100, prow


def test_a_loop_of_curl_processes_is_counted_after_they_exit(upstream, sockdir, tmp_path, cli):
    """10 curl processes, each two GETs of one URL (a miss, then a hit on its kept-alive
    connection), all gone before anyone asks: their final counters were left beside their
    sockets, and `httpshim stats` sums them (10 exited, 20 requests, 10 hits); --live
    leaves them out."""
    if "curl" in SANITIZER_SKIP:
        pytest.skip("curl cannot run under the sanitizer runtime")
    conf = stats_conf(tmp_path, sockdir, [(upstream, ["GET /bytes/* ttl=10m"])])
    url = upstream.url("/bytes/300")
    for _ in range(10):
        r = run(CURL + [url, url], conf=conf)
        assert r.rc == 0, r.describe()
    doc = json.loads(run([cli, "stats", "-c", conf, "--json"], shim=False).out.decode())
    total = doc["total"]
    assert total["processes"] == 0 and total["exited"] == 10, total
    u = total["upstreams"][label(upstream)]
    assert u["requests"] == 20 and u["hits"] == 10, u
    assert len(doc["processes"]) == 10 and all(p["exited"] and p["comm"] == "curl" for p in doc["processes"]), doc
    text = table(cli, conf)
    assert "0 live processes, 10 exited" in text, text
    _, rows = rows_after(text, "UPSTREAM")
    assert rows[label(upstream)][0] == "20", text
    assert sum(1 for ln in text.splitlines() if " curl " in ln and "exited" in ln) == 10, text
    live = json.loads(run([cli, "stats", "-c", conf, "--json", "--live"], shim=False).out.decode())
    assert live["total"]["exited"] == 0 and live["processes"] == [], live


def test_exited_records_are_bounded_by_count_and_age(upstream, sockdir, tmp_path, cli):
    """Records beyond the newest 256, and any older than an hour, are removed by whoever
    looks next (the CLI here; an exiting process does the same)."""
    conf = stats_conf(tmp_path, sockdir, [(upstream, ["GET /bytes/* ttl=10m"])])
    d = Path(sockdir) / "s"
    d.mkdir(mode=0o700, exist_ok=True)
    doc = {"pid": 0, "comm": "x", "exited": True, "upstreams": {}, "redis": {}}
    now = time.time()
    for i in range(300):
        p = d / ("%d.sock.exited" % (100000 + i))
        p.write_text(json.dumps(dict(doc, pid=100000 + i)))
        os.utime(p, (now - i, now - i))
    old = d / "99999.sock.exited"
    old.write_text(json.dumps(dict(doc, pid=99999)))
    os.utime(old, (now - 7200, now - 7200))
    out = json.loads(run([cli, "stats", "-c", conf, "--json"], shim=False).out.decode())
    left = sorted(p.name for p in d.iterdir() if p.name.endswith(".exited"))
    assert len(left) == 256 and not old.exists(), len(left)
    assert "100000.sock.exited" in left and "100299.sock.exited" not in left   # the newest stay
    assert out["total"]["exited"] == 256


def test_watch_redraws_in_place_with_rates(upstream, sockdir, tmp_path, apps, cli):
    """`--watch 0.5` under tmux (a real terminal) while the app makes requests: the screen
    holds one table (redrawn in place, not scrolled) with REQ/s, HITS/s and UP.REQ/s, the
    request rate above zero; with stdout a pipe, plain blocks without escape codes."""
    if not shutil.which("tmux"):
        pytest.fail("tmux is not installed (tools/install-deps installs it)", pytrace=False)
    conf = stats_conf(tmp_path, sockdir, [(upstream, ["GET /bytes/* ttl=10m"])])
    app = apps(conf, sockdir)
    app.get(upstream.port, "/bytes/10")
    wait_socket(app.sock)
    sock = str(tmp_path / "tmux.sock")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "HTTPSHIM_CONF", "TMUX")}
    subprocess.run(["tmux", "-S", sock, "new-session", "-d", "-x", "220", "-y", "60",
                    "%s stats -c %s --watch 0.5" % (cli, conf)], env=env, check=True, timeout=30)
    server_pid = None
    try:
        server_pid = int(subprocess.run(["tmux", "-S", sock, "display-message", "-p", "#{pid}"], env=env,
                                        stdout=subprocess.PIPE, timeout=30).stdout.decode().strip())
        screen, deadline = "", time.time() + 30
        while time.time() < deadline:
            app.get(upstream.port, "/bytes/10", n=5)
            screen = subprocess.run(["tmux", "-S", sock, "capture-pane", "-p"], env=env, stdout=subprocess.PIPE,
                                    timeout=30).stdout.decode()
            _, rows = rows_after(screen, "UPSTREAM") if "REQ/s" in screen else (None, {})
            row = rows.get(label(upstream))
            if row and float(row[-3]) > 0:
                break
            time.sleep(0.3)
        assert "REQ/s" in screen and "HITS/s" in screen and "UP.REQ/s" in screen, screen
        assert sum(1 for ln in screen.splitlines() if ln.startswith("UPSTREAM ")) == 1, screen
        assert float(rows_after(screen, "UPSTREAM")[1][label(upstream)][-3]) > 0, screen
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], env=env, timeout=30)
        if server_pid:
            try:
                os.kill(server_pid, 9)
            except ProcessLookupError:
                pass
    p = subprocess.Popen([cli, "stats", "-c", conf, "--watch", "0.2"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        time.sleep(1.5)
    finally:
        p.terminate()
        out, _ = p.communicate(timeout=30)
    text = out.decode()
    assert text.count("\n--- ") + text.startswith("--- ") >= 2 and "\033[" not in text, text[:2000]


def test_a_stopped_redis_shows_as_disconnected(upstream, sockdir, tmp_path, apps, cli, redis):
    """Redis up: the table's REDIS line says connected; Redis stopped (and the app asked
    again, so its engine sees the connection gone): DISCONNECTED."""
    conf = redis_conf(tmp_path, sockdir, redis_url(redis), [(upstream, ["GET /bytes/* ttl=10m"])])
    app = apps(conf, sockdir)
    app.get(upstream.port, "/bytes/10", n=2)
    wait_socket(app.sock)
    text = table(cli, conf)
    line = [ln for ln in text.splitlines() if ln.startswith("REDIS")]
    assert line and "connected (1 of 1 live processes)" in line[0], text
    redis.kill()
    deadline = time.time() + 30
    while time.time() < deadline and get_stats(app.sock)["redis"]["connected"]:
        app.get(upstream.port, "/bytes/11")
        time.sleep(0.2)
    line = [ln for ln in table(cli, conf).splitlines() if ln.startswith("REDIS")]
    assert line and "DISCONNECTED (0 of 1 live processes)" in line[0], line


def test_each_cache_rule_counts_its_requests_and_hits(upstream, sockdir, tmp_path, apps, cli):
    """Two rules: one that pays off, one that never hits. /stats, /metrics (a rule label) and
    `httpshim stats --rules` say which."""
    conf = stats_conf(tmp_path, sockdir, [(upstream, ["GET /bytes/* ttl=10m", "GET /status/* ttl=10m"])])
    app = apps(conf, sockdir)
    app.get(upstream.port, "/bytes/10", n=5)
    for code in (201, 202, 203):                       # distinct keys: each a miss
        app.get(upstream.port, "/status/%d" % code, status=code)
    wait_socket(app.sock)
    rules = get_stats(app.sock)["upstreams"][label(upstream)]["rules"]
    assert [(r["rule"], r["requests"], r["hits"]) for r in rules] == [("GET /bytes/*", 5, 4), ("GET /status/*", 3, 0)]
    from test_stats import curl_unix
    metrics = curl_unix(app.sock, "/metrics").out.decode()
    lb = label(upstream)
    assert 'httpshim_rule_hits_total{upstream="%s",rule="GET /bytes/*"} 4' % lb in metrics, metrics[-3000:]
    assert 'httpshim_rule_requests_total{upstream="%s",rule="GET /status/*"} 3' % lb in metrics
    text = table(cli, conf, "--rules")
    rows = [ln.split() for ln in text.splitlines()[1:]]
    assert [lb, "GET", "/bytes/*", "5", "4", "80.0"] in rows and [lb, "GET", "/status/*", "3", "0", "0.0"] in rows, text


def metric_families(text):
    names = set()
    for ln in text.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", ln)
        if m:
            names.add(m.group(1))
            if m.group(2) == "histogram":
                names |= {m.group(1) + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_monitoring_kit_uses_only_served_metrics(upstream, sockdir, tmp_path, apps):
    """Every httpshim_* name in docs/grafana-dashboard.json and docs/prometheus-alerts.yml is
    one that /metrics serves; the dashboard is valid JSON with panels; each alert has an
    expression and a summary."""
    from test_stats import curl_unix
    conf = stats_conf(tmp_path, sockdir, [(upstream, ["GET /bytes/* ttl=10m"])])
    app = apps(conf, sockdir)
    app.get(upstream.port, "/bytes/10")
    wait_socket(app.sock)
    served = metric_families(curl_unix(app.sock, "/metrics").out.decode())
    dash = (ROOT / "docs" / "grafana-dashboard.json").read_text()
    alerts = (ROOT / "docs" / "prometheus-alerts.yml").read_text()
    panels = json.loads(dash)["panels"]
    assert len(panels) >= 6 and all(p.get("targets") for p in panels if p.get("type") != "row"), panels
    used = set(re.findall(r"\bhttpshim_[a-z_]+", dash + alerts))
    assert used and used <= served, sorted(used - served)
    rules = re.findall(r"^\s*- alert: (\S+)", alerts, re.M)
    assert {"HttpshimHitRateCollapsed", "HttpshimRedisDown", "HttpshimQueueTimeouts", "HttpshimErrorRate"} <= set(rules)
    assert alerts.count("expr:") == len(rules) and alerts.count("summary:") == len(rules), alerts


TUNNELLER = r'''
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"\x00\x01 not http at all\r\n\r\n")
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    s.close()
print("done")
'''


def test_tunnelled_connections_are_not_counted_as_saved(upstream, sockdir, tmp_path, cli):
    """Connections the shim can only tunnel (here: bytes that are not HTTP) each open an
    upstream connection of their own: the table shows them as tunnels, NOT.HTTP in the
    tunnel section, and no connection saved."""
    conf = stats_conf(tmp_path, sockdir, [(upstream, ["GET /bytes/* ttl=10m"])])
    from conftest import SYS_PY
    r = run([SYS_PY, "-c", TUNNELLER, upstream.port, 6], conf=conf)
    assert r.rc == 0 and b"done" in r.out, r.describe()
    text = table(cli, conf)
    _, rows = rows_after(text, "UPSTREAM")
    row = rows[label(upstream)]
    assert row[6] == "6" and row[8] == "0" and row[9] == "6", text        # CLIENT, SAVED, TUNNELS
    _, rows = rows_after(text, "TUNNELS")
    assert rows[label(upstream)][:3] == ["6", "0", "6"], text               # ALL, TLS, NOT.HTTP


def test_a_stats_directory_another_user_controls_is_never_used(upstream, sockdir, tmp_path, cli):
    """The stats directory made ahead by another user (nobody), world-writable with the
    sticky bit: its owner may remove anything in it and bind a socket of its own under a
    process's name. The library puts no socket there (the process runs, unshimmed stats),
    and `httpshim stats` asks nothing found there. Before, the library accepted any sticky
    directory, and a socket planted there answered `stats` and `purge` for the process."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory another user owns")
    import pwd
    foreign = Path(sockdir) / "foreign"
    foreign.mkdir()
    os.chown(foreign, pwd.getpwnam("nobody").pw_uid, -1)
    os.chmod(foreign, 0o1777)
    conf = stats_conf(tmp_path, sockdir, [(upstream, ["GET /bytes/* ttl=10m"])], sub="foreign")
    code = ("import os, socket, sys, time\n"
            "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
            "s.sendall(b'GET /bytes/10 HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
            "while s.recv(65536): pass\n"
            "print(sorted(os.listdir(sys.argv[2])))\n")
    r = run([sys.executable, "-c", code, upstream.port, foreign], conf=conf)
    assert r.rc == 0 and r.out.strip() == b"[]", r.describe()
    assert upstream.stats()["requests"] == 1
    planted = foreign / ("%d.sock" % os.getpid())     # a live pid's name, a socket of the test's
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(planted))
    s.listen(1)
    try:
        doc = json.loads(run([cli, "stats", "-c", conf, "--json"], shim=False).out.decode())
        assert doc["total"]["processes"] == 0, doc
        assert planted.exists()
    finally:
        s.close()


def test_a_stopped_processs_socket_survives_a_refused_connect(sockdir, tmp_path, cli):
    """A live process whose stats socket refuses a connection (stopped with its backlog
    full, here a socket bound and not listening, under a live pid's name): `httpshim stats`
    reports nothing for it and leaves the socket alone. Before, it removed the socket, and
    the process's stats were gone for the rest of its life."""
    d = Path(sockdir) / "refusing"
    d.mkdir(mode=0o700)
    conf = write_rules(tmp_path, [], name="refusing.conf", raw="[global]\nstats_socket = %s/%%p.sock\n" % d)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        path = d / ("%d.sock" % sleeper.pid)
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))                             # (not listening: connects are refused)
        run([cli, "stats", "-c", conf, "--json"], shim=False)
        assert path.exists(), "the live process's socket was removed"
        s.close()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_rules_file_that_is_not_a_regular_file_is_refused_at_once(tmp_path, cli):
    """HTTPSHIM_CONF naming a FIFO, or /dev/stdin: the library reads its rules in every
    preloaded program's constructor, where a FIFO blocked the program forever (even
    `/bin/echo`) and /dev/stdin ate its input. Now the process runs unshimmed, and
    `httpshim check` says why."""
    fifo = tmp_path / "rules.fifo"
    os.mkfifo(fifo)
    r = run(["/bin/echo", "hi"], conf=str(fifo), timeout=20)
    assert not r.timed_out and r.rc == 0 and r.out == b"hi\n", r.describe()
    r = run(["cat"], conf="/dev/stdin", input=b"line1\nline2\n", timeout=20)
    assert r.out == b"line1\nline2\n", r.describe()
    r = run([cli, "check", fifo], shim=False, timeout=20)
    assert r.rc == 1 and b"not a regular file" in r.out + r.err, r.describe()
    # nor one over 1 MiB: 54 MB of comments cost every preloaded program 327 ms at its start
    big = tmp_path / "big.conf"
    big.write_bytes(b"# a comment line of a file far larger than any set of rules\n" * 20000)
    r = run(["/bin/echo", "hi"], conf=str(big), timeout=20)
    assert r.rc == 0 and r.out == b"hi\n", r.describe()
    r = run([cli, "check", big], shim=False, timeout=20)
    assert r.rc == 1 and b"larger than 1024 KiB" in r.out + r.err, r.describe()


def test_secret_files_that_are_not_regular_files_and_a_repeated_cache_are_refused(tmp_path, cli):
    """redis_password_file / redis_secret_file naming a FIFO or /dev/stdin: read in every
    preloaded program's constructor, the FIFO blocked /bin/true forever and /dev/stdin ate
    cat's input as the secret. Now such a file is refused (the process inert, `check` says
    why). And `cache` said twice laid the second URL over what the first set (its unix
    socket, its user and password): refused, naming both lines."""
    fifo = tmp_path / "pw.fifo"
    os.mkfifo(fifo)
    for key, path in (("redis_password_file", fifo), ("redis_secret_file", fifo), ("redis_secret_file", "/dev/stdin")):
        conf = write_rules(tmp_path, [], name="secret.conf", raw="[global]\ncache = redis://127.0.0.1:1/0\n%s = %s\n"
                           "\n[upstream 127.0.0.1:9]\n" % (key, path))
        r = run(["cat"], conf=conf, input=b"line1\n", timeout=20)
        assert not r.timed_out and r.rc == 0 and r.out == b"line1\n", (key, path, r.describe())
        c = run([cli, "check", conf], shim=False, timeout=20)
        assert c.rc == 1 and b"not a regular file" in c.out + c.err, c.describe()
    conf = write_rules(tmp_path, [], name="twice.conf", raw="[global]\ncache = redis+unix:///x.sock\n"
                       "cache = redis://127.0.0.1:6379/0\n")
    c = run([cli, "check", conf], shim=False, timeout=20)
    assert c.rc == 1 and b":3: cache is set twice (line 2 first)" in c.out + c.err, c.describe()


@pytest.mark.parametrize("args", [["check", "--bogus"], ["check", "rules.conf", "extra"], ["stats", "--bogus"],
                                  ["stats", "extra"], ["stats", "--json", "--prometheus"], ["purge", "--bogus"],
                                  ["purge", "/a", "/b"], ["run", "--bogus", "--", "true"],
                                  ["check", "--defaults", "extra"], ["purge", "--upstream", "127.0.0.1:99999"],
                                  ["purge", "--upstream", "127.0.0.1:0"]])
def test_a_wrong_command_line_is_a_usage_error(args, cli):
    """An option a command does not know, an argument too many, two output formats: exit 2
    and a usage line. Before, `check --bogus` looked for a file named --bogus (exit 1),
    `check FILE extra` and `stats extra` ignored the extra, `stats --json --prometheus`
    printed nothing, and `run --bogus -- true` ran a program named --bogus (exit 127)."""
    r = run([cli] + args, shim=False, timeout=20, cwd=str(ROOT))
    assert r.rc == 2 and b"usage: httpshim " + args[0].encode() in r.err, r.describe()


def test_check_connect_reaches_only_a_redis(tmp_path, cli):
    """`httpshim check --connect` against a listener that is not Redis (it greets like an
    SSH server and then says nothing): exit 1, naming what failed. Before, with no password
    and database 0 only a TCP connect was made, and any listener was "reached" (exit 0);
    with a password, an AUTH that got no Redis reply counted as accepted."""
    def greet(conn):
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    with tcp_server(greet) as srv:
        for url in ("redis://127.0.0.1:%d/0" % srv.port, "redis://:pw@127.0.0.1:%d/0" % srv.port):
            conf = write_rules(tmp_path, [], name="notredis.conf", raw="[global]\ncache = %s\n" % url)
            r = run([cli, "check", "--connect", conf], shim=False, timeout=30)
            assert r.rc == 1 and b"redis 127.0.0.1:%d" % srv.port in r.err, r.describe()


def test_a_bom_is_read_past_and_run_keeps_a_link(tmp_path, cli):
    """A rules file saved with a UTF-8 byte order mark (Windows editors) is read as the
    same file without it (it failed: "setting outside a section" on a correct [global]); and
    `httpshim run -c LINK` hands the commands it starts the link, made absolute, not what
    it points to today (a ConfigMap's rules.conf is a link into a directory swapped on each
    update: the pinned target vanished with the next one)."""
    bom = tmp_path / "bom.conf"
    bom.write_bytes(b"\xef\xbb\xbf[global]\ncache = memory\n")
    r = run([cli, "check", str(bom)], shim=False, timeout=20)
    assert r.rc == 0, r.describe()
    commented = tmp_path / "bom-comment.conf"     # (the comment was cut before the mark was seen)
    commented.write_bytes(b"\xef\xbb\xbf# rules for my service\n[global]\ncache = memory\n")
    r = run([cli, "check", str(commented)], shim=False, timeout=20)
    assert r.rc == 0, r.describe()
    (tmp_path / "link.conf").symlink_to(bom)
    r = run([cli, "run", "-c", "link.conf", "--", "sh", "-c", "echo $HTTPSHIM_CONF"], shim=False, timeout=20,
            cwd=str(tmp_path), env=cli_env())
    assert r.rc == 0 and r.out.strip() == str(tmp_path / "link.conf").encode(), r.describe()


def test_one_address_written_two_ways_is_one_upstream(tmp_path, cli):
    """[::1]:P and [0:0::1]:P are one upstream: the second section's rules could never
    apply (the first match wins). It is refused as a duplicate, as the same name twice is."""
    conf = write_rules(tmp_path, [], name="v6.conf", raw="[upstream [::1]:26001]\n\n[upstream [0:0::1]:26001]\n")
    r = run([cli, "check", conf], shim=False, timeout=20)
    assert r.rc == 1 and b":3: upstream [0:0::1]:26001 is already defined at line 1" in r.out + r.err, r.describe()


def test_stopped_processes_cost_one_timeout_together_and_are_named(upstream, sockdir, tmp_path, apps, cli):
    """4 processes stopped with SIGSTOP beside 1 running: `httpshim stats` and `purge` ask
    every socket at once under one deadline (3 s), so they take about one timeout, not one
    each (before: 3 s per stopped process, one after another: 12 s here, 5 min for 100).
    The running one is in the table; the stopped ones are named on stderr as not answering.
    `purge` says its request was left with them, unanswered (it runs when they resume),
    instead of counting them as 0 processes purged with nothing said."""
    conf = stats_conf(tmp_path, sockdir, [(upstream, ["GET /bytes/* ttl=10m"])])
    running = apps(conf, sockdir)
    stopped = [apps(conf, sockdir) for _ in range(4)]
    for a in [running] + stopped:
        a.get(upstream.port, "/bytes/10")
        wait_socket(a.sock)
    try:
        for a in stopped:
            os.kill(a.pid, signal.SIGSTOP)

        def all_stopped(pid):          # every thread of it in the stopped state ('T')
            states = []
            for task in glob.glob("/proc/%d/task/*/stat" % pid):
                try:
                    with open(task) as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
                except (OSError, IndexError):
                    pass
            return bool(states) and all(st == "T" for st in states)
        for _ in range(100):           # (on a loaded machine a stop is not always done when kill returns)
            if all(all_stopped(a.pid) for a in stopped):
                break
            time.sleep(0.05)
        # (stats and purge at once: each takes its one timeout, together one)
        t0 = time.monotonic()
        both = {}
        threads = [threading.Thread(target=lambda what=what: both.__setitem__(what, run([cli, what, "-c", conf],
                                                                                       shim=False, timeout=60)))
                   for what in ("stats", "purge")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - t0
        r = both["stats"]
        assert r.rc == 0, r.describe()
        assert took < 6, "stats and purge took %.1f s with 4 stopped processes (one 3 s timeout each?)" % took
        rows = [ln.split()[0] for ln in r.out.decode().splitlines() if ln.split()]
        assert str(running.pid) in rows and "1 live process" in r.out.decode(), r.describe()
        err = r.err.decode()
        assert "4 processes did not answer" in err, r.describe()
        for a in stopped:
            assert str(a.pid) not in rows and str(a.pid) in err, r.describe()

        r = both["purge"]
        assert r.rc == 0, r.describe()
        assert "purged 1 entries in 1 processes" in r.out.decode(), r.describe()
        err = r.err.decode()
        assert "4 processes did not answer" in err and "when they run again" in err, r.describe()
        for a in stopped:
            assert str(a.pid) in err, r.describe()
    finally:
        for a in stopped:
            os.kill(a.pid, signal.SIGCONT)
    # what the report said: the purge was queued with them, and applies once they run
    for a in stopped:
        deadline = time.time() + 20
        while time.time() < deadline and get_stats(a.sock)["upstreams"][label(upstream)]["memory_entries"]:
            time.sleep(0.1)
        assert get_stats(a.sock)["upstreams"][label(upstream)]["memory_entries"] == 0, a.pid


def test_a_name_resolving_to_another_sections_address_is_said(upstream, sockdir, tmp_path, cli):
    """[upstream localhost:P] beside [upstream 127.0.0.1:P] (which has the cache rule): one
    address, one section. Before, the named section took every connection and the other's
    rule was never used, without a word (check: ok; 0 hits in 3 GETs). Now the address stays
    the literal section's, every process says so on stderr, and check warns."""
    if "curl" in SANITIZER_SKIP:
        pytest.skip("curl cannot run under the sanitizer runtime")
    conf = write_rules(tmp_path, [], name="alias.conf", raw=(
        "[global]\nstats_socket = %s/s/%%p.sock\n[upstream localhost:%d]\n[upstream 127.0.0.1:%d]\n"
        "cache GET /bytes/* ttl=10m\n" % (sockdir, upstream.port, upstream.port)))
    c = run([cli, "check", conf], shim=False, timeout=20)
    assert c.rc == 0 and b":3: warning: [upstream localhost:%d] resolves to 127.0.0.1" % upstream.port in c.err, \
        c.describe()
    url = upstream.url("/bytes/64")
    # (the name resolves in the background and is said once it has: a curl done in 250 ms
    # on a loaded machine ended before it had, and said nothing; its three GETs are spaced
    # over a second, as a process that lives a moment)
    r = run(["curl", "-s", "--rate", "2/s", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null", url, url, url],
            conf=conf)
    assert r.rc == 0 and b"resolves to 127.0.0.1, which the section at line 4 has already" in r.err, r.describe()
    doc = json.loads(run([cli, "stats", "-c", conf, "--json"], shim=False).out.decode())
    assert doc["total"]["upstreams"][label(upstream)]["hits"] == 2, doc["total"]


def test_a_busy_stats_socket_is_named_not_left_out_in_silence(upstream, sockdir, tmp_path, apps, cli):
    """A live process whose stats socket is serving 16 clients already: the 17th (the CLI) is
    answered 503, and stats and purge name the process on stderr (purge exits 1). Before,
    it was accepted and closed: `purge` printed "purged 0 entries in 0 processes", exit 0,
    and stats left the process out, without a word."""
    conf = stats_conf(tmp_path, sockdir, [(upstream, ["GET /bytes/* ttl=10m"])])
    app = apps(conf, sockdir)
    app.get(upstream.port, "/bytes/10", n=1)
    wait_socket(app.sock)
    held = []
    try:
        for _ in range(16):
            s = socket.socket(socket.AF_UNIX)
            s.connect(app.sock)
            held.append(s)
        def backlog():                                   # connections the process has not accepted yet
            if not shutil.which("ss"):
                time.sleep(1)
                return [0]
            out = subprocess.run(["ss", "-xlnH"], stdout=subprocess.PIPE).stdout.decode()
            return [int(ln.split()[2]) for ln in out.splitlines() if " %s " % app.sock in ln + " "]
        for _ in range(150):                             # (all 16 accepted: the next is the 17th)
            if backlog() == [0]:
                break
            time.sleep(0.1)
        p = run([cli, "purge", "-c", conf, "/bytes/*"], shim=False, timeout=20)
        # named either way: busy (503, exit 1), or, on a loaded machine, not reached in 3 s
        assert b" %d" % app.pid in p.err and (p.rc == 1 or b"answered with an error" not in p.err), p.describe()
        st = run([cli, "stats", "-c", conf, "--live"], shim=False, timeout=20)
        assert st.rc == 0 and b"left out:" in st.err and b" %d" % app.pid in st.err, st.describe()
    finally:
        for s in held:
            s.close()


def test_the_newest_exited_records_stay_however_many_there_are(upstream, sockdir, tmp_path, cli):
    """3 000 old records and 5 new ones: the 5 newest are among the 256 kept. Before, every
    record the directory listed after the first 1 024 was removed, whatever its age."""
    conf = stats_conf(tmp_path, sockdir, [(upstream, ["GET /bytes/* ttl=10m"])])
    d = Path(sockdir) / "s"
    d.mkdir(mode=0o700, exist_ok=True)
    doc = {"comm": "x", "exited": True, "upstreams": {}, "redis": {}}
    now = time.time()
    for i in range(3005):
        pid = 100000 + i
        p = d / ("%d.sock.exited" % pid)
        p.write_text(json.dumps(dict(doc, pid=pid)))
        age = 1 if i >= 3000 else 600 + i % 1000
        os.utime(p, (now - age, now - age))
    run([cli, "stats", "-c", conf, "--json"], shim=False, timeout=60)
    left = {p.name for p in d.iterdir() if p.name.endswith(".exited")}
    assert len(left) == 256, len(left)
    assert all("%d.sock.exited" % (103000 + i) in left for i in range(5)), sorted(left)[-8:]


def test_what_records_say_reaches_the_terminal_harmless(upstream, sockdir, tmp_path, cli):
    """Records another user writes (seen with --user), or a process answers: a command name
    with an escape sequence and a newline is shown with '?' in the table (--json keeps it,
    escaped); a record whose pid is not its file's, or with a string where a counter goes,
    is left out; an inert record of a pid now held by a later process is not "live". Before,
    the table printed the name raw (an escape sequence to the operator's terminal, a row
    split in two), the totals carried "hits": "x", and any process holding the pid made an
    inert record live."""
    conf = stats_conf(tmp_path, sockdir, [(upstream, ["GET /bytes/* ttl=10m"])])
    d = Path(sockdir) / "s"
    d.mkdir(mode=0o700, exist_ok=True)
    up = {label(upstream): {"requests": 3, "hits": 2}}
    now = time.time()

    def record(pid, suffix, body):
        p = d / ("%d.sock%s" % (pid, suffix))
        p.write_text(json.dumps(body))
        os.utime(p, (now - 5, now - 5))

    record(200001, ".exited", {"pid": 200001, "comm": "x\x1b[31mRED\nFAKE", "exited": True, "upstreams": up})
    record(200002, ".exited", {"pid": 1, "comm": "wrongpid", "exited": True, "upstreams": up})
    record(200003, ".exited", {"pid": 200003, "comm": "garbage", "exited": True,
                               "upstreams": {label(upstream): {"requests": 1, "hits": "x"}}})
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        # an inert record of sleeper's pid, written by a process that started at another tick
        record(sleeper.pid, ".inert", {"pid": sleeper.pid, "comm": "gone", "started_unix": int(now) - 60,
                                       "start_ticks": 1, "inert": "bad rules", "upstreams": {}})
        text = table(cli, conf)
        assert "\x1b" not in text and "x?[31mRED?FAKE" in text, text
        doc = json.loads(run([cli, "stats", "-c", conf, "--json"], shim=False).out.decode())
        assert [p["comm"] for p in doc["processes"]] == ["x\x1b[31mRED\nFAKE"], doc["processes"]
        assert doc["total"]["upstreams"][label(upstream)]["hits"] == 2, doc["total"]
        # (another test's inert record of the same pid, left in the default directory by a
        # process that held it before, may be listed too: none of them is live)
        lives = [r["live"] for r in doc["inert"] if r["pid"] == sleeper.pid]
        assert lives and not any(lives), doc["inert"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_rules_file_named_but_unreadable_is_never_swapped_for_the_defaults(tmp_path, cli):
    """`stats -c FILE` / `purge -c FILE` with FILE missing (a typo): exit 1 naming it. Before,
    both looked at the default sockets and exited 0, as if FILE's processes had none."""
    missing = str(tmp_path / "no-such-rules.conf")
    for args in (["stats", "-c", missing, "--live"], ["purge", "-c", missing, "/x"]):
        r = run([cli] + args, shim=False, timeout=20)
        assert r.rc == 1 and missing.encode() + b": No such file or directory" in r.err, r.describe()


def test_check_warns_of_a_stats_socket_no_process_can_make(tmp_path, cli):
    """A stats_socket longer than a socket path can be, or under a directory that does not
    exist: the library runs without stats (one stderr line); check said "ok" without a word.
    Now it warns (exit 0: the rules are valid)."""
    long_dir = "/tmp/" + "d" * 110
    for sock, said in ((long_dir + "/%p.sock", b"longer than a socket path can be"),
                       (str(tmp_path / "no" / "such" / "%p.sock"), b"does not exist")):
        conf = write_rules(tmp_path, [], name="sock.conf", raw="[global]\nstats_socket = %s\n" % sock)
        r = run([cli, "check", conf], shim=False, timeout=20)
        assert r.rc == 0 and b"warning: stats_socket" in r.err and said in r.err, r.describe()
