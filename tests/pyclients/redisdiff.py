"""Random pipelines of commands that touch connection state, for a differential test of
the Redis proxy: run once direct and once under the shim, the two logs must be equal.

  redisdiff.py --port P --seeds 1-20 --steps 150 [--password P]

For each seed: FLUSHALL (after AUTH P on a server with a password, where each app
connection starts refused until it says AUTH alice pw), then three app connections take turns (which one, chosen by the
seed) sending 1 to 5 commands in one write and reading every reply before the next turn;
now and then one is closed and opened again. The commands mix plain ones with every kind
of state the proxy keeps per app connection: AUTH (a user `alice` with password `pw` must
exist), SELECT, HELLO 2/3 (with SETNAME), CLIENT SETNAME/GETNAME, MULTI/EXEC/DISCARD,
WATCH/UNWATCH, RESET, QUIT, blocking commands that time out (BLPOP, XREAD BLOCK, WAIT),
SUBSCRIBE and UNSUBSCRIBE (one reply per channel, a push in RESP3), commands that go
direct, every RESP3 type (DEBUG PROTOCOL: the server must allow DEBUG from local
clients), and errors of each (wrong arity, wrong password, EXEC without MULTI, commands
refused in subscriber mode, an unknown command). Nothing is PUBLISHed: a message reaches
a subscriber whenever it reaches it, not in a place the two runs could agree on. Prints
one JSON line per seed:
{"seed": N, "log": [[conn, commands, replies], ...]}; the `id` field of a HELLO reply,
which names a server connection, is masked."""
import os
import random
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resp import RespError, _Reader, encode  # noqa: E402
from seeds import run_seeds  # noqa: E402

KEYS = ["k1", "k2", "n", "l"]


def command(rnd, password):
    k = rnd.choice(KEYS)
    # (Redis 7.0 names a connection whose HELLO it refuses for want of AUTH; 7.2 does not,
    # nor does the shim: not asked where the server has a password)
    hello_named = ["HELLO", "3"] if password else ["HELLO", "3", "SETNAME", "h"]
    return rnd.choice([
        ["SET", k, "v%d" % rnd.randrange(5)], ["GET", k], ["INCR", "n"], ["DEL", k], ["MGET", "k1", "k2"],
        ["LPUSH", "l", "x"], ["RPOP", "l"], ["PING"], ["ECHO", "e"], ["CLIENT", "SETNAME", rnd.choice(["a", "b"])],
        ["CLIENT", "GETNAME"], ["SELECT", rnd.choice(["0", "1", "2"])], ["SELECT", "x"], ["AUTH", "alice", "pw"],
        ["AUTH", "alice", "bad"], ["AUTH", "default", "any"], ["MULTI"], ["EXEC"], ["DISCARD"], ["WATCH", k],
        ["UNWATCH"], ["RESET"], ["HELLO", "2"], ["HELLO", "3"], hello_named,
        ["BLPOP", "empty", "0.01"], ["ACL", "WHOAMI"], ["DBSIZE"], ["FOO"], ["GET"], ["CLIENT", "GETNAME", "x"],
        ["HELLO"], ["AUTH", "x"], ["SELECT"], ["INCR", "n"], ["GET", k], ["SET", k, "w"], ["TYPE", k],
        ["EXISTS", k], ["PING", "p"],
        ["HSET", "h", "f", "v"], ["HGETALL", "h"], ["ZADD", "z", "1.5", "m"], ["ZRANGE", "z", "0", "-1", "WITHSCORES"],
        ["DEBUG", "PROTOCOL", rnd.choice(["map", "set", "double", "null", "bignum", "true", "verbatim", "attrib"])],
        ["EVAL", "return redis.call('GET', KEYS[1])", "1", "k1"], ["WAIT", "0", "0"],
        ["XREAD", "BLOCK", "5", "STREAMS", "s", "0-0"], ["XLEN", "s"],
        ["SUBSCRIBE", "ch"], ["UNSUBSCRIBE", "ch"], ["QUIT"],
        ["CLIENT", "NO-EVICT", "on"], ["CLIENT", "REPLY", "ON"], ["OBJECT", "ENCODING", k],
    ])


def comparable(v):
    if isinstance(v, RespError):
        return "ERR:" + str(v)
    if isinstance(v, bytes):
        return v.decode("latin-1")
    if isinstance(v, tuple) and v and v[0] == "map":
        return ["map", [[comparable(a), "ID" if comparable(a) == "id" else comparable(b)] for a, b in v[1]]]
    if isinstance(v, (list, tuple)):
        out = [comparable(x) for x in v]
        for i in range(len(out) - 1):      # a RESP2 HELLO reply: the value after "id"
            if out[i] == "id" and isinstance(out[i + 1], int):
                out[i + 1] = "ID"
        return out
    return v


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return [s, _Reader(s)]


def run_seed(port, seed, steps, password=None):
    rnd = random.Random(seed)
    first = connect(port)
    if password:
        first[0].sendall(encode(["AUTH", password]))
        assert first[1].reply() == "OK"
    first[0].sendall(encode(["FLUSHALL"]))
    assert first[1].reply() == "OK"
    first[0].close()
    conns = [connect(port) for _ in range(3)]
    log = []
    for _ in range(steps):
        i = rnd.randrange(len(conns))
        if rnd.random() < 0.03:
            conns[i][0].close()
            conns[i] = connect(port)
            log.append([i, "reconnect"])
            continue
        cmds = [command(rnd, password) for _ in range(rnd.randrange(1, 6))]
        s, r = conns[i]
        got = []
        try:
            s.sendall(b"".join(encode(c) for c in cmds))
            for _ in cmds:
                got.append(comparable(r.reply()))
        except (OSError, ConnectionError):  # closed (whether the send or the read sees it
            got.append("closed")               # first is timing): said, and a new one
            conns[i][0].close()
            conns[i] = connect(port)
        else:
            if ["QUIT"] in cmds:
                conns[i][0].close()
                conns[i] = connect(port)
        log.append([i, cmds, got])
    for s, _ in conns:
        s.close()
    return log


if __name__ == "__main__":
    run_seeds(run_seed, "1-20", 150, password=True)
