"""RFC 9111 4.4: a POST, PUT, DELETE or PATCH that succeeds makes the stored GET answers
of its URL stale, in this process's memory tier (every variant, every credential's entry)
and in the Redis tier. A stateful upstream of the test's own: GET /items/ID answers the
item's version, an unsafe request bumps it (and answers the status its X-Status asks for)."""
import json
import posixpath
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from conftest import SYS_PY, run, write_rules
from test_redis import RedisServer, redis_url


def resolved(path):
    """The item a path names, as nginx reads it: escapes decoded, dot segments resolved."""
    return posixpath.normpath(unquote(path))


class ItemServer(object):
    """Items with versions; counts GETs per path (as resolved())."""

    def __init__(self):
        self.lock = threading.Lock()
        self.versions = {}
        self.gets = {}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _answer(self, status, body, extra=()):
                self.send_response(status)
                for k, v in extra:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                url = urlsplit(self.path)
                url = url._replace(path=resolved(url.path))
                with owner.lock:
                    owner.gets[url.path] = owner.gets.get(url.path, 0) + 1
                    v = owner.versions.get(url.path, 0)
                time.sleep(float(self.headers.get("X-Delay", "0")))   # (the version read before)
                extra = [("Vary", "Accept-Language")] if "vary" in parse_qs(url.query) else []
                lang = self.headers.get("Accept-Language", "-")
                user = self.headers.get("Authorization", "-")
                self._answer(200, ("%s v%d %s %s" % (url.path, v, lang, user)).encode(), extra)

            def _write(self):
                url = urlsplit(self.path)
                url = url._replace(path=resolved(url.path))
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                status = int(self.headers.get("X-Status", "200"))
                with owner.lock:
                    owner.versions[url.path] = owner.versions.get(url.path, 0) + 1
                self._answer(status, b"" if status == 204 else b"done")

            do_POST = do_PUT = do_DELETE = do_PATCH = _write

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def items():
    s = ItemServer()
    yield s
    s.stop()


# Each step: [method, path, headers, body]; prints one JSON list of [status, body].
# A new connection per request (urllib), so hits are answered on the app's own thread too.
STEPS_CLIENT = r"""
import json, sys, urllib.request, urllib.error
port = int(sys.argv[1])
steps = json.loads(sys.argv[2])
op = urllib.request.build_opener(urllib.request.ProxyHandler({}))
out = []
for method, path, headers, body in steps:
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method,
                                 headers=headers, data=body.encode() if body is not None else None)
    try:
        with op.open(req, timeout=20) as r:
            out.append([r.status, r.read().decode()])
    except urllib.error.HTTPError as e:
        out.append([e.code, e.read().decode()])
print(json.dumps(out))
"""


def memory_conf(tmp_path, port, extra=""):
    return write_rules(tmp_path, [], raw="[global]\ncache = memory\n%s\n[upstream 127.0.0.1:%d]\n"
                       "cache GET /items/* ttl=10m key_headers=Authorization\n" % (extra, port))


def steps(conf, port, seq, shim=True):
    r = run([SYS_PY, "-c", STEPS_CLIENT, port, json.dumps(seq)], conf=conf, shim=shim, timeout=60)
    assert r.rc == 0, r.describe()
    return json.loads(r.out.strip().splitlines()[-1])


def G(path, **headers):
    return ["GET", path, headers, None]


def test_an_unsafe_request_that_succeeds_invalidates_its_url(tmp_path, items):
    """Each unsafe method, once answered 2xx, makes the next GET of its URL go upstream
    and get the new version, as direct; a GET of another URL still hits."""
    conf = memory_conf(tmp_path, items.port)
    seq = [G("/items/a"), G("/items/a"), G("/items/other")]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        seq += [[method, "/items/a", {}, "x"], G("/items/a"), G("/items/a")]
    seq += [G("/items/other")]
    got = steps(conf, items.port, seq)
    direct = steps(conf, items.port, [G("/items/a")], shim=False)[0]
    bodies = [b for _, b in got]
    assert bodies[:3] == ["/items/a v0 - -", "/items/a v0 - -", "/items/other v0 - -"], bodies
    for i, _ in enumerate(("POST", "PUT", "DELETE", "PATCH")):
        w, a1, a2 = got[3 + 3 * i:6 + 3 * i]
        assert w == [200, "done"], got
        assert a1[1] == a2[1] == "/items/a v%d - -" % (i + 1), (i, got)
    assert bodies[-1] == "/items/other v0 - -", bodies
    assert direct[1] == "/items/a v4 - -", direct
    # one GET per version (each version's second GET a hit), and /items/other once
    assert items.gets == {"/items/a": 5 + 1, "/items/other": 1}, items.gets


