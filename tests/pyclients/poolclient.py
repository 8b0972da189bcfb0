#!/usr/bin/env python3
"""Concurrent one-shot GETs, each on its own connection, started in a given order.

    poolclient.py --port P --paths-file F [--gap-ms G] [--timeout S] [--stats-socket PATH]
                  [--warm PATH]

Starts one thread per path (in file order, G ms apart); each connects, sends
`GET PATH HTTP/1.1` with `Connection: close` and reads to EOF. A line that starts with
`{` is a JSON request instead: {"path", "method" (GET), "version" ("1.1"), "headers"
({name: value}), "abandon" (true: close without reading, "abandon_after_ms" (0) after
sending), "delay_ms" (0: wait that long before connecting)}. Prints one
JSON line per request ({"i", "path", "status", "version", "headers" (lower-cased names),
"body_len", "body_sha256", "ms", "error"}), then, with --stats-socket, the process's own
/stats document as {"stats": ...}, then {"done": true}. --warm: one GET of PATH, read whole,
before the first thread starts (the engine then running, the order the requests reach it
is the order they were sent in: a first connect that starts the engine on a loaded machine
took 160 ms, and the next request, sent 150 ms later, was read before it), printed as
{"warm": ...}."""
import argparse
import json
import socket
import threading
import time

from ownstats import own_stats

# CPython's own SHA-256, not OpenSSL's: the worker threads are daemons that may still be
# alive at exit, and OpenSSL's exit cleanup orphans such a thread's state; under `make
# test-asan` LeakSanitizer then reports it with a stack cut short at libcrypto, which no
# suppression can tell from the library's own.
try:
    from _sha256 import sha256
except ImportError:            # Python 3.12+
    try:
        from _sha2 import sha256
    except ImportError:
        from hashlib import sha256


def read_all(s):
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            return data
        data += b


def one(i, port, line, timeout, out):
    t0 = time.monotonic()
    spec = json.loads(line) if line.startswith("{") else {"path": line}
    path = spec["path"]
    rec = {"i": i, "path": path, "status": None, "body_len": 0, "error": None}
    if spec.get("delay_ms"):
        time.sleep(spec["delay_ms"] / 1000)
        t0 = time.monotonic()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        head = "%s %s HTTP/%s\r\nHost: 127.0.0.1:%d\r\n" % (spec.get("method", "GET"), path, spec.get("version", "1.1"), port)
        if spec.get("version", "1.1") == "1.1":
            head += "Connection: close\r\n"
        for k, v in spec.get("headers", {}).items():
            head += "%s: %s\r\n" % (k, v)
        s.sendall((head + "\r\n").encode())
        if spec.get("abandon"):
            time.sleep(spec.get("abandon_after_ms", 0) / 1000)
            s.close()
            rec["error"] = "abandoned"
            rec["ms"] = (time.monotonic() - t0) * 1000
            out[i] = rec
            return
        data = read_all(s)
        s.close()
        if data:
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            rec["status"] = int(lines[0].split(b" ", 2)[1])
            rec["version"] = lines[0].split(b" ", 1)[0].decode()
            rec["headers"] = {}
            for h in lines[1:]:
                k, _, v = h.partition(b":")
                rec["headers"][k.decode().strip().lower()] = v.decode().strip()
            rec["body_len"] = len(body)
            rec["body_sha256"] = sha256(body).hexdigest()
        else:
            rec["error"] = "closed before a response"
    except OSError as e:
        rec["error"] = "%s: %s" % (type(e).__name__, e)
    rec["ms"] = (time.monotonic() - t0) * 1000
    out[i] = rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--paths-file", required=True)
    ap.add_argument("--gap-ms", type=float, default=0)
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--stats-socket")
    ap.add_argument("--warm")
    a = ap.parse_args()
    paths = [p for p in open(a.paths_file).read().split("\n") if p]
    if a.warm:
        warm = [None]
        one(0, a.port, a.warm, a.timeout, warm)
        print(json.dumps({"warm": warm[0]}), flush=True)
    out = [None] * len(paths)
    threads = []
    for i, p in enumerate(paths):
        t = threading.Thread(target=one, args=(i, a.port, p, a.timeout, out), daemon=True)
        t.start()
        threads.append(t)
        if a.gap_ms:
            time.sleep(a.gap_ms / 1000)
    for t in threads:
        t.join(a.timeout + 30)
    for rec in out:
        print(json.dumps(rec), flush=True)
    if a.stats_socket:
        print(json.dumps({"stats": own_stats(a.stats_socket)}), flush=True)
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    main()
