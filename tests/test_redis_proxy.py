"""The Redis protocol pooled (issue 23): an [upstream] with protocol = redis carries the
commands of an app that opens a connection per call over a few server connections, with
every piece of connection state kept exact. Every test starts its own redis-server; the
clients are raw RESP (tests/pyclients/redisscenarios.py, one process per scenario, so one
pool), redis-py and redis-cli; the server's own counters say what reached it."""
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

from conftest import BUILD, PYCLIENTS, SYS_PY, client_env, jlines, pyclient, require_build, run, tcp_server, write_rules
from resp import command, raw_replies
from test_redis import redis, redis_servers  # noqa: F401 (fixtures)

SCENARIOS = pyclient("redisscenarios.py")
HTTPSHIM = BUILD / "httpshim"


def conf_for(tmp, srv, sockdir, extra=(), upstream_extra=()):
    lines = ["[global]", "stats_socket = %s/%%p.sock" % sockdir] + list(extra)
    lines += ["", "[upstream 127.0.0.1:%d]" % srv.port, "protocol = redis"] + list(upstream_extra)
    return write_rules(tmp, [], raw="\n".join(lines) + "\n", name="redis-proxy.conf")


def received(srv):
    """Connections the server has accepted before this call's own (which it counts too)."""
    info = srv.cmd("INFO", "stats").decode()
    return int(re.search(r"^total_connections_received:(\d+)", info, re.M).group(1)) - 1


def scenario(name, srv, conf=None, sockdir=None, timeout=120, **args):
    cmd = [SYS_PY, SCENARIOS, name, "--port", srv.port]
    for k, v in args.items():
        cmd += ["--" + k.replace("_", "-"), v]
    if sockdir:
        cmd += ["--stats-socket", "%s/%%p.sock" % sockdir]
    r = run(cmd, shim=conf is not None, conf=conf, timeout=timeout)
    lines = jlines(r.out)
    assert r.rc == 0 and lines and lines[-1].get("done"), r.describe()
    res = [x for x in lines if x.get("scenario") == name][0]
    st = [x["stats"] for x in lines if "stats" in x]
    return res, (st[0]["upstreams"]["127.0.0.1:%d" % srv.port] if st else None)


def test_a_connection_per_call_rides_a_few_server_connections(redis, tmp_path, sockdir):
    """2 000 INCRs, 2 000 SETs and 2 000 GETs, each a new connection: the server accepts at
    most pool_max_per_host (4) connections for all 6 000, the counter ends at exactly
    2 000, and every key reads back its own value."""
    before = received(redis)
    res, u = scenario("percall", redis, conf_for(tmp_path, redis, sockdir), sockdir, n=2000)
    assert res["incr"] == 2000 and res["wrong"] == 0, res
    assert received(redis) - before - 1 <= 4, received(redis) - before - 1
    assert u["client_connections"] == 6000 and u["redis_commands"] == 6000, u
    assert u["redis_server_opened"] <= 4 and u["redis_batches"] >= 1, u
    assert u["redis_server_lost"] == 0 and u["redis_malformed"] == 0 and u["redis_direct"] == 0, u


def test_many_threads_never_get_another_ones_reply(redis, tmp_path, sockdir):
    """100 threads x 100 calls, each a new connection, SET/GET/INCR/MGET on each thread's own
    keys, all at once: no wrong reply, no error, still a few server connections."""
    before = received(redis)
    res, u = scenario("threads", redis, conf_for(tmp_path, redis, sockdir), sockdir, threads=100, n=100)
    assert res["calls"] == 10000 and res["wrong"] == 0 and res["errors"] == 0, res
    # the pool opens at most pool_max_per_host (4) itself; the server may also have seen
    # the app's own first connect (the cold upstream's probe, made for real so that a
    # refused connect fails as direct would), which the pool could not use when it settled
    # only after the probe's hold (1 s) had let the pool open its own
    assert u["redis_server_opened"] <= 4, {k: v for k, v in u.items() if k.startswith("redis")}
    assert received(redis) - before - 1 <= 4 + 1, (received(redis) - before - 1,
                                                  {k: v for k, v in u.items() if k.startswith("redis")})


def test_transactions_are_as_atomic_as_direct(redis, tmp_path, sockdir):
    """Two connections' MULTI/INCR/INCR/EXEC interleaved with a third's plain INCRs: each
    EXEC's increments are consecutive, and every reply is the one a direct run gets."""
    direct, _ = scenario("multi", redis)
    redis.cmd("DEL", "m")
    shimmed, u = scenario("multi", redis, conf_for(tmp_path, redis, sockdir), sockdir)
    assert {k: shimmed[k] for k in ("a", "b", "plain")} == {k: direct[k] for k in ("a", "b", "plain")}, (direct, shimmed)
    assert all(x[1] == x[0] + 1 for x in shimmed["a"] + shimmed["b"]), shimmed
    assert u["redis_pinned_multi"] == 0, "every lent connection was given back: %s" % u


def test_a_watch_conflict_is_seen_as_direct(redis, tmp_path, sockdir):
    direct, _ = scenario("watch", redis)
    shimmed, _ = scenario("watch", redis, conf_for(tmp_path, redis, sockdir), sockdir)
    assert shimmed["exec"] is None and shimmed["exec_no_conflict"] == ["OK"], shimmed
    assert {k: shimmed[k] for k in ("exec", "after", "exec_no_conflict")} == \
        {k: direct[k] for k in ("exec", "after", "exec_no_conflict")}, (direct, shimmed)


def test_subscribe_receives_what_publish_sends(redis, tmp_path, sockdir):
    res, u = scenario("pubsub", redis, conf_for(tmp_path, redis, sockdir), sockdir)
    assert res["subscribed"] == ["subscribe", "ch", 1] and res["message"] == ["message", "ch", "hello"], res
    assert u["redis_direct"] == 1, u


def test_cluster_connection_state_is_never_shared(redis, tmp_path, sockdir):
    """READONLY / READWRITE / ASKING are connection state on a cluster node (reads from a
    replica; the next command's slot check), REPLCONF a replica's handshake: an app connection that sends one is served
    over a connection of its own, so no other app's command ever runs under it; the replies
    are the server's own, as direct. CLIENT ID names the app's own connection too: an app
    that kills it from another ends that one only, never a shared one."""
    direct, _ = scenario("clusterstate", redis)
    shimmed, u = scenario("clusterstate", redis, conf_for(tmp_path, redis, sockdir), sockdir)
    assert shimmed == direct, (direct, shimmed)
    assert shimmed["kill"] == 1 and shimmed["killed_after_kill"] == "closed", shimmed
    assert u["redis_direct"] == 5 and u["redis_server_lost"] == 0, u   # (the killed one: its own end)


def test_a_direct_connection_the_app_quits_is_no_loss_of_the_server(redis, tmp_path, sockdir):
    """Connections that went direct (CLIENT INFO names the app's own connection) and then
    QUIT: the server closes each as asked, and that is the app's own end, not the server
    gone. Before, each such close was taken for a lost server: the pool forgot what it knew,
    and other app connections holding commands on that login were closed with no reply (an
    adversarial pass: 140 of 720 connections got an end of file)."""
    res, u = scenario("quits", redis, conf_for(tmp_path, redis, sockdir), sockdir, threads=8, n=30)
    assert res["calls"] == 240 and res["short"] == 0, res
    assert u["redis_direct"] >= 40 and u["redis_server_lost"] == 0, u


def test_a_blocking_command_blocks_no_one_else(redis, tmp_path, sockdir):
    """BLPOP on an empty list (2 s) on one connection while 1 000 GETs run on others, each
    a new connection: the GETs are done long before the block ends."""
    res, u = scenario("blpop", redis, conf_for(tmp_path, redis, sockdir), sockdir, n=1000)
    assert res["blpop"] is None and res["blpop_s"] >= 1.9, res
    assert res["gets_bad"] == 0 and res["gets_s"] < res["blpop_s"] - 0.3, res
    assert u["redis_pinned_blocking"] == 0, u


def test_users_and_databases_never_mix(redis, tmp_path, sockdir):
    """alice and bob (ACL users) on connections of their own, the default user in between:
    every command runs as the user of its own connection (ACL WHOAMI, and each user's key
    patterns enforced), and SELECT 1 writes land in database 1 only."""
    redis.cmd("ACL", "SETUSER", "alice", "on", ">pa", "~a:*", "+@all")
    redis.cmd("ACL", "SETUSER", "bob", "on", ">pb", "~b:*", "+@all")
    res, u = scenario("acl", redis, conf_for(tmp_path, redis, sockdir), sockdir, n=60)
    assert res["calls"] == 60 and res["wrong_user"] == 0 and res["wrong_db"] == 0, res
    for i in range(60):
        assert redis.cmd("GET", "where:%d" % i, db=i % 2) == b"db%d" % (i % 2), i
        assert redis.cmd("EXISTS", "where:%d" % i, db=1 - i % 2) == 0, i
    assert u["redis_local_replies"] > 0, "known identities are answered by the shim: %s" % u


def direct_and_shimmed(redis, tmp_path, sockdir, connections, replies):
    """The same few commands (redisscenarios' conn/on/as_text) run direct and under the
    shim: `connections` opens them (`port` is the server's), `replies` is the list whose
    JSON the program prints. Returns both runs."""
    code = ("import json, sys; sys.path.insert(0, %r)\n"
            "from redisscenarios import conn, on, as_text\n"
            "port = int(sys.argv[1])\n"
            "%s\n"
            "print(json.dumps(%s))\n") % (os.path.dirname(SCENARIOS), connections, replies)
    direct = run([SYS_PY, "-c", code, redis.port], shim=False, timeout=60)
    shimmed = run([SYS_PY, "-c", code, redis.port], conf=conf_for(tmp_path, redis, sockdir), timeout=60)
    return direct, shimmed


def replies_as_direct(redis, tmp_path, sockdir, connections, replies):
    """direct_and_shimmed, both runs required to succeed and print the same: what they
    printed."""
    direct, shimmed = direct_and_shimmed(redis, tmp_path, sockdir, connections, replies)
    assert direct.rc == 0 and shimmed.rc == 0, (direct.describe(), shimmed.describe())
    assert jlines(shimmed.out) == jlines(direct.out), (direct.out, shimmed.out)
    return jlines(direct.out)[0]


def test_a_wrong_password_fails_as_direct(redis, tmp_path, sockdir):
    """AUTH with a password the server refuses: the app gets the server's own error, and
    its next commands run as before (the default user)."""
    redis.cmd("ACL", "SETUSER", "carol", "on", ">right", "~*", "+@all")
    got = replies_as_direct(
        redis, tmp_path, sockdir, "X = conn(port)",
        "[as_text(on(X, 'AUTH', 'carol', 'wrong')), as_text(on(X, 'ACL', 'WHOAMI')),"
        " as_text(on(X, 'AUTH', 'carol', 'right')), as_text(on(X, 'ACL', 'WHOAMI'))]")
    assert got[0].startswith("ERR:WRONGPASS"), got


# (a program's lines: how many of its app connections went direct, through the shim; None
# without it. SOCKDIR: the test's stats socket directory)
WENT_DIRECT = """
try:
    from ownstats import own_stats
    went_direct = own_stats('SOCKDIR/%p.sock')['upstreams']['127.0.0.1:%d' % port]['redis_direct']
except OSError:
    went_direct = None
"""


RESP3_SESSION = """
A, B = conn(port), conn(port)
on(B, 'DEL', 'r3:k', 'r3:h', 'r3:z', 'r3:c')                # (each run starts from none)
def hello(*a):
    v = as_text(on(A, 'HELLO', *a))
    # (the map's id names a connection: the app's own direct, a shared one through the shim)
    if isinstance(v, list) and v[:1] == ['map']:
        return [[k, 0 if k == 'id' else x] for k, x in v[1]]
    if isinstance(v, list) and 'id' in v[::2]:                # (RESP2: the same pairs, flat)
        return [0 if i % 2 and v[i - 1] == 'id' else x for i, x in enumerate(v)]
    return v
out = [hello('3')]
for args in (('SET', 'r3:k', 'v'), ('HSET', 'r3:h', 'f', '1')):
    out.append(as_text(on(A, *args)))
for X in (A, B, A, B):
    out.append(as_text(on(X, 'HGETALL', 'r3:h')))          # a map in RESP3, an array in RESP2
    out.append(as_text(on(X, 'GET', 'r3:missing')))        # _ and $-1
out.append(as_text(on(A, 'ZADD', 'r3:z', '1.5', 'm')))
out.append(as_text(on(A, 'ZSCORE', 'r3:z', 'm')))          # a double
out.append(as_text(on(A, 'CLIENT', 'GETNAME')))
out.append(hello('3', 'SETNAME', 'r3name'))
out.append(as_text(on(A, 'CLIENT', 'GETNAME')))
out.append(as_text(on(A, 'MULTI')))
out.append(as_text(on(A, 'INCR', 'r3:c')))
out.append(as_text(on(A, 'EXEC')))
out.append(hello('3', 'AUTH', 'default', 'wrong'))          # refused: still RESP3, as before
out.append(as_text(on(A, 'HGETALL', 'r3:h')))
out.append(hello('2'))
out.append(as_text(on(A, 'HGETALL', 'r3:h')))
out.append(hello('3', 'AUTH', 'dave', 'pd'))
out.append(as_text(on(A, 'ACL', 'WHOAMI')))
out.append(as_text(on(B, 'ACL', 'WHOAMI')))
out.append(as_text(on(A, 'RESET')))
out.append(as_text(on(A, 'HGETALL', 'r3:h')))
out.append(as_text(on(A, 'ACL', 'WHOAMI')))
""" + WENT_DIRECT + """
out.append(hello('4'))                                      # the server's own error (direct from here)
out.append(as_text(on(A, 'GET', 'r3:k')))
"""