def test_every_variant_and_every_users_entry_goes(tmp_path, items):
    """The target URI is the unit (RFC 9111 4.4): variants behind a Vary marker and the
    entries of other credentials go with it; another query of the same path stays."""
    conf = memory_conf(tmp_path, items.port)
    de, fr = {"Accept-Language": "de"}, {"Accept-Language": "fr"}
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    warm = [G("/items/v?vary=1", **de), G("/items/v?vary=1", **fr), G("/items/u", **alice), G("/items/u", **bob),
            G("/items/q?x=2")]
    seq = warm + warm + [["POST", "/items/v?vary=1", alice, "x"], ["DELETE", "/items/u", alice, None],
                         ["PUT", "/items/q?x=1", {}, "x"]] + warm
    got = steps(conf, items.port, seq)
    b = [x[1] for x in got]
    assert b[:5] == b[5:10] == ["/items/v v0 de -", "/items/v v0 fr -", "/items/u v0 - Bearer alice",
                                "/items/u v0 - Bearer bob", "/items/q v0 - -"], b
    assert b[13:] == ["/items/v v1 de -", "/items/v v1 fr -", "/items/u v1 - Bearer alice",
                      "/items/u v1 - Bearer bob", "/items/q v0 - -"], b
    assert items.gets == {"/items/v": 4, "/items/u": 4, "/items/q": 1}, items.gets


def test_an_error_answer_invalidates_nothing(tmp_path, items):
    """RFC 9111 4.4 invalidates on a non-error status: a 4xx or 5xx leaves the entry
    (here the upstream did change, so the stored answer is older than direct's: the rule's
    TTL is what bounds it, as before)."""
    conf = memory_conf(tmp_path, items.port)
    got = steps(conf, items.port, [G("/items/e"), ["POST", "/items/e", {"X-Status": "409"}, "x"], G("/items/e"),
                                   ["POST", "/items/e", {"X-Status": "503"}, "x"], G("/items/e"),
                                   ["POST", "/items/e", {"X-Status": "204"}, "x"], G("/items/e")])
    assert [x[0] for x in got] == [200, 409, 200, 503, 200, 204, 200], got
    assert [x[1] for x in got[::2]] == ["/items/e v0 - -", "/items/e v0 - -", "/items/e v0 - -",
                                        "/items/e v3 - -"], got
    assert items.gets == {"/items/e": 2}, items.gets


def test_a_keep_alive_client_and_a_chunked_post_invalidate_too(tmp_path, items):
    """One kept-alive connection (requests.Session) doing GET, POST, GET; and a POST whose
    body is chunked (its connection becomes a tunnel, whose answer the shim does not read:
    it invalidates when it sees the request)."""
    conf = memory_conf(tmp_path, items.port)
    client = r"""
import json, sys, requests
port = int(sys.argv[1]); base = "http://127.0.0.1:%d" % port
s = requests.Session(); s.trust_env = False
out = [s.get(base + "/items/k", timeout=20).text, s.get(base + "/items/k", timeout=20).text]
out.append(s.post(base + "/items/k", data=b"x", timeout=20).status_code)
out.append(s.get(base + "/items/k", timeout=20).text)
t = requests.Session(); t.trust_env = False
out.append(t.get(base + "/items/c", timeout=20).text)
out.append(requests.post(base + "/items/c", data=iter([b"a", b"b"]), timeout=20,
                         proxies={"http": None}).status_code)
out.append(t.get(base + "/items/c", timeout=20).text)
print(json.dumps(out))
"""
    r = run([SYS_PY, "-c", client, items.port], conf=conf, timeout=60)
    assert r.rc == 0, r.describe()
    got = json.loads(r.out.strip().splitlines()[-1])
    assert got == ["/items/k v0 - -", "/items/k v0 - -", 200, "/items/k v1 - -",
                   "/items/c v0 - -", 200, "/items/c v1 - -"], got


def test_redis_entries_of_the_url_are_deleted(tmp_path, items, sockdir):
    """With the Redis tier: a process that only writes (its memory tier never held the
    entry) deletes the entry another process stored, and a third process's GET goes
    upstream; the writer's own process deletes what its memory held, variants included."""
    srv = RedisServer(tmp_path / "redis")
    try:
        conf = write_rules(tmp_path, [], raw="[global]\ncache = %s\nredis_timeout = 2s\n"
                           "[upstream 127.0.0.1:%d]\ncache GET /items/* ttl=10m\n" % (redis_url(srv), items.port))
        de, fr = {"Accept-Language": "de"}, {"Accept-Language": "fr"}
        assert steps(conf, items.port, [G("/items/r"), G("/items/r?vary=1", **de), G("/items/r?vary=1", **fr)]) \
            == [[200, "/items/r v0 - -"], [200, "/items/r v0 de -"], [200, "/items/r v0 fr -"]]
        assert steps(conf, items.port, [G("/items/r")]) == [[200, "/items/r v0 - -"]]   # from Redis
        assert items.gets == {"/items/r": 3}, items.gets
        # a process that never read it writes it; the exit waits for the DEL
        assert steps(conf, items.port, [["PUT", "/items/r", {}, "x"]]) == [[200, "done"]]
        assert steps(conf, items.port, [G("/items/r")]) == [[200, "/items/r v1 - -"]]
        # a process that holds the variants writes their URL: both go from Redis
        got = steps(conf, items.port, [G("/items/r?vary=1", **de), G("/items/r?vary=1", **fr),
                                       ["POST", "/items/r?vary=1", {}, "x"]])
        assert got == [[200, "/items/r v0 de -"], [200, "/items/r v0 fr -"], [200, "done"]], got
        assert steps(conf, items.port, [G("/items/r?vary=1", **de), G("/items/r?vary=1", **fr)]) \
            == [[200, "/items/r v2 de -"], [200, "/items/r v2 fr -"]]
    finally:
        srv.shutdown()


