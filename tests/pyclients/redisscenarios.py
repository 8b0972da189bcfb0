#!/usr/bin/env python3
"""Redis clients for the protocol = redis tests: each scenario runs in this one process
(so, under the shim, over one pool) and prints JSON lines, the last {"done": true}.

    redisscenarios.py SCENARIO --port P [--n N] [--threads T] [--stats-socket PATTERN]
                      [--seconds S] [--password PW]

  percall   N INCRs, then N SETs of distinct keys, then N GETs of them, each call a new
            connection: {"incr": last value, "wrong": GETs that were not their key's value}
  threads   T threads x N calls, each a new connection, SET/GET/INCR/MGET on the thread's
            own keys: {"calls", "wrong", "errors"}
  multi     two connections run MULTI/INCR/INCR/EXEC interleaved with a third's INCR:
            {"a": EXEC's replies, "b": ..., "plain": the INCR's replies}
  watch     WATCH w, another connection changes w, MULTI/SET/EXEC: {"exec": reply}
  pubsub    SUBSCRIBE on one connection, PUBLISH on another: {"message": what arrived}
  blpop     BLPOP on one connection (2 s) while N GETs on new connections run:
            {"gets_s": their wall time, "blpop_s": the block's, "blpop": its reply}
  acl       alice and bob (users the test made) AUTH on connections of their own, every
            command's ACL WHOAMI checked; SELECT 1 vs 0: {"wrong_user", "wrong_db", "calls"}
  quits     T threads x N connections, each pipelining SELECT/SET/(CLIENT INFO, one in
            five: its connection goes direct, or PING)/DBSIZE, then half of them QUIT:
            {"calls", "short": connections that got fewer than their 4 replies}
  loop      a new connection per INCR for S seconds, each call's outcome as a line
            {"t": seconds, "m": time.monotonic() at its start (the system's clock: the
            test's own instants compare with it), "r": "ok" | "refused" | "closed" |
            "error:..." | "timeout"}
With --stats-socket, the process's own /stats follow as {"stats": ...}.
"""
import argparse
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resp import RespError, encode, _Reader  # noqa: E402
from ownstats import own_stats  # noqa: E402


