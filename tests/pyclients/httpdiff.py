"""Random pipelines of HTTP/1.x requests, for a differential test of the HTTP side: run
once direct and once under the shim (whose rules cache what they can), the two logs must
be equal.

  httpdiff.py --port P --seeds 1-10 --steps 80

For each seed, 80 turns: 1 to 3 requests sent in one write (an HTTP/1.0 one only last),
then every response read. They mix cacheable GETs of bodies framed by length and by
chunks, HEADs, statuses with and without bodies, conditional GETs (If-None-Match against
an ETag), no-store answers, chunked answers with trailers (TE: trailers), Vary, and
requests the cache must pass by: POST/PUT (Content-Length, chunked, Expect: 100-continue),
DELETE, OPTIONS. The connection is kept while both sides said it may be. Each response
is logged as what an app sees of it: status, body (its SHA-256 and length), end-to-end
headers (framing, Date, Age, Server and the upstream's per-connection counters left
out), trailers; for /echo, the method, target and body the upstream received. Prints one
JSON line per seed: {"seed": N, "log": [[requests, responses], ...]}."""
import hashlib
import json
import os
import random
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rawclient import parse_responses  # noqa: E402
from seeds import run_seeds  # noqa: E402

LEFT_OUT = {"date", "age", "server", "connection", "keep-alive", "transfer-encoding", "content-length",
            "x-served", "x-conn", "x-req", "proxy-connection"}


def request(rnd):
    """(method, target, version, extra header lines, body bytes)"""
    kind = rnd.randrange(16)
    size = rnd.choice([0, 1, 500, 70000])
    body = bytes(rnd.getrandbits(8) for _ in range(rnd.choice([0, 3, 1000]))) if kind in (7, 8, 9) else b""
    version = rnd.choice(["HTTP/1.1"] * 4 + ["HTTP/1.0"])
    extra = "Connection: keep-alive\r\n" if version == "HTTP/1.0" else ""
    if kind == 0:
        return "GET", "/bytes/%d" % size, version, extra, b""
    if kind == 1:
        return "GET", "/chunked/%d" % size, version, extra, b""
    if kind == 2:
        return "HEAD", "/bytes/%d" % size, version, extra, b""
    if kind == 3:
        return "GET", "/status/%s" % rnd.choice(["404", "204", "500", "301", "200"]), version, extra, b""
    if kind == 4:
        cond = rnd.choice(["", 'If-None-Match: "e%d"\r\n' % size])
        return "GET", "/custom?n=%d&etag=e%d" % (size, size), version, extra + cond, b""
    if kind == 5:
        return "GET", "/custom?n=20&h=Cache-Control:no-store&h=X-Multi:a&h=X-Multi:b", version, extra, b""
    if kind == 6:
        return "GET", "/custom?n=%d&mode=chunked&t=X-T:1" % size, version, extra + "TE: trailers\r\n", b""
    if kind == 7:
        return "POST", "/echo", version, extra + "Content-Length: %d\r\n" % len(body), body
    if kind == 8 and version == "HTTP/1.1":
        chunked = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        return "POST", "/echo", version, "Transfer-Encoding: chunked\r\n", chunked
    if kind == 9:
        return "PUT", "/echo", version, extra + "Content-Length: %d\r\nExpect: 100-continue\r\n" % len(body), body
    if kind == 10:
        return "DELETE", "/echo", version, extra, b""
    if kind == 11:
        return "GET", "/echo?x=%d" % rnd.randrange(3), version, extra, b""
    if kind == 12:
        return "HEAD", "/chunked/%d" % size, version, extra, b""
    if kind == 13:
        accept = "Accept: %s\r\n" % rnd.choice(["a", "b"])
        return "GET", "/custom/a%d?n=%d&h=Vary:Accept" % (size, size), version, extra + accept, b""
    if kind == 14:
        return "OPTIONS", "/echo", version, extra, b""
    return "GET", "/bytes/%d?q=%d" % (size, rnd.randrange(2)), version, extra, b""


def seen(resp):
    if not resp.get("complete"):
        return ["incomplete"]
    body = resp["body"]
    if body.startswith(b"{") and b'"body_sha256"' in body:
        d = json.loads(body)
        return [resp["status"], d["method"], d["target"], d["body_len"], d["body_sha256"]]
    heads = sorted((k.lower(), v) for k, v in resp["headers"] if k.lower() not in LEFT_OUT)
    return [resp["status"], hashlib.sha256(body).hexdigest()[:16], len(body), heads,
            sorted(resp.get("trailers") or [])]


def run_seed(port, seed, steps):
    rnd = random.Random(seed)
    host = "127.0.0.1:%d" % port
    log, s = [], None
    for _ in range(steps):
        if s is None:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        reqs = [request(rnd) for _ in range(rnd.randrange(1, 4))]
        reqs = [r for r in reqs[:-1] if r[2] == "HTTP/1.1"] + reqs[-1:]
        data = b"".join(("%s %s %s\r\nHost: %s\r\n%s\r\n" % (m, t, v, host, x)).encode() + b
                        for m, t, v, x, b in reqs)
        methods = [r[0] for r in reqs]
        buf, eof = b"", False
        try:
            s.sendall(data)
            deadline = time.monotonic() + 10
            while not eof and time.monotonic() < deadline:
                got = parse_responses(buf, methods, eof=False)
                if len(got) >= len(reqs) and all(r.get("complete") for r in got[:len(reqs)]):
                    break
                chunk = s.recv(65536)
                eof = not chunk
                buf += chunk
        except OSError:
            eof = True
        got = parse_responses(buf, methods, eof=eof)
        log.append([[r[:3] for r in reqs], [seen(r) for r in got]])
        keep = (not eof and len(got) == len(reqs) and all(r.get("complete") for r in got)
                and reqs[-1][2] == "HTTP/1.1"
                and not any(k.lower() == "connection" and "close" in v.lower() for k, v in got[-1]["headers"]))
        if not keep:
            s.close()
            s = None
    if s is not None:
        s.close()
    return log


if __name__ == "__main__":
    run_seeds(run_seed, "1-10", 80)