def test_a_get_after_the_write_never_joins_a_fetch_begun_before_it(tmp_path, items):
    """Thread A's GET is on its way upstream (1 s, reading the version before the write);
    the main thread PUTs, reads its 200, and GETs: its GET must not join A's fetch (it
    would be answered the version before its own write), and what A's fetch brings back
    is not stored. Direct, that GET reads the new version."""
    conf = memory_conf(tmp_path, items.port)
    client = r"""
import json, sys, threading, time, urllib.request
port = int(sys.argv[1]); base = "http://127.0.0.1:%d/items/f" % port
op = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def get(headers=None):
    with op.open(urllib.request.Request(base, headers=headers or {}), timeout=20) as r:
        return r.read().decode()
slow = []
a = threading.Thread(target=lambda: slow.append(get({"X-Delay": "1"})))
a.start()
time.sleep(0.3)                                  # A's fetch is under way
with op.open(urllib.request.Request(base, method="PUT", data=b"x"), timeout=20) as r:
    put = r.status
after = get()
a.join()
print(json.dumps([slow[0], put, after, get()]))
"""
    for shim in (False, True):
        r = run([SYS_PY, "-c", client, items.port], conf=conf, shim=shim, timeout=60)
        assert r.rc == 0, r.describe()
        got = json.loads(r.out.strip().splitlines()[-1])
        v = 1 if shim else 0                     # (the second run starts where the first left it)
        assert got == ["/items/f v%d - -" % v, 200, "/items/f v%d - -" % (v + 1), "/items/f v%d - -" % (v + 1)], \
            (shim, got)


def test_a_write_to_another_spelling_of_the_url_invalidates_it(tmp_path, items):
    """`PUT /items/x/../7`, `PUT /items/%37` and `%c3%a9` for `%C3%A9` name the URL a GET
    was stored under, as the upstream resolves them: each invalidates it. And `/items/%37`
    and `/items/7` share one entry (RFC 3986 6.2.2). Before, only the exact spelling was
    reached, and the next GET was the stale one (found by an adversarial pass)."""
    conf = memory_conf(tmp_path, items.port)
    seq = [G("/items/7"), G("/items/%37"), ["PUT", "/items/x/../7", {}, "x"], G("/items/7"),
           ["PUT", "/items/%37", {}, "x"], G("/items/7"),
           G("/items/%C3%A9"), ["PUT", "/items/%c3%a9", {}, "x"], G("/items/%C3%A9")]
    b = [x[1] for x in steps(conf, items.port, seq)]
    assert b[0] == b[1] == "/items/7 v0 - -", b
    assert b[3] == "/items/7 v1 - -" and b[5] == "/items/7 v2 - -", b
    assert b[6].endswith("v0 - -") and b[8].endswith("v1 - -"), b
    assert items.gets["/items/7"] == 3, items.gets


RAW_WRITE_CLIENT = r"""
import socket, sys, urllib.request
port = int(sys.argv[1])
op = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def get():
    with op.open("http://127.0.0.1:%d/items/raw" % port, timeout=20) as r:
        return r.read().decode()
out = [get(), get()]
s = socket.create_connection(("127.0.0.1", port))
s.sendall(sys.argv[2].encode().replace(b"PORT", b"%d" % port))
got = b""
while b"done" not in got:
    d = s.recv(4096)
    if not d:
        break
    got += d
s.close()
out.append(get())
print("|".join(out))
"""


@pytest.mark.parametrize("raw", ["PUT /items/raw HTTP/1.1\nHost: 127.0.0.1:PORT\nContent-Length: 1\n\nx",
                                 "PUT /items/raw HTTP/1.1\r\nHost : 127.0.0.1:PORT\r\nContent-Length: 1\r\n\r\nx"])
def test_a_write_the_parser_refuses_still_invalidates_what_it_names(tmp_path, items, raw):
    """A PUT with bare-LF line ends, or a space before a colon: the shim relays it as bytes
    (its parser refuses it) and the upstream takes it. What its request line names is
    invalidated all the same. Before, only a request the parser read invalidated, and the
    next GET was the stale one."""
    conf = memory_conf(tmp_path, items.port)
    r = run([SYS_PY, "-c", RAW_WRITE_CLIENT, items.port, raw], conf=conf, timeout=60)
    assert r.rc == 0, r.describe()
    assert r.out.decode().strip().splitlines()[-1] == "/items/raw v0 - -|/items/raw v0 - -|/items/raw v1 - -", \
        r.describe()
