#!/usr/bin/env python3
"""Scenario 9 of bench/full: HTTPS the app encrypts itself, direct vs httpshim with
`tls = intercept`, against the test upstream serving HTTPS with a CA of this run's own.

    bench/tlsbench.py [--hits N] [--story N] [--delay-ms 300]

1. hit latency: N sequential GETs from one python3 process, each on a new connection with
   a full TLS handshake (http.client, one SSLContext, no session reuse), 1.2 KB body;
   direct every GET reaches the upstream, under the shim all but the first are hits.
2. the geo-IP story: aiohttp, a ClientSession per request (a new connection and TLS
   handshake per call), N requests over N/10 client IPs, 10 at a time, against /v3/ip/ADDR
   answering after --delay-ms.
Prints a markdown section (tables), and one JSON line per measurement on stderr."""
import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tlsca import CA  # noqa: E402

LIB = ROOT / "build" / "libhttpshim.so"

HITS_CLIENT = r'''
import http.client, json, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[2])
port, n = int(sys.argv[1]), int(sys.argv[3])
lat = []
for i in range(n):
    t0 = time.perf_counter()
    c = http.client.HTTPSConnection("localhost", port, context=ctx)
    c.request("GET", "/custom/hit?n=1200&tag=tlsbench")
    r = c.getresponse(); r.read(); c.close()
    lat.append(time.perf_counter() - t0)
lat = sorted(lat[10:])
print(json.dumps({"p50_us": round(lat[len(lat) // 2] * 1e6), "p99_us": round(lat[int(len(lat) * 0.99)] * 1e6),
                  "n": len(lat)}))
'''

STORY_CLIENT = r'''
import aiohttp, asyncio, json, ssl, sys, time
port, cafile, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ctx = ssl.create_default_context(cafile=cafile)
lat = []
async def one(i):
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.get("https://localhost:%d/v3/ip/10.1.0.%d" % (port, i % max(1, n // 10))) as r:
            await r.read()
    lat.append(time.perf_counter() - t0)
async def main():
    sem = asyncio.Semaphore(10)
    async def bounded(i):
        async with sem:
            await one(i)
    t0 = time.perf_counter()
    await asyncio.gather(*(bounded(i) for i in range(n)))
    return time.perf_counter() - t0
wall = asyncio.run(main())
lat.sort()
print(json.dumps({"p50_ms": round(lat[len(lat) // 2] * 1000, 1), "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 1),
                  "wall_s": round(wall, 2), "n": len(lat)}))
'''


def control(port, method, path):
    import urllib.request
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method,
                                 data=b"" if method == "POST" else None)
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30) as r:
        return json.loads(r.read().decode())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hits", type=int, default=2000)
    ap.add_argument("--story", type=int, default=200)
    ap.add_argument("--delay-ms", type=int, default=300)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="httpshim-tlsbench."))
    ca = CA(work)
    chain, key = ca.leaf(["localhost", "127.0.0.1"])
    env0 = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "HTTPSHIM_CONF")}
    up = subprocess.Popen([sys.executable, str(ROOT / "tests" / "upstream.py"), "--port-file", str(work / "port"),
                           "--control-port-file", str(work / "cport"), "--tls-cert", str(chain), "--tls-key", str(key),
                           "--geo-delay-ms", str(a.delay_ms)], env=env0, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if (work / "cport").exists() and (work / "port").exists():
                break
            time.sleep(0.05)
        port, cport = int((work / "port").read_text()), int((work / "cport").read_text())
        conf = work / "rules.conf"
        conf.write_text("[global]\nstats_socket = %s/%%p.sock\n\n[upstream localhost:%d]\ntls = intercept\n"
                        "tls_ca_file = %s\ncache GET /custom/* ttl=10m\ncache GET /v3/ip/* ttl=10m\n"
                        % (work, port, ca.pem))
        shim_env = dict(env0, LD_PRELOAD=str(LIB), HTTPSHIM_CONF=str(conf))
        results = {}
        for setup, env in (("direct", env0), ("httpshim", shim_env)):
            control(cport, "POST", "/reset")
            r = subprocess.run([sys.executable, "-c", HITS_CLIENT, str(port), str(ca.pem), str(a.hits)], env=env,
                               capture_output=True, timeout=600)
            d = json.loads(r.stdout.decode().strip().splitlines()[-1])
            st = control(cport, "GET", "/stats")
            d.update(requests=st["requests"], handshakes=st["handshakes"])
            results["hits", setup] = d
            print(json.dumps({"hits": setup, **d}), file=sys.stderr)
        for setup, env in (("direct", env0), ("httpshim", shim_env)):
            control(cport, "POST", "/reset")
            r = subprocess.run([sys.executable, "-c", STORY_CLIENT, str(port), str(ca.pem), str(a.story)], env=env,
                               capture_output=True, timeout=600)
            d = json.loads(r.stdout.decode().strip().splitlines()[-1])
            st = control(cport, "GET", "/stats")
            d.update(requests=st["requests"], handshakes=st["handshakes"])
            results["story", setup] = d
            print(json.dumps({"story": setup, **d}), file=sys.stderr)
    finally:
        up.terminate()
        up.wait(15)
    h0, h1 = results["hits", "direct"], results["hits", "httpshim"]
    s0, s1 = results["story", "direct"], results["story", "httpshim"]
    print("## 9. HTTPS the app encrypts itself — direct TLS vs httpshim `tls = intercept` (one run)\n")
    print("Hit latency: %d sequential GETs from one python3 process, a new connection and a full TLS handshake each"
          " (http.client, one SSLContext), 1.2 KB body, first 10 left out. Under the shim the handshake is with the"
          " shim's in-process TLS session (a certificate its own CA minted; the app trusts it only inside this"
          " process) and every GET after the first is a hit.\n" % a.hits)
    print("| setup | p50 | p99 | upstream requests | upstream TLS handshakes |")
    print("|---|---|---|---|---|")
    print("| direct TLS to the upstream | %d µs | %d µs | %d | %d |" % (h0["p50_us"], h0["p99_us"], h0["requests"],
                                                                   h0["handshakes"]))
    print("| httpshim, tls = intercept | %d µs | %d µs | %d | %d |" % (h1["p50_us"], h1["p99_us"], h1["requests"],
                                                                  h1["handshakes"]))
    print("\nThe geo-IP story: aiohttp, a ClientSession (connection and TLS handshake) per request, %d requests over"
          " %d client IPs, 10 at a time; the upstream answers /v3/ip/ADDR after %d ms.\n"
          % (a.story, max(1, a.story // 10), a.delay_ms))
    print("| setup | p50 | p99 | wall | upstream requests | upstream TLS handshakes |")
    print("|---|---|---|---|---|---|")
    for name, d in (("direct TLS to the upstream", s0), ("httpshim, tls = intercept", s1)):
        print("| %s | %.1f ms | %.1f ms | %.2f s | %d | %d |" % (name, d["p50_ms"], d["p99_ms"], d["wall_s"],
                                                               d["requests"], d["handshakes"]))


if __name__ == "__main__":
    main()
