#!/usr/bin/env python3
"""Scripted raw-socket client for the cache tests: ONE process makes a list of
exchanges (the shim's cache is per process), each step on its own connection.

  cacheclient.py --spec FILE

FILE is JSON: {"host": "127.0.0.1", "timeout": 20, "steps": [STEP, ...]} where STEP is
  {"sleep": SECONDS}
or {"advance": SECONDS}: moves the shim's test clock forward that far (the process runs
with HTTPSHIM_TEST_CLOCK=1; its stats socket is the default /tmp/httpshim-UID/PID.sock),
so entries age without the wall clock's help,
or a connection:
  {"port": P, "mode": "sequential"|"pipeline", "wait_eof": bool,
   "requests": [{"raw": "<request bytes as latin-1 text>", "method": "GET"}, ...]}
sequential: send a request, read its whole response, then the next (keep-alive);
pipeline: write every request in one send, then read all the responses.
wait_eof: after the last response, wait (bounded) for the server to close.

One JSON line per connection step:
  {"step": i, "connect": "ok"|error, "responses": [{"version", "status", "reason",
   "headers": [[k, v]...], "body_len", "body_sha256", "complete", "garbage"?}, ...],
   "eof": bool, "reset": bool, "timed_out": bool, "recv_len": N, "seconds": connect to close}
(`responses` holds everything parsed from the bytes received: more entries than requests,
or an entry with "garbage", means bytes arrived that belong to no response), then
  {"done": true, "engine": <an httpshim thread exists in this process>}.
Exit status 0 unless the client itself failed.
"""
import argparse
import errno
import hashlib
import json
import os
import socket
import sys
import time

from rawclient import engine_present, parse_responses


def n_complete(rs):
    n = 0
    for r in rs:
        if not r.get("complete"):
            break
        n += 1
    return n


def read_responses(s, buf, methods, want, deadline, rep):
    """Reads into buf until `want` complete responses (for `methods`), EOF, an error or
    the deadline."""
    while True:
        rs = parse_responses(bytes(buf), methods, eof=False)
        if n_complete(rs) >= want:
            return True
        if rs and "garbage" in rs[-1]:
            return False               # unparsable: nothing more will make sense
        left = deadline - time.time()
        if left <= 0:
            rep["timed_out"] = True
            return False
        s.settimeout(min(left, 1.0))
        try:
            data = s.recv(262144)
        except socket.timeout:
            continue
        except OSError as e:
            if e.errno == errno.ECONNRESET:
                rep["reset"] = True
            else:
                rep["recv_error"] = errno.errorcode.get(e.errno, str(e))
            return False
        if not data:
            rep["eof"] = True
            return False
        buf += data


def wait_eof(s, buf, deadline, rep):
    while not rep["eof"] and not rep["reset"]:
        left = deadline - time.time()
        if left <= 0:
            rep["timed_out"] = True
            return
        s.settimeout(min(left, 1.0))
        try:
            data = s.recv(262144)
        except socket.timeout:
            continue
        except OSError as e:
            if e.errno == errno.ECONNRESET:
                rep["reset"] = True
            else:
                rep["recv_error"] = errno.errorcode.get(e.errno, str(e))
            return
        if not data:
            rep["eof"] = True
            return
        buf += data


def connection(i, host, step, timeout):
    rep = {"step": i, "connect": None, "responses": [], "eof": False, "reset": False,
           "timed_out": False, "recv_len": 0}
    reqs = step["requests"]
    methods = [r.get("method", "GET") for r in reqs]
    started = time.monotonic()
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                      socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, step["port"]))
        rep["connect"] = "ok"
    except OSError as e:
        rep["connect"] = errno.errorcode.get(e.errno, str(e)) if e.errno else str(e)
        s.close()
        return rep
    buf = bytearray()
    deadline = time.time() + timeout
    try:
        if step.get("mode", "sequential") == "pipeline":
            s.sendall(b"".join(r["raw"].encode("latin-1") for r in reqs))
            read_responses(s, buf, methods, len(reqs), deadline, rep)
        else:
            for k, r in enumerate(reqs):
                s.sendall(r["raw"].encode("latin-1"))
                if not read_responses(s, buf, methods[:k + 1], k + 1, deadline, rep):
                    break
        if step.get("wait_eof"):
            wait_eof(s, buf, time.time() + min(timeout, 10.0), rep)
    except OSError as e:
        rep["send_error"] = errno.errorcode.get(e.errno, str(e)) if e.errno else str(e)
    s.close()
    rep["seconds"] = time.monotonic() - started
    rep["recv_len"] = len(buf)
    out = []
    for r in parse_responses(bytes(buf), methods, eof=rep["eof"]):
        d = {"complete": bool(r.get("complete"))}
        if "garbage" in r or "partial_head" in r:
            d["garbage"] = (r.get("garbage") or r.get("partial_head")).decode("latin-1")
        else:
            body = r.get("body", b"")
            d.update(version=r["version"], status=r["status"], reason=r["reason"],
                     headers=[[k, v] for k, v in r["headers"]], body_len=len(body),
                     body_sha256=hashlib.sha256(body).hexdigest())
            if "trailers" in r:
                d["trailers"] = r["trailers"]
        out.append(d)
    rep["responses"] = out
    return rep


def advance_clock(seconds):
    """POST /test/clock?advance_ms=N to this process's own stats socket."""
    path = "/tmp/httpshim-%d/%d.sock" % (os.getuid(), os.getpid())
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(("POST /test/clock?advance_ms=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
               % int(seconds * 1000)).encode())
    data = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        data += b
    s.close()
    if b" 200 " not in data.split(b"\r\n", 1)[0]:
        raise SystemExit("test clock not advanced: %r" % data[:200])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    a = ap.parse_args()
    with open(a.spec) as f:
        spec = json.load(f)
    host = spec.get("host", "127.0.0.1")
    timeout = float(spec.get("timeout", 20))
    for i, step in enumerate(spec["steps"]):
        if "sleep" in step:
            time.sleep(float(step["sleep"]))
            continue
        if "advance" in step:
            advance_clock(float(step["advance"]))
            continue
        print(json.dumps(connection(i, host, step, timeout)), flush=True)
    print(json.dumps({"done": True, "engine": engine_present()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
