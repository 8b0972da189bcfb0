#!/usr/bin/env python3
"""Raw byte sequences to a Redis server, each case on a new connection of one process, and
what comes back: for the framing and connection-ending cases the RESP clients never send.

    redisraw.py --port P < CASES

CASES is a JSON list of {"send": [TEXT, ...], "shut": BOOL, "expect": N, "settle": S}: the
texts (latin-1) are written one by one, then with "shut" the write side is shut down;
the reply bytes are read until EOF (with "shut", only until EOF, 5 s at most without a
byte), or until at least "expect" bytes came and the
connection stayed quiet for "settle" seconds (0.15 by default; 5 s at most without a
byte). Prints one JSON line per case: {"got": TEXT, "eof": BOOL}."""
import argparse
import json
import select
import socket
import sys
import time


def one(port, case):
    s = socket.create_connection(("127.0.0.1", port))
    for text in case["send"]:
        s.sendall(text.encode("latin-1"))
    if case.get("shut"):
        s.shutdown(socket.SHUT_WR)
    got, eof = b"", False
    expect, settle = case.get("expect", 0), case.get("settle", 0.15)
    deadline = time.time() + 20
    while time.time() < deadline:
        wait = 5.0 if len(got) < expect or case.get("shut") else settle   # (shut: until the end)
        r, _, _ = select.select([s], [], [], wait)
        if not r:
            break
        chunk = s.recv(1 << 20)
        if not chunk:
            eof = True
            break
        got += chunk
    s.close()
    return {"got": got.decode("latin-1"), "eof": eof}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    for case in json.load(sys.stdin):
        sys.stdout.write(json.dumps(one(a.port, case)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
