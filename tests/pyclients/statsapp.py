#!/usr/bin/env python3
"""A long-lived client for the stats tests: it makes the HTTP requests it is told to, one
command per stdin line, and keeps running (engine, stats socket and all) until told to
exit, so the test can read its stats socket in between.

  statsapp.py [--sigterm-handler] [--default-signal NAME]...

--sigterm-handler installs a Python SIGTERM handler (counting, not exiting) at startup,
before any connection, i.e. before the shim's engine starts; --default-signal resets a
signal to SIG_DFL at startup (SIGINT, which Python handles itself, or one the process was
started with ignored: `nohup` leaves SIGHUP ignored in every child).

Prints {"pid": N, "ready": true, "engine": false} first, then one JSON line per command:
  {"op": "get", "port": P, "path": "/x", "method": "GET", "body": "text" or null,
   "n": 1, "host": "127.0.0.1", "headers": {"K": "V"}}
      n requests, each on its own connection (http.client, `Connection: close`), the
      whole response read -> {"ok": N, "statuses": [...], "lens": [...], "errors": [...]}
  {"op": "engine"}   -> {"engine": <an httpshim thread exists in this process>}
  {"op": "signals"}  -> {"sigterm": <SIGTERMs the handler saw>}
  {"op": "exit", "code": N, "how": "main"|"thread"}
      main: sys.exit(N) on the main thread (normal interpreter exit);
      thread: libc exit(N) called from a second thread while the main thread waits.
      No answer.
stdin at EOF: exit 0.
"""
import argparse
import ctypes
import glob
import http.client
import json
import os
import signal
import sys
import threading

SIGTERMS = [0]


def engine_present():
    for p in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(p) as f:
                if f.read().strip() == "httpshim":
                    return True
        except OSError:
            pass
    return False


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def do_get(cmd):
    rep = {"ok": 0, "statuses": [], "lens": [], "errors": []}
    body = cmd.get("body")
    if body is not None:
        body = body.encode("latin-1")
    headers = {"Connection": "close"}
    headers.update(cmd.get("headers") or {})
    for _ in range(int(cmd.get("n", 1))):
        conn = http.client.HTTPConnection(cmd.get("host", "127.0.0.1"), int(cmd["port"]),
                                          timeout=float(cmd.get("timeout", 20)))
        try:
            conn.request(cmd.get("method", "GET"), cmd["path"], body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            rep["statuses"].append(r.status)
            rep["lens"].append(len(data))
            rep["ok"] += 1
        except Exception as e:  # noqa: BLE001 - every failure is reported
            rep["errors"].append("%s: %s" % (type(e).__name__, str(e)[:200]))
        finally:
            conn.close()
    return rep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sigterm-handler", action="store_true")
    ap.add_argument("--default-signal", action="append", default=[])
    a = ap.parse_args()
    for name in a.default_signal:
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    if a.sigterm_handler:
        def on_term(signum, frame):
            SIGTERMS[0] += 1
        signal.signal(signal.SIGTERM, on_term)
    say({"pid": os.getpid(), "ready": True, "engine": engine_present()})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "get":
            say(do_get(cmd))
        elif op == "engine":
            say({"engine": engine_present()})
        elif op == "signals":
            say({"sigterm": SIGTERMS[0]})
        elif op == "exit":
            code = int(cmd.get("code", 0))
            if cmd.get("how") == "thread":
                libc = ctypes.CDLL(None)
                libc.exit.argtypes = [ctypes.c_int]
                t = threading.Thread(target=libc.exit, args=(code,))
                t.start()
                t.join()               # never returns: the process exits under us
            sys.exit(code)
        else:
            say({"error": "unknown op %r" % op})
    return 0


if __name__ == "__main__":
    sys.exit(main())
