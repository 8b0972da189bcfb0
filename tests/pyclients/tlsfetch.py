#!/usr/bin/env python3
"""HTTPS GETs from one long-lived process, one per stdin line, with urllib and a context
that trusts only the CA file it is given (as an app's own configuration would), so that a
test can change the upstream between two fetches of the same process.

    tlsfetch.py --cafile F [--stats-socket PATTERN]

Prints {"ready": true}, then for each line {"url": URL} one line: {"status", "len"} or
{"error": "ExceptionType: text"}; the line may also set the context as an app would:
"ciphers" (an OpenSSL cipher string, e.g. with @SECLEVEL=3), "min_tls": "1.3",
"max_tls": "1.2", "strict"
(VERIFY_X509_STRICT), "no_cn": true (hostname_checks_common_name off, as urllib3 2 sets); a line {"stats": true} answers {"stats": the process's
/stats} (with --stats-socket). stdin at EOF: exit 0."""
import argparse
import json
import ssl
import sys
import urllib.request

from ownstats import own_stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cafile", required=True)
    ap.add_argument("--stats-socket")
    a = ap.parse_args()
    say = lambda obj: (sys.stdout.write(json.dumps(obj) + "\n"), sys.stdout.flush())
    say({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("stats"):
            say({"stats": own_stats(a.stats_socket)})
            continue
        try:
            ctx = ssl.create_default_context(cafile=a.cafile)
            if cmd.get("ciphers"):
                ctx.set_ciphers(cmd["ciphers"])
            if cmd.get("min_tls") == "1.3":
                ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            if cmd.get("max_tls") == "1.2":
                ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            if cmd.get("strict"):
                ctx.verify_flags |= ssl.VERIFY_X509_STRICT
            if cmd.get("no_cn"):
                ctx.hostname_checks_common_name = False
            with urllib.request.urlopen(cmd["url"], context=ctx, timeout=20) as r:
                say({"status": r.status, "len": len(r.read())})
        except Exception as e:  # noqa: BLE001 (the test compares the failure)
            say({"error": "%s: %s" % (type(e).__name__, e)})


if __name__ == "__main__":
    main()
