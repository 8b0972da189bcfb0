#!/usr/bin/env python3
"""Raw-socket client: connect, send bytes (from a thread, so a server that answers
early is read while we still send), read until EOF / enough bytes / enough complete
HTTP responses / timeout, and report as one JSON line:

  {"connect": "ok"|"ECONNREFUSED"|..., "peer": [...], "sockname_family": "AF_INET",
   "recv_len": N, "eof": bool, "reset": bool, "timed_out": bool, "send_error": str|null,
   "responses": [[status, body_len], ...], "engine": bool}

  rawclient.py --addr A --port P [--family 4|6] [--send-file F] [--out F]
               [--expect-bytes N] [--responses K --methods GET,HEAD,...] [--timeout S]
Exit status 0 unless the client itself failed (a crash shows as a signal exit).
`parse_responses` is imported by the tests.
"""
import argparse
import errno
import glob
import json
import socket
import sys
import threading
import time


def engine_present():
    for p in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(p) as f:
                if f.read().strip() == "httpshim":
                    return True
        except OSError:
            pass
    return False


def parse_responses(data, methods=None, eof=True):
    """Parse consecutive HTTP/1.x responses from `data`. Returns a list of dicts
    {version, status, reason, headers, body, complete} (1xx interim responses other
    than 101 are skipped) and stops at the first incomplete or unparsable one
    (returned with complete=False, or {"garbage": bytes})."""
    out = []
    pos = 0
    idx = 0
    methods = methods or []
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            out.append({"complete": False, "partial_head": data[pos:pos + 200]})
            break
        head = data[pos:end].decode("latin-1")
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            out.append({"complete": False, "garbage": data[pos:pos + 200]})
            break
        version, status = parts[0], int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        headers = []
        for ln in lines[1:]:
            if ":" in ln:
                k, v = ln.split(":", 1)
                headers.append((k.strip(), v.strip()))
        hd = {}
        for k, v in headers:
            hd.setdefault(k.lower(), v)
        body_start = end + 4
        if 100 <= status < 200 and status != 101:
            pos = body_start
            continue
        method = methods[idx] if idx < len(methods) else "GET"
        idx += 1
        resp = {"version": version, "status": status, "reason": reason,
                "headers": headers, "body": b"", "complete": True}
        if method == "HEAD" or status in (101, 204, 304):
            pos = body_start
        elif "chunked" in hd.get("transfer-encoding", "").lower():
            p = body_start
            chunks = []
            ok = False
            while True:
                le = data.find(b"\r\n", p)
                if le < 0:
                    break
                try:
                    sz = int(data[p:le].split(b";")[0].strip(), 16)
                except ValueError:
                    break
                p = le + 2
                if sz == 0:
                    # trailers until empty line
                    trailers = []
                    while True:
                        le = data.find(b"\r\n", p)
                        if le < 0:
                            break
                        line = data[p:le]
                        p = le + 2
                        if not line:
                            ok = True
                            break
                        k, _, v = line.decode("latin-1").partition(":")
                        trailers.append([k.strip(), v.strip()])
                    resp["trailers"] = trailers
                    break
                if p + sz + 2 > len(data):
                    break
                chunks.append(data[p:p + sz])
                p += sz + 2
            resp["body"] = b"".join(chunks)
            if not ok:
                resp["complete"] = False
                out.append(resp)
                break
            pos = p
        elif "content-length" in hd:
            n = int(hd["content-length"])
            resp["body"] = data[body_start:body_start + n]
            if body_start + n > len(data):
                resp["complete"] = False
                out.append(resp)
                break
            pos = body_start + n
        else:
            resp["body"] = data[body_start:]
            resp["complete"] = eof
            out.append(resp)
            break
        out.append(resp)
        if status == 101:
            resp["rest"] = data[pos:]
            break
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--family", choices=["4", "6"], default="4")
    ap.add_argument("--send-file")
    ap.add_argument("--out")
    ap.add_argument("--expect-bytes", type=int)
    ap.add_argument("--responses", type=int)
    ap.add_argument("--methods", default="")
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--shut-wr", action="store_true",
                    help="shutdown(SHUT_WR) once everything is sent (half-close)")
    a = ap.parse_args()

    rep = {"connect": None, "peer": None, "sockname_family": None, "recv_len": 0,
           "eof": False, "reset": False, "timed_out": False, "send_error": None,
           "recv_error": None, "responses": [], "engine": None}
    fam = socket.AF_INET6 if a.family == "6" else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(a.timeout)
    try:
        s.connect((a.addr, a.port))
        rep["connect"] = "ok"
    except OSError as e:
        rep["connect"] = errno.errorcode.get(e.errno, str(e)) if e.errno else str(e)
        rep["engine"] = engine_present()
        print(json.dumps(rep))
        return 0
    try:
        peer = s.getpeername()
        rep["peer"] = list(peer)
    except OSError as e:
        rep["peer"] = "error: %s" % e
    try:
        sn = s.getsockname()
        rep["sockname_family"] = "AF_INET6" if len(sn) == 4 else (
            "AF_INET" if isinstance(sn, tuple) else "other:%r" % (sn,))
    except OSError as e:
        rep["sockname_family"] = "error: %s" % e

    payload = b""
    if a.send_file:
        with open(a.send_file, "rb") as f:
            payload = f.read()

    def sender():
        try:
            view = memoryview(payload)
            while len(view):
                n = s.send(view[:262144])
                view = view[n:]
            if a.shut_wr:
                s.shutdown(socket.SHUT_WR)
        except OSError as e:
            rep["send_error"] = errno.errorcode.get(e.errno, str(e)) if e.errno else str(e)

    t = threading.Thread(target=sender)
    t.daemon = True
    t.start()
    methods = [m for m in a.methods.split(",") if m]
    buf = bytearray()
    deadline = time.time() + a.timeout
    while True:
        left = deadline - time.time()
        if left <= 0:
            rep["timed_out"] = True
            break
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
            break
        if not data:
            rep["eof"] = True
            break
        buf += data
        if a.expect_bytes is not None and len(buf) >= a.expect_bytes:
            break
        if a.responses:
            rs = parse_responses(bytes(buf), methods, eof=False)
            if len([r for r in rs if r.get("complete")]) >= a.responses:
                break
    t.join(max(0.1, deadline - time.time()))
    rep["recv_len"] = len(buf)
    rs = parse_responses(bytes(buf), methods, eof=rep["eof"])
    rep["responses"] = [[r.get("status"), len(r.get("body", b"")), r.get("complete")]
                        for r in rs]
    rep["engine"] = engine_present()
    if a.out:
        with open(a.out, "wb") as f:
            f.write(bytes(buf))
    s.close()
    print(json.dumps(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
