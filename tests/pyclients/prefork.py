#!/usr/bin/env python3
"""Prefork check. --mode after: the parent makes one request, then forks the children;
--mode before: the parent forks first and makes its request afterwards. Each child
makes --per-child urllib requests, verifies the bodies, and checks that it has a thread
named httpshim (--expect-engine yes|no|any). Prints one JSON line; exit 0 iff all ok.
"""
import argparse
import glob
import json
import os
import signal
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from upstream import pattern  # noqa: E402


def engine_present():
    for p in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(p) as f:
                if f.read().strip() == "httpshim":
                    return True
        except OSError:
            pass
    return False


def do_requests(base, n, seed, timeout):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    errs = []
    for k in range(n):
        size = 100 * seed + k + 1
        try:
            with opener.open("%s/bytes/%d" % (base, size), timeout=timeout) as r:
                body = r.read()
            if body != pattern(size):
                errs.append("wrong body for %d (got %d bytes)" % (size, len(body)))
        except Exception as e:  # noqa: BLE001
            errs.append("%s: %s" % (type(e).__name__, e))
    return errs


def engine_ok(expect):
    e = engine_present()
    return (expect == "any") or (e == (expect == "yes")), e


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["after", "before"], required=True)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--per-child", type=int, default=5)
    ap.add_argument("--base", required=True)
    ap.add_argument("--expect-engine", choices=["yes", "no", "any"], default="yes")
    ap.add_argument("--timeout", type=float, default=30)
    a = ap.parse_args()
    report = {"parent_errors": [], "children": {}, "parent_engine": None}

    def parent_request():
        report["parent_errors"] += do_requests(a.base, 1, 99, a.timeout)
        ok, e = engine_ok(a.expect_engine)
        report["parent_engine"] = e
        if not ok:
            report["parent_errors"].append("engine thread present=%s" % e)

    if a.mode == "after":
        parent_request()
    pids = []
    for c in range(a.children):
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            signal.alarm(int(a.timeout * (a.per_child + 2)))
            code = 0
            try:
                errs = do_requests(a.base, a.per_child, c, a.timeout)
                ok, e = engine_ok(a.expect_engine)
                if not ok:
                    errs.append("child engine thread present=%s" % e)
                if errs:
                    sys.stderr.write("child %d: %s\n" % (c, errs))
                    code = 1
            except BaseException as ex:  # noqa: BLE001
                sys.stderr.write("child %d crashed: %r\n" % (c, ex))
                code = 2
            sys.stderr.flush()
            os._exit(code)
        pids.append(pid)
    if a.mode == "before":
        parent_request()
    deadline = time.time() + a.timeout * (a.per_child + 3)
    pending = set(pids)
    while pending and time.time() < deadline:
        for pid in list(pending):
            r, status = os.waitpid(pid, os.WNOHANG)
            if r == pid:
                pending.discard(pid)
                report["children"][str(pid)] = (os.WEXITSTATUS(status)
                                                if os.WIFEXITED(status)
                                                else -os.WTERMSIG(status))
        time.sleep(0.05)
    for pid in pending:
        report["children"][str(pid)] = "hung"
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    print(json.dumps(report), flush=True)
    ok = not report["parent_errors"] and all(v == 0 for v in report["children"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
