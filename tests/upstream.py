#!/usr/bin/env python3
"""Test upstream for the httpshim real-client suite.

A threaded raw-socket HTTP/1.1 server (stdlib only; runs under any python3 >= 3.6)
with exact control of framing, plus a control server for counters.

    python3 tests/upstream.py --port-file F --control-port-file G [--host 127.0.0.1|::1]

Listens on an ephemeral port (and a second one for control), writes the port numbers
to the files, serves until SIGTERM/SIGINT.

With --tls-cert CHAIN --tls-key KEY it serves HTTPS (ALPN http/1.1), every connection
a TLS handshake of its own, counted in "handshakes" (and "handshake_failures");
--tls-max-version 1.2 caps its protocol, --tls-ciphers LIST sets its TLS 1.2 suites, and
--tls-client-ca CA requires a client certificate from that CA.

Control server (never counted as upstream traffic):
    GET  /stats  -> {"connections":N,"open":N,"peak":N,"requests":N,"handshakes":N,
                     "handshake_failures":N,"log":[...]}
    POST /reset  -> zero the counters (open stays, peak = open)

Upstream paths:
    /bytes/N            N pattern bytes, Content-Length
    /range/N            the same, with Accept-Ranges and X-Served; `Range: bytes=A-[B]`
                        gets 206 and that slice (Content-Range)
    /chunked/N          the same bytes, chunked in pieces of varied sizes
    /close/N            HTTP/1.1, no Content-Length, Connection: close, close-delimited
    /http10/N           HTTP/1.0 200 with Content-Length, then close
    /odd/KIND           a head legal to receive, not to send, and "hello": fold (obsolete
                        line folding, one of them in Cache-Control), spacename (white space
                        before a colon), status600 (a status past 599), badname (field
                        names that are not tokens: a space, parentheses); spacedlength: only
                        `Content-Length : 3`, then "OK!" and what reads as a second
                        response, then close
    /truncate/N         promises Content-Length N, sends N//2, closes
    /reset/N            promises Content-Length N, sends N//2, then RST (SO_LINGER 0)
    /garbage            non-HTTP bytes, then close
    /delay/MS/rest      sleeps MS milliseconds, then serves /rest
    /status/CODE        that status with a small body (none for 1xx/204/304)
    /echo               JSON: method, target, version, headers (pairs, as received),
                        body (latin-1 text), body_len, body_sha256
    /v3/ip/ADDR         sleeps --geo-delay-ms MS (default 0), then a deterministic ~1.2 KB
                        JSON document about ADDR ({"ip": ADDR, "country", "city", "asn",
                        ..., "padding"}), Content-Length framed; the query is ignored
    /custom[/anything]  driven by the query string (percent-decoded):
                          status=N      status code (default 200)
                          h=Name:Value  an extra response header (repeatable, in order)
                          t=Name:Value  a trailer field after a chunked body (repeatable)
                          n=BYTES       body size, pattern bytes (default 100)
                          delay=MS      sleep MS milliseconds first
                          fail_at=T     from wall-clock time T (ms since the epoch) on,
                                        answer 503 instead
                          drop_at=T     from T on, close the connection without answering
                          fail_after=K  the first K requests for this exact target are
                                        answered, later ones get 503 (for a test clock:
                                        no wall time involved)
                          drop_after=K  the same, closing without answering
                          etag=V        ETag: "V"; a request whose If-None-Match names
                                        "V" (or *) gets 304 Not Modified, no body
                          lm=DATE       Last-Modified: DATE; a request whose
                                        If-Modified-Since is DATE gets 304 (without etag)
                          mode=length|chunked|close|truncate|badchunk|none|rawchunked
                                        framing:
                            length    Content-Length
                            chunked   Transfer-Encoding: chunked (varied chunk sizes)
                            close     no Content-Length, Connection: close, body ends at close
                            truncate  promises Content-Length n, sends n//2, closes
                            badchunk  chunked: one good chunk of n//2, then a chunk-size
                                      line that is not hex, then closes
                            none      no framing header of the server's own (the h= headers
                                      frame it, in their order): the n bytes, then close
                            rawchunked  the same, the body chunk-encoded
                          tag=T         echoed as `X-Tag: T`
                          echo=NAME     the request's NAME header value as `X-Echo` ("-": none)
                        Every /custom and /v3/ip response carries `X-Served: K`, K a
                        per-server counter (1, 2, ...; never reset) so a test can tell a
                        response replayed from a cache (same K) from a fresh one.
    anything else       404 with a small body
Requests whose first byte is not an ASCII letter switch the connection to raw echo.
`Upgrade: echo` -> 101 then raw echo; CONNECT -> 200 then raw echo.
Request line > 64 KiB -> 414 and close; header block > 1 MiB -> 431 and close.
Malformed request (bad header line, bad Content-Length, bad chunk) -> 400 and close.
"""

