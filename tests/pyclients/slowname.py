"""GETs by IP address, timed, while the rules name an upstream whose host name is slow to
resolve: one to a port no named upstream uses (it starts the lookup), one to the port of
the named upstream while its name is still resolving, and the same again once the name
has had time to resolve; then this process's own /stats. One JSON line.

With --fork the process forks right after the first GET, while the lookup runs on a
thread the child does not get, and the child makes the other two GETs and prints.

    slowname.py [--fork] OTHER_PORT NAMED_PORT WAIT_S STATS_SOCKET_PATTERN
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
    args = sys.argv[1:]
    fork = args[0] == "--fork"
    other, named, wait_s, pattern = args[fork:]
    t_other = get(other)
    if fork:
        pid = os.fork()
        if pid:
            _, status = os.waitpid(pid, 0)
            sys.exit(os.waitstatus_to_exitcode(status))
    try:
        t_named = get(named)
        time.sleep(float(wait_s))
        t_later = get(named)
        print(json.dumps({"other": t_other, "named": t_named, "later": t_later, "stats": own_stats(pattern)}),
              flush=True)
    except Exception as e:  # noqa: BLE001 (the child must not unwind into its parent's code)
        print(json.dumps({"error": repr(e)}), flush=True)
        if not fork:
            raise
        os._exit(1)
    if fork:
        os._exit(0)                    # (no interpreter shutdown, no sanitizer exit hooks, in a fork)


if __name__ == "__main__":
    main()
