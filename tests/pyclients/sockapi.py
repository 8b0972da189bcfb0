#!/usr/bin/env python3
"""Socket API behaviour on a (possibly diverted) connection; prints one JSON line.
  sockapi.py --port P --path /bytes/N
Checks: a second connect() -> EISCONN (after a non-blocking one: 0, then EISCONN); the
request works on a dup()ed fd after the original is closed; the answer arrives;
getsockopt(SO_TYPE) is SOCK_STREAM; sendto() and sendmsg() with an address (which TCP
ignores) send; writev() of more than IOV_MAX buffers fails with EINVAL, nothing sent."""
import argparse
import errno
import glob
import json
import os
import socket


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
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/bytes/1000")
    a = ap.parse_args()
    rep = {}
    # The "connect again to learn the result" idiom after a non-blocking connect:
    # Linux answers 0 once, then EISCONN; both mean "connected" to that idiom.
    t = socket.socket()
    t.settimeout(20)          # CPython: non-blocking connect + poll
    t.connect(("127.0.0.1", a.port))
    rep["recheck_after_nonblocking"] = [t.connect_ex(("127.0.0.1", a.port)),
                                        t.connect_ex(("127.0.0.1", a.port))]
    t.close()
    addr = ("127.0.0.1", a.port)
    req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (a.path, a.port)).encode()
    for how in ("sendto", "sendmsg", "writev_over_iov_max"):
        u = socket.create_connection(addr, timeout=20)
        try:
            if how == "sendto":
                u.sendto(req, addr)
            elif how == "sendmsg":
                u.sendmsg([req], [], 0, addr)
            else:
                os.writev(u.fileno(), [b"G"] * (os.sysconf("SC_IOV_MAX") + 1))
            rep[how] = u.recv(12).decode("latin-1")
        except OSError as e:
            rep[how] = errno.errorcode.get(e.errno, str(e))
        u.close()
    s = socket.socket()       # blocking connect; a second one is EISCONN
    s.connect(("127.0.0.1", a.port))
    try:
        s.connect(("127.0.0.1", a.port))
        rep["second_connect"] = "ok"
    except OSError as e:
        rep["second_connect"] = errno.errorcode.get(e.errno, str(e))
    s.settimeout(20)
    rep["so_type"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rep["nodelay"] = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    fd2 = os.dup(s.fileno())
    s.close()
    s2 = socket.socket(fileno=fd2)
    s2.settimeout(20)
    rep["peer_after_dup"] = list(s2.getpeername())
    s2.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                % (a.path, a.port)).encode())
    data = b""
    try:
        while True:
            d = s2.recv(65536)
            if not d:
                break
            data += d
    except OSError as e:
        rep["recv_error"] = str(e)
    s2.close()
    rep["status_line"] = data.split(b"\r\n", 1)[0].decode("latin-1")
    rep["body_len"] = len(data.split(b"\r\n\r\n", 1)[1]) if b"\r\n\r\n" in data else None
    rep["engine"] = engine_present()
    print(json.dumps(rep))


if __name__ == "__main__":
    main()
