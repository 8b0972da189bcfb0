#!/usr/bin/env python3
"""GETs over connections opened with TCP Fast Open, as wget2 opens them: no connect, the
first request goes in sendto(MSG_FASTOPEN) with the address. One process, one new socket
per path.

    fastopen.py --port P [--nonblock] PATH...

Blocking: sendto connects and sends (or raises the connect's error). --nonblock: sendto
may answer EINPROGRESS (a fast-open connect without a cookie sent nothing); then the
client waits for the socket to be writable and sends the request again with send(), as
wget2 does. Prints one JSON line per path: {"status", "len"} (the body's length, the
response read to its end: Connection: close) or {"error": "ExceptionType"}, with
"inprogress": whether sendto said EINPROGRESS."""
import argparse
import errno
import json
import select
import socket
import sys

MSG_FASTOPEN = getattr(socket, "MSG_FASTOPEN", 0x20000000)


def fetch(port, path, nonblock):
    req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % (path, port)).encode()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    out = {"inprogress": False}
    try:
        if nonblock:
            s.setblocking(False)
        try:
            sent = s.sendto(req, MSG_FASTOPEN, ("127.0.0.1", port))
        except (BlockingIOError, InterruptedError) as e:
            if e.errno != errno.EINPROGRESS:
                raise
            out["inprogress"] = True
            sent = 0
        if nonblock:
            select.select([], [s], [], 10)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, "connect")
            s.setblocking(True)
        if sent < len(req):
            s.sendall(req[sent:])
        s.settimeout(10)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        out.update(status=int(head.split()[1]), len=len(body))
    except Exception as e:  # noqa: BLE001 (the test compares the failure)
        out["error"] = type(e).__name__
    finally:
        s.close()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--nonblock", action="store_true")
    ap.add_argument("paths", nargs="+")
    a = ap.parse_args()
    for p in a.paths:
        sys.stdout.write(json.dumps(fetch(a.port, p, a.nonblock)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
