"""Hits on the app's own thread (issue 15): a write that carries one whole GET or HEAD head
which is a fresh memory hit is answered by the app thread itself, straight into the
engine's end of the socketpair; everything else goes the engine's way, in order. Each
test's requests come from one process (one memory tier)."""
import re
import shutil
import time

import pytest

from conftest import (BUILD, PRELOAD, PYCLIENTS, SANITIZER_SKIP, SYS_PY, jlines, require_build, run, strace_calls,
                      write_rules)

SOCKSTATE = BUILD / "sockstate"

CLIENT = r'''
import json, socket, sys, time
port, path, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
out = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path).encode())
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    out.append({"status": int(head.split(b" ", 2)[1]), "len": len(body), "age": b"Age:" in head})
print(json.dumps(out))
'''


def conf_for(tmp, up, sockdir, extra=(), name="fp.conf"):
    lines = ["[global]", "stats_socket = %s/%%p.sock" % sockdir] + list(extra)
    lines += ["", "[upstream 127.0.0.1:%d]" % up.port, "cache GET /custom* ttl=10m", "cache GET /bytes/* ttl=10m"]
    return write_rules(tmp, [], raw="\n".join(lines) + "\n", name=name)


def stats_of(tmp, conf, up, sockdir, code_args):
    """Runs CLIENT then reads its own /stats (the script is extended to print them)."""
    code = CLIENT + r'''
sys.path.insert(0, %r)
from ownstats import own_stats
print(json.dumps(own_stats(sys.argv[4])["upstreams"]))
''' % str(PYCLIENTS)
    r = run([SYS_PY, "-c", code] + [str(a) for a in code_args] + ["%s/%%p.sock" % sockdir], conf=conf, timeout=60)
    lines = jlines(r.out)
    assert r.rc == 0 and len(lines) == 2, r.describe()
    return lines[0], lines[1]["127.0.0.1:%d" % up.port]


def test_hits_are_answered_inline(upstream, tmp_path, sockdir):
    """Connection per request, 20 GETs of one URL: the first goes upstream, the other 19
    are hits answered on the app's own thread (inline_hits), byte-for-byte like any hit."""
    conf = conf_for(tmp_path, upstream, sockdir)
    resps, u = stats_of(tmp_path, conf, upstream, sockdir, [upstream.port, "/custom/fp?n=1200&tag=fp", 20])
    assert all(r["status"] == 200 and r["len"] == 1200 for r in resps), resps
    assert u["hits"] == 19 and u["inline_hits"] == 19 and u["requests"] == 20, u
    assert upstream.stats()["requests"] == 1


HALF_CLOSE = r'''
import json, socket, sys, time
port, path = int(sys.argv[1]), sys.argv[2]
out = []
for i in range(3):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(5)
    started = time.monotonic()
    s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path).encode())   # keep-alive
    s.shutdown(socket.SHUT_WR)          # then half-closes, as `nc -N` and HTTP/1.0 habits do
    data, eof = b"", True
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
    except socket.timeout:
        eof = False
    s.close()
    out.append({"len": len(data.partition(b"\r\n\r\n")[2]), "eof": eof, "s": round(time.monotonic() - started, 2)})
print(json.dumps(out))
'''


def test_a_half_closed_connection_is_closed_after_its_hit(upstream, tmp_path, sockdir):
    """A keep-alive GET, then shutdown(SHUT_WR): direct, the server answers, reads the EOF
    and closes. The hits, answered inline, must end the same way: the app's half-close
    makes the engine hear the connection (it used to wait for the client's timeout)."""
    conf = conf_for(tmp_path, upstream, sockdir)
    r = run([SYS_PY, "-c", HALF_CLOSE, upstream.port, "/custom/half?n=300&tag=half"], conf=conf, timeout=60)
    assert r.rc == 0, r.describe()
    out = jlines(r.out)[0]
    assert [(x["len"], x["eof"]) for x in out] == [(300, True)] * 3, out
    assert all(x["s"] < 2 for x in out), out
    assert upstream.stats()["requests"] == 1