def test_resp3_is_spoken_and_shared_only_with_resp3(redis, tmp_path, sockdir):
    """HELLO 3 (as ioredis and node-redis send first): the app's replies come in RESP3 (maps,
    nulls, doubles) while another connection's stay RESP2, on the same upstream at once;
    HELLO's SETNAME is the app's own name, its AUTH a user checked by the server (a wrong
    password refused as direct, the protocol unchanged), HELLO 2 and RESET go back to
    RESP2, and a version the shim does not know gets the server's own error: every reply
    as direct. (HELLO 3 used to give the app a server connection of its own for good.)"""
    redis.cmd("ACL", "SETUSER", "dave", "on", ">pd", "~*", "+@all")
    session = RESP3_SESSION.replace("SOCKDIR", sockdir)
    direct, shimmed = direct_and_shimmed(redis, tmp_path, sockdir, session, "[out, went_direct]")
    assert direct.rc == 0 and shimmed.rc == 0, (direct.describe(), shimmed.describe())
    (got, went_direct), (want, _) = jlines(shimmed.out)[0], jlines(direct.out)[0]
    assert got == want, [(i, x, y) for i, (x, y) in enumerate(zip(want, got)) if x != y]
    assert went_direct == 0, "RESP3 went on shared connections, not direct: %s" % went_direct
    assert ["proto", 3] in want[0], want[0]
    assert want[3:7] == [["map", [["f", "1"]]], None, ["f", "1"], None], want


RESP3_TYPES = """
import time
s = socket.create_connection(('127.0.0.1', port), timeout=10)
def command(*a):
    s.sendall(b''.join([b'*%d\\r\\n' % len(a)] + [b'$%d\\r\\n%s\\r\\n' % (len(x), x) for x in (y.encode() for y in a)]))
def until(end):
    data = b''
    while not data.endswith(end):
        data += s.recv(65536)
    return data
command('HELLO', '3')
until(b'modules\\r\\n*0\\r\\n')
got = []
for t in ('string', 'integer', 'double', 'bignum', 'null', 'array', 'set', 'map', 'attrib', 'verbatim', 'true', 'false'):
    command('DEBUG', 'PROTOCOL', t)
    command('ECHO', 'end')                                  # (the reply after it ends it)
    got.append(until(b'$3\\r\\nend\\r\\n').decode('latin-1'))
""" + WENT_DIRECT


def test_every_resp3_type_comes_back_as_the_server_sent_it(redis, tmp_path, sockdir):
    """DEBUG PROTOCOL makes the server send each RESP3 type (double, big number, null, set,
    map, an attribute before its reply, verbatim string, booleans): through the shim's
    framer (hiredis 0.14 knows none of them) each reaches the app byte for byte as direct."""
    code = "import socket\n" + RESP3_TYPES.replace("SOCKDIR", sockdir)
    direct, shimmed = direct_and_shimmed(redis, tmp_path, sockdir, code, "[got, went_direct]")
    assert direct.rc == 0 and shimmed.rc == 0, (direct.describe(), shimmed.describe())
    (got, went_direct), (want, _) = jlines(shimmed.out)[0], jlines(direct.out)[0]
    assert got == want, [(x, y) for x, y in zip(want, got) if x != y]
    assert "|1\r\n" in want[8] and "=29\r\ntxt:" in want[9], want
    assert went_direct == 0, "over the shared RESP3 connections, not direct: %s" % went_direct


BURST = """
import re, threading
def accepted():
    X = conn(port)
    info = as_text(on(X, 'INFO', 'stats'))
    X[0].close()
    return int(re.search(r'total_connections_received:(\\d+)', info).group(1))
def burst(work):
    barrier = threading.Barrier(20)
    got = [None] * 20
    def one(i):
        X = conn(port)
        barrier.wait()
        got[i] = work(X)
        X[0].close()
    ts = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    return got
before = accepted()
resp3 = burst(lambda X: [as_text(on(X, 'HELLO', '3', 'AUTH', 'erin', 'pe'))[0], as_text(on(X, 'ACL', 'WHOAMI')),
                         as_text(on(X, 'HGETALL', 'burst:none'))])
opened = accepted() - before                               # (direct: INFO's own connection too)
refused = burst(lambda X: [as_text(on(X, 'AUTH', 'erin', 'wrong')), as_text(on(X, 'ACL', 'WHOAMI'))])
"""


def test_a_burst_of_new_identities_checks_each_once(redis, tmp_path, sockdir):
    """20 app connections at once saying HELLO 3 AUTH as a user the shim has not seen: each
    gets the server's answer as direct, and the identity is checked on one server connection
    while the others wait for its verdict, so the burst opens at most pool_max_per_host (4);
    then 20 at once with a wrong password: each gets WRONGPASS and goes on as the default
    user, as direct. (Each opened a connection of its own to be checked, and all of them
    then stayed shared: 52 server connections for redis-benchmark -3 -c 50.)"""
    redis.cmd("ACL", "SETUSER", "erin", "on", ">pe", "~*", "+@all")
    direct, shimmed = direct_and_shimmed(redis, tmp_path, sockdir, BURST, "[resp3, refused, opened]")
    assert direct.rc == 0 and shimmed.rc == 0, (direct.describe(), shimmed.describe())
    (resp3, refused, opened), (want3, want_refused, opened_direct) = jlines(shimmed.out)[0], jlines(direct.out)[0]
    assert (resp3, refused) == (want3, want_refused), (direct.out, shimmed.out)
    assert want3 == [["map", "erin", ["map", []]]] * 20, want3
    assert all(r[0].startswith("ERR:WRONGPASS") and r[1] == "default" for r in want_refused), want_refused
    assert opened_direct == 21 and opened <= 4, (opened_direct, opened)


RESP3_PER_CALL = """
wrong = 0
for i in range(300):
    X = conn(port)
    hello = as_text(on(X, 'HELLO', '3'))
    wrong += hello[0] != 'map' or ['proto', 3] not in hello[1]
    on(X, 'SET', 'r3pc:%d' % i, 'v%d' % i)
    wrong += as_text(on(X, 'GET', 'r3pc:%d' % i)) != 'v%d' % i
    wrong += as_text(on(X, 'HGETALL', 'r3pc:none')) != ['map', []]
    X[0].close()
"""


def test_resp3_clients_per_call_ride_a_few_server_connections(redis, tmp_path, sockdir):
    """300 calls, each a new connection that says HELLO 3 first (as ioredis and node-redis
    do): every reply right and in RESP3, and the server accepts at most pool_max_per_host
    (4) connections for them all."""
    before = received(redis)
    _, shimmed = direct_and_shimmed(redis, tmp_path, sockdir, RESP3_PER_CALL, "{'wrong': wrong}")
    assert shimmed.rc == 0 and jlines(shimmed.out) == [{"wrong": 0}], shimmed.describe()
    # (direct_and_shimmed ran it direct first: 300 connections, then the shim's)
    assert received(redis) - before - 300 - 1 <= 4, received(redis) - before


NODE_MODULES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node", "node_modules")
NODE_CLIENTS = r"""
const Redis = require("ioredis");
const { createClient } = require("redis");
const port = +process.argv[1];
(async () => {
  const out = { wrong: 0, calls: 0 };
  for (let i = 0; i < 150; i++) {            // a new ioredis client per call (it says HELLO 3)
    const r = new Redis({ port, host: "127.0.0.1", db: 1 });
    await r.set("io:" + i, "v" + i);
    if ((await r.get("io:" + i)) !== "v" + i) out.wrong++;
    const res = await r.multi().incr("io:count").get("io:" + i).exec();
    if (res[1][1] !== "v" + i) out.wrong++;
    const h = await r.hgetall("io:none");
    if (JSON.stringify(h) !== "{}") out.wrong++;
    r.disconnect();
    out.calls++;
  }
  for (let i = 0; i < 150; i++) {            // a new node-redis client per call
    const c = createClient({ url: `redis://127.0.0.1:${port}/2` });
    await c.connect();
    await c.set("nr:" + i, "w" + i);
    if ((await c.get("nr:" + i)) !== "w" + i) out.wrong++;
    await c.quit();
    out.calls++;
  }
  const sub = new Redis({ port }), pub = new Redis({ port });
  let got = null;
  sub.on("message", (ch, m) => { got = m; });
  await sub.subscribe("node:ch");
  await pub.publish("node:ch", "hello");
  for (let i = 0; i < 100 && got === null; i++) await new Promise(r => setTimeout(r, 20));
  out.pubsub = got;
  sub.disconnect(); pub.disconnect();
  const check = new Redis({ port, db: 1 });
  out.count = await check.get("io:count");
  check.disconnect();
  console.log(JSON.stringify(out));
  process.exit(0);
})().catch(e => { console.error(e); process.exit(1); });
"""


@pytest.mark.skipif(not shutil.which("node"), reason="node not installed")
def test_node_clients_per_call(redis, tmp_path, sockdir):
    """ioredis and node-redis (tools/install-deps puts them in tests/node/), a new client per
    call as the services this is for do: ioredis says HELLO 3 and SELECT 1 on each, node-redis
    SELECT 2; every reply as direct, a transaction's too, a subscription receives what is
    published, and the 300 calls ride a few server connections (direct: one each)."""
    if not os.path.isdir(os.path.join(NODE_MODULES, "ioredis")) or not os.path.isdir(os.path.join(NODE_MODULES, "redis")):
        pytest.skip("ioredis and node-redis not installed (tools/install-deps installs them with npm)")
    redis.cmd("DEL", "io:count", db=1)
    env = {"NODE_PATH": NODE_MODULES}
    direct = run(["node", "-e", NODE_CLIENTS, redis.port], shim=False, env=env, timeout=120)
    redis.cmd("DEL", "io:count", db=1)
    before = received(redis)
    shimmed = run(["node", "-e", NODE_CLIENTS, redis.port], conf=conf_for(tmp_path, redis, sockdir), env=env,
                  timeout=120)
    opened = received(redis) - before - 1
    assert direct.rc == 0 and shimmed.rc == 0, (direct.describe(), shimmed.describe())
    want = {"wrong": 0, "calls": 300, "pubsub": "hello", "count": "150"}
    assert jlines(direct.out) == jlines(shimmed.out) == [want], (direct.out, shimmed.out)
    # (identities: db 1 in RESP3, db 2 in RESP2, db 0 in RESP3 for the publisher, at most 4
    # shared connections each; the subscriber's is its own, as direct)
    assert opened <= 10, opened


def test_the_connection_name_is_the_apps_own(redis, tmp_path, sockdir):
    """CLIENT SETNAME on one app connection, GETNAME on it and on another: each sees its
    own (the shared server connection's name is never touched)."""
    replies_as_direct(
        redis, tmp_path, sockdir, "A, B = conn(port), conn(port)",
        "[as_text(on(A, 'CLIENT', 'SETNAME', 'first')), as_text(on(A, 'CLIENT', 'GETNAME')),"
        " as_text(on(B, 'CLIENT', 'GETNAME')), as_text(on(A, 'CLIENT', 'SETNAME', 'a b'))]")
    names = [ln for ln in redis.cmd("CLIENT", "LIST").decode().splitlines() if "name=first" in ln]
    assert names == [], "the name reached a shared server connection: %s" % names


