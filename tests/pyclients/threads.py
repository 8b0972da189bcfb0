#!/usr/bin/env python3
"""N threads start together (barrier), each does K urllib GETs of /bytes/SIZE with
distinct sizes and checks the bytes. Prints one JSON line; exit 0 iff all correct.
  threads.py --threads 32 --per-thread 5 --base http://127.0.0.1:PORT
"""
import argparse
import glob
import json
import os
import sys
import threading
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--per-thread", type=int, default=5)
    ap.add_argument("--base", required=True)
    ap.add_argument("--timeout", type=float, default=60)
    a = ap.parse_args()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    barrier = threading.Barrier(a.threads, timeout=a.timeout)
    results = {"ok": 0, "bad": []}
    lock = threading.Lock()

    def worker(t):
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        for k in range(a.per_thread):
            size = 1000 * t + 7 * k + 1
            try:
                with opener.open("%s/bytes/%d" % (a.base, size), timeout=a.timeout) as r:
                    body = r.read()
                ok = body == pattern(size)
                err = None if ok else "wrong body (len %d, want %d)" % (len(body), size)
            except Exception as e:  # noqa: BLE001
                ok, err = False, "%s: %s" % (type(e).__name__, e)
            with lock:
                if ok:
                    results["ok"] += 1
                else:
                    results["bad"].append([t, k, err])

    ths = [threading.Thread(target=worker, args=(t,)) for t in range(a.threads)]
    for th in ths:
        th.daemon = True
        th.start()
    for th in ths:
        th.join(a.timeout * (a.per_thread + 1))
    results["alive"] = sum(1 for th in ths if th.is_alive())
    results["engine"] = engine_present()
    print(json.dumps(results), flush=True)
    ok = results["ok"] == a.threads * a.per_thread and not results["alive"]
    sys.stdout.flush()
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()
