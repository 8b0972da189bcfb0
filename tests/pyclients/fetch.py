#!/usr/bin/env python3
"""Fetch URLs one after the other with urllib or requests (no Session), one connection
per request, and print one JSON line per URL:
  {"url", "status", "len", "sha256", "error", "headers"}
then a final line {"done": true, "engine": <httpshim thread present>, "errors": N}.

  fetch.py --lib urllib|requests [--header 'K: V']... [--method M] [--data-file F]
           [--timeout S] [--save-dir D] [--stop-on-error] URL...
Exit status: 0 if every URL gave a complete response (any HTTP status), 1 otherwise.
"""
import argparse
import glob
import hashlib
import json
import os
import sys


def engine_present():
    for p in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(p) as f:
                if f.read().strip() == "httpshim":
                    return True
        except OSError:
            pass
    return False


def fetch_urllib(url, headers, method, data, timeout):
    import urllib.request
    import urllib.error
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        resp = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        resp = e
    with resp:
        body = resp.read()
        return resp.status if hasattr(resp, "status") else resp.code, body, \
            [[k, v] for k, v in resp.headers.items()]


def fetch_requests(url, headers, method, data, timeout):
    import requests
    r = requests.request(method or ("POST" if data is not None else "GET"), url,
                         headers=headers, data=data, timeout=timeout,
                         proxies={"http": None, "https": None}, allow_redirects=False)
    return r.status_code, r.content, [[k, v] for k, v in r.headers.items()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", choices=["urllib", "requests"], required=True)
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--method")
    ap.add_argument("--data-file")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--save-dir")
    ap.add_argument("--stop-on-error", action="store_true")
    ap.add_argument("urls", nargs="+")
    a = ap.parse_args()
    headers = {}
    for h in a.header:
        k, v = h.split(":", 1)
        headers[k.strip()] = v.strip()
    data = None
    if a.data_file:
        with open(a.data_file, "rb") as f:
            data = f.read()
    fn = fetch_urllib if a.lib == "urllib" else fetch_requests
    errors = 0
    for i, url in enumerate(a.urls):
        rec = {"url": url, "status": None, "len": None, "sha256": None, "error": None}
        try:
            status, body, rh = fn(url, headers, a.method, data, a.timeout)
            rec.update(status=status, len=len(body),
                       sha256=hashlib.sha256(body).hexdigest(), headers=rh)
            if a.save_dir:
                with open(os.path.join(a.save_dir, str(i)), "wb") as f:
                    f.write(body)
        except Exception as e:  # noqa: BLE001 - we report every failure class
            errors += 1
            rec["error"] = "%s: %s" % (type(e).__name__, str(e)[:200])
        print(json.dumps(rec), flush=True)
        if rec["error"] and a.stop_on_error:
            break
    print(json.dumps({"done": True, "engine": engine_present(), "errors": errors}),
          flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