import argparse
import hashlib
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
import urllib.parse

MAX_REQUEST_LINE = 64 * 1024
MAX_HEADER_BLOCK = 1024 * 1024
MAX_BODY = 256 * 1024 * 1024
MAX_LOG = 20000
DRAIN_SECONDS = 10.0
DRAIN_BYTES = 256 * 1024 * 1024

# ---------------------------------------------------------------- pattern bytes
_BLOCK_LEN = 65521  # prime, so the pattern does not line up with power-of-two buffers
_BLOCK = bytes(((i * 131 + (i >> 7) * 17 + 7) & 0xFF) for i in range(_BLOCK_LEN))


def pattern(n):
    """n deterministic bytes (also imported by the tests)."""
    if n <= 0:
        return b""
    reps = n // _BLOCK_LEN + 1
    return (_BLOCK * reps)[:n]


# Varied chunk sizes for /chunked/N (cycled).
CHUNK_SIZES = [1, 7, 100, 4096, 3, 65536, 1000, 17, 32768, 250000, 2, 8191]

GARBAGE = b"\x00\xff\xfeTHIS IS NOT HTTP\x01\x02\x03\r\n\r\n\x80\x81garbage" * 4

REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created",
    202: "Accepted", 204: "No Content", 206: "Partial Content",
    301: "Moved Permanently", 302: "Found", 304: "Not Modified",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
    414: "URI Too Long", 418: "I'm a teapot", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}

HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding",
              "upgrade", "proxy-connection", "proxy-authorization",
              "proxy-authenticate"}


# ---------------------------------------------------------------- statistics
class Stats(object):
    def __init__(self):
        self.lock = threading.Lock()
        self.connections = 0
        self.open = 0
        self.peak = 0
        self.requests = 0
        self.handshakes = 0
        self.handshake_failures = 0
        self.log = []
        self.next_conn_id = 1

    def tls(self, ok):
        with self.lock:
            if ok:
                self.handshakes += 1
            else:
                self.handshake_failures += 1

    def conn_opened(self):
        with self.lock:
            cid = self.next_conn_id
            self.next_conn_id += 1
            self.connections += 1
            self.open += 1
            if self.open > self.peak:
                self.peak = self.open
            return cid

    def conn_closed(self):
        with self.lock:
            self.open -= 1

    def request(self, entry):
        entry["t"] = time.monotonic()  # when its head was read: orders requests across connections
        with self.lock:
            self.requests += 1
            if len(self.log) < MAX_LOG:
                self.log.append(entry)

    def snapshot(self):
        with self.lock:
            return {"connections": self.connections, "open": self.open,
                    "peak": self.peak, "requests": self.requests,
                    "handshakes": self.handshakes, "handshake_failures": self.handshake_failures,
                    "log": list(self.log)}

    def reset(self):
        with self.lock:
            self.connections = 0
            self.requests = 0
            self.handshakes = self.handshake_failures = 0
            self.peak = self.open
            self.log = []


STATS = Stats()

# X-Served: numbers every /custom and /v3/ip response this server produces.
_SERVED_LOCK = threading.Lock()
_SERVED = [0]


def next_served():
    with _SERVED_LOCK:
        _SERVED[0] += 1
        return _SERVED[0]


GEO_DELAY_MS = [0]   # --geo-delay-ms


# ---------------------------------------------------------------- connection I/O
class TooLong(Exception):
    pass


class BadRequest(Exception):
    pass


class PeerGone(Exception):
    pass