def test_names_pipelined_behind_commands_answer_in_order(redis, tmp_path, sockdir):
    """CLIENT SETNAME and GETNAME, answered by the shim, sent in one write behind commands
    the server answers (and behind WATCH, whose connection is lent): every reply comes back
    in the order asked, byte for byte as direct. (They used to be answered at once, ahead
    of the replies still owed: the app read the name as GET's value.)"""
    got = replies_as_direct(
        redis, tmp_path, sockdir,
        "from resp import encode\n"
        "def piped(c, *cmds):\n"
        "    c[0].sendall(b''.join(encode(a) for a in cmds))\n"
        "    return [as_text(c[1].reply()) for _ in cmds]\n"
        "X, Y = conn(port), conn(port)",
        "piped(X, ['SET', 'pn', '0'], ['SET', 'pk', 'v' * 300], ['GET', 'pk'], ['CLIENT', 'SETNAME', 'me'], ['CLIENT', 'GETNAME'],"
        " ['INCR', 'pn'], ['CLIENT', 'GETNAME', 'extra'], ['CLIENT', 'SETNAME', 'a b'], ['GET', 'pk'], ['PING'])"
        " + piped(Y, ['WATCH', 'pk'], ['CLIENT', 'SETNAME', 'y'], ['CLIENT', 'GETNAME'], ['GET', 'pk'],"
        " ['UNWATCH'], ['CLIENT', 'GETNAME'])")
    assert got[1:6] == ["OK", "v" * 300, "OK", "me", 1], got


def first_difference(direct, shimmed):
    """The first step where two redisdiff.py logs part, with what that connection did
    before it (since it last opened): the commands that set the state it got wrong."""
    for d, s in zip(direct, shimmed):
        for k, (a, b) in enumerate(zip(d["log"], s["log"])):
            if a != b:
                mine = [x for x in d["log"][:k] if x[0] == a[0]]
                opened = max([j for j, x in enumerate(mine) if x[1] == "reconnect"] + [-1])
                return "seed %d step %d, connection %d; before it:\n%s\ndirect: %s\nshim:   %s" % (
                    d["seed"], k, a[0], "\n".join(str(x[1:]) for x in mine[opened + 1:]), a[1:], b[1:])
    return None if len(direct) == len(shimmed) else "%d seeds direct, %d shimmed" % (len(direct), len(shimmed))


def test_random_pipelines_of_connection_state_answer_as_direct(redis, tmp_path, sockdir):
    """20 seeds x 150 turns of three app connections sending 1 to 5 commands at once, mixed
    with AUTH, SELECT, HELLO, names, transactions, WATCH, RESET, a blocking command and
    errors of each (tests/pyclients/redisdiff.py): every reply equal to direct's. This
    found the name answered ahead of replies owed, a lent connection whose unread reply was
    handed to the app going direct on it, a name lost when a transaction went direct, and a
    transaction's state taken from replies (DISCARD then MULTI in one write left no
    transaction open; EXEC without MULTI ended a WATCH the server kept)."""
    same_random_pipelines(redis, tmp_path, sockdir, "1-20")


def same_random_pipelines(srv, tmp_path, sockdir, seeds, password=None):
    srv.cmd("ACL", "SETUSER", "alice", "on", ">pw", "~*", "+@all")
    srv.cmd("CONFIG", "SET", "hz", "500")   # (BLPOP's timeout is checked hz times a second)
    cmd = [SYS_PY, pyclient("redisdiff.py"), "--port", srv.port, "--seeds", seeds, "--steps", "150"]
    cmd += ["--password", password] if password else []
    direct = run(cmd, shim=False, timeout=120)
    shimmed = run(cmd, conf=conf_for(tmp_path, srv, sockdir), timeout=120)
    assert direct.rc == 0 and shimmed.rc == 0, (direct.describe(), shimmed.describe())
    d, s = jlines(direct.out), jlines(shimmed.out)
    lo, _, hi = seeds.partition("-")
    assert len(d) == int(hi) - int(lo) + 1, direct.describe()
    diff = first_difference(d, s)
    assert diff is None, diff


def test_random_pipelines_where_the_server_wants_a_password(redis_servers, tmp_path, sockdir):
    """The same on a server with a password (requirepass), where each app connection starts
    as the default identity and is refused until it says AUTH: what the shim answers itself
    (CLIENT SETNAME and GETNAME, SELECT 0) is refused as the server refuses it, in the
    server's words (it answered them OK before; the first such question per upstream costs a
    PING in its place, to learn whether the server runs commands for a connection that
    never said AUTH)."""
    same_random_pipelines(redis_servers(password="pw"), tmp_path, sockdir, "1-10", password="pw")


def test_an_unsubscribe_naming_two_channels_answers_only_its_app(redis, tmp_path, sockdir):
    """UNSUBSCRIBE a b on a connection that subscribed to nothing gets two replies, one per
    channel (in RESP3, two pushes). On a shared server connection the second was routed to
    the next command's app: another app's PING read ["unsubscribe", "b", 0]. It goes
    direct now, and each app reads its own replies."""
    got = replies_as_direct(
        redis, tmp_path, sockdir, "A, B = conn(port), conn(port)",
        "[as_text(on(A, 'UNSUBSCRIBE', 'a', 'b')), as_text(on(B, 'PING')), as_text(A[1].reply()),"
        " as_text(on(B, 'ECHO', 'b'))]")
    assert got[1:] == ["PONG", ["unsubscribe", "b", 0], "b"], got


HANDSHAKES = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[2])
from resp import encode, _Reader
from redisdiff import comparable
out = []
for i in range(30):   # ioredis's connect, then one call: a client made per request
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    r = _Reader(s)
    cmds = [["HELLO", "3", "AUTH", "default", "pw"], ["select", "1"], ["client", "SETINFO", "LIB-VER", "6.1.0"],
            ["client", "SETINFO", "LIB-NAME", "ioredis"], ["CLIENT", "NO-SUCH-THING", "x"], ["GET", "k%d" % i]]
    s.sendall(b"".join(encode(c) for c in cmds))
    out.append([comparable(r.reply()) for _ in cmds])
    s.close()
print(json.dumps(out))
"""


def test_a_handshake_said_at_every_connect_costs_the_server_nothing_once_known(redis_servers, tmp_path, sockdir):
    """What ioredis says at each connect (HELLO 3 AUTH, SELECT, two CLIENT SETINFO, which
    Redis 7.0 does not know), pipelined, then a GET, 30 times on a connection each: the
    replies are direct's (but HELLO's `id`, which names a server connection), and once the
    shim has heard the server answer them, only the GETs and each connect's password (an
    AUTH over a shared connection: a password is the server's to accept every time) reach
    it: the HELLO reply and the unknown-subcommand errors are the server's own words, kept
    per upstream."""
    srv = redis_servers(password="pw")
    code = [SYS_PY, "-c", HANDSHAKES, srv.port, os.path.dirname(SCENARIOS)]
    direct = run(code, shim=False, timeout=60)
    before = srv.cmd("INFO", "all").decode()
    shimmed = run(code, conf=conf_for(tmp_path, srv, sockdir), timeout=60)
    after = srv.cmd("INFO", "all").decode()
    assert direct.rc == 0 and shimmed.rc == 0, (direct.describe(), shimmed.describe())
    assert jlines(shimmed.out) == jlines(direct.out), (direct.out, shimmed.out)

    def count(info, pattern):
        m = re.search(pattern, info, re.M)
        return int(m.group(1)) if m else 0
    hellos = count(after, r"^cmdstat_hello:calls=(\d+)") - count(before, r"^cmdstat_hello:calls=(\d+)")
    errors = count(after, r"^errorstat_ERR:count=(\d+)") - count(before, r"^errorstat_ERR:count=(\d+)")
    gets = count(after, r"^cmdstat_get:calls=(\d+)") - count(before, r"^cmdstat_get:calls=(\d+)")
    auths = count(after, r"^cmdstat_auth:calls=(\d+)") - count(before, r"^cmdstat_auth:calls=(\d+)")
    assert gets == 30, after
    assert 30 <= auths <= 33, "the password reached the server %d times for 30 connects" % auths
    assert hellos <= 3, "HELLO reached the server %d times for 30 connects" % hellos
    assert errors <= 6, "the unknown CLIENT subcommands reached the server %d times for 30 connects" % errors


def test_the_lent_cap_sends_the_rest_direct(redis, tmp_path, sockdir):
    """redis_pinned_max = 1: the second of two concurrent transactions cannot borrow a
    connection and is served over one of its own; both are as atomic as direct."""
    conf = conf_for(tmp_path, redis, sockdir, upstream_extra=["redis_pinned_max = 1"])
    res, u = scenario("multi", redis, conf, sockdir)
    assert all(x[1] == x[0] + 1 for x in res["a"] + res["b"]), res
    assert u["redis_direct"] >= 1, u


def test_malformed_input_reaches_nothing(redis, tmp_path, sockdir):
    """A command that is not an array of bulk strings: nothing of it reaches Redis, the app
    gets Redis's own protocol error and the end of its connection; an inline command (PING
    typed at a terminal) is relayed over a connection of its own."""
    code = ("import socket, sys, json\n"
            "p = int(sys.argv[1])\n"
            "s = socket.create_connection(('127.0.0.1', p), timeout=10)\n"
            "s.sendall(b'*2\\r\\n$3\\r\\nGET\\r\\n:5\\r\\n')\n"
            "d = s.recv(100)\n"
            "t = socket.create_connection(('127.0.0.1', p), timeout=10)\n"
            "t.sendall(b'PING\\r\\n')\n"
            "print(json.dumps({'bad': d.decode(), 'inline': t.recv(100).decode()}))\n")
    before = redis.get_calls()
    r = run([SYS_PY, "-c", code, redis.port], conf=conf_for(tmp_path, redis, sockdir), timeout=60)
    assert r.rc == 0 and jlines(r.out) == [{"bad": "-ERR Protocol error: expected '$', got ':'\r\n",
                                            "inline": "+PONG\r\n"}], r.describe()
    after = redis.get_calls()
    assert after == before, "a malformed command reached Redis"


def test_malformed_input_after_commands_gets_their_replies_then_the_error(redis, tmp_path, sockdir):
    """Commands, then bytes that are not RESP, in one write: as direct, the replies of the
    commands before (they ran), then Redis's protocol error in its words, then the end.
    Before, the app got only the end, though its SET and INCR had run (an adversarial
    pass). The shim reads lengths as Redis does: a sign, a leading zero or a space is an
    error, never a command sent on (a shared connection the server would close)."""
    c = cmd_text
    ran = c("SET", "m0", "1") + c("INCR", "m0")
    cases = [{"send": [ran + "*2\r\n$3\r\nGET\r\n$-5\r\n"], "expect": 60},
             {"send": [c("MULTI") + c("INCR", "m0") + "*1\r\n:5\r\n"], "expect": 60},
             {"send": ["*+1\r\n$4\r\nPING\r\n"], "expect": 40},
             {"send": ["*01\r\n$4\r\nPING\r\n"], "expect": 40},
             {"send": [c("PING") + "*1\r\n$04\r\nPING\r\n"], "expect": 40},
             {"send": ["*1\r\n$4 \r\nPING\r\n"], "expect": 40},
             {"send": ["*1\r\n+PING\r\n"], "expect": 40},
             {"send": ["*1\r\n$99999999999\r\nx"], "expect": 40}]
    got = raw_as_direct(redis, tmp_path, sockdir, cases)
    assert got[0] == {"got": "+OK\r\n:2\r\n-ERR Protocol error: invalid bulk length\r\n", "eof": True}, got
    assert got[1]["got"] == "+OK\r\n+QUEUED\r\n-ERR Protocol error: expected '$', got ':'\r\n", got
    assert all(g["eof"] for g in got), got


def test_a_command_with_more_arguments_than_the_shim_frames_goes_direct(redis, tmp_path, sockdir):
    """SADD with 180 000 and 300 000 members (more arguments than a command of the 1 MiB
    the shim frames can have): it goes direct, as any command larger than the shim frames,
    and the server takes it. Before, it was taken for malformed and the app's connection
    closed (an adversarial pass)."""
    def sadd(key, n, width):
        members = [str(i).zfill(width) if width > 1 else chr(97 + i % 26) for i in range(n)]
        return "*%d\r\n$4\r\nSADD\r\n$%d\r\n%s\r\n" % (n + 2, len(key), key) + \
            "".join("$%d\r\n%s\r\n" % (width, m) for m in members)
    cases = [{"send": [sadd("s6", 180000, 6) + cmd_text("SCARD", "s6")], "expect": 18},
             {"send": [sadd("s1", 300000, 1) + cmd_text("SCARD", "s1")], "expect": 4}]
    got = raw_as_direct(redis, tmp_path, sockdir, cases)
    assert got[0]["got"] == ":180000\r\n:180000\r\n" and got[1]["got"] == ":26\r\n:26\r\n", got


def test_redis_killed_and_restarted(redis, tmp_path, sockdir):
    """INCRs in a loop, each a new connection; Redis is killed 1 s in and started again
    1.5 s later: calls in flight fail as a reset would, calls while it is down are refused
    at connect, nothing waits for a timeout, and after the restart calls succeed again."""
    conf = conf_for(tmp_path, redis, sockdir)
    cmd = [SYS_PY, SCENARIOS, "loop", "--port", redis.port, "--seconds", 4.5]
    from conftest import client_env
    env = client_env(True, conf)
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         start_new_session=True)
    try:
        time.sleep(1.0)
        killing = time.monotonic()
        redis.kill()
        dead = time.monotonic()
        time.sleep(1.5)
        restarting = time.monotonic()
        redis.restart()
        up = time.monotonic()
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()
    lines = [x for x in jlines(out) if "r" in x]
    assert p.returncode == 0 and lines, (p.returncode, out[-2000:], err[-2000:])
    outcomes = {x["r"] for x in lines}
    assert "timeout" not in outcomes and not any(o.startswith("error") for o in outcomes), outcomes
    # (on the system's monotonic clock, which the client's "m" reads too: its own "t"
    # starts when the client does, late on a loaded machine, and once counted a call made
    # after the restart as one made while Redis was down)
    assert any(x["r"] == "ok" and x["m"] < killing for x in lines), lines[:5]
    down = [x["r"] for x in lines if dead + 0.2 < x["m"] < restarting - 0.2]
    assert down and set(down) <= {"refused", "closed"} and "refused" in down, down
    assert any(x["r"] == "ok" and x["m"] > up + 0.7 for x in lines), lines[-5:]


BURST_AFTER_KILL = r"""
import errno, os, select, socket, sys, time
port, pid = int(sys.argv[1]), int(sys.argv[2])
first = socket.create_connection(("127.0.0.1", port), timeout=5)
first.sendall(b"*1\r\n$4\r\nPING\r\n")
assert first.recv(100) == b"+PONG\r\n"
os.kill(pid, 9)                        # the server dies under a live connection
time.sleep(0.2)
for rnd in range(3):
    socks = []
    for i in range(10):                # ten at once, non-blocking, as a reconnecting event loop does
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        socks.append(c)
    for c in socks:
        select.select([], [c], [], 5)
        err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        print(errno.errorcode.get(err, "connected"))
        c.close()
    time.sleep(0.3 * (rnd + 1))
