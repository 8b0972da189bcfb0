#!/usr/bin/env python3
"""HTTPS GETs from one process through a chosen Python client library, trusting only the
CA file it is given (its own configuration, as an app's would be).

    tlsclient.py --lib urllib|requests|httpclient|asyncio|aiohttp --url URL --cafile F
                 [--count N] [--client-cert C --client-key K] [--stats-socket PATTERN]
                 [--hold SECONDS]

urllib, requests (a Session per request) and asyncio open a connection per request;
httpclient and aiohttp keep one connection (one session) for all N. Prints one JSON line
per request: {"i", "status", "len", "sha256"} or {"i", "error": "ExceptionType: text"},
then (with --stats-socket) {"stats": the process's /stats}, then {"done": true}."""
import argparse
import asyncio
import hashlib
import json
import ssl
import urllib.parse

from ownstats import own_stats


def context(a):
    ctx = ssl.create_default_context(cafile=a.cafile)
    if a.client_cert:
        ctx.load_cert_chain(a.client_cert, a.client_key)
    return ctx


def record(i, status=None, body=None, error=None):
    if error is not None:
        return {"i": i, "error": "%s: %s" % (type(error).__name__, error)}
    return {"i": i, "status": status, "len": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def run_urllib(a):
    import urllib.request
    out = []
    for i in range(a.count):
        try:
            with urllib.request.urlopen(a.url, context=context(a), timeout=20) as r:
                out.append(record(i, r.status, r.read()))
        except Exception as e:  # noqa: BLE001 (the test compares the failure)
            out.append(record(i, error=e))
    return out


def run_requests(a):
    import requests
    out = []
    for i in range(a.count):
        try:
            with requests.Session() as s:
                cert = (a.client_cert, a.client_key) if a.client_cert else None
                r = s.get(a.url, verify=a.cafile, cert=cert, timeout=20)
                out.append(record(i, r.status_code, r.content))
        except Exception as e:  # noqa: BLE001
            out.append(record(i, error=e))
    return out


def run_httpclient(a):
    import http.client
    u = urllib.parse.urlsplit(a.url)
    out = []
    c = http.client.HTTPSConnection(u.hostname, u.port, context=context(a), timeout=20)
    for i in range(a.count):
        try:
            c.request("GET", u.path + ("?" + u.query if u.query else ""))
            r = c.getresponse()
            out.append(record(i, r.status, r.read()))
        except Exception as e:  # noqa: BLE001
            out.append(record(i, error=e))
            c = http.client.HTTPSConnection(u.hostname, u.port, context=context(a), timeout=20)
    return out


async def asyncio_one(a, i, u):
    try:
        r, w = await asyncio.open_connection(u.hostname, u.port, ssl=context(a), server_hostname=u.hostname)
        w.write(("GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                 % (u.path + ("?" + u.query if u.query else ""), u.netloc)).encode())
        data = await r.read()
        w.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return record(i, int(head.split(b" ", 2)[1]), body)
    except Exception as e:  # noqa: BLE001
        return record(i, error=e)


def run_asyncio(a):
    u = urllib.parse.urlsplit(a.url)

    async def main():
        return [await asyncio_one(a, i, u) for i in range(a.count)]
    return asyncio.run(main())


def run_aiohttp(a):
    import aiohttp

    async def main():
        out = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context(a))) as s:
            for i in range(a.count):
                try:
                    async with s.get(a.url) as r:
                        out.append(record(i, r.status, await r.read()))
                except Exception as e:  # noqa: BLE001
                    out.append(record(i, error=e))
        return out
    return asyncio.run(main())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True, choices=["urllib", "requests", "httpclient", "asyncio", "aiohttp"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--cafile", required=True)
    ap.add_argument("--count", type=int, default=2)
    ap.add_argument("--client-cert")
    ap.add_argument("--client-key")
    ap.add_argument("--stats-socket")
    ap.add_argument("--hold", type=float, default=0, help="stay alive this long after {done}")
    a = ap.parse_args()
    for rec in globals()["run_" + a.lib](a):
        print(json.dumps(rec), flush=True)
    if a.stats_socket:
        print(json.dumps({"stats": own_stats(a.stats_socket)}), flush=True)
    print(json.dumps({"done": True}), flush=True)
    if a.hold:
        import time
        time.sleep(a.hold)


if __name__ == "__main__":
    main()