class Conn(object):
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.eof = False

    def fill(self):
        if self.eof:
            return False
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def peek1(self):
        while not self.buf:
            if not self.fill():
                return None
        return self.buf[:1]

    def readline(self, limit):
        """A line including its LF; TooLong once more than `limit` bytes without LF.
        Returns b"" at EOF with nothing buffered."""
        start = 0
        while True:
            idx = self.buf.find(b"\n", start)
            if idx >= 0:
                if idx + 1 > limit:
                    raise TooLong()
                line = self.buf[:idx + 1]
                self.buf = self.buf[idx + 1:]
                return line
            if len(self.buf) > limit:
                raise TooLong()
            start = len(self.buf)
            if not self.fill():
                line = self.buf
                self.buf = b""
                if line:
                    raise PeerGone()
                return b""

    def read_exact(self, n):
        out = []
        while n > 0:
            if not self.buf and not self.fill():
                raise PeerGone()
            take = self.buf[:n]
            self.buf = self.buf[len(take):]
            out.append(take)
            n -= len(take)
        return b"".join(out)

    def sendall(self, data):
        self.sock.sendall(data)


def reason(code):
    return REASONS.get(code, "Status")


def drain_and_close(sock):
    """Half-close, then read (bounded) what the peer still sends, so the close does
    not turn into a RST that destroys the response in flight."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    deadline = time.time() + DRAIN_SECONDS
    total = 0
    try:
        while total < DRAIN_BYTES:
            left = deadline - time.time()
            if left <= 0:
                break
            sock.settimeout(min(left, 2.0))
            data = sock.recv(262144)
            if not data:
                break
            total += len(data)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def raw_echo(conn):
    """Echo every byte back until the peer closes (or errors)."""
    conn.sock.settimeout(None)
    try:
        if conn.buf:
            data, conn.buf = conn.buf, b""
            conn.sendall(data)
        while True:
            data = conn.sock.recv(65536)
            if not data:
                break
            conn.sendall(data)
    except OSError:
        pass
    try:
        conn.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def simple_error(conn, code, version="HTTP/1.1"):
    body = ("%d %s\n" % (code, reason(code))).encode()
    head = ("%s %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            "Connection: close\r\n\r\n" % (version, code, reason(code), len(body)))
    try:
        conn.sendall(head.encode("latin-1") + body)
    except OSError:
        pass


# ---------------------------------------------------------------- request parsing
def read_head(conn):
    """Returns (method, target, version, headers) or None at a clean EOF.
    Raises TooLong (with .code) or BadRequest."""
    # Skip (a bounded number of) empty lines before a request line, as RFC 9112 allows.
    for _ in range(8):
        line = conn.readline_or_toolong(MAX_REQUEST_LINE, 414)
        if line == b"":
            return None
        if line.strip(b"\r\n"):
            break
    else:
        raise BadRequest("too many empty lines")
    total = len(line)
    reqline = line.rstrip(b"\r\n")
    parts = reqline.split(b" ")
    if len(parts) != 3:
        raise BadRequest("bad request line")
    method, target, version = [p.decode("latin-1") for p in parts]
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest("bad version")
    if not method.isalpha():
        raise BadRequest("bad method")
    headers = []
    while True:
        line = conn.readline_or_toolong(MAX_HEADER_BLOCK - total + 2, 431)
        total += len(line)
        if total > MAX_HEADER_BLOCK:
            e = TooLong()
            e.code = 431
            raise e
        if line == b"":
            raise PeerGone()
        stripped = line.rstrip(b"\r\n")
        if not stripped:
            break
        if stripped[:1] in (b" ", b"\t"):
            raise BadRequest("obsolete line folding")
        if b":" not in stripped:
            raise BadRequest("header line without colon")
        name, value = stripped.split(b":", 1)
        if not name or name != name.strip() or b" " in name:
            raise BadRequest("bad header name")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return method, target, version, headers


def _readline_or_toolong(self, limit, code):
    try:
        return self.readline(limit)
    except TooLong:
        e = TooLong()
        e.code = code
        raise e


Conn.readline_or_toolong = _readline_or_toolong


def hget(headers, name):
    name = name.lower()
    vals = [v for k, v in headers if k.lower() == name]
    return vals


def conn_tokens(headers):
    toks = set()
    for v in hget(headers, "connection"):
        for t in v.split(","):
            t = t.strip().lower()
            if t:
                toks.add(t)
    return toks


def read_body(conn, method, version, headers):
    te = [t.strip().lower() for v in hget(headers, "transfer-encoding") for t in v.split(",")]
    cls = hget(headers, "content-length")
    if te:
        if te[-1] != "chunked" or version == "HTTP/1.0":
            raise BadRequest("unsupported transfer-encoding")
        if cls:
            raise BadRequest("both content-length and transfer-encoding")
        out = []
        size_total = 0
        while True:
            line = conn.readline(4096)
            if line == b"":
                raise PeerGone()
            szs = line.rstrip(b"\r\n").split(b";", 1)[0].strip()
            try:
                if not szs or any(c not in b"0123456789abcdefABCDEF" for c in szs):
                    raise ValueError()
                sz = int(szs, 16)
            except ValueError:
                raise BadRequest("bad chunk size")
            if sz == 0:
                # trailers
                for _ in range(100):
                    tl = conn.readline(8192)
                    if tl == b"":
                        raise PeerGone()
                    if not tl.rstrip(b"\r\n"):
                        break
                else:
                    raise BadRequest("too many trailers")
                break
            size_total += sz
            if size_total > MAX_BODY:
                raise BadRequest("body too large")
            out.append(conn.read_exact(sz))
            crlf = conn.readline(8)
            if crlf.rstrip(b"\r\n"):
                raise BadRequest("missing CRLF after chunk")
        return b"".join(out)
    if cls:
        vals = set()
        for v in cls:
            for p in v.split(","):
                vals.add(p.strip())
        if len(vals) != 1:
            raise BadRequest("conflicting content-length")
        v = vals.pop()
        if not v.isdigit():
            raise BadRequest("bad content-length")
        n = int(v)
        if n > MAX_BODY:
            raise BadRequest("body too large")
        return conn.read_exact(n)
    return b""


# ---------------------------------------------------------------- responses
def send_response(conn, ctx, code, body, extra=(), framing="length", trailers=()):
    """framing: 'length' | 'chunked' | 'close'; trailers: lines after a chunked body.
    Returns True if connection stays open."""
    version = "HTTP/1.0" if ctx["version"] == "HTTP/1.0" else "HTTP/1.1"
    keep = ctx["keep"]
    if version == "HTTP/1.0" and framing == "chunked":
        framing = "close"
    if framing == "close":
        keep = False
    lines = ["%s %d %s" % (version, code, reason(code))]
    lines.append("Server: httpshim-test-upstream")
    lines.extend(extra)
    no_body_status = code < 200 or code in (204, 304)
    if not no_body_status:
        if framing == "length":
            lines.append("Content-Length: %d" % len(body))
        elif framing == "chunked":
            lines.append("Transfer-Encoding: chunked")
    if not keep:
        lines.append("Connection: close")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if ctx["method"] == "HEAD" or no_body_status:
        conn.sendall(head)
        return keep
    if framing == "chunked":
        parts = [head]
        pos = 0
        i = 0
        while pos < len(body):
            sz = min(CHUNK_SIZES[i % len(CHUNK_SIZES)], len(body) - pos)
            i += 1
            parts.append(b"%x\r\n" % sz)
            parts.append(body[pos:pos + sz])
            parts.append(b"\r\n")
            pos += sz
            if sum(len(p) for p in parts) > 262144:
                conn.sendall(b"".join(parts))
                parts = []
        parts.append(b"0\r\n" + b"".join(t.encode("latin-1") + b"\r\n" for t in trailers) + b"\r\n")
        conn.sendall(b"".join(parts))
    else:
        conn.sendall(head + body)  # one write: no Nagle / delayed-ACK stall
    return keep


def parse_n(s, default=None):
    try:
        n = int(s)
    except (TypeError, ValueError):
        return default
    if n < 0 or n > 512 * 1024 * 1024:
        return default
    return n


# Heads that are legal to receive but not to send, or past the usual ranges, each with a
# 5-byte body ("hello") and X-Served.
ODD_HEADS = {
    "fold": b"HTTP/1.1 200 OK\r\nX-Served: %d\r\nX-Folded: first\r\n  second\r\n\tthird\r\n"
            b"Cache-Control: max-age=60,\r\n private\r\nContent-Length: 5\r\n\r\n",
    "spacename": b"HTTP/1.1 200 OK\r\nX-Served: %d\r\nX-Spaced \t: v\r\nContent-Length: 5\r\n\r\n",
    "status600": b"HTTP/1.1 600 Beyond\r\nX-Served: %d\r\nContent-Length: 5\r\n\r\n",
    "badname": b"HTTP/1.1 200 OK\r\nX-Served: %d\r\nBad Name: v\r\nX(paren): w\r\nContent-Length: 5\r\n\r\n",
}
# A head whose only length has white space before its colon (no framing a strict reader
# takes), then bytes that read as a second response if the length were believed, then close.
SPACED_LENGTH = (b"HTTP/1.1 200 OK\r\nX-Served: %d\r\nContent-Length : 3\r\n\r\n"
                 b"OK!HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Smuggled: 1\r\n\r\nEVIL")


def serve_path(conn, ctx, path, body):
    """Returns 'keep', 'close' (graceful), or 'done' (socket already finished)."""
    segs = path.split("/")
    # segs[0] == ''
    kind = segs[1] if len(segs) > 1 else ""
    arg = segs[2] if len(segs) > 2 else None
    if kind == "delay" and arg is not None:
        ms = parse_n(arg, 0)
        time.sleep(min(ms, 60000) / 1000.0)
        rest = "/" + "/".join(segs[3:])
        return serve_path(conn, ctx, rest, body)
    if kind == "bytes" and parse_n(arg) is not None and len(segs) == 3:
        keep = send_response(conn, ctx, 200, pattern(parse_n(arg)),
                             ["Content-Type: application/octet-stream"])
        return "keep" if keep else "close"
    if kind == "range" and parse_n(arg) is not None and len(segs) == 3:
        data, code, extra = pattern(parse_n(arg)), 200, ["Accept-Ranges: bytes", "X-Served: %d" % next_served()]
        m = re.match(r"bytes=(\d+)-(\d*)$", (hget(ctx["headers"], "range") or [""])[0].strip())
        if m and int(m.group(1)) < len(data):
            first = int(m.group(1))
            last = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            code = 206
            extra.append("Content-Range: bytes %d-%d/%d" % (first, last, len(data)))
            data = data[first:last + 1]
        keep = send_response(conn, ctx, code, data, ["Content-Type: application/octet-stream"] + extra)
        return "keep" if keep else "close"
    if kind == "chunked" and parse_n(arg) is not None and len(segs) == 3:
        keep = send_response(conn, ctx, 200, pattern(parse_n(arg)),
                             ["Content-Type: application/octet-stream"], framing="chunked")
        return "keep" if keep else "close"
    if kind == "close" and parse_n(arg) is not None and len(segs) == 3:
        send_response(conn, ctx, 200, pattern(parse_n(arg)),
                      ["Content-Type: application/octet-stream"], framing="close")
        return "close"
    if kind == "odd" and arg == "spacedlength" and len(segs) == 3:
        conn.sendall(SPACED_LENGTH % next_served())
        return "close"
    if kind == "odd" and arg in ODD_HEADS and len(segs) == 3:
        head = ODD_HEADS[arg] % next_served()
        conn.sendall(head if ctx["method"] == "HEAD" else head + b"hello")
        return "keep"
    if kind == "http10" and parse_n(arg) is not None and len(segs) == 3:
        data = pattern(parse_n(arg))
        head = ("HTTP/1.0 200 OK\r\nServer: httpshim-test-upstream\r\n"
                "Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
                % len(data)).encode()
        conn.sendall(head if ctx["method"] == "HEAD" else head + data)
        return "close"
    if kind in ("truncate", "reset") and parse_n(arg) is not None and len(segs) == 3:
        n = parse_n(arg)
        data = pattern(n)
        head = ("HTTP/1.1 200 OK\r\nServer: httpshim-test-upstream\r\n"
                "Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
                % n).encode()
        conn.sendall(head + data[:n // 2])
        if kind == "truncate":
            return "close"
        time.sleep(0.05)
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 struct.pack("ii", 1, 0))
        except OSError:
            pass
        conn.sock.close()
        return "done"
    if kind == "garbage" and len(segs) == 2:
        conn.sendall(GARBAGE)
        return "close"
    if kind == "status" and parse_n(arg) is not None and len(segs) == 3:
        code = parse_n(arg)
        if not 100 <= code <= 599 or code == 101:
            code = 400
        b = ("status %d\n" % code).encode()
        keep = send_response(conn, ctx, code, b, ["Content-Type: text/plain"])
        return "keep" if keep else "close"
    if kind == "custom":
        return serve_custom(conn, ctx)
    if kind == "v3" and arg == "ip" and len(segs) == 4 and segs[3]:
        return serve_geo(conn, ctx, urllib.parse.unquote(segs[3]))
    if kind == "echo" and len(segs) == 2:
        doc = {
            "method": ctx["method"], "target": ctx["target"], "version": ctx["version"],
            "headers": [[k, v] for k, v in ctx["headers"]],
            "body": body.decode("latin-1"), "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(), "conn": ctx["conn"],
        }
        b = json.dumps(doc).encode()
        keep = send_response(conn, ctx, 200, b, ["Content-Type: application/json"])
        return "keep" if keep else "close"
    b = b"not found\n"
    keep = send_response(conn, ctx, 404, b, ["Content-Type: text/plain"])
    return "keep" if keep else "close"


# ---------------------------------------------------------------- /v3/ip and /custom
_GEO_COUNTRIES = [("US", "United States", ["Mountain View", "Ashburn", "Chicago", "Dallas"]),
                  ("DE", "Germany", ["Frankfurt", "Berlin", "Munich"]),
                  ("JP", "Japan", ["Tokyo", "Osaka"]),
                  ("BR", "Brazil", ["Sao Paulo", "Rio de Janeiro"]),
                  ("AU", "Australia", ["Sydney", "Melbourne"]),
                  ("FR", "France", ["Paris", "Marseille", "Lyon"]),
                  ("IN", "India", ["Mumbai", "Bengaluru"]),
                  ("CY", "Cyprus", ["Limassol", "Nicosia"])]
GEO_DOC_LEN = 1200


def geo_document(addr):
    """A deterministic ~1.2 KB JSON document about addr (bytes)."""
    h = hashlib.sha256(addr.encode("utf-8", "replace")).digest()
    code, country, cities = _GEO_COUNTRIES[h[0] % len(_GEO_COUNTRIES)]
    asn = 1000 + int.from_bytes(h[1:4], "big") % 64000
    doc = {"ip": addr, "country": country, "country_code": code,
           "city": cities[h[4] % len(cities)],
           "latitude": round((int.from_bytes(h[5:7], "big") / 65535.0) * 180 - 90, 4),
           "longitude": round((int.from_bytes(h[7:9], "big") / 65535.0) * 360 - 180, 4),
           "asn": asn, "org": "AS%d Example Networks %s" % (asn, code),
           "network": "%s/24" % addr, "source": "httpshim-test-upstream",
           "padding": ""}
    base = len(json.dumps(doc, sort_keys=True).encode())
    doc["padding"] = (h.hex() * 20)[:max(0, GEO_DOC_LEN - base)]
    return json.dumps(doc, sort_keys=True).encode()


def serve_geo(conn, ctx, addr):
    if GEO_DELAY_MS[0] > 0:
        time.sleep(min(GEO_DELAY_MS[0], 60000) / 1000.0)
    keep = send_response(conn, ctx, 200, geo_document(addr),
                         ["Content-Type: application/json",
                          "X-Served: %d" % next_served()])
    return "keep" if keep else "close"


def _header_ok(name, value):
    return (name and all(33 <= ord(c) <= 126 and c != ":" for c in name) and
            "\r" not in value and "\n" not in value)


# requests seen per exact /custom target (fail_after, drop_after); never reset
TARGET_LOCK = threading.Lock()
TARGET_SEEN = {}


def serve_custom(conn, ctx):
    """/custom: status, headers, size and framing from the query string."""
    query = ctx["target"].split("?", 1)[1] if "?" in ctx["target"] else ""
    status, n, mode, tag, hdrs, trailers = 200, 100, "length", None, [], []
    etag = lm = None
    now_ms = time.time() * 1000
    with TARGET_LOCK:
        TARGET_SEEN[ctx["target"]] = seen = TARGET_SEEN.get(ctx["target"], 0) + 1
    for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if k == "drop_at" and v.isdigit() and now_ms >= int(v):
            return "close"
        if k == "drop_after" and v.isdigit() and seen > int(v):
            return "close"
    for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if (k == "fail_at" and v.isdigit() and now_ms >= int(v)) or (k == "fail_after" and v.isdigit() and seen > int(v)):
            status = 503
        if k == "delay":
            time.sleep(min(parse_n(v, 0), 60000) / 1000.0)
        elif k == "etag" and _header_ok("ETag", v):
            etag = '"%s"' % v
            hdrs.append("ETag: %s" % etag)
        elif k == "lm" and _header_ok("Last-Modified", v):
            lm = v
            hdrs.append("Last-Modified: %s" % v)
        elif k == "status" and status != 503:
            c = parse_n(v, 200)
            status = c if 100 <= c <= 599 and c != 101 else 400
        elif k == "n":
            n = parse_n(v, 100)
        elif k == "mode" and v in ("length", "chunked", "close", "truncate", "badchunk", "none", "rawchunked"):
            mode = v
        elif k == "tag":
            tag = v
        elif k == "echo":             # the request's value of that header, as X-Echo
            got = hget(ctx["headers"], v.lower())
            value = got[0].strip() if got else "-"
            hdrs.append("X-Echo: %s" % (value if _header_ok("X-Echo", value) else "?"))
        elif k == "h" and ":" in v:
            name, value = v.split(":", 1)
            name, value = name.strip(), value.strip()
            if _header_ok(name, value):
                hdrs.append("%s: %s" % (name, value))
        elif k == "t" and ":" in v:
            name, value = v.split(":", 1)
            if _header_ok(name.strip(), value.strip()):
                trailers.append("%s: %s" % (name.strip(), value.strip()))
    extra = ["X-Served: %d" % next_served()]
    if tag is not None and _header_ok("X-Tag", tag):
        extra.append("X-Tag: %s" % tag)
    extra += hdrs
    data = pattern(n)
    inm = [t.strip() for v in hget(ctx["headers"], "if-none-match") for t in v.split(",")]
    ims = [v.strip() for v in hget(ctx["headers"], "if-modified-since")]
    if (etag and (etag in inm or "*" in inm)) or (lm and not inm and lm in ims):
        status, data = 304, b""
    if mode in ("length", "chunked", "close"):
        keep = send_response(conn, ctx, status, data, extra, framing=mode, trailers=trailers)
        return "keep" if keep and mode != "close" else "close"
    version = "HTTP/1.0" if ctx["version"] == "HTTP/1.0" else "HTTP/1.1"
    lines = ["%s %d %s" % (version, status, reason(status)),
             "Server: httpshim-test-upstream"] + extra
    if mode in ("none", "rawchunked"):
        body = data
        if mode == "rawchunked":
            body = (b"%x\r\n" % n + data + b"\r\n" if n else b"") + b"0\r\n\r\n"
        head = ("\r\n".join(lines + ["Connection: close"]) + "\r\n\r\n").encode("latin-1")
        conn.sendall(head if ctx["method"] == "HEAD" else head + body)
        return "close"
    half = n // 2
    if mode == "truncate" or version == "HTTP/1.0":
        lines.append("Content-Length: %d" % n)
        tail = data[:half]
    else:  # badchunk
        lines.append("Transfer-Encoding: chunked")
        tail = (b"%x\r\n" % half + data[:half] + b"\r\n" if half else b"") + \
            b"zz-not-hex\r\n" + data[:16]
    lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    conn.sendall(head if ctx["method"] == "HEAD" else head + tail)
    return "close"


TLS_CONTEXT = [None]


def handle_connection(sock, cid):
    if TLS_CONTEXT[0] is not None:
        sock.settimeout(30)
        try:
            sock = TLS_CONTEXT[0].wrap_socket(sock, server_side=True)
        except (OSError, ValueError):
            STATS.tls(False)
            STATS.conn_closed()
            try:
                sock.close()
            except OSError:
                pass
            return
        sock.settimeout(None)
        STATS.tls(True)
    conn = Conn(sock)
    finished = False
    try:
        first = conn.peek1()
        if first is None:
            return
        if not (b"A" <= first <= b"Z" or b"a" <= first <= b"z"):
            STATS.request({"conn": cid, "kind": "raw", "method": None, "target": None,
                           "headers": [], "body_len": 0})
            raw_echo(conn)
            return
        while True:
            try:
                head = read_head(conn)
            except TooLong as e:
                STATS.request({"conn": cid, "kind": "error", "status": e.code,
                               "method": None, "target": None, "headers": [],
                               "body_len": 0})
                simple_error(conn, e.code)
                drain_and_close(sock)
                finished = True
                return
            except BadRequest as e:
                STATS.request({"conn": cid, "kind": "error", "status": 400,
                               "error": str(e), "method": None, "target": None,
                               "headers": [], "body_len": 0})
                simple_error(conn, 400)
                drain_and_close(sock)
                finished = True
                return
            if head is None:
                return
            method, target, version, headers = head
            toks = conn_tokens(headers)
            if version == "HTTP/1.1":
                keep = "close" not in toks
            else:
                keep = "keep-alive" in toks
            entry = {"conn": cid, "kind": "http", "method": method, "target": target,
                     "version": version, "headers": [[k, v] for k, v in headers],
                     "body_len": 0}
            if method == "CONNECT":
                STATS.request(entry)
                conn.sendall(("%s 200 Connection Established\r\n\r\n" % version).encode())
                raw_echo(conn)
                return
            if any(v.strip().lower() == "echo" for v in hget(headers, "upgrade")) \
                    and "upgrade" in toks:
                STATS.request(entry)
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\n"
                             b"Upgrade: echo\r\nConnection: Upgrade\r\n\r\n")
                raw_echo(conn)
                return
            expect = [v.strip().lower() for v in hget(headers, "expect")]
            has_body = bool(hget(headers, "content-length") or
                            hget(headers, "transfer-encoding"))
            if version == "HTTP/1.1" and "100-continue" in expect and has_body:
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                body = read_body(conn, method, version, headers)
            except BadRequest as e:
                entry["kind"] = "error"
                entry["status"] = 400
                entry["error"] = str(e)
                STATS.request(entry)
                simple_error(conn, 400, version)
                drain_and_close(sock)
                finished = True
                return
            entry["body_len"] = len(body)
            STATS.request(entry)
            path = target.split("?", 1)[0]
            if path.startswith("http://"):
                path = "/" + path[7:].split("/", 1)[-1] if "/" in path[7:] else "/"
            ctx = {"method": method, "target": target, "version": version,
                   "headers": headers, "keep": keep, "conn": cid}
            result = serve_path(conn, ctx, path, body)
            if result == "done":
                finished = True
                return
            if result == "close":
                drain_and_close(sock)
                finished = True
                return
    except (PeerGone, OSError):
        return
    finally:
        if not finished:
            try:
                sock.close()
            except OSError:
                pass
        STATS.conn_closed()


# ---------------------------------------------------------------- control server
def control_connection(sock):
    try:
        sock.settimeout(30)
        conn = Conn(sock)
        try:
            head = read_head(conn)
        except (TooLong, BadRequest):
            head = None
        if head is None:
            return
        method, target, version, headers = head
        try:
            read_body(conn, method, version, headers)
        except BadRequest:
            pass
        code = 200
        if method == "GET" and target == "/stats":
            body = json.dumps(STATS.snapshot()).encode()
        elif method == "POST" and target == "/reset":
            STATS.reset()
            body = b'{"ok":true}'
        else:
            code = 404
            body = b'{"error":"not found"}'
        conn.sendall(("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                      "Content-Length: %d\r\nConnection: close\r\n\r\n"
                      % (code, reason(code), len(body))).encode() + body)
    except (OSError, PeerGone):
        pass
    finally:
        try:
            sock.close()
        except OSError:
            pass


def accept_loop(lsock, handler, counted):
    while True:
        try:
            sock, _addr = lsock.accept()
        except OSError:
            time.sleep(0.01)
            continue
        sock.settimeout(None)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if counted:
            cid = STATS.conn_opened()
            t = threading.Thread(target=handler, args=(sock, cid))
        else:
            t = threading.Thread(target=handler, args=(sock,))
        t.daemon = True
        try:
            t.start()
        except RuntimeError:
            sock.close()
            if counted:
                STATS.conn_closed()


def write_atomic(path, text):
    tmp = path + ".tmp%d" % os.getpid()
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--control-port-file", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--control-host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--geo-delay-ms", type=int, default=0,
                    help="how long /v3/ip/ADDR sleeps before answering")
    ap.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    ap.add_argument("--tls-key", help="... and this key")
    ap.add_argument("--tls-max-version", choices=["1.2", "1.3"])
    ap.add_argument("--tls-ciphers")
    ap.add_argument("--tls-client-ca")
    args = ap.parse_args()
    if args.tls_cert:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_max_version == "1.2":
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if args.tls_ciphers:
            ctx.set_ciphers(args.tls_ciphers)
        if args.tls_client_ca:
            ctx.load_verify_locations(args.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["http/1.1"])
        TLS_CONTEXT[0] = ctx
    GEO_DELAY_MS[0] = max(0, args.geo_delay_ms)

    def listener(host, port):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(1024)
        return s

    ls = listener(args.host, args.port)
    cs = listener(args.control_host, 0)

    def stop(_sig, _frm):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    t = threading.Thread(target=accept_loop, args=(cs, control_connection, False))
    t.daemon = True
    t.start()
    t = threading.Thread(target=accept_loop, args=(ls, handle_connection, True))
    t.daemon = True
    t.start()
    write_atomic(args.control_port_file, "%d\n" % cs.getsockname()[1])
    write_atomic(args.port_file, "%d\n" % ls.getsockname()[1])
    try:
        while True:
            time.sleep(3600)
    except SystemExit:
        pass
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
