"""One kept-alive connection to an upstream and N GETs one after another through the shim's
engine (no cache rules: every one goes upstream), then a quiet second. Prints, as JSON, the
engine thread's voluntary context switches over the N requests (each one a sleep in
epoll_wait), the CPU time it used during the quiet second, and the "engine" section of the
process's own /stats.

    pollprobe.py PORT N STATS_SOCKET_PATTERN
"""
import json
import os
import socket
import sys
import time

from ownstats import own_stats


def engine_tid():
    for tid in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/comm" % tid) as f:
                if f.read().strip() == "httpshim":
                    return tid
        except OSError:
            pass
    return None


def sleeps(tid):
    with open("/proc/self/task/%s/status" % tid) as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def cpu_ms(tid):
    with open("/proc/self/task/%s/stat" % tid) as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) * 1000 // os.sysconf("SC_CLK_TCK")


def main():
    port, n = int(sys.argv[1]), int(sys.argv[2])
    s = socket.create_connection(("127.0.0.1", port))
    f = s.makefile("rb")

    def get(i):
        s.sendall(b"GET /bytes/64?i=%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (i, port))
        length = 0
        while True:
            line = f.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = f.read(length)
        assert len(body) == length == 64, (len(body), length)

    get(0)                             # the engine runs from the first connect on
    tid = engine_tid()
    if tid is None:
        print(json.dumps({"error": "no engine thread"}))
        return
    before = sleeps(tid)
    for i in range(1, n + 1):
        get(i)
    slept = sleeps(tid) - before
    cpu = cpu_ms(tid)
    time.sleep(1.0)
    quiet = cpu_ms(tid) - cpu
    print(json.dumps({"sleeps": slept, "quiet_cpu_ms": quiet, "engine": own_stats(sys.argv[3])["engine"]}))


if __name__ == "__main__":
    main()