def test_fastpath_off(upstream, tmp_path, sockdir):
    conf = conf_for(tmp_path, upstream, sockdir, extra=["fastpath = off"])
    resps, u = stats_of(tmp_path, conf, upstream, sockdir, [upstream.port, "/custom/fpo?n=1200&tag=fpo", 10])
    assert all(r["status"] == 200 and r["len"] == 1200 for r in resps), resps
    assert u["hits"] == 9 and u["inline_hits"] == 0, u


# a client's requests on one kept-alive connection, and one answer read (Content-Length)
PIPELINED = r'''
import os, socket, sys, json
def get(s, path):
    s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path).encode())
def read_one(f):
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += f.read(1)
    n = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
    return f.read(n)
'''


def test_a_pipelined_hit_waits_for_the_miss_before_it(upstream, tmp_path, sockdir):
    """On one kept-alive connection: a miss to a slow upstream, then (without waiting) a
    request that is a hit. The hit must not overtake: the answers come in request order."""
    conf = conf_for(tmp_path, upstream, sockdir)
    code = PIPELINED + r'''
port = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", port)); f = s.makefile("rb")
get(s, "/bytes/11"); read_one(f)                       # now /bytes/11 is cached
get(s, "/custom/slow?n=22&delay=400&tag=order")          # a miss, 400 ms
get(s, "/bytes/11")                                      # a hit, written right after
print(json.dumps([len(read_one(f)), len(read_one(f))]))
'''
    r = run([SYS_PY, "-c", code, upstream.port], conf=conf, timeout=60)
    assert r.rc == 0 and jlines(r.out)[0] == [22, 11], r.describe()


@pytest.mark.parametrize("how", ["sendfile", "splice"])
def test_a_hit_never_overtakes_a_request_written_from_a_file_or_a_pipe(how, upstream, tmp_path, sockdir):
    """The same, with the slow miss written by sendfile() from a file or splice() from a
    pipe, which never carry an answer inline but must still pass the gate, on a connection
    whose first request was a hit answered inline (the engine not listening to it yet): the
    engine never heard the miss, and the hit written after it came back in its place."""
    conf = conf_for(tmp_path, upstream, sockdir)
    code = PIPELINED + r'''
port, how, tmp = int(sys.argv[1]), sys.argv[2], sys.argv[3]
w = socket.create_connection(("127.0.0.1", port)); get(w, "/bytes/11"); read_one(w.makefile("rb"))
s = socket.create_connection(("127.0.0.1", port)); f = s.makefile("rb")
get(s, "/bytes/11"); hit = read_one(f)                 # answered inline: the engine is not listening
miss = b"GET /custom/slow?n=22&delay=400&tag=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % how.encode()
if how == "sendfile":
    with open(os.path.join(tmp, "req"), "wb") as r:
        r.write(miss)
    with open(os.path.join(tmp, "req"), "rb") as r:
        assert os.sendfile(s.fileno(), r.fileno(), 0, len(miss)) == len(miss)
else:
    rd, wr = os.pipe()
    os.write(wr, miss)
    assert os.splice(rd, s.fileno(), len(miss)) == len(miss)
get(s, "/bytes/11")                                      # a hit, written right after
s.settimeout(10)
print(json.dumps([len(hit), len(read_one(f)), len(read_one(f))]))
'''
    r = run([SYS_PY, "-c", code, upstream.port, how, tmp_path], conf=conf, timeout=60)
    assert r.rc == 0 and jlines(r.out)[0] == [11, 22, 11], r.describe()


def test_a_large_hit_the_pair_does_not_take_whole(upstream, tmp_path, sockdir):
    """A 600 KB entry: the inline answer does not fit the socketpair's buffer; the engine
    sends the rest, and the client gets the whole body, intact."""
    conf = conf_for(tmp_path, upstream, sockdir)
    code = r'''
import socket, sys, json, hashlib
port = int(sys.argv[1])
out = []
for i in range(3):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /bytes/600000?big=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    d = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        d += b
    body = d.partition(b"\r\n\r\n")[2]
    out.append([len(body), hashlib.sha256(body).hexdigest()])
print(json.dumps(out))
'''
    r = run([SYS_PY, "-c", code, upstream.port], conf=conf, timeout=60)
    out = jlines(r.out)[0]
    assert r.rc == 0 and all(x == out[0] for x in out) and out[0][0] == 600000, r.describe()


