#!/usr/bin/env python3
"""One process of the burst scenario (bench/full scenario 8): C asyncio coroutines, each
sends one GET for key (i % KEYS) on a connection of its own, all at once (at --start-at,
so several processes fire together). Prints one JSON line: wall time, answered, errors,
p50 and max latency in ms.

    bench/burstclient.py --port P --coroutines C --keys K --path-prefix /custom/burst?...
                         [--offset N] [--start-at EPOCH_SECONDS]

Request i asks for PATH_PREFIX&k=((i + offset) % K); the response is read whole."""
import argparse
import asyncio
import json
import time


async def one(a, i, lat, errors):
    t0 = time.monotonic()
    try:
        r, w = await asyncio.open_connection("127.0.0.1", a.port)
        w.write(("GET %s&k=%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                 % (a.path_prefix, (i + a.offset) % a.keys, a.port)).encode())
        head = await r.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await r.readexactly(length)
        w.close()
        lat.append(time.monotonic() - t0)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        errors.append(type(e).__name__)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--coroutines", type=int, default=500)
    ap.add_argument("--keys", type=int, default=100)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--path-prefix", required=True)
    ap.add_argument("--start-at", type=float, default=0)
    a = ap.parse_args()
    if a.start_at:
        await asyncio.sleep(max(0.0, a.start_at - time.time()))
    lat, errors = [], []
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(one(a, i, lat, errors) for i in range(a.coroutines))), 120)
    wall = time.monotonic() - t0
    lat.sort()
    print(json.dumps({"wall_s": round(wall, 3), "requests": len(lat), "errors": len(errors),
                      "p50_ms": round(lat[len(lat) // 2] * 1000, 1) if lat else 0,
                      "max_ms": round(lat[-1] * 1000, 1) if lat else 0}))


asyncio.run(main())
