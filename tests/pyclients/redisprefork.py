#!/usr/bin/env python3
"""Prefork workers sharing the Redis tier: the parent (optionally after a request of its
own, --warm PATH, so its engine and Redis connection exist before the fork) forks
--children workers that each wait for a go. Worker 0 goes first and GETs --path; once it
has exited the parent prints {"first": {...}} and waits for a line on stdin (the test
checks Redis meanwhile), then lets the other workers go at once, each GETting --path.

Lines on stdout:
  {"parent": {"pid", "warm": "ok" | error | null, "children": [pids]}}
  {"child": c, "pid", "ok": bool, "why"?, "status", "len", "ms"}     one per worker
  {"first": {"exit": status}}
  {"report": {"exits": {pid: status | "hung"}}}
Exit 0 iff every worker and the warm request were ok.
"""
import argparse
import http.client
import json
import os
import select
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from upstream import pattern  # noqa: E402


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def fetch(port, path, n, timeout):
    rep = {"ok": False, "status": None, "len": None}
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        r = conn.getresponse()
        body = r.read()
        rep.update(status=r.status, len=len(body))
        if r.status != 200 or body != pattern(n):
            rep["why"] = "status %s, %d bytes, pattern %s" % (r.status, len(body),
                                                              body == pattern(n))
        else:
            rep["ok"] = True
    except Exception as e:  # noqa: BLE001
        rep["why"] = "%s: %s" % (type(e).__name__, str(e)[:200])
    finally:
        conn.close()
    rep["ms"] = round((time.monotonic() - t0) * 1000.0, 3)
    return rep


def wait_pid(pid, deadline):
    while time.time() < deadline:
        r, status = os.waitpid(pid, os.WNOHANG)
        if r == pid:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass
    return "hung"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--n", type=int, required=True, help="expected body: pattern(N)")
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--warm", default=None, help="a /bytes/N path the parent GETs first")
    ap.add_argument("--timeout", type=float, default=20)
    a = ap.parse_args()

    warm = None
    if a.warm:
        r = fetch(a.port, a.warm, int(a.warm.rsplit("/", 1)[1]), a.timeout)
        warm = "ok" if r["ok"] else r.get("why")
    gos, pids = [], []
    for c in range(a.children):
        rd, wr = os.pipe()
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            signal.alarm(int(a.timeout * 4))
            for w in gos:
                os.close(w)
            os.close(wr)
            code = 1
            try:
                ready, _, _ = select.select([rd], [], [], a.timeout * 3)
                if ready and os.read(rd, 1) == b"g":
                    rep = fetch(a.port, a.path, a.n, a.timeout)
                    code = 0 if rep["ok"] else 1
                else:
                    rep = {"ok": False, "why": "no go from the parent"}
                rep.update(child=c, pid=os.getpid())
                say(rep)
            except BaseException as ex:  # noqa: BLE001
                sys.stderr.write("child %d crashed: %r\n" % (c, ex))
                code = 2
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        os.close(rd)
        gos.append(wr)
        pids.append(pid)
    say({"parent": {"pid": os.getpid(), "warm": warm, "children": pids}})
    exits = {}
    os.write(gos[0], b"g")
    exits[str(pids[0])] = wait_pid(pids[0], time.time() + a.timeout * 2)
    say({"first": {"exit": exits[str(pids[0])]}})
    ready, _, _ = select.select([sys.stdin], [], [], 60)
    if ready:
        sys.stdin.readline()
    for w in gos[1:]:
        os.write(w, b"g")
    deadline = time.time() + a.timeout * 2
    for pid in pids[1:]:
        exits[str(pid)] = wait_pid(pid, deadline)
    for w in gos:
        os.close(w)
    say({"report": {"exits": exits}})
    ok = (warm in (None, "ok")) and all(v == 0 for v in exits.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