@pytest.mark.skipif(not shutil.which("strace"), reason="strace not installed")
def test_an_inline_hit_costs_the_engine_nothing(upstream, tmp_path, sockdir):
    """strace -f: with the fast path on, the engine thread writes no answer for 30 hits
    (the app's thread does); with it off, it writes each of them."""
    counts = {}
    for fp in ("on", "off"):
        # (busy_poll off: a polling engine's epoll_waits, as many as the CPU allows, are not
        # work for the hits, and drowned the difference on a loaded machine)
        conf = conf_for(tmp_path, upstream, sockdir, extra=["fastpath = %s" % fp, "busy_poll = off"],
                        name="fp-%s.conf" % fp)
        log = tmp_path / ("strace-%s.log" % fp)
        code = CLIENT.replace("for i in range(n):", "for i in range(n):\n    if i == 1: time.sleep(0.3)")
        r = run(["strace", "-f", "-qq", "-o", log, SYS_PY, "-c", code, upstream.port, "/custom/st?n=500&tag=" + fp,
                 31], conf=conf, timeout=120)
        assert r.rc == 0, r.describe()
        lines = log.read_text().splitlines()
        main = lines[0].split()[0]
        engine = {ln.split()[0] for ln in lines if "epoll_wait" in ln and ln.split()[0] != main}
        assert len(engine) == 1, engine
        pid = engine.pop()
        # the engine's calls after the first (miss) exchange: from the client's pause after
        # it on (its start, libcurl's loading and the miss, a thousand calls, are the same
        # either way and drowned the difference on a loaded machine)
        pause = next((i for i, ln in enumerate(lines) if ln.split()[0] == main and "nanosleep" in ln), 0)
        mine = [ln for ln in lines[pause:] if ln.split()[0] == pid]
        # what answers a hit is a write: the engine's housekeeping (socketpairs made ahead,
        # sockets closed for the app, its wake-ups) is the same either way, and on a loaded
        # machine it is batched less well, which alone moved the totals by hundreds
        writes = [ln for ln in mine if re.match(r"\d+ +(write|writev|send|sendto|sendmsg)\(", ln)]
        counts[fp] = {"all": len(mine), "writes": len(writes)}
    assert counts["off"]["writes"] >= counts["on"]["writes"] + 30, counts
    assert counts["on"]["writes"] <= 3, counts


def test_socket_state_survives_the_divert(upstream, tmp_path, sockdir):
    """The hooks keep what the app did to its socket (socket() flags, fcntl, ioctl, timeouts,
    owner and signal) instead of asking the kernel at connect: the diverted fd reports
    exactly what the real one does without the shim (raw syscalls), a socket the hooks did
    not see made (closed and made again behind them, then bound) is not diverted, nor is
    one the app holds twice (a dup before connect: the other fd would be left on a socket
    never connected), and neither is UDP."""
    require_build(SOCKSTATE)
    conf = conf_for(tmp_path, upstream, sockdir)
    direct = run([str(SOCKSTATE), "--port", upstream.port], shim=False, timeout=60)
    shimmed = run([str(SOCKSTATE), "--port", upstream.port], conf=conf, timeout=60)
    assert direct.rc == 0 and shimmed.rc == 0, (direct.describe(), shimmed.describe())
    want, got = jlines(direct.out), jlines(shimmed.out)
    assert len(want) == len(got) == 10 and not any("error" in x for x in want + got), (want, got)
    for w, g in zip(want, got):
        name = w["case"]
        assert g["diverted"] == (0 if name in ("reused_bound", "udp", "dup_first") else 1), g
        drop = {"diverted", "owner"}
        assert {k: v for k, v in g.items() if k not in drop} == {k: v for k, v in w.items() if k not in drop}, (w, g)
        assert (g["owner"] != 0) == (w["owner"] != 0), (w, g)


