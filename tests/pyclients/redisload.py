#!/usr/bin/env python3
"""A long-lived client for the Redis-tier tests: ONE process (so one memory tier, one
engine, one stats socket) that makes the requests it is told to, one command per stdin
line, and keeps running until told to exit or stdin closes.

Prints {"pid": N, "ready": true} first. Commands:
  {"op": "get", "reqs": [REQ, ...], "timeout": 20, "pace_ms": 0}
      REQ = {"port": P, "path": "/bytes/1200", "n": 1200 or null, "tag": "t" or null,
             "status": 200, "headers": {"K": "V"}, "method": "GET", "host": "127.0.0.1",
             "body": "text" or absent}
      each request on its own connection (http.client, `Connection: close`), the whole
      response read. One line per request, as soon as it is done:
        {"i": k, "path": ..., "ok": bool, "why": "..." (when not ok), "status": S,
         "len": L, "ms": latency (connect to last byte), "served": X-Served or null,
         "age": [Age values]}
      ok means: status == REQ.status (default 200), the body is exactly pattern(n) when n
      is given, and `X-Tag` equals tag when tag is given.
      pace_ms: a pause after each request (so a long run lasts long enough for what
      the test does meanwhile). Then {"done": true, "n": N, "failed": F}.
  {"op": "exit"}   exits 0, no answer.
"""
import http.client
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from upstream import pattern  # noqa: E402

_PATTERNS = {}


def expected(n):
    if n not in _PATTERNS:
        _PATTERNS[n] = pattern(n)
    return _PATTERNS[n]


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def one(k, req, timeout):
    rep = {"i": k, "path": req["path"], "ok": False, "status": None, "len": None,
           "served": None, "age": []}
    headers = {"Connection": "close"}
    headers.update(req.get("headers") or {})
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(req.get("host", "127.0.0.1"), int(req["port"]),
                                      timeout=timeout)
    try:
        body = req.get("body")
        conn.request(req.get("method", "GET"), req["path"], body=body.encode() if body is not None else None,
                     headers=headers)
        r = conn.getresponse()
        body = r.read()
        rep["status"] = r.status
        rep["len"] = len(body)
        rep["served"] = r.getheader("X-Served")
        rep["age"] = r.msg.get_all("Age") or []
        why = []
        if r.status != int(req.get("status", 200)):
            why.append("status %s" % r.status)
        n = req.get("n")
        if n is not None and body != expected(int(n)):
            why.append("body: %d bytes, not the %d pattern bytes%s" % (
                len(body), int(n), " (same length, different bytes)"
                if len(body) == int(n) else ""))
        tag = req.get("tag")
        if tag is not None and r.getheader("X-Tag") != tag:
            why.append("X-Tag %r, want %r" % (r.getheader("X-Tag"), tag))
        rep["ok"] = not why
        if why:
            rep["why"] = "; ".join(why)
    except Exception as e:  # noqa: BLE001 - every failure is reported
        rep["why"] = "%s: %s" % (type(e).__name__, str(e)[:200])
    finally:
        conn.close()
    rep["ms"] = round((time.monotonic() - t0) * 1000.0, 3)
    return rep


def main():
    say({"pid": os.getpid(), "ready": True})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        if cmd["op"] == "get":
            failed = 0
            timeout = float(cmd.get("timeout", 20))
            pace = float(cmd.get("pace_ms", 0)) / 1000.0
            for k, req in enumerate(cmd["reqs"]):
                rep = one(k, req, timeout)
                failed += not rep["ok"]
                say(rep)
                if pace:
                    time.sleep(pace)
            say({"done": True, "n": len(cmd["reqs"]), "failed": failed})
        elif cmd["op"] == "exit":
            return 0
        else:
            say({"error": "unknown op %r" % cmd["op"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
