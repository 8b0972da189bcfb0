#!/usr/bin/env python3
"""asyncio client: N coroutines at once, each opens its own connection (non-blocking
connect driven by epoll), sends one HTTP/1.1 request with Connection: close and reads to
EOF. Prints one JSON line; exit 0 iff every body is right.
  aioclient.py --port P --n 50"""
import argparse
import asyncio
import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from upstream import pattern  # noqa: E402


def engine_present():
    for p in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(p) as f:
                if f.read().strip() == "httpshim":
                    return True
        except OSError:
            pass
    return False


async def one(port, size):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(("GET /bytes/%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
             % (size, port)).encode())
    await w.drain()
    data = await r.read()
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 200") and body == pattern(size)


async def main_async(port, n):
    res = await asyncio.wait_for(
        asyncio.gather(*[one(port, 100 + 37 * i) for i in range(n)],
                       return_exceptions=True), 120)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--n", type=int, default=50)
    a = ap.parse_args()
    res = asyncio.run(main_async(a.port, a.n))
    ok = sum(1 for x in res if x is True)
    errs = [repr(x)[:200] for x in res if x is not True][:5]
    print(json.dumps({"ok": ok, "errors": errs, "engine": engine_present()}))
    return 0 if ok == a.n else 1


if __name__ == "__main__":
    sys.exit(main())