@pytest.mark.skipif(not shutil.which("strace"), reason="strace not installed")
def test_a_hit_costs_few_system_calls(upstream, tmp_path, sockdir, epollclient):
    """strace -f, per thread: 100 more connection-per-request hits cost the app's own
    thread at most 3 system calls each beyond what the same client makes without the shim
    talking to the upstream itself (the connect hook asks the kernel nothing about a socket
    the hooks saw made: no getsockname, and no fstat; it was 18 more before the hooks kept
    the socket's state, 4 before the socketpair's second reference to the app's end was
    kept until the app's close, 3.2 before the getsockname went: now 2.1), and
    the engine at most 11: the three closes it makes for the app's thread (in batches: the
    app's TCP socket swapped out at connect, the pair's two ends, so that the app's own
    close is not the one that tears its socket down), the socketpair it makes ahead for the
    next connection (the app's thread takes one from the stash and makes none itself), the
    fcntl and close that move each of that pair's ends above the small fd numbers (so that
    the app's dup2 onto a small number of its choosing finds it free, and its open() the
    number it would get direct: 2 more on 2026-12-06, 2 more on 2026-12-07) and its share
    of wake-ups (9.5 in all alone, about 10 with the suite's four workers on two CPUs,
    where the engine is woken more often for fewer hits each time)."""
    if "strace" in SANITIZER_SKIP:
        pytest.skip("the sanitizer runtime cannot run under ptrace")
    conf = conf_for(tmp_path, upstream, sockdir)
    totals = {}
    for shim in (False, True):
        for n in (11, 111):             # (what the engine leaves unclosed at exit varies: over 100)
            log = tmp_path / ("sc-%s-%d" % (shim, n))
            cmd = ["strace", "-f", "-qq", "-o", log]
            if shim:
                cmd += ["-E", "LD_PRELOAD=%s" % PRELOAD, "-E", "HTTPSHIM_CONF=%s" % conf]
            cmd += [epollclient, "--port", upstream.port, "--path", "/bytes/1200", "--count", n]
            r = run(cmd, shim=False, timeout=120)
            assert r.rc == 0, r.describe()
            time.sleep(0.05)
            totals[(shim, n)] = strace_calls(log)

    def per_hit(shim, side, name=None):
        a, b = totals[(shim, 11)][side], totals[(shim, 111)][side]
        if name:
            return (b.get(name, 0) - a.get(name, 0)) / 100.0
        return (sum(b.values()) - sum(a.values())) / 100.0
    # (+4 for each connect that found the socketpair stash empty, a loaded machine's engine
    # behind: it makes its pair itself, raises the engine's end, an F_DUPFD and a close, and
    # takes the app's end's inode for its record, an fstat: 4.34 over 13 with 0.44 pairs made,
    # in a suite run beside a stress, where 3 each allowed 4.32)
    def app_extra():                    # (the calls the shim adds, by name: what a failure shows first)
        names = set(totals[(True, 111)]["app"]) | set(totals[(False, 111)]["app"])
        extra = {n: round(per_hit(True, "app", n) - per_hit(False, "app", n), 2) for n in sorted(names)}
        return " ".join("%s%+.2f" % (n, d) for n, d in extra.items() if d)
    assert per_hit(True, "app") <= per_hit(False, "app") + 3 + 4 * per_hit(True, "app", "socketpair"), \
        (per_hit(True, "app"), per_hit(False, "app"), app_extra())
    # (glibc's fstat is newfstatat to strace; the one the hooks make is of a pair the app's
    # thread made itself, never of the app's socket: one per hit would be 1.0 here, and a
    # call or two in the hundred is not a hit's, the two runs' cold starts told apart)
    fstats = sum(per_hit(True, "app", n) - per_hit(False, "app", n) for n in ("fstat", "newfstatat", "statx"))
    assert per_hit(True, "app", "getsockname") == 0 and fstats <= per_hit(True, "app", "socketpair") + 0.1, \
        app_extra()
    assert per_hit(True, "engine") <= 11, (per_hit(True, "engine"), totals)
    # (most from the stash: under strace every engine call is slowed, and with the suite's
    # other workers on the two CPUs the engine fell behind for 13, then 37, of 100)
    assert per_hit(True, "app", "socketpair") <= 0.5, totals
    # each connection took one pair, made ahead by the engine or, the stash found empty, by the
    # app's thread; the 111-connection run may end with up to a stash (32) of refills not yet
    # made, so at least 0.68 per hit in all (the engine's alone fell to 0.47 on a loaded CI run,
    # the app's thread making the rest)
    made = per_hit(True, "engine", "socketpair") + per_hit(True, "app", "socketpair")
    assert made >= 0.6, (made, totals)
    # no SO_DOMAIN, F_GETOWN_EX, F_GETFD...: one fcntl more, the F_DUPFD that hands the app's
    # TCP socket to the engine to close (and, for a connect that found the stash empty on a
    # loaded machine and made its socketpair itself, the one that raises its engine end)
    assert per_hit(True, "app", "getsockopt") <= per_hit(False, "app", "getsockopt"), totals
    assert per_hit(True, "app", "fcntl") <= per_hit(False, "app", "fcntl") + 1 + per_hit(True, "app", "socketpair"), \
        totals