"""


def test_connects_to_a_redis_that_just_died_are_refused_as_direct(redis, tmp_path, sockdir):
    """The server is killed under a live connection, then ten non-blocking connects at once,
    three times: every one is refused (ECONNREFUSED), as direct. Before, the ones that came
    while the first was finding out were answered connected and closed a moment later: a
    client that reconnects on a timer (ioredis) never saw a refusal, reset its retry count
    each time and never failed its commands."""
    r = run([SYS_PY, "-c", BURST_AFTER_KILL, redis.port, redis.proc.pid], conf=conf_for(tmp_path, redis, sockdir),
            timeout=60)
    outcomes = r.out.decode().split()
    assert r.rc == 0 and len(outcomes) == 30, r.describe()
    assert set(outcomes) == {"ECONNREFUSED"}, outcomes


@pytest.mark.skipif(not shutil.which("redis-cli"), reason="redis-cli not installed")
def test_redis_cli_through_the_shim(redis, tmp_path, sockdir):
    """redis-cli (which carries its own hiredis) as the app: answers as direct."""
    conf = conf_for(tmp_path, redis, sockdir)
    for args, want in ((["SET", "cli", "v"], b"OK"), (["GET", "cli"], b"v"), (["INCR", "clictr"], b"1"),
                       (["PING"], b"PONG")):
        r = run(["redis-cli", "-p", redis.port] + args, conf=conf, timeout=30)
        assert r.rc == 0 and r.out.strip() == want, r.describe()


def test_redis_py_client_per_call(redis, tmp_path, sockdir):
    """redis-py, a new client (and connection pool) per call, 500 calls: the counter is
    exact and the server accepted a few connections."""
    code = ("import sys, redis\n"
            "p = int(sys.argv[1])\n"
            "for i in range(500):\n"
            "    c = redis.Redis(port=p)\n"
            "    c.incr('py')\n"
            "    c.close()\n"
            "print(redis.Redis(port=p).get('py').decode())\n")
    try:
        import redis as _  # noqa: F401
    except ImportError:
        pytest.fail("python3-redis is not installed (tools/install-deps installs it)", pytrace=False)
    before = received(redis)
    r = run([SYS_PY, "-c", code, redis.port], conf=conf_for(tmp_path, redis, sockdir), timeout=120)
    assert r.rc == 0 and r.out.strip() == b"500", r.describe()
    assert received(redis) - before - 1 <= 4, received(redis) - before - 1


def test_stats_show_the_redis_protocol(redis, tmp_path, sockdir):
    """The counters are in /stats (JSON, above), in /metrics, and the table has a REDIS
    PROTOCOL section with the commands carried and the connections saved."""
    require_build(HTTPSHIM)
    conf = conf_for(tmp_path, redis, sockdir)
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from redisscenarios import call\n"
            "for i in range(50): call(int(sys.argv[1]), 'INCR', 'st')\n"
            "print('ready', flush=True); sys.stdin.readline()\n") % os.path.dirname(SCENARIOS)
    from conftest import client_env
    p = subprocess.Popen([SYS_PY, "-c", code, str(redis.port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env=client_env(True, conf), start_new_session=True)
    try:
        assert p.stdout.readline().strip() == b"ready"
        table = run([HTTPSHIM, "stats", "-c", conf], shim=False, timeout=30)
        prom = run([HTTPSHIM, "stats", "-c", conf, "--prometheus"], shim=False, timeout=30)
    finally:
        p.stdin.close()
        p.wait(timeout=30)
    text = table.out.decode()
    assert "REDIS PROTOCOL" in text, text
    row = [ln for ln in text.splitlines() if ln.startswith("127.0.0.1:%d" % redis.port)]
    assert row, text
    assert "httpshim_redis_commands_total" in prom.out.decode() or "httpshim_redis_commands" in prom.out.decode(), \
        prom.out.decode()[:2000]


def test_large_values_pass_both_ways(redis, tmp_path, sockdir):
    """A 3 MB value: its SET (a command larger than the shim frames) goes direct, and its
    GETs, each on a new connection, come back whole over the shared connections (a reply
    may be as large as RESP_REPLY_MAX); 50 small calls after it still share."""
    code = ("import sys, hashlib, redis\n"
            "p = int(sys.argv[1]); big = bytes(range(256)) * (3 * 4096)\n"
            "c = redis.Redis(port=p); c.set('big', big); c.close()\n"
            "ok = 0\n"
            "for i in range(5):\n"
            "    c = redis.Redis(port=p); ok += c.get('big') == big; c.close()\n"
            "for i in range(50):\n"
            "    c = redis.Redis(port=p); c.incr('after'); c.close()\n"
            "print(ok, redis.Redis(port=p).get('after').decode())\n")
    before = received(redis)
    r = run([SYS_PY, "-c", code, redis.port], conf=conf_for(tmp_path, redis, sockdir), timeout=120)
    assert r.rc == 0 and r.out.split() == [b"5", b"50"], r.describe()
    assert received(redis) - before - 1 <= 4 + 2, received(redis) - before - 1


def test_check_names_the_redis_settings(tmp_path):
    """`httpshim check` shows an upstream's protocol and its caps; a cache rule on a redis
    upstream, or a bad cap, is an error naming the line."""
    require_build(HTTPSHIM)
    good = tmp_path / "good.conf"
    good.write_text("[upstream 127.0.0.1:6379]\nprotocol = redis\nredis_pinned_max = 3\n")
    r = run([HTTPSHIM, "check", good], shim=False)
    assert r.rc == 0 and b"protocol=redis pool_max_per_host=4 redis_pinned_max=3" in r.out, r.describe()
    for body, want in (("protocol = redis\ncache GET /x ttl=1m\n", b"protocol = http"),
                       ("protocol = memcached\n", b"protocol takes http or redis"),
                       ("protocol = redis\npool_max_per_host = 0\n", b"expected a number from 1")):
        bad = tmp_path / "bad.conf"
        bad.write_text("[upstream 127.0.0.1:6379]\n" + body)
        r = run([HTTPSHIM, "check", bad], shim=False)
        assert r.rc != 0 and want in r.out + r.err, (body, r.describe())


# ---- what the raw client sends (tests/pyclients/redisraw.py): framing Redis accepts,
# connections that end, commands larger than the shim frames, each compared with direct ----

def cmd_text(*args):
    """One command in RESP, as text (latin-1)."""
    return "*%d\r\n" % len(args) + "".join("$%d\r\n%s\r\n" % (len(a), a) for a in args)


def raw_as_direct(redis, tmp_path, sockdir, cases):
    """The cases run direct and under the shim (the database flushed before each run): the
    same bytes back, and the same end. Returns what came back."""
    outs = []
    for conf in (None, conf_for(tmp_path, redis, sockdir)):
        redis.cmd("FLUSHALL")
        r = run([SYS_PY, pyclient("redisraw.py"), "--port", redis.port], shim=conf is not None, conf=conf,
                input=json.dumps(cases).encode(), timeout=120)
        assert r.rc == 0 and not r.timed_out, r.describe()
        outs.append(jlines(r.out))
    assert outs[1] == outs[0], [(c["send"][0][:60], d, s) for c, d, s in zip(cases, outs[0], outs[1]) if d != s]
    return outs[0]


def test_an_app_that_shuts_its_side_gets_its_replies_and_the_end(redis, tmp_path, sockdir):
    """Commands, then shutdown(SHUT_WR), as `nc -q` or a Ruby `close_write` do: every reply,
    then the end of the connection, whatever state it left (a database, a transaction, a
    name, a subscription that took it direct). Before, the replies came and the end never
    did: the app waited forever."""
    c = cmd_text
    cases = [{"send": [c("SET", "hc", "1") + c("INCR", "hc") + c("GET", "hc")], "shut": True},
             {"send": [c("SELECT", "3") + c("SET", "hc3", "x") + c("GET", "hc3")], "shut": True},
             {"send": [c("MULTI") + c("INCR", "hc") + c("EXEC")], "shut": True},
             {"send": [c("CLIENT", "SETNAME", "hcn") + c("CLIENT", "GETNAME")], "shut": True},
             {"send": [c("SUBSCRIBE", "hcch")], "shut": True},
             {"send": ["PING\r\nECHO hi\r\n"], "shut": True}]
    got = raw_as_direct(redis, tmp_path, sockdir, cases)
    assert all(g["eof"] for g in got) and got[0]["got"] == "+OK\r\n:2\r\n$1\r\n2\r\n", got


def test_a_connection_lent_to_an_app_that_shut_its_side_is_never_shared(redis, tmp_path, sockdir):
    """MULTI/INCR/EXEC, then shutdown(SHUT_WR): the server connection lent to the transaction
    carries the app's end, so it is ending once EXEC's reply is in. Before, it was given back
    to the shared pool all the same, and the next app connection's commands were written
    to it after its end: that app saw its connection reset with no reply (a flake of the
    test above, once in a hundred runs, where the server's close came late). Here the
    server's close comes late every time: a relay between the shim and the real server
    passes the shim's end on a second after it comes."""
    def relay(conn):
        srv = socket.create_connection(("127.0.0.1", int(redis.port)))

        def back():
            while True:
                data = srv.recv(65536)
                if not data:
                    break
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        t = threading.Thread(target=back, daemon=True)
        t.start()
        while True:
            data = conn.recv(65536)
            if not data:
                break
            srv.sendall(data)
        time.sleep(1.0)                # (the end reaches the server late)
        srv.shutdown(socket.SHUT_WR)
        t.join(10)
        srv.close()

    c = cmd_text
    cases = [{"send": [c("MULTI") + c("INCR", "lx") + c("EXEC")], "shut": True},
             {"send": [c("SET", "ly", "1") + c("GET", "ly")], "expect": 11},
             {"send": [c("CLIENT", "SETNAME", "n") + c("CLIENT", "GETNAME")], "expect": 10}]
    with tcp_server(relay) as front:
        conf = write_rules(tmp_path, [], raw="[global]\nstats_socket = %s/%%p.sock\n\n[upstream 127.0.0.1:%d]\n"
                           "protocol = redis\n" % (sockdir, front.port), name="relay.conf")
        r = run([SYS_PY, pyclient("redisraw.py"), "--port", str(front.port)], conf=conf,
                input=json.dumps(cases).encode(), timeout=60)
    assert r.rc == 0 and not r.timed_out, r.describe()
    got = jlines(r.out)
    assert got[0] == {"got": "+OK\r\n+QUEUED\r\n*1\r\n:1\r\n", "eof": True}, got
    assert got[1]["got"] == "+OK\r\n$1\r\n1\r\n" and got[2]["got"] == "+OK\r\n$1\r\nn\r\n", got


def test_framing_redis_accepts_is_answered_as_direct(redis, tmp_path, sockdir):
    """What Redis reads between commands and ignores (an empty line, `*0`, `*-1`) and an
    inline command after RESP ones (redis-cli --pipe of a file with a blank line at the
    end, or with an inline line in it): answered as direct. Before, each closed the app's
    connection, and replies owed were lost."""
    c = cmd_text
    cases = [{"send": [c("PING") + "\r\n" + c("ECHO", "a")], "expect": 14},
             {"send": [c("PING") + "\n\r\n" + c("ECHO", "b")], "expect": 14},
             {"send": ["*0\r\n" + c("PING")], "expect": 7},
             {"send": ["*-1\r\n" + c("ECHO", "c")], "expect": 7},
             {"send": [c("SELECT", "2") + "DBSIZE\r\n"], "expect": 9},
             {"send": [c("SET", "k", "v") + "GET k\r\n" + c("ECHO", "d")], "expect": 19}]
    got = raw_as_direct(redis, tmp_path, sockdir, cases)
    assert got[0]["got"] == "+PONG\r\n$1\r\na\r\n" and got[4]["got"] == "+OK\r\n:0\r\n", got


def test_a_command_larger_than_the_shim_frames_inside_a_transaction(redis, tmp_path, sockdir):
    """A 1.1 MB SET inside MULTI, and after WATCH (the shim frames commands up to 1 MiB): it
    goes on the connection lent to the transaction, as it is, and every reply comes as
    direct. Before, nothing came back, ever (redis-rb raised a timeout)."""
    big = "x" * (1100 * 1024)
    c = cmd_text
    cases = [{"send": [c("MULTI"), c("SET", "bigk", big), c("EXEC"), c("STRLEN", "bigk")], "expect": 33},
             {"send": [c("WATCH", "w"), c("SET", "bigw", big), c("GET", "w")], "expect": 15}]
    got = raw_as_direct(redis, tmp_path, sockdir, cases)
    assert got[0]["got"] == "+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n:1126400\r\n", got


def test_connection_commands_with_odd_arguments_answer_as_direct(redis, tmp_path, sockdir):
    """What the shim answers itself, with arguments the server would refuse or take: RESET
    with an argument (an arity error: the database stays), SELECT of an empty string, AUTH
    with three arguments (a syntax error), and a connection name of 600 bytes (the server
    keeps any length; the shim's own room is 512: that connection goes direct)."""
    c = cmd_text
    name = "n" * 600
    cases = [{"send": [c("SELECT", "1") + c("SET", "d5", "1") + c("RESET", "x") + c("GET", "d5")], "expect": 20},
             {"send": [c("SELECT", "") + c("PING")], "expect": 10},
             {"send": [c("AUTH", "a", "b", "c") + c("PING")], "expect": 10},
             {"send": [c("CLIENT", "SETNAME", name) + c("CLIENT", "GETNAME")], "expect": 600}]
    got = raw_as_direct(redis, tmp_path, sockdir, cases)
    assert got[0]["got"].endswith("$1\r\n1\r\n") and got[3]["got"].startswith("+OK\r\n$600\r\n"), got


EARLY_LOGIN = r"""
import json, os, signal, socket, sys
sys.path.insert(0, sys.argv[3])
from ownstats import own_stats
from resp import command as cmd, raw_replies as replies, until_closed
port, server_pid = int(sys.argv[1]), int(sys.argv[2])
shimmed = sys.argv[4] != "-"
wait = 3 if shimmed else 0.3         # (direct, what is waited for never comes: not long then)
def conn():
    return socket.create_connection(("127.0.0.1", port), timeout=3)
def first(s):
    return replies(s, 1)
adm = conn()
adm.sendall(cmd("AUTH", "pw") + cmd("SET", "k", "v")); replies(adm, 2)
a = conn(); a.sendall(cmd("AUTH", "pw") + cmd("GET", "k")); warm = replies(a, 2)
a1 = conn(); a1.sendall(cmd("AUTH", "pw") + cmd("SELECT", "1") + cmd("SET", "k", "v1")); warm += replies(a1, 3)
os.kill(server_pid, signal.SIGSTOP)                # the server can answer nothing now
try:
    b = conn(); b.settimeout(wait); b.sendall(cmd("AUTH", "pw")); while_stopped = first(b)
    b.sendall(cmd("SELECT", "1")); while_stopped += first(b)
    b.sendall(cmd("GET", "k") + cmd("SET", "w", "1") + cmd("GET", "w"))
finally:
    os.kill(server_pid, signal.SIGCONT)
b.settimeout(3)
after = replies(b, 3)
adm.sendall(cmd("CONFIG", "SET", "requirepass", "new")); first(adm)
c = conn(); c.settimeout(wait); c.sendall(cmd("AUTH", "pw") + cmd("GET", "k") + cmd("SET", "late", "1") + cmd("GET", "k"))
refused_late = until_closed(c)
d = conn(); d.sendall(cmd("AUTH", "pw")); refused = first(d)
a.sendall(cmd("SELECT", "1") + cmd("GET", "k")); old_session = replies(a, 2)
adm.sendall(cmd("EXISTS", "late")); late = first(adm)
adm.sendall(cmd("CONFIG", "SET", "requirepass", "pw")); first(adm)
u = own_stats(sys.argv[4])["upstreams"]["127.0.0.1:%d" % port] if shimmed else {}
print(json.dumps([warm, while_stopped, after, refused_late, refused, late, old_session,
                  u.get("redis_auth_early"), u.get("redis_auth_refused_late")]))
"""


def test_a_password_accepted_before_is_answered_at_once_and_checked_alongside(redis_servers, tmp_path, sockdir):
    """A server with a password; one process logs in (the shim's pool now has a connection
    for that password). The server is stopped (SIGSTOP): a new app connection's AUTH with
    that password, and its SELECT 1 (a database that password was seen in), are answered
    +OK at once, by the shim, where direct they wait for the server; its GET, SET and GET
    are answered once the server runs again, in order, each
    as direct (the SET waited for the server's word on the password: only reads go
    before it). Then the password is changed on the server: the next app connection that
    says the old one, then pipelines GET, SET and GET, is answered +OK and then closed
    (a reset: direct, -WRONGPASS and -NOAUTH), its GET's value never sent and its SET never
    run; the app connection after it gets the server's own -WRONGPASS, while one logged
    in before the change goes on, into another database too, as direct. Counted."""
    srv = redis_servers(password="pw")
    pyclients = os.path.dirname(SCENARIOS)
    r = run([SYS_PY, "-c", EARLY_LOGIN, srv.port, str(srv.proc.pid), pyclients, "%s/%%p.sock" % sockdir],
            conf=conf_for(tmp_path, srv, sockdir), timeout=60)
    assert r.rc == 0, r.describe()
    warm, while_stopped, after, refused_late, refused, late, old_session, early, refused_count = jlines(r.out)[0]
    assert warm == "+OK\r\n$1\r\nv\r\n+OK\r\n+OK\r\n+OK\r\n", warm
    assert while_stopped == "+OK\r\n+OK\r\n", while_stopped
    assert after == "$2\r\nv1\r\n+OK\r\n$1\r\n1\r\n", after
    assert refused_late == "+OK\r\n<closed>", refused_late
    assert refused.startswith("-WRONGPASS"), refused
    assert late == ":0\r\n", "a write ran under a password the server had refused"
    assert old_session == "+OK\r\n$2\r\nv1\r\n", old_session
    assert early >= 2 and refused_count == 1, (early, refused_count)
    # direct, the AUTH waits for the stopped server, and the old password is refused
    d = run([SYS_PY, "-c", EARLY_LOGIN, srv.port, str(srv.proc.pid), pyclients, "-"], shim=False, timeout=60)
    assert d.rc == 0, d.describe()
    dwarm, dstopped, dafter, drefused_late, drefused, dlate, dold = jlines(d.out)[0][:7]
    assert dstopped.startswith("<timeout>") and drefused_late.startswith("-WRONGPASS") and dlate == ":0\r\n", jlines(d.out)
    assert dold == old_session, jlines(d.out)


SEND_AND_CLOSE = r"""
import json, socket, sys, time
sys.path.insert(0, sys.argv[2])
from resp import command as cmd
port = int(sys.argv[1])
def conn():
    return socket.create_connection(("127.0.0.1", port), timeout=5)
w = conn(); w.sendall(cmd("AUTH", "sam", "pw") + cmd("PING")); w.recv(64)   # a login the shim has seen
for i in range(20):                    # fire and forget: nothing read, the socket closed at once
    a = conn()
    a.sendall(cmd("SET", "ff:%d" % i, "x") if i % 2 else cmd("AUTH", "sam", "pw") + cmd("SET", "ff:%d" % i, "x") + cmd("INCR", "ff:n"))
    a.close()
time.sleep(0.5)
adm = conn(); adm.sendall(cmd("EVAL", "return #redis.call('KEYS', 'ff:*')", "0") + cmd("GET", "ff:n"))
time.sleep(0.2)
print(json.dumps([adm.recv(256).decode()]))
"""


def test_commands_sent_before_a_close_run_as_direct(redis, tmp_path, sockdir):
    """An app that sends its commands and closes its socket without reading a reply (a
    fire-and-forget writer), 20 times, half of them logging in first with a password the
    shim has seen accepted: every command runs, as direct (10 + 10 keys and the counter at
    10). Before, the engine saw the hang-up before it read the bytes and dropped them, and
    a session whose app had gone was closed at its first reply, with the commands still
    waiting for the password's check."""
    redis.cmd("ACL", "SETUSER", "sam", "on", ">pw", "~*", "+@all")
    got = []
    for shim in (False, True):
        redis.cmd("FLUSHALL")
        r = run([SYS_PY, "-c", SEND_AND_CLOSE, redis.port, os.path.dirname(SCENARIOS)], shim=shim,
                conf=conf_for(tmp_path, redis, sockdir) if shim else None, timeout=60)
        assert r.rc == 0, r.describe()
        got.append(jlines(r.out)[0])
    assert got[0] == got[1] == [":21\r\n$2\r\n10\r\n"], got


ROTATED_THEN_DIRECT = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[2])
from resp import command as cmd, until_closed
port = int(sys.argv[1])
def conn():
    return socket.create_connection(("127.0.0.1", port), timeout=3)
