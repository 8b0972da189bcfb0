"""Three GETs by IP address, timed: one to a port no named upstream uses, one to the port of
a named upstream whose name is still resolving, and the same again once the name has had
time to resolve; then this process's own /stats. One JSON line.

    slowname.py OTHER_PORT NAMED_PORT WAIT_S STATS_SOCKET_PATTERN
"""
import json
import sys
import time
import urllib.request

from ownstats import own_stats


def get(port):
    t = time.monotonic()
    with urllib.request.urlopen("http://127.0.0.1:%s/bytes/10" % port, timeout=20) as r:
        body = r.read()
    return round(time.monotonic() - t, 3), len(body)


def main():
    other, named, wait_s, pattern = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    t_other = get(other)
    t_named = get(named)
    time.sleep(wait_s)
    t_later = get(named)
    print(json.dumps({"other": t_other, "named": t_named, "later": t_later, "stats": own_stats(pattern)}))


if __name__ == "__main__":
    main()