def test_a_socket_closed_behind_the_hooks_is_let_go(upstream, tmp_path, sockdir):
    """libc closes a socket behind the close hook in fclose (of an fdopen'ed stream) and in
    closefrom: fclose of a diverted fd the engine never heard from closes the engine's end
    too (no fd left over, as after close()), and closefrom(3) spares the engine's own fds,
    so the next connection still works."""
    require_build(SOCKSTATE)
    conf = conf_for(tmp_path, upstream, sockdir)
    r = run([str(SOCKSTATE), "--port", upstream.port, "--case", "fclose"], conf=conf, timeout=60)
    out = jlines(r.out)
    assert r.rc == 0 and out and out[0]["connect"] == 0, r.describe()
    assert out[0]["fds_before"] == out[0]["fds_after_close"] == out[0]["fds_after_fclose"], out
    r = run([str(SOCKSTATE), "--port", upstream.port, "--case", "closefrom"], conf=conf, timeout=60)
    assert r.rc == 0 and jlines(r.out) == [{"case": "closefrom", "first": 200, "after": 200}], r.describe()


def test_requests_glibc_writes_itself_are_answered(upstream, tmp_path, sockdir):
    """A C client that writes its request through stdio (fdopen, fprintf, fflush, fgets) or
    with dprintf: glibc writes from within itself, past every hook, so the engine never heard
    the connection and the client waited for an answer that never came (a read timeout
    each). Now a FILE made on a diverted fd makes the engine hear it, and dprintf passes the
    gate: three GETs each, a miss then hits, answered as direct."""
    require_build(SOCKSTATE)
    conf = conf_for(tmp_path, upstream, sockdir)
    for case in ("stdio", "dprintf"):
        got = {}
        for shim in (False, True):
            upstream.reset()
            r = run([str(SOCKSTATE), "--port", upstream.port, "--case", case], shim=shim, conf=conf, timeout=60)
            assert r.rc == 0, r.describe()
            got[shim] = (jlines(r.out), upstream.stats()["requests"])
        assert got[False] == ([{"case": case, "status": [200, 200, 200]}], 3), got
        assert got[True] == ([{"case": case, "status": [200, 200, 200]}], 1), got   # (a miss, then hits)


def test_a_vfork_child_closing_its_copy_leaves_the_connection_alone(upstream, tmp_path, sockdir):
    """A vfork child runs in its parent's memory with fds of its own; CPython's subprocess
    closes fd by fd in it where the kernel has no close_range. Such a close of a diverted
    connection's copy dropped the parent's connection (its engine end went to the
    graveyard): the parent's GET then found no one at the other end. Now the child leaves
    the parent's record alone, and a child that makes the connection its stdout first hands
    it to the parent's engine to serve."""
    require_build(SOCKSTATE)
    conf = conf_for(tmp_path, upstream, sockdir)
    for case in ("vfork_close", "vfork_dup2"):
        for shim in (False, True):
            r = run([str(SOCKSTATE), "--port", upstream.port, "--case", case], shim=shim, conf=conf, timeout=60)
            assert r.rc == 0 and jlines(r.out) == [{"case": case, "connect": 0, "child": 0, "status": 200}], \
                r.describe()