def conn(port, timeout=10.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return s, _Reader(s)


def call(port, *args, timeout=10.0):
    """One command on a connection of its own."""
    s, r = conn(port, timeout)
    try:
        s.sendall(encode(args))
        return r.reply()
    finally:
        s.close()


def on(sock_reader, *args):
    s, r = sock_reader
    s.sendall(encode(args))
    return r.reply()


def pipe(sock_reader, *commands):
    """Several commands in one write; their replies, in order."""
    s, r = sock_reader
    s.sendall(b"".join(encode(c) for c in commands))
    out = []
    for _ in commands:
        try:
            out.append(r.reply())
        except RespError as e:
            out.append(e)
    return out


def as_text(v):
    if isinstance(v, bytes):
        return v.decode("latin-1")
    if isinstance(v, (list, tuple)):
        return [as_text(x) for x in v]
    if isinstance(v, RespError):
        return "ERR:" + str(v)
    return v


def percall(a):
    last = None
    for _ in range(a.n):
        last = call(a.port, "INCR", "ctr")
    for i in range(a.n):
        call(a.port, "SET", "key:%d" % i, "value:%d" % i)
    wrong = sum(1 for i in range(a.n) if call(a.port, "GET", "key:%d" % i) != b"value:%d" % i)
    return {"incr": last, "wrong": wrong}


def threads(a):
    wrong, errors, calls = [0], [0], [0]
    lock = threading.Lock()

    def worker(t):
        w = e = c = 0
        for j in range(a.n):
            try:
                op = j % 4
                if op == 0:
                    ok = call(a.port, "SET", "t%d:%d" % (t, j), "v%d:%d" % (t, j)) == "OK"
                elif op == 1:
                    ok = call(a.port, "GET", "t%d:%d" % (t, j - 1)) == b"v%d:%d" % (t, j - 1)
                elif op == 2:
                    ok = call(a.port, "INCR", "t%d:ctr" % t) == j // 4 + 1
                else:
                    ok = call(a.port, "MGET", "t%d:%d" % (t, j - 3), "t%d:none" % t) == [b"v%d:%d" % (t, j - 3), None]
                w += not ok
            except (OSError, RespError):
                e += 1
            c += 1
        with lock:
            wrong[0] += w
            errors[0] += e
            calls[0] += c

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(a.threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"calls": calls[0], "wrong": wrong[0], "errors": errors[0]}


def multi(a):
    A, B, C = conn(a.port), conn(a.port), conn(a.port)
    out = {"a": [], "b": [], "plain": []}
    for _ in range(50):
        on(A, "MULTI")
        on(B, "MULTI")
        on(A, "INCR", "m")
        out["plain"].append(on(C, "INCR", "m"))
        on(B, "INCR", "m")
        on(A, "INCR", "m")
        out["plain"].append(on(C, "INCR", "m"))
        on(B, "INCR", "m")
        out["a"].append(on(A, "EXEC"))
        out["b"].append(on(B, "EXEC"))
    for s, _ in (A, B, C):
        s.close()
    return out


def watch(a):
    A, B = conn(a.port), conn(a.port)
    on(B, "SET", "w", "0")
    on(A, "WATCH", "w")
    on(A, "GET", "w")
    on(B, "SET", "w", "changed")
    on(A, "MULTI")
    on(A, "SET", "w", "mine")
    res = on(A, "EXEC")
    after = on(B, "GET", "w")
    # and without a conflict: the same dance succeeds
    on(A, "WATCH", "w")
    on(A, "MULTI")
    on(A, "SET", "w", "mine")
    ok = on(A, "EXEC")
    return {"exec": as_text(res), "after": as_text(after), "exec_no_conflict": as_text(ok)}


def pubsub(a):
    S = conn(a.port)
    first = on(S, "SUBSCRIBE", "ch")
    got = None
    for _ in range(50):
        n = call(a.port, "PUBLISH", "ch", "hello")
        if n:
            break
        time.sleep(0.05)
    S[0].settimeout(5)
    got = S[1].reply()
    S[0].close()
    return {"subscribed": as_text(first), "message": as_text(got)}


def clusterstate(a):
    """READONLY, READWRITE and ASKING change how the connection's next commands are served
    (on a cluster node; a plain server refuses them), REPLCONF makes it a replica's: each
    app connection that sends one keeps it to itself."""
    out = {}
    for cmd in (["READONLY"], ["READWRITE"], ["ASKING"], ["REPLCONF", "listening-port", "6999"]):
        S = conn(a.port)
        out[cmd[0]] = [as_text(on(S, *cmd)), as_text(on(S, "SET", "cs:" + cmd[0], "v")),
                       as_text(on(S, "GET", "cs:" + cmd[0]))]
        S[0].close()
    # CLIENT ID names the app's own connection: killing it from another ends only that one
    S, T = conn(a.port), conn(a.port)
    my_id = on(S, "CLIENT", "ID")
    out["kill"] = as_text(on(T, "CLIENT", "KILL", "ID", str(my_id)))
    out["other_after_kill"] = as_text(on(T, "SET", "cs:after", "ok"))
    try:
        out["killed_after_kill"] = as_text(on(S, "GET", "cs:after"))
    except (OSError, EOFError, ConnectionError) as e:
        out["killed_after_kill"] = "closed"
    S[0].close()
    T[0].close()
    return out


def blpop(a):
    res = {}

    def block():
        t0 = time.monotonic()
        res["blpop"] = as_text(call(a.port, "BLPOP", "empty:list", "2", timeout=10))
        res["blpop_s"] = round(time.monotonic() - t0, 3)

    t = threading.Thread(target=block)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    bad = sum(1 for _ in range(a.n) if call(a.port, "GET", "nokey") is not None)
    res["gets_s"] = round(time.monotonic() - t0, 3)
    res["gets_bad"] = bad
    t.join()
    return res


def acl(a):
    wrong_user = wrong_db = calls = 0
    for i in range(a.n):
        who = ("alice", "pa") if i % 2 == 0 else ("bob", "pb")
        X = conn(a.port)
        if on(X, "AUTH", who[0], who[1]) != "OK":
            wrong_user += 1
        Y = conn(a.port)                     # the default user, in between
        wrong_user += on(Y, "ACL", "WHOAMI") != b"default"
        wrong_user += on(X, "ACL", "WHOAMI") != who[0].encode()
        wrong_user += isinstance(on(X, "SET", "%s:%d" % (who[0][0], i), "x"), RespError)
        # the other user's keys: refused (NOPERM)
        wrong_user += not isinstance(on(X, "SET", "%s:%d" % ("b" if who[0] == "alice" else "a", i), "x"), RespError)
        db = i % 2
        Z = conn(a.port)
        if db:
            on(Z, "SELECT", "1")
        on(Z, "SET", "where:%d" % i, "db%d" % db)
        wrong_db += on(Y, "GET", "where:%d" % i) != (None if db else b"db0")
        for s, _ in (X, Y, Z):
            s.close()
        calls += 1
    return {"wrong_user": wrong_user, "wrong_db": wrong_db, "calls": calls}


def quits(a):
    short = [0]
    lock = threading.Lock()

    def worker(w):
        for i in range(a.n):
            S = conn(a.port)
            own = ["CLIENT", "INFO"] if (w + i) % 5 == 0 else ["PING"]
            try:
                got = pipe(S, ["SELECT", str(i % 3)], ["SET", "q:%d:%d" % (w, i), "1"], own, ["DBSIZE"])
                ok = len(got) == 4
            except (OSError, EOFError, ConnectionError):
                ok = False
            if not ok:
                with lock:
                    short[0] += 1
            if i % 2:
                try:
                    on(S, "QUIT")
                except (OSError, EOFError, ConnectionError):
                    pass
            S[0].close()
    ts = [threading.Thread(target=worker, args=(w,)) for w in range(a.threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"calls": a.threads * a.n, "short": short[0]}


def loop(a):
    t0 = time.monotonic()
    while time.monotonic() - t0 < a.seconds:
        m = time.monotonic()
        t = round(m - t0, 3)
        try:
            call(a.port, "INCR", "loop", timeout=5)
            r = "ok"
        except ConnectionRefusedError:
            r = "refused"
        except socket.timeout:
            r = "timeout"
        except (ConnectionResetError, BrokenPipeError, EOFError, ConnectionError):
            r = "closed"
        except (OSError, RespError) as e:
            r = "error:%s" % type(e).__name__
        print(json.dumps({"t": t, "m": m, "r": r}), flush=True)
        time.sleep(0.01)
    return {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--stats-socket")
    a = ap.parse_args()
    res = globals()[a.scenario](a)
    print(json.dumps(dict(res, scenario=a.scenario)), flush=True)
    if a.stats_socket:
        print(json.dumps({"stats": own_stats(a.stats_socket)}), flush=True)
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    main()
