#!/usr/bin/env python3
"""The Redis seed scenario (issue 23), side by side in one run: a Python service that makes
a new Redis client (and so a new connection) per request — without the shim, with the shim
(protocol = redis; and with the engine's busy polling off), and with the client library's
own connection pool reused (the fix the app cannot make), direct and through the shim (what
one round trip through the engine costs). redis-py, a local redis-server this script starts, loopback. A request
is one GET (a cache lookup), or a SET and a GET (--ops 1,2 runs both). Prints a markdown
table: requests/s, p50/p99 per request, and the connections the server accepted.

    bench/redisbench.py [--calls 2000] [--runs 3] [--ops 1,2] [--lib build/libhttpshim.so]
                        [--host H --port P] [--password PW] [--db N] [--client redis-py|ioredis]

With --host/--port it uses that server (e.g. one behind bench/delayline in a network
namespace) instead of starting its own; --password and --db make every new client send
AUTH and SELECT, as services that build a client per request often do. --client ioredis
runs the same service in Node.js with ioredis (RESP3: HELLO 3, then its INFO ready check).
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r'''
import json, sys, time, redis
host, port, calls, mode, pw, db, ops = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5],
                                        int(sys.argv[6]), int(sys.argv[7]))
kw = dict(host=host, port=port, db=db, password=pw or None)
shared = redis.Redis(**kw) if mode in ("reused", "floor") else None
lat = []
t0 = time.monotonic()
for i in range(calls):
    s = time.monotonic()
    if mode == "floor":
        c = redis.Redis(**kw)                   # a new client and pool per request, never connected:
        if ops == 2:                            # what a proxy costing nothing would leave
            shared.set("k%d" % (i % 100), "v")
        shared.get("k%d" % (i % 100))
        c.close()
    elif shared is None:
        c = redis.Redis(**kw)                   # a new client, pool and connection per request
        if ops == 2:
            c.set("k%d" % (i % 100), "v")
        c.get("k%d" % (i % 100))
        c.close()
    else:
        if ops == 2:
            shared.set("k%d" % (i % 100), "v")
        shared.get("k%d" % (i % 100))
    lat.append(time.monotonic() - s)
wall = time.monotonic() - t0
lat.sort()
print(json.dumps({"calls_s": calls / wall, "p50_us": lat[len(lat) // 2] * 1e6,
                  "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6}))
'''


# The same service in Node.js with ioredis (RESP3: HELLO 3 first, then its INFO ready check):
# node's argv after -e: host, port, calls, mode, password, db, ops.
NODE_CHILD = r'''
const Redis = require("ioredis");
const [host, port, calls, mode, pw, db, ops] = process.argv.slice(1);
const kw = { host, port: +port, db: +db, password: pw || undefined };
(async () => {
  const shared = mode === "reused" || mode === "floor" ? new Redis(kw) : null;
  if (shared) await shared.ping();
  const lat = [];
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < +calls; i++) {
    const s = process.hrtime.bigint(), key = "k" + (i % 100);
    if (mode === "floor") {                 // a client built per request, never connected
      const c = new Redis({ ...kw, lazyConnect: true });
      if (+ops === 2) await shared.set(key, "v");
      await shared.get(key);
      c.disconnect();
    } else if (!shared) {
      const c = new Redis(kw);
      if (+ops === 2) await c.set(key, "v");
      await c.get(key);
      c.disconnect();
    } else {
      if (+ops === 2) await shared.set(key, "v");
      await shared.get(key);
    }
    lat.push(Number(process.hrtime.bigint() - s) / 1000);
  }
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  lat.sort((a, b) => a - b);
  console.log(JSON.stringify({ calls_s: +calls / wall, p50_us: lat[lat.length >> 1],
                               p99_us: lat[Math.min(lat.length - 1, Math.floor(lat.length * 0.99))] }));
  process.exit(0);
})().catch(e => { console.error(e); process.exit(1); });
'''


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def received(host, port, password):
    cmd = ["redis-cli", "-h", host, "-p", str(port)] + (["--no-auth-warning", "-a", password] if password else [])
    out = subprocess.run(cmd + ["INFO", "stats"], stdout=subprocess.PIPE, check=True).stdout
    return int(re.search(rb"total_connections_received:(\d+)", out).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lib", default=os.path.join(ROOT, "build", "libhttpshim.so"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    ap.add_argument("--password", default="")
    ap.add_argument("--db", type=int, default=0)
    ap.add_argument("--ops", default="1,2", help="commands per request: 1 (GET), 2 (SET and GET), or both")
    ap.add_argument("--client", default="redis-py", choices=("redis-py", "ioredis"),
                    help="ioredis: node with NODE_PATH (default tests/node/node_modules, tools/install-deps)")
    a = ap.parse_args()
    py = "/usr/bin/python3"
    work = tempfile.mkdtemp(prefix="redisbench")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "HTTPSHIM_CONF")}
    if a.client == "ioredis":
        env.setdefault("NODE_PATH", os.path.join(ROOT, "tests", "node", "node_modules"))
        child = ["node", "-e", NODE_CHILD]
    else:
        child = [py, "-c", CHILD]
    srv = None
    port = a.port
    if not port:
        port = free_port()
        srv = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", work]
                               + (["--requirepass", a.password] if a.password else []),
                               stdout=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        for _ in range(100):
            try:
                received(a.host, port, a.password)
                break
            except (subprocess.CalledProcessError, AttributeError):
                time.sleep(0.05)
        confs = {}
        for poll in ("50us", "off"):
            confs[poll] = os.path.join(work, "rules-%s.conf" % poll)
            with open(confs[poll], "w") as f:
                f.write("[global]\nstats_socket = %s/%%p.sock\nbusy_poll = %s\n[upstream %s:%d]\nprotocol = redis\n"
                        % (work, poll, a.host, port))
        # (label, client mode, shim config or None)
        setups = [("per-request client, direct", "percall", None), ("per-request client, httpshim", "percall", "50us"),
                  ("per-request client, httpshim with busy_poll = off", "percall", "off"),
                  ("one client reused (its pool), direct", "reused", None),
                  ("one client reused (its pool), httpshim", "reused", "50us"),
                  ("per-request client, its commands on one reused connection (a proxy that cost nothing)", "floor",
                   None)]
        kinds = [int(x) for x in a.ops.split(",")]
        res = {(k, s[0]): [] for k in kinds for s in setups}
        for _ in range(a.runs):
            for k in kinds:
                for name, mode, shim in setups:
                    e = dict(env)
                    if shim:
                        e.update(LD_PRELOAD=a.lib, HTTPSHIM_CONF=confs[shim])
                    before = received(a.host, port, a.password)
                    out = subprocess.run(child + [a.host, str(port), str(a.calls), mode, a.password, str(a.db),
                                                  str(k)], stdout=subprocess.PIPE, env=e, check=True, timeout=1800).stdout
                    d = json.loads(out.decode().strip().splitlines()[-1])
                    d["conns"] = received(a.host, port, a.password) - before - 1
                    res[(k, name)].append(d)
                    print("%d op(s) %s: %s" % (k, name, d), file=sys.stderr, flush=True)
        med = {key: {f: statistics.median(r[f] for r in runs) for f in runs[0]} for key, runs in res.items()}
        what = {1: "GET", 2: "SET + GET"}
        print("| request | setup | requests/s | p50 per request | p99 per request | server connections |")
        print("|---|---|---|---|---|---|")
        for k in kinds:
            for name, _, _ in setups:
                m = med[(k, name)]
                print("| %s | %s | %.0f | %.0f µs | %.0f µs | %d |" % (what[k], name, m["calls_s"], m["p50_us"],
                                                                     m["p99_us"], m["conns"]))
        print()
        for k in kinds:
            d, s, r, f = (med[(k, setups[i][0])] for i in (0, 1, 3, 5))
            print("%s per request: httpshim vs direct %.2f× the requests/s (target ≥ 3×); httpshim's p50 vs the "
                  "reused pool's %.2f× (target ≤ 1.5×). The most any proxy could give here (the last row): %.2f× "
                  "the requests/s, p50 %.2f× the reused pool's.  " % (what[k], s["calls_s"] / d["calls_s"],
                                                                      s["p50_us"] / r["p50_us"],
                                                                      f["calls_s"] / d["calls_s"],
                                                                      f["p50_us"] / r["p50_us"]))
        print("Median of %d runs of %d requests each." % (a.runs, a.calls))
        if a.password or a.db:
            print("Every new client sends %s first." % " and ".join(
                x for x in ("AUTH" if a.password else "", "SELECT %d" % a.db if a.db else "") if x))
    finally:
        if srv:
            os.kill(srv.pid, signal.SIGTERM)
            srv.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