EPOLL_CLOSE_CLIENT = r"""
import json, select, socket, sys
port = int(sys.argv[1])
def get():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /bytes/100 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return s, got
s0, _ = get()                                  # the miss that stores the entry
s0.close()
ep, ep2, ep3 = select.epoll(), select.epoll(), select.epoll()
events, ok = [], 0
for i in range(20):
    s, got = get()                             # a hit, answered inline
    ok += got.startswith(b"HTTP/1.1 200")
    ep.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
    if i % 2:
        ep2.register(s.fileno(), select.EPOLLIN)
    if i % 5 == 4:
        ep3.register(s.fileno(), select.EPOLLIN)   # a third set: more than the entry notes
    if i % 4 == 3:
        ep.unregister(s.fileno())              # some unregistered by the app, most not
    s.close()                                  # the kernel drops what is left at the last close
    events += ep.poll(0.03) + ep2.poll(0.0) + ep3.poll(0.0)
print(json.dumps({"events": [list(e) for e in events], "ok": ok}))
"""


def test_a_closed_hit_leaves_no_epoll_registration_behind(upstream, tmp_path, sockdir):
    """After a hit answered inline, the app's close is not the last reference to its
    socket (the engine closes the other one, off the app's thread): the registrations of
    the fd in the app's epoll sets, which the kernel drops at the last close, are dropped
    at the app's close as without the shim (an fd in more epoll sets than its entry notes
    has the other reference closed at once). 20 hits, each fd registered in one to three
    epoll sets and closed without unregistering: no event for a closed fd (there were 210)."""
    conf = conf_for(tmp_path, upstream, sockdir)
    for shim in (False, True):
        r = run([SYS_PY, "-c", EPOLL_CLOSE_CLIENT, upstream.port], shim=shim, conf=conf if shim else None,
                timeout=60)
        assert r.rc == 0, r.describe()
        got = jlines(r.out)[0]
        assert got["ok"] == 20 and got["events"] == [], (shim, got)


WRITE_AFTER_THE_END = r'''
import json, socket, sys, time
port = int(sys.argv[1])
def ended(path, close):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (path, "Connection: close\r\n" if close else "")).encode())
    got = 0
    while True:
        b = s.recv(65536)
        if not b:
            break
        got += len(b)
    time.sleep(0.05)                  # (the engine's closes are batched, a few ms after)
    try:
        wrote = s.send(b"GET /bytes/100 HTTP/1.1\r\nHost: x\r\n\r\n")
    except OSError as e:
        wrote = "%s" % type(e).__name__
    try:
        after = len(s.recv(65536))
    except OSError as e:
        after = "%s" % type(e).__name__
    s.close()
    return [path, got > 0, wrote, after]
ended("/bytes/100", True)             # (stored: the next is a hit answered on this thread)
print(json.dumps([ended("/bytes/100", True), ended("/bytes/4100000", True), ended("/bytes/12345", True),
                  ended("/close/50", False), ended("/http10/50", False)]))
'''


def test_a_write_after_the_server_ended_the_connection_is_taken_as_direct(upstream, tmp_path, sockdir):
    """After an answer that ends the connection (the client's Connection: close, an upstream
    that closes), the app writes once more and reads: direct, TCP takes that write and the
    read says EOF. Through the shim the pair's far end was closed, and the write failed
    with EPIPE (a C client with SIGPIPE's default action was killed), for a hit answered
    inline and for an answer the engine wrote alike."""
    conf = conf_for(tmp_path, upstream, sockdir)
    direct = run([SYS_PY, "-c", WRITE_AFTER_THE_END, str(upstream.port)], shim=False, timeout=60)
    shimmed = run([SYS_PY, "-c", WRITE_AFTER_THE_END, str(upstream.port)], conf=conf, timeout=60)
    assert direct.rc == 0 and shimmed.rc == 0, (direct.describe(), shimmed.describe())
    assert jlines(shimmed.out) == jlines(direct.out), (direct.out, shimmed.out)
    assert all(r[2] == 36 and r[3] == 0 for r in jlines(shimmed.out)[0]), shimmed.out
