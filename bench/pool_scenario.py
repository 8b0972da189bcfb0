#!/usr/bin/env python3
"""The pool-under-load scenario of issue 12: C coroutines, each with its own kept-alive
connection, N requests each, against an upstream that answers after a delay. Prints wall
time, p50/p99/max latency, the p50/p99 of each connection's first request (a cold pool's
cost is there) and how many requests failed, as one JSON line.

    bench/pool_scenario.py --port P [--coroutines 500] [--requests 20] [--path /delay/20/bytes/100]

"engine_cpu_ms" is the CPU time (user + system) of the process's threads named httpshim
(the shim's engine; 0 without the shim), read from /proc at the end.
"""
import argparse
import asyncio
import json
import os
import time


async def client(port, path, n, lat, first, errors):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        errors.append("connect")
        return
    req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (path, port)).encode()
    for i in range(n):
        t0 = time.monotonic()
        try:
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await r.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            errors.append("exchange")
            return
        lat.append(time.monotonic() - t0)
        if i == 0:
            first.append(lat[-1])
    w.close()


def engine_cpu_ms():
    """CPU of this process's threads named httpshim, from /proc (clock ticks of 10 ms)."""
    ticks = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/stat" % tid) as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.index("(") + 1:stat.rindex(")")] == "httpshim":
            fields = stat[stat.rindex(")") + 2:].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks * 1000 // os.sysconf("SC_CLK_TCK")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--coroutines", type=int, default=500)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--path", default="/delay/20/bytes/100")
    a = ap.parse_args()
    lat, first, errors = [], [], []
    t0 = time.monotonic()
    await asyncio.gather(*(client(a.port, a.path, a.requests, lat, first, errors) for _ in range(a.coroutines)))
    wall = time.monotonic() - t0
    lat.sort()
    first.sort()
    q = lambda v, p: round(v[min(len(v) - 1, int(p * len(v)))] * 1000, 1) if v else None  # noqa: E731
    print(json.dumps({"wall_s": round(wall, 3), "requests": len(lat), "errors": len(errors),
                      "p50_ms": q(lat, 0.5), "p99_ms": q(lat, 0.99), "max_ms": round(lat[-1] * 1000, 1) if lat else None,
                      "first_p50_ms": q(first, 0.5), "first_p99_ms": q(first, 0.99),
                      "engine_cpu_ms": engine_cpu_ms()}))


asyncio.run(main())