adm = conn()
out = []
for key, rest in (("inl", b"SET inl 1\r\n"), ("lng", cmd("CLIENT", "SETNAME", "m" * 600) + cmd("SET", "lng", "1"))):
    adm.sendall(cmd("ACL", "SETUSER", "ivy", "resetpass", ">old")); adm.recv(64)
    w = conn(); w.sendall(cmd("AUTH", "ivy", "old") + cmd("PING")); w.recv(64)     # the shim sees it accepted
    adm.sendall(cmd("ACL", "SETUSER", "ivy", "resetpass", ">new")); adm.recv(64)
    a = conn(); a.sendall(cmd("AUTH", "ivy", "old") + rest)
    said = until_closed(a)
    adm.sendall(cmd("EXISTS", key)); out.append([said[:14], adm.recv(64).decode()])
print(json.dumps(out))
"""


def test_what_goes_direct_waits_for_the_password_check(redis, tmp_path, sockdir):
    """After ivy's password is changed on the server, an app connection says the old one
    (answered at once: the shim had seen it accepted) and then an inline command, or a
    CLIENT SETNAME longer than the shim keeps, with a SET: both would take the connection
    direct, onto a connection of its own. They wait for the server's word on the password,
    which refuses it: the app's connection is closed and nothing it sent runs. Before, the
    direct connection's own login was refused and the SET ran on it as the default user."""
    redis.cmd("ACL", "SETUSER", "ivy", "on", ">old", "~*", "+@all")
    r = run([SYS_PY, "-c", ROTATED_THEN_DIRECT, redis.port, os.path.dirname(SCENARIOS)],
            conf=conf_for(tmp_path, redis, sockdir), timeout=60)
    assert r.rc == 0, r.describe()
    assert jlines(r.out)[0] == [["+OK\r\n<closed>", ":0\r\n"]] * 2, r.describe()


