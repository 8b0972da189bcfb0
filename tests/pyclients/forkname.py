"""A process forks while the rules' host names are still resolving on a thread the child
does not get: the parent's first GET (to a port no named upstream uses) starts the
resolution, then the process forks at once. The child GETs the named upstream's port by
address right away, and again once a resolution started in the child has had time to
finish; it prints its timings and its own /stats as one JSON line.

    forkname.py OTHER_PORT NAMED_PORT WAIT_S STATS_SOCKET_PATTERN
"""
import json
import os
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
    get(other)
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    first = get(named)
    time.sleep(wait_s)
    later = get(named)
    print(json.dumps({"first": first, "later": later, "stats": own_stats(pattern)}), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
