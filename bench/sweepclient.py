#!/usr/bin/env python3
"""One cell of the concurrency sweep (bench/full scenario 7): C asyncio clients in a closed
loop, N requests each, every URL distinct (no cache hits). Prints one JSON line: wall time,
requests answered, errors, p50/p99/max latency in ms.

    bench/sweepclient.py --host H --port P --clients C --requests N --mode reuse|per-request
                         [--tag T] [--timeout S]

reuse        each client opens one kept-alive connection and sends its N requests on it
per-request  each request opens a new connection, sends `Connection: close`, reads the
             response and closes (what a client that builds a pool per call does)

A request's latency runs from its first byte written (per-request: from the connect) to the
last byte of its body read."""
import argparse
import asyncio
import json
import time


async def exchange(r, w, req):
    w.write(req)
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await r.readexactly(length)


def request(a, c, i, close):
    path = "/bytes/1200?sweep=%s&c=%d&i=%d" % (a.tag, c, i)
    return ("GET %s HTTP/1.1\r\nHost: %s:%d\r\n%s\r\n" %
            (path, a.host, a.port, "Connection: close\r\n" if close else "")).encode()


async def client_reuse(a, c, lat, errors):
    try:
        r, w = await asyncio.open_connection(a.host, a.port)
    except OSError as e:
        errors.append("connect: %s" % e)
        return
    for i in range(a.requests):
        t0 = time.monotonic()
        try:
            await exchange(r, w, request(a, c, i, False))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            errors.append("exchange: %s" % type(e).__name__)
            break
        lat.append(time.monotonic() - t0)
    w.close()


async def client_per_request(a, c, lat, errors):
    for i in range(a.requests):
        t0 = time.monotonic()
        try:
            r, w = await asyncio.open_connection(a.host, a.port)
        except OSError as e:
            errors.append("connect: %s" % e)
            continue
        try:
            await exchange(r, w, request(a, c, i, True))
            lat.append(time.monotonic() - t0)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            errors.append("exchange: %s" % type(e).__name__)
        w.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--mode", choices=["reuse", "per-request"], required=True)
    ap.add_argument("--tag", default="x")
    ap.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args()
    lat, errors = [], []
    one = client_reuse if a.mode == "reuse" else client_per_request
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(one(a, c, lat, errors) for c in range(a.clients))), a.timeout)
    wall = time.monotonic() - t0
    lat.sort()

    def q(p):
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else 0

    print(json.dumps({"wall_s": round(wall, 3), "requests": len(lat), "errors": len(errors),
                      "first_error": errors[0] if errors else None,
                      "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": round(lat[-1] * 1000, 1) if lat else 0}))


asyncio.run(main())