def test_a_password_changed_on_the_server_is_refused_as_direct(redis, tmp_path, sockdir):
    """dave authenticates (the shim now has connections as dave), then his password is
    reset on the server: a new connection that says the old password is refused (direct:
    -WRONGPASS; through the shim, which answered a password it had seen accepted at once:
    closed as a reset before anything but a read ran, here at its ACL WHOAMI, which waits
    for the server's word), and never runs as dave; the next one gets the server's own
    -WRONGPASS, as do HELLO's AUTH, and the new password works.
    Before, the shim answered +OK from what it had verified before, and the app ran as dave
    with a revoked password."""
    redis.cmd("ACL", "SETUSER", "dave", "on", ">old", "~*", "+@all")
    login = ("def login(user, pw):\n"
             "    s = conn(port)\n"
             "    said = as_text(on(s, 'AUTH', user, pw))\n"
             "    if said != 'OK':\n"
             "        return said[:13]\n"
             "    try:\n"
             "        return 'as ' + as_text(on(s, 'ACL', 'WHOAMI'))\n"
             "    except ConnectionError:\n"
             "        return 'ERR:WRONGPASS'     # the shim's +OK, then the server's refusal: a reset\n"
             "A = conn(port); Z = conn(port)")
    got = replies_as_direct(
        redis, tmp_path, sockdir, login,
        "[as_text(on(A, 'AUTH', 'dave', 'old')), as_text(on(A, 'SET', 'dk', 'v')),"
        " as_text(on(Z, 'ACL', 'SETUSER', 'dave', 'resetpass', '>new')),"
        " login('dave', 'old'), login('dave', 'old'),"
        " as_text(on(conn(port), 'HELLO', '2', 'AUTH', 'dave', 'old'))[:14],"
        " login('dave', 'new'),"
        " as_text(on(Z, 'ACL', 'SETUSER', 'dave', 'resetpass', '>old'))]")
    assert got[3] == got[4] == "ERR:WRONGPASS" and got[6] == "as dave", got


def test_more_commands_in_flight_than_the_shim_holds_wait_instead_of_failing(redis, tmp_path, sockdir):
    """redis-cli --pipe of 20 000 SETs (more than the 8192 replies a session may owe): the
    session stops reading until replies drain, as a server's socket buffer would make the
    app wait; every command runs. Before, the connection was closed after 8192."""
    data = "".join(cmd_text("SET", "p%d" % i, "v") for i in range(20000)).encode()
    for conf in (None, conf_for(tmp_path, redis, sockdir)):
        redis.cmd("FLUSHALL")
        r = run(["redis-cli", "-p", redis.port, "--pipe"], shim=conf is not None, conf=conf, input=data, timeout=60)
        assert r.rc == 0 and b"errors: 0, replies: 20000" in r.out, r.describe()
        assert redis.cmd("DBSIZE") == 20000


def test_state_a_command_failed_to_end_is_never_shared(redis, tmp_path, sockdir):
    """Each case its own app connection of one process, compared byte for byte with direct:
    DISCARD and UNWATCH with an argument too many (refused: the transaction and the WATCH
    stay open) no longer give the connection back to the shared set, where the next app's
    SET answered +QUEUED and its EXEC was aborted by a key it never watched; a script
    debugger (SCRIPT DEBUG YES) goes on a connection of its own, where another app's EVAL
    stopped at its breakpoint; AUTH with a user named "" is the server's to judge (it was
    taken as the default user's password), and a password holding a NUL byte is sent
    whole (it stopped at the NUL, and the server read the next commands, other apps', as
    the rest of it)."""
    redis.cmd("ACL", "SETUSER", "nul", "on", ">a\x00b", "~*", "+@all")
    c = cmd_text
    cases = [{"send": [c("MULTI") + c("SET", "t", "1") + c("DISCARD", "extra")], "expect": 1},
             {"send": [c("SET", "t2", "v") + c("GET", "t2")], "expect": 1},
             {"send": [c("WATCH", "w") + c("UNWATCH", "extra")], "expect": 1},
             {"send": [c("SET", "w", "changed")], "expect": 1},
             {"send": [c("MULTI") + c("INCR", "n") + c("EXEC")], "expect": 1},
             {"send": [c("SCRIPT", "DEBUG", "YES") + c("PING")], "expect": 1},
             {"send": [c("EVAL", "return 'r'", "0")], "expect": 1},
             {"send": [c("AUTH", "", "pw") + c("ACL", "WHOAMI")], "expect": 1},
             {"send": [c("HELLO", "3", "AUTH", "", "pw") + c("PING")], "expect": 1},
             {"send": [c("AUTH", "nul", "a\x00b") + c("ACL", "WHOAMI")], "expect": 1},
             {"send": [c("AUTH", "nul", "a\x00b") + c("ACL", "WHOAMI")], "expect": 1},
             {"send": [c("PING")], "expect": 1}]
    got = raw_as_direct(redis, tmp_path, sockdir, cases)
    assert got[1]["got"] == "+OK\r\n$1\r\nv\r\n" and got[4]["got"] == "+OK\r\n+QUEUED\r\n*1\r\n:1\r\n", got
    assert got[6]["got"] == "$1\r\nr\r\n" and got[7]["got"].startswith("-WRONGPASS"), got
    assert got[9]["got"] == got[10]["got"] == "+OK\r\n$3\r\nnul\r\n", got


SLOW_READERS = r"""
import json, socket, sys, time
port = int(sys.argv[1])
def conn():
    return socket.create_connection(("127.0.0.1", port), timeout=10)
setup = conn(); setup.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$200000\r\n" + b"x" * 200000 + b"\r\n")
setup.recv(16)
slow = []
for i in range(4):                     # each pipelines 300 GETs of 200 kB and reads nothing
    s = conn()
    s.sendall(b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n" * 300)
    slow.append(s)
time.sleep(0.5)
b = conn(); b.settimeout(15)          # (held back, it would wait for ever: the slow ones read after it)
b.sendall(b"*1\r\n$4\r\nPING\r\n")
try:
    pong = b.recv(16).decode()
except socket.timeout:
    pong = "timeout"
late = 0                               # the slow ones, reading at last, get every reply
for s in slow:
    s.settimeout(20)
    want, got = 300 * (200000 + 11), 0     # "$200000\r\n" + the value + "\r\n" each
    while got < want:
        d = s.recv(1 << 20)
        if not d:
            break
        got += len(d)
    late += got == want
print(json.dumps([pong, late]))
"""


def test_an_app_slow_to_read_holds_no_one_else_back(redis, tmp_path, sockdir):
    """Four app connections pipeline 300 GETs of 200 kB each and read nothing; a fifth's
    PING is answered before any of them reads, as direct (no time limit: under the
    sanitizers on a loaded machine the shim took over 2 s to read past the replies queued
    ahead of it, and a held-back PING would wait for ever). Before, a slow reader stopped the shim reading the
    shared server connection its commands rode (pool_max_per_host = 4: all of them), and the
    PING waited for them. A shared connection is never held back now: the slow app's own
    commands stop being read, and the replies it owes are kept (up to its cap) until it
    reads them, every one."""
    for shim in (False, True):
        r = run([SYS_PY, "-c", SLOW_READERS, redis.port], shim=shim, conf=conf_for(tmp_path, redis, sockdir) if shim else None,
                timeout=90)
        assert r.rc == 0, r.describe()
        assert jlines(r.out)[0] == ["+PONG\r\n", 4], (shim, r.describe())


def test_a_refused_hello_names_nothing(redis_servers, tmp_path, sockdir):
    """On a server with a password, an app connection that never said AUTH sends `HELLO 2
    SETNAME z` (refused: -NOAUTH), then a command that takes it direct (CLIENT ID): the
    server's -NOAUTH, as direct. Before, the refused HELLO's name was kept, the direct
    connection's setup named it, the server refused that, and the app's connection was
    closed."""
    srv = redis_servers(password="pw")
    c = cmd_text
    cases = [{"send": [c("HELLO", "2", "SETNAME", "z") + c("CLIENT", "ID")], "expect": 1},
             {"send": [c("AUTH", "pw") + c("CLIENT", "GETNAME")], "expect": 1}]
    got = raw_as_direct(srv, tmp_path, sockdir, cases)
    assert got[0]["got"].count("-NOAUTH") == 2 and got[1]["got"] == "+OK\r\n$-1\r\n", got


ROTATION = r"""
import json, socket, sys
port = int(sys.argv[1])
def conn():
    return socket.create_connection(("127.0.0.1", port), timeout=10)
def cmd(*a):
    return ("*%d\r\n" % len(a) + "".join("$%d\r\n%s\r\n" % (len(x), x) for x in a)).encode()
def read_replies(s, n):
    buf, got = b"", 0
    while got < n:
        d = s.recv(65536)
        if not d:
            break
        buf += d
        got = buf.count(b"\r\n")
    return buf.decode()
adm = conn()
adm.sendall(cmd("ACL", "SETUSER", "alice", "on", ">old", "~alice:*", "+@all")); read_replies(adm, 1)
apps = [conn() for i in range(6)]
for a in apps:
    a.sendall(cmd("AUTH", "alice", "old")); read_replies(a, 1)
adm.sendall(cmd("ACL", "SETUSER", "alice", "resetpass", ">new")); read_replies(adm, 1)
for i, a in enumerate(apps):                 # busy at once: the pool opens more for alice
    a.sendall(b"".join(cmd("SET", "other:%d:%d" % (i, j), "v") for j in range(50)))
for a in apps:
    try:
        read_replies(a, 50)
    except OSError:
        pass
adm.sendall(cmd("KEYS", "other:*"))
print(json.dumps([read_replies(adm, 1)]))
"""


def test_commands_never_ride_a_login_the_server_refused(redis, tmp_path, sockdir):
    """alice (keys alice:* only) is logged in on six app connections; her password is
    rotated on the server; the six then send 50 SETs of keys she may not write, at once,
    so the pool opens more connections for her, whose setup says the old password and is
    refused. No SET may run: direct, each is refused -NOPERM as alice. Before, the commands
    queued behind the refused AUTH ran on that connection as the default user, who may
    write anything."""
    r = run([SYS_PY, "-c", ROTATION, redis.port], conf=conf_for(tmp_path, redis, sockdir), timeout=60)
    assert r.rc == 0, r.describe()
    assert jlines(r.out)[0] == ["*0\r\n"], r.describe()


LOGIN_CHANGES = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[2])
from resp import command as c, raw_replies
port = int(sys.argv[1])
def ex(data, n):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        return raw_replies(s, n)
def step(name, data, n):
    print(json.dumps([name, ex(data, n)]), flush=True)
    sys.stdin.readline()               # the test changes the server's login meanwhile
step("open", c("GET", "secret") + c("CLIENT", "SETNAME", "a"), 2)
step("changed", c("GET", "secret") + c("SET", "written", "x"), 2)
step("next", c("GET", "secret") + c("SELECT", "0") + c("CLIENT", "SETNAME", "b"), 3)
step("back", c("CLIENT", "SETNAME", "c") + c("SELECT", "0") + c("GET", "secret"), 3)
"""


def admin(port, *argv):
    """One command as the test's own user (never the default one, which the tests turn off)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(command("AUTH", "admin", "adminpw") + command(*argv))
        return raw_replies(s, 2).split("\r\n", 1)[1]


