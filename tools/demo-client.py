#!/usr/bin/env python3
"""The "legacy app" of `make demo`: looks up ADDRS geo-IP records ROUNDS times, one
request per connection, with plain urllib — exactly what an unchanged service does on
every page load. It knows nothing about httpshim.

usage: demo-client.py BASE_URL ROUNDS ADDR [ADDR...]"""
import json
import sys
import time
import urllib.request

base, rounds, addrs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
start = time.monotonic()
for _ in range(rounds):
    for addr in addrs:
        req = urllib.request.Request("%s/v3/ip/%s?sign=%d" % (base, addr, time.time_ns()),
                                     headers={"Connection": "close"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            record = json.loads(resp.read())
            assert record["ip"] == addr, record
print("%.3f" % (time.monotonic() - start))