@pytest.mark.parametrize("change", ["requirepass", "default off"])
def test_a_login_changed_on_the_server_is_asked_again_for_every_connection(redis, tmp_path, sockdir, change):
    """One process, connections that never say AUTH: while the server needs no password
    they read; then a password is set (`CONFIG SET requirepass`), or the default user
    turned off, while the shim's server connections are still logged in (Redis keeps a
    connection's login): the next app connection gets no byte of data and writes nothing
    (direct: -NOAUTH; here its connection ends, as for a password revoked), the one after
    gets the server's own -NOAUTH, as direct; and once the password is gone again, a name
    and SELECT 0 are +OK, as direct (the -NOAUTH learnt meanwhile is asked again). Before,
    the new connections rode the logged-in ones: the secret read, the write made."""
    redis.cmd("ACL", "SETUSER", "admin", "on", ">adminpw", "~*", "+@all")
    redis.cmd("SET", "secret", "s3cr3t")
    lock = ["CONFIG", "SET", "requirepass", "pw"] if change == "requirepass" else ["ACL", "SETUSER", "default", "off"]
    unlock = ["CONFIG", "SET", "requirepass", ""] if change == "requirepass" else ["ACL", "SETUSER", "default", "on"]
    got = {}
    for shim in (False, True):
        env = client_env(shim, conf_for(tmp_path, redis, sockdir) if shim else None)
        p = subprocess.Popen([SYS_PY, "-c", LOGIN_CHANGES, str(redis.port), str(PYCLIENTS)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        lines = []
        try:
            for after in (lock, ["EXISTS", "written"], unlock, ["DEL", "written"]):
                line = p.stdout.readline()
                assert line, p.stderr.read()
                lines.append(json.loads(line))
                lines.append(admin(redis.port, *after))
                p.stdin.write(b"\n")
                p.stdin.flush()
            assert p.wait(timeout=30) == 0, p.stderr.read()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        got[shim] = lines
    direct, shimmed = got[False], got[True]
    assert direct[0] == shimmed[0] == ["open", "$6\r\ns3cr3t\r\n+OK\r\n"], got
    assert direct[2][1].count("-NOAUTH") == 2 and direct[3] == ":0\r\n", direct
    assert shimmed[2][1] in (direct[2][1], "<closed>") and shimmed[3] == ":0\r\n", got
    assert shimmed[4] == direct[4] and direct[4][1].count("-NOAUTH") == 3, got
    assert shimmed[6] == direct[6] == ["back", "+OK\r\n+OK\r\n$6\r\ns3cr3t\r\n"], got


LIBCURL_LATER = r'''
import json, socket, sys, urllib.request
def curl_loaded():
    return any("libcurl" in line for line in open("/proc/self/maps"))
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"*1\r\n$4\r\nPING\r\n")
pong = s.recv(64)
s.close()
before = curl_loaded()
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
bodies = [opener.open("http://127.0.0.1:%s/bytes/300" % sys.argv[2], timeout=10).read() for _ in range(2)]
print(json.dumps({"pong": pong.decode(), "curl_before_http": before, "curl_after_http": curl_loaded(),
                  "bodies": [len(b) for b in bodies], "same": bodies[0] == bodies[1]}))
'''


def test_a_process_that_speaks_only_redis_never_loads_libcurl(redis, upstream, tmp_path, sockdir):
    """libcurl (about 30 libraries and OpenSSL's setup: most of a redis-cli's cost under the
    shim) is loaded only when the first HTTP connection is diverted: a process whose first
    diverted connection is Redis's runs without it, and its first HTTP connection then
    starts it, its answers cached and pooled as ever (the second GET a hit)."""
    conf = conf_for(tmp_path, redis, sockdir)
    with open(conf, "a") as f:
        f.write("\n[upstream 127.0.0.1:%d]\ncache GET /bytes/* ttl=1m\n" % upstream.port)
    r = run([SYS_PY, "-c", LIBCURL_LATER, str(redis.port), str(upstream.port)], shim=True, conf=conf, timeout=60)
    assert r.rc == 0, r.describe()
    res = jlines(r.out)[-1]
    assert res["pong"] == "+PONG\r\n" and res["bodies"] == [300, 300] and res["same"], res
    assert res["curl_before_http"] is False and res["curl_after_http"] is True, res
    assert upstream.stats()["requests"] == 1, upstream.stats()


def test_state_said_in_one_write_with_a_transaction_keeps_its_order(redis, tmp_path, sockdir):
    """SELECT, MULTI/EXEC, WATCH and a name in one write: a transaction's lent connection
    still being set up (a database the process has not used yet, the app's name) held its
    commands while a SELECT after them went direct ahead of them, and the transaction ran
    in the wrong database with its replies shifted (found by an adversarial run). Every
    reply and every key's database as direct."""
    got = replies_as_direct(
        redis, tmp_path, sockdir,
        "import os, time\nk = 'ord:%d:' % os.getpid()\nX, Y, Z, V, R = [conn(port) for _ in range(5)]\n"
        "from redisscenarios import pipe\n"
        "a = as_text(pipe(X, ['SELECT', '6'], ['MULTI'], ['SET', k + 'm', 'x'], ['EXEC'], ['SELECT', '0'],"
        " ['GET', k + 'm']))\n"
        "on(Y, 'CLIENT', 'SETNAME', 'worker')\n"
        "b = as_text(pipe(Y, ['MULTI'], ['INCR', k + 'n'], ['EXEC'], ['SELECT', '3'], ['INCR', k + 'n']))\n"
        "c = as_text(pipe(Z, ['SELECT', '5'], ['WATCH', k + 'w'], ['SELECT', '0']))\n"
        "on(V, 'SELECT', '5'); on(V, 'SET', k + 'w', 'theirs')\n"
        "d = as_text(pipe(Z, ['SELECT', '5'], ['MULTI'], ['SET', k + 'w', 'mine'], ['EXEC'], ['GET', k + 'w']))\n"
        "where = [as_text(on(R, 'SELECT', db)) and as_text(on(R, 'MGET', k + 'm', k + 'n', k + 'w'))"
        " for db in ('0', '3', '5', '6')]",
        "[a, b, c, d, where]")
    assert got[0] == ["OK", "OK", "QUEUED", ["OK"], "OK", None], got
    assert got[3][3] is None and got[3][4] == "theirs", "the WATCH was in database 5: %s" % got


def test_an_app_that_closes_while_blocked_takes_nothing(redis, tmp_path, sockdir):
    """BLPOP k 0, then the app closes its connection (a worker whose socket timeout ends
    first): the server drops the blocked command as direct, so the next item pushed stays
    in the list. The server connection lent for the block stayed blocked, and popped the
    next job for no one."""
    got = replies_as_direct(
        redis, tmp_path, sockdir,
        "import os, time\nfrom resp import encode\nk = 'blk:%d' % os.getpid()\nA, B = conn(port), conn(port)\n"
        "A[0].sendall(encode(['BLPOP', k, '0'])); time.sleep(0.3); A[0].close(); time.sleep(0.5)\n"
        "pushed = on(B, 'RPUSH', k, 'job'); time.sleep(0.3)\n"
        "C = conn(port)    # (a command the shim answers itself, held behind the block, then more)\n"
        "C[0].sendall(encode(['BLPOP', k + 'c', '0']) + encode(['CLIENT', 'GETNAME']) + encode(['INCR', k + 'n']))\n"
        "time.sleep(0.15); C[0].close(); time.sleep(0.3)\n"
        "pushed_c = on(B, 'RPUSH', k + 'c', 'job'); time.sleep(0.15)",
        "[pushed, on(B, 'LLEN', k), pushed_c, on(B, 'LLEN', k + 'c'), as_text(on(B, 'GET', k + 'n'))]")
    assert got == [1, 1, 1, 1, None], got


def test_script_kill_ends_a_script_another_app_runs(redis, tmp_path, sockdir):
    """A long script runs for one app connection; another says SCRIPT KILL: answered at
    once and the script ends, as direct. Its login's check went behind the script on the
    only shared connection, and SCRIPT KILL waited for the script to end (for ever, for an
    endless one)."""
    script = "local t = tonumber(redis.call('TIME')[1]) while tonumber(redis.call('TIME')[1]) < t + 3 do end"
    got = replies_as_direct(
        redis, tmp_path, sockdir,
        "import time\nfrom resp import encode\nA, B = conn(port), conn(port)\n"
        "on(A, 'CONFIG', 'SET', 'lua-time-limit', '100')\n"
        "A[0].sendall(encode(['EVAL', %r, '0'])); time.sleep(0.4)\n"
        "t0 = time.monotonic(); killed = as_text(on(B, 'SCRIPT', 'KILL')); prompt = time.monotonic() - t0 < 1.5\n"
        "ended = as_text(A[1].reply())[:27]" % script,
        "[killed, prompt, ended]")
    assert got == ["OK", True, "ERR:ERR Script killed by us"], got


def test_hello_on_a_connection_that_never_logged_in_is_refused_as_direct(redis_servers, tmp_path, sockdir):
    """On a server with a password, HELLO 2 from a connection that never said AUTH is
    refused (-NOAUTH); the reply kept from a logged-in connection's HELLO answered it,
    naming the server, its version and its role to a client that had not logged in."""
    srv = redis_servers(password="pw")
    got = replies_as_direct(
        srv, tmp_path, sockdir, "X, Y = conn(port), conn(port)",
        "[as_text(on(X, 'AUTH', 'pw')), isinstance(on(X, 'HELLO', '2'), list), as_text(on(Y, 'HELLO', '2'))[:15],"
        " as_text(on(Y, 'RESET')), as_text(on(X, 'RESET')), as_text(on(X, 'HELLO', '2'))[:15]]")
    assert got == ["OK", True, "ERR:NOAUTH HELL", "RESET", "RESET", "ERR:NOAUTH HELL"], got


def test_a_bulk_longer_than_the_server_takes_is_its_protocol_error(redis, tmp_path, sockdir):
    """A bulk length past what Redis takes (proto-max-bulk-len, 512 MB): the server's
    protocol error and the end of the connection, at once, as direct (the shim waited for
    the bytes, holding the app's connection open and silent)."""
    got = replies_as_direct(
        redis, tmp_path, sockdir, "from resp import until_closed\nX, Y = conn(port, 5), conn(port, 5)",
        "[X[0].sendall(b'*2\\r\\n$3\\r\\nSET\\r\\n$99999999999\\r\\n') or until_closed(X[0]),"
        " Y[0].sendall(b'*3\\r\\n$3\\r\\nSET\\r\\n$1\\r\\nk\\r\\n$600000000\\r\\nabc') or until_closed(Y[0])]")
    assert got == ["-ERR Protocol error: invalid bulk length\r\n<closed>"] * 2, got


ROTATED_SELECT = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[2])
from resp import command as c, raw_replies
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
first = (c("AUTH", "u", "old") if sys.argv[3] == "user" else b"") + c("SET", "k", "zero")
s.sendall(first)
print(json.dumps(raw_replies(s, first.count(b"*"))), flush=True)
sys.stdin.readline()                   # the test changes the login on the server meanwhile
s.sendall(c("SELECT", "2") + c("SET", "k", "two") + c("SELECT", "0") + c("GET", "k"))
print(json.dumps(raw_replies(s, 4)), flush=True)
"""


@pytest.mark.parametrize("login", ["user", "default"])
def test_a_database_asked_for_after_a_password_change_never_takes_the_old_one(redis, tmp_path, sockdir, login):
    """A connection logged in (as u, or as the default user with no password) sets k in
    database 0; then the server's password changes (u's rotated, or `requirepass` set).
    Redis keeps the connection logged in, so direct its `SELECT 2`, `SET k two`,
    `SELECT 0`, `GET k` all succeed. The shim needs a new server connection for database 2,
    and cannot log it in any more: before, the app got -WRONGPASS (or -NOAUTH) to its
    SELECT and the SET pipelined behind it overwrote k in database 0 (found by an
    adversarial pass). Now the app's connection ends, as a reset, and nothing it sent after
    the SELECT runs anywhere."""
    redis.cmd("ACL", "SETUSER", "admin", "on", ">adminpw", "~*", "+@all")
    redis.cmd("ACL", "SETUSER", "u", "on", ">old", "~*", "+@all")
    lock = ["ACL", "SETUSER", "u", "resetpass", ">new"] if login == "user" else ["CONFIG", "SET", "requirepass", "pw"]
    got = {}
    try:
        for shim in (False, True):
            admin(redis.port, "FLUSHALL")
            admin(redis.port, "CONFIG", "SET", "requirepass", "")
            admin(redis.port, "ACL", "SETUSER", "u", "resetpass", ">old")
            env = client_env(shim, conf_for(tmp_path, redis, sockdir) if shim else None)
            p = subprocess.Popen([SYS_PY, "-c", ROTATED_SELECT, str(redis.port), str(PYCLIENTS), login],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            try:
                before = json.loads(p.stdout.readline() or "null")
                admin(redis.port, *lock)
                p.stdin.write(b"\n")
                p.stdin.flush()
                after = json.loads(p.stdout.readline() or "null")
                assert p.wait(timeout=30) == 0, p.stderr.read()
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            got[shim] = (before, after, admin(redis.port, "GET", "k"), admin(redis.port, "SELECT", "2"))
    finally:
        admin(redis.port, "CONFIG", "SET", "requirepass", "")
    ok = "+OK\r\n" * (2 if login == "user" else 1)
    assert got[False] == (ok, "+OK\r\n+OK\r\n+OK\r\n$4\r\nzero\r\n", "$4\r\nzero\r\n", "+OK\r\n"), got
    before, after, k0, _ = got[True]
    assert before == ok and after in (got[False][1], "<closed>") and k0 == "$4\r\nzero\r\n", got


WRITE_ALL_THEN_READ = r"""
import json, sys, redis
r = redis.Redis(port=int(sys.argv[1]), socket_timeout=10)
r.set("kv", b"v" * 1000)
p = r.pipeline(transaction=False)
for _ in range(20000):
    p.get("kv")
many = p.execute()
big = b"x" * 1500000
r.set("big", big)
p = r.pipeline(transaction=False)
p.get("big")
p.set("big2", big)
p.get("big2")
two = p.execute()
print(json.dumps([len(many), all(x == b"v" * 1000 for x in many), two[0] == big, two[1], two[2] == big]))
"""


def test_a_pipeline_written_whole_before_its_replies_are_read_completes(redis, tmp_path, sockdir):
    """redis-py's pipeline writes every command before it reads a reply. 20 000 GETs of a
    1 KB value (20 MB of replies), and a GET of 1.5 MB beside a SET of 1.5 MB: direct, Redis
    reads on while the replies wait, and both finish in a second. Under the shim they hung
    (found by an adversarial pass): it stopped reading the app once 1 MB of replies waited
    for it, or 8 192 commands were in flight, while the app was still writing. Now the
    commands it writes are read on and held (up to 16 MB) while it is not reading, and sent
    on as it reads."""
    for shim in (False, True):
        r = run([SYS_PY, "-c", WRITE_ALL_THEN_READ, redis.port], shim=shim,
                conf=conf_for(tmp_path, redis, sockdir) if shim else None, timeout=60)
        assert r.rc == 0 and jlines(r.out)[0] == [20000, True, True, True, True], r.describe()


OWED_PAST_THE_CAP = r"""
import json, socket, sys, time
sys.path.insert(0, sys.argv[2])
from resp import command as cmd
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
s.sendall(b"".join(cmd("GET", "big") + cmd("INCR", "owed") for _ in range(20)))
time.sleep(1)                          # the replies pile up in the shim meanwhile
data = bytearray()
while True:
    d = s.recv(1 << 20)
    if not d:
        break
    data += d
replies, i = [], 0
while i < len(data):
    j = data.index(b"\r\n", i)
    head = bytes(data[i:j])
    if head.startswith(b"$"):
        n = int(head[1:])
        if j + 2 + n + 2 > len(data):
            break
        replies.append(("bulk", n))
        i = j + 2 + n + 2
    else:
        replies.append(("line", head.decode()))
        i = j + 2
want = [r for k in range(20) for r in (("bulk", 5 << 20), ("line", ":%d" % (k + 1)))]
print(json.dumps([len(replies), replies == want[:len(replies)]]))
"""


def test_replies_past_the_cap_end_the_connection_with_no_hole(redis, tmp_path, sockdir):
    """20 GETs of a 5 MB value, each followed by an INCR, written at once by an app that
    reads a second later: more than the 65 MB the shim keeps for one app connection on a
    shared server connection. The reply that did not fit was dropped and the connection
    marked to close, but the replies after it were still kept and delivered: the app read
    an INCR's reply as a GET's (found by a regression pass). Now the app reads an unbroken
    prefix of its replies, then the end, as a reset would leave it."""
    redis.cmd("SET", "big", "x" * (5 << 20))
    r = run([SYS_PY, "-c", OWED_PAST_THE_CAP, redis.port, PYCLIENTS], conf=conf_for(tmp_path, redis, sockdir), timeout=60)
    assert r.rc == 0, r.describe()
    n, prefix = jlines(r.out)[0]
    assert prefix and n >= 2, r.describe()


VALUE_OVER_THE_FRAME_CAP = r"""
import hashlib, json, socket, sys, time
sys.path.insert(0, sys.argv[2])
from resp import command as cmd
port = int(sys.argv[1])
def conn():
    return socket.create_connection(("127.0.0.1", port), timeout=20)
def read_bulk(s, slow=False):
    got = b""
    while b"\r\n" not in got:
        got += s.recv(65536)
    head, rest = got.split(b"\r\n", 1)
    n, rest = int(head[1:]), bytearray(rest)
    while len(rest) < n + 2:
        d = s.recv(1 << 16 if slow else 1 << 20)
        if not d:
            return None, b""
        rest += d
        if slow and (len(rest) < (4 << 20) or len(rest) > n - (4 << 20)):
            time.sleep(0.01)           # slow at the start and at the end: the shared connection waits on it
    return bytes(rest[:n]), bytes(rest[n + 2:])
out = {}
a, b = conn(), conn()
a.sendall(cmd("GET", "huge"))          # nothing more owed to it: the value's end frees it
b.sendall(cmd("INCR", "other"))        # rides the same shared server connection
v, more = read_bulk(a, slow=True)
out["huge"] = hashlib.sha256(v).hexdigest() if v is not None else None
out["other"] = b.recv(100).decode()
a.sendall(cmd("INCR", "after"))
out["after"] = a.recv(100).decode()
c = conn()                             # one that leaves in the middle of the value
c.sendall(cmd("GET", "huge"))
c.recv(1 << 20)
c.close()
b.sendall(cmd("INCR", "other"))
out["other2"] = b.recv(100).decode()
print(json.dumps(out))
"""


def test_a_value_over_the_frame_cap_comes_in_parts(redis, tmp_path, sockdir):
    """A 70 MB value (over the 64 MB the shim holds of one reply) read on a shared server
    connection: relayed in parts as it comes, whole and exact, with the replies behind it
    in order, while the app reads slowly (the connection's reading waits on it) and when
    another app leaves in the middle of the value (the connection goes on for the rest).
    Before, the server connection was closed as a reply it could not frame: every app
    connection on it ended as a reset, and ioredis, sending its GET again on a new
    connection each time, looped for ever."""
    value = bytes(range(256)) * (70 * 4096)      # 70 MiB
    with_port = conf_for(tmp_path, redis, sockdir)
    redis.cmd("SET", "huge", value)
    before = received(redis)
    r = run([SYS_PY, "-c", VALUE_OVER_THE_FRAME_CAP, redis.port, PYCLIENTS], conf=with_port, timeout=120)
    assert r.rc == 0, r.describe()
    out = jlines(r.out)[0]
    assert out == {"huge": hashlib.sha256(value).hexdigest(), "after": ":1\r\n", "other": ":1\r\n",
                   "other2": ":2\r\n"}, out
    assert received(redis) - before - 1 <= 4, "server connections were lost and opened again"


QUIT_MID_PIPELINE = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[2])
from resp import command as cmd, read_to_end
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
blob = cmd("GET", "v") * 30000 + cmd("QUIT") + cmd("INCR", "after-quit") * 200000
try:
    s.sendall(blob)                    # all of it before a reply is read
    sent = "all"
except OSError as e:
    sent = type(e).__name__
got = read_to_end(s)
print(json.dumps([sent, got.endswith(b"+OK\r\n") or sent != "all"]))
"""


def test_quit_inside_a_pipeline_written_whole_ends_it(redis, tmp_path, sockdir):
    """30 000 GETs, QUIT, then 200 000 INCRs, written at once before any reply is read
    (5.7 MB): direct, Redis answers up to QUIT and closes, and reads on meanwhile. The
    shim answered QUIT and stopped reading the app, which waited in its write for the shim
    to read while the shim waited for the app to read its replies: for ever (found by a
    regression pass). What the app writes after QUIT is read and dropped now: it ends,
    and nothing after QUIT runs."""
    redis.cmd("SET", "v", "1")
    for shim in (False, True):
        r = run([SYS_PY, "-c", QUIT_MID_PIPELINE, redis.port, PYCLIENTS], shim=shim, conf=conf_for(tmp_path, redis, sockdir),
                timeout=40)
        sent, ended = jlines(r.out)[0] if r.rc == 0 else (None, False)
        assert sent != "TimeoutError" and ended, r.describe()     # (the write waited on a shim that waited on it)
        assert redis.cmd("EXISTS", "after-quit") == 0


WRITE_AFTER_END = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[2])
from resp import command as cmd
port, out = int(sys.argv[1]), []
def reply(s):
    data = b""
    while not data.endswith(b"\r\n"):
        k = s.recv(4096)
        if not k:
            break
        data += k
    return data
def write_then_read(s):
    try:
        s.sendall(cmd("PING"))
        wrote = "ok"
    except OSError as e:
        wrote = type(e).__name__
    try:
        got = s.recv(4096)
    except OSError as e:
        got = b"reset"
    return [wrote, got in (b"", b"reset")]
a = socket.create_connection(("127.0.0.1", port), timeout=10)
a.sendall(cmd("QUIT"))
out.append(reply(a).decode())
out.append(write_then_read(a))
b = socket.create_connection(("127.0.0.1", port), timeout=10)
b.sendall(cmd("CLIENT", "ID"))                      # (a connection gone direct)
ident = reply(b)[1:-2].decode()
k = socket.create_connection(("127.0.0.1", port), timeout=10)
k.sendall(cmd("CLIENT", "KILL", "ID", ident))
out.append(reply(k).decode())
b.settimeout(10)
while True:                                         # its end of file first
    try:
        if not b.recv(4096):
            break
    except OSError:
        break
out.append(write_then_read(b))
print(json.dumps(out))
"""


def test_a_write_after_the_server_ended_the_connection_is_taken_as_direct(redis, tmp_path, sockdir):
    """After QUIT's +OK, and after another connection's CLIENT KILL of one gone direct, the
    app's next write succeeds (TCP takes the first write after a FIN) and its read ends, as
    direct. Before, the shim had closed its end at once: the write failed with EPIPE, and
    SIGPIPE killed a C client (found by an acceptance pass)."""
    want = ["+OK\r\n", ["ok", True], ":1\r\n", ["ok", True]]
    for shim in (False, True):
        r = run([SYS_PY, "-c", WRITE_AFTER_END, redis.port, PYCLIENTS], shim=shim,
                conf=conf_for(tmp_path, redis, sockdir), timeout=40)
        assert r.rc == 0 and json.loads(r.out.decode().splitlines()[-1]) == want, (shim, r.describe())


def test_an_exited_process_counts_no_server_connection_open(redis, tmp_path, sockdir):
    """The record a process leaves at exit holds its gauges at 0: server connections open
    and lent now. Before, `redis_server_open` kept its value at exit, and `httpshim stats`
    summed connections open to a server that had none (found by an acceptance pass)."""
    conf = conf_for(tmp_path, redis, sockdir)
    r = run([SYS_PY, "-c", "import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
             "s.sendall(b'*1\\r\\n$4\\r\\nPING\\r\\n'); print(s.recv(100))", redis.port], conf=conf, timeout=30)
    assert r.rc == 0 and b"PONG" in r.out, r.describe()
    doc = json.loads(run([HTTPSHIM, "stats", "-c", conf, "--json"], shim=False).out.decode())
    u = doc["total"]["upstreams"]["127.0.0.1:%d" % redis.port]
    assert doc["total"]["exited"] == 1 and u["redis_server_opened"] >= 1 and u["redis_server_open"] == 0, u


HELD_ACROSS_A_RESTART = r"""
import json, socket, sys, time
sys.path.insert(0, sys.argv[2])
from resp import command as cmd, read_to_end
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
s.sendall(b"".join(cmd("GET", "v") + cmd("INCR", "held") for _ in range(20000)))
print(json.dumps(["written"]), flush=True)
sys.stdin.readline()                   # the test kills and restarts Redis meanwhile
data = read_to_end(s)
print(json.dumps([data.count(b"$-1\r\n")]), flush=True)
"""


def test_commands_held_for_an_app_never_run_on_the_next_server(redis, tmp_path, sockdir):
    """20 000 GET + INCR pairs written at once by an app that reads only later: the shim
    holds most of them while the replies wait. Redis is killed and started again (empty)
    meanwhile. Direct, the app's connection ends with the server. The shim sent the held
    commands to the new server: the app read nil GETs and the INCRs ran again from 1
    (found by a regression pass). It ends the app's connection once the replies from before
    are read now, and nothing it held runs anywhere."""
    redis.cmd("SET", "v", "x" * 1000)
    p = subprocess.Popen([SYS_PY, "-c", HELD_ACROSS_A_RESTART, str(redis.port), str(PYCLIENTS)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=client_env(True, conf_for(tmp_path, redis, sockdir)))
    try:
        assert json.loads(p.stdout.readline() or "null") == ["written"], p.stderr.read()
        time.sleep(0.3)
        redis.kill()
        time.sleep(0.3)
        redis.restart()
        p.stdin.write(b"\n")
        p.stdin.flush()
        nil_gets = json.loads(p.stdout.readline() or "null")
        assert p.wait(timeout=30) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert nil_gets == [0] and redis.cmd("EXISTS", "held") == 0, nil_gets
