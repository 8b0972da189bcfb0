"""HTTPS upstreams (issue 14): `origin = https://HOST[:PORT]` carries a legacy app's plain
HTTP over TLS that libcurl verifies (the system store plus the rule's tls_ca_file);
`httpshim check` warns about cache rules on an upstream whose connections will be
TLS-tunnelled. The TLS upstream is tests/upstream.py with a certificate from a test CA
of the test's own (tests/tlsca.py); it counts its handshakes."""
import os
import subprocess

import pytest

from conftest import (BUILD, PYCLIENTS, SANITIZER_SKIP, SYS_PY, JsonLineProcess, Upstream, client_env, free_port, jlines, kill_group,
                      pyclient, run, wait_until, write_rules)
from tlsca import CA

HTTPSHIM = BUILD / "httpshim"

# Under the sanitizer run: Python's TLS clients leave OpenSSL objects behind at exit, and
# with the fast unwinder their stacks end inside libcrypto (no frame pointers), where the
# suppressions cannot see that they are the interpreter's. Full unwinding for these
# clients keeps every leak attributable: the shim's own are still reported.
SAN_ENV = ({"ASAN_OPTIONS": os.environ["ASAN_OPTIONS"] + ":fast_unwind_on_malloc=0"}
           if "ASAN_OPTIONS" in os.environ else None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = CA(d)
    other = CA(d / "other", name="a CA nobody trusts")
    return {"ca": ca, "other": other, "dir": d}


@pytest.fixture(scope="module")
def tls_upstream_server(pki, tmp_path_factory):
    chain, key = pki["ca"].leaf(["localhost", "127.0.0.1"], stem="upstream")
    u = Upstream(tmp_path_factory.mktemp("tls-upstream"), tls=(chain, key))
    yield u
    u.stop()


@pytest.fixture
def tls_upstream(tls_upstream_server):
    tls_upstream_server.reset()
    return tls_upstream_server


def origin_conf(tmp, legacy_port, origin, ca_file=None, rules=("cache GET /custom* ttl=10m",), name="origin.conf",
                sockdir=None, extra=()):
    lines = ["[global]", "upstream_timeout = 5s"] + list(extra)
    if sockdir:
        lines.append("stats_socket = %s/%%p.sock" % sockdir)
    lines += ["", "[upstream 127.0.0.1:%d]" % legacy_port, "origin = %s" % origin]
    if ca_file:
        lines.append("tls_ca_file = %s" % ca_file)
    lines += list(rules)
    return write_rules(tmp, [], raw="\n".join(lines) + "\n", name=name)


def test_origin_https_carries_plain_http_over_verified_tls(tls_upstream, pki, tmp_path, sockdir):
    """A legacy client speaks plain HTTP to 127.0.0.1:LEGACY, where nothing listens; the
    rule sends it to the HTTPS origin, verified against the test CA (tls_ca_file). The body
    is the origin's; the second GET from the same process is a hit; 40 connection-per-
    request GETs (distinct URLs, started 10 ms apart, so as many overlap as the machine is
    slow) reach the origin over at most pool_max_per_host = 4 pooled TLS connections."""
    legacy = free_port()
    conf = origin_conf(tmp_path, legacy, "https://localhost:%d" % tls_upstream.port, pki["ca"].pem,
                       sockdir=sockdir, extra=["pool_max_per_host = 4"])
    f = tmp_path / "paths.txt"
    f.write_text("\n".join(["/custom/o?tag=origin&n=900"] * 2) + "\n")
    r = run([SYS_PY, pyclient("poolclient.py"), "--port", legacy, "--paths-file", f, "--gap-ms", 300,
             "--stats-socket", "%s/%%p.sock" % sockdir], conf=conf, timeout=60)
    lines = jlines(r.out)
    reqs = [x for x in lines if "i" in x]
    assert r.rc == 0 and len(reqs) == 2, r.describe()
    assert all(x["status"] == 200 and x["body_len"] == 900 for x in reqs), reqs
    assert reqs[0]["body_sha256"] == reqs[1]["body_sha256"]
    st = [x["stats"] for x in lines if "stats" in x][0]["upstreams"]["127.0.0.1:%d" % legacy]
    assert st["hits"] == 1 and st["upstream_requests"] == 1, st
    up = tls_upstream.stats()
    assert up["requests"] == 1 and up["handshakes"] == 1, up
    tls_upstream.reset()
    f.write_text("\n".join("/custom/o?tag=many&n=100&i=%d" % i for i in range(40)) + "\n")
    r = run([SYS_PY, pyclient("poolclient.py"), "--port", legacy, "--paths-file", f, "--gap-ms", 10], conf=conf,
            timeout=60)
    reqs = [x for x in jlines(r.out) if "i" in x]
    assert len(reqs) == 40 and all(x["status"] == 200 for x in reqs), r.describe()
    up = tls_upstream.stats()
    assert up["requests"] == 40 and up["handshakes"] <= 4, up


def test_origin_with_curl(tls_upstream, pki, tmp_path):
    legacy = free_port()
    conf = origin_conf(tmp_path, legacy, "https://127.0.0.1:%d" % tls_upstream.port, pki["ca"].pem)
    url = "http://127.0.0.1:%d/custom/c?tag=curl&n=321" % legacy
    r = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", url], conf=conf)
    assert r.rc == 0 and r.out == b"200 321", r.describe()


@pytest.mark.parametrize("case", ["untrusted-ca", "wrong-name", "expired"])
def test_origin_that_fails_verification_is_never_reached(case, pki, tmp_path_factory, tmp_path):
    """The origin's certificate is from a CA nobody trusts, for another name, or expired:
    the exchange fails (the app's connection closes before a response) and the origin
    never sees a request."""
    ca = pki["other"] if case == "untrusted-ca" else pki["ca"]
    names = ["elsewhere.example"] if case == "wrong-name" else ["localhost", "127.0.0.1"]
    chain, key = ca.leaf(names, stem="bad-" + case, expired=case == "expired")
    up = Upstream(tmp_path_factory.mktemp("bad-" + case), tls=(chain, key))
    try:
        legacy = free_port()
        conf = origin_conf(tmp_path, legacy, "https://localhost:%d" % up.port, pki["ca"].pem)
        r = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:%d/custom/x?n=5" % legacy],
                conf=conf)
        assert r.out != b"200", r.describe()
        assert up.stats()["requests"] == 0, up.stats()
    finally:
        up.stop()


def test_origin_without_the_ca_file_uses_the_system_store(tls_upstream, tmp_path):
    """No tls_ca_file: the test CA is in no system store, so the origin is refused."""
    legacy = free_port()
    conf = origin_conf(tmp_path, legacy, "https://localhost:%d" % tls_upstream.port)
    r = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:%d/custom/x?n=5" % legacy],
            conf=conf)
    assert r.out != b"200" and tls_upstream.stats()["requests"] == 0, r.describe()


BAD = {
    "bad-tls": ("[upstream 127.0.0.1:443]\ntls = maybe\n", 2),
    "missing-ca-file": ("[upstream 127.0.0.1:443]\n\ntls_ca_file = /nonexistent/ca.pem\n", 3),
    "origin-not-https": ("[upstream 127.0.0.1:80]\norigin = http://example.com\n", 2),
    "origin-with-path": ("[upstream 127.0.0.1:80]\norigin = https://example.com/v1\n", 2),
    "origin-bad-port": ("[upstream 127.0.0.1:80]\norigin = https://example.com:0\n", 2),
    "unknown-upstream-setting": ("[upstream 127.0.0.1:80]\ncolour = blue\n", 2),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tls_settings_name_their_line(case, tmp_path):
    text, line = BAD[case]
    conf = write_rules(tmp_path, [], raw=text)
    r = run([HTTPSHIM, "check", conf], shim=False)
    assert r.rc == 1 and r.err.decode().startswith("%s:%d: " % (conf, line)), r.describe()


def test_check_warns_about_cache_rules_on_a_tunnelled_tls_upstream(tmp_path, pki):
    conf = write_rules(tmp_path, [], raw="[upstream api.example.com:443]\ncache GET /v3/* ttl=10m\n")
    r = run([HTTPSHIM, "check", conf], shim=False)
    assert r.rc == 0, r.describe()
    assert b"warning" in r.err and b"tunnel" in r.err and b":2:" in r.err, r.describe()
    # intercepting, or carried over TLS to an origin: no warning
    conf = write_rules(tmp_path, [], name="ok.conf", raw="[upstream api.example.com:443]\ntls = intercept\n"
                       "cache GET /v3/* ttl=10m\n\n[upstream 127.0.0.1:8080]\norigin = https://api.example.com\n"
                       "cache GET /v3/* ttl=10m\n")
    r = run([HTTPSHIM, "check", conf], shim=False)
    assert r.rc == 0 and b"warning" not in r.err, r.describe()


# ------------------------------------------------------------------ tls = intercept
TLSCLIENT = pyclient("tlsclient.py")
LIBS = ["urllib", "requests", "httpclient", "asyncio", "aiohttp"]


def intercept_conf(tmp, up, ca_file, sockdir, name="intercept.conf", host="localhost", extra=()):
    lines = ["[global]", "upstream_timeout = 5s", "stats_socket = %s/%%p.sock" % sockdir,
             "", "[upstream %s:%d]" % (host, up.port), "tls = intercept"]
    if ca_file:
        lines.append("tls_ca_file = %s" % ca_file)
    lines += list(extra) + ["cache GET /custom* ttl=10m"]
    return write_rules(tmp, [], raw="\n".join(lines) + "\n", name=name)


def tls_run(lib, url, cafile, conf=None, sockdir=None, count=2, shim=True, extra=()):
    cmd = [SYS_PY, TLSCLIENT, "--lib", lib, "--url", url, "--cafile", cafile, "--count", count] + list(extra)
    if sockdir:
        cmd += ["--stats-socket", "%s/%%p.sock" % sockdir]
    r = run(cmd, shim=shim, conf=conf, timeout=90, env=SAN_ENV)
    lines = jlines(r.out)
    assert r.rc == 0 and lines and lines[-1].get("done"), r.describe()
    st = [x["stats"] for x in lines if "stats" in x]
    return [x for x in lines if "i" in x], (st[0] if st else None), r


def upstream_counters(st, up, host="localhost"):
    return st["upstreams"]["%s:%d" % (host, up.port)]


@pytest.mark.parametrize("lib", LIBS)
def test_intercepted_https_is_cached_and_pooled(lib, tls_upstream, pki, tmp_path, sockdir):
    """The app trusts the upstream's CA through its own configuration (cafile=, verify=);
    with tls = intercept its TLS is terminated by the shim: the body is byte-identical to
    the one it gets without the shim, the second GET is a hit (zero upstream requests),
    and the upstream sees one TLS handshake for the leg (plus the shim's verification)."""
    url = tls_upstream.url("/custom/i?tag=%s&n=1500" % lib, host="localhost")
    direct, _, _ = tls_run(lib, url, pki["ca"].pem, shim=False)
    assert all(x.get("status") == 200 and x["len"] == 1500 for x in direct), direct
    tls_upstream.reset()
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    reqs, st, r = tls_run(lib, url, pki["ca"].pem, conf=conf, sockdir=sockdir)
    assert [x.get("sha256") for x in reqs] == [direct[0]["sha256"]] * 2, (reqs, r.describe())
    u = upstream_counters(st, tls_upstream)
    assert u["tls_intercepted"] >= 1 and u["hits"] == 1 and u["upstream_requests"] == 1, (dict((k, v) for k, v in u.items() if "tls" in k or "tunnel" in k), r.err[-3000:])
    up = tls_upstream.stats()
    assert up["requests"] == 1, up
    assert up["handshakes"] <= 2, "one handshake for the leg, one for the shim's verification: %s" % up


@pytest.mark.parametrize("lib", ["urllib", "requests"])
def test_connection_per_request_https_rides_pooled_tls(lib, tls_upstream, pki, tmp_path, sockdir):
    """100 HTTPS GETs, a new connection and handshake (with the shim) each, distinct URLs:
    the upstream sees 100 requests over at most a handful of TLS connections."""
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    urls = [tls_upstream.url("/custom/p?tag=pool&n=200&i=%d" % i, host="localhost") for i in range(100)]
    code = ("import sys, ssl, urllib.request, requests, json\n"
            "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
            "ok = 0\n"
            "for u in sys.argv[3:]:\n"
            "    if sys.argv[2] == 'urllib':\n"
            "        ok += urllib.request.urlopen(u, context=ctx, timeout=20).status == 200\n"
            "    else:\n"
            "        with requests.Session() as s:\n"
            "            ok += s.get(u, verify=sys.argv[1], timeout=20).status_code == 200\n"
            "print(json.dumps({'ok': ok}))\n")
    r = run([SYS_PY, "-c", code, pki["ca"].pem, lib] + urls, conf=conf, timeout=120, env=SAN_ENV)
    total_ok = jlines(r.out)[0]["ok"] if r.rc == 0 else 0
    assert total_ok == 100, r.describe()
    up = tls_upstream.stats()
    assert up["requests"] == 100 and up["handshakes"] <= 6, up


@pytest.mark.parametrize("by", ["name", "address"])
def test_curl_cli_intercepted(by, tls_upstream, pki, tmp_path, sockdir):
    """curl (libcurl, OpenSSL, its own CA file): two GETs in one run, the second a hit.
    By address (https://127.0.0.1:PORT, no server name) to the upstream listed by name:
    curl writes its hello through a BIO of its own, so the mark followed the rule for
    memory BIOs, and a hello without a name went unmarked (tunnelled, nothing cached) once
    the mark was kept to intercepting upstreams; the connection its thread diverted last
    says where such a hello goes now."""
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    url = tls_upstream.url("/custom/curl?tag=curl&n=700", host="localhost" if by == "name" else "127.0.0.1")
    d = run(["curl", "-s", "--cacert", pki["ca"].pem, url], shim=False)
    tls_upstream.reset()
    r = run(["curl", "-s", "--cacert", pki["ca"].pem, url, url], conf=conf, env={"HTTPSHIM_DEBUG": "1"})
    assert r.rc == 0 and r.out == d.out * 2, r.describe()
    mine = [e for e in tls_upstream.stats()["log"] if "tag=curl" in (e.get("target") or "")]
    up = tls_upstream.stats()
    print("UPSTATS", {k: v for k, v in up.items() if k != "log"})
    assert len(mine) == 1, "shim said:\n%s\nupstream: %s" % (r.err.decode(), {k: v for k, v in up.items() if k != "log"})


def test_node_https_works(tls_upstream, pki, tmp_path, sockdir):
    """Node carries its own TLS (no mark): tunnelled untouched, and it works."""
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    url = tls_upstream.url("/custom/node?tag=node&n=333", host="localhost")
    js = ("const https=require('https'),fs=require('fs');"
          "https.get(process.argv[1],{ca:fs.readFileSync(process.argv[2])},r=>{let n=0;"
          "r.on('data',d=>n+=d.length);r.on('end',()=>console.log(r.statusCode+' '+n))})"
          ".on('error',e=>{console.log('error '+e.code);})")
    d = run(["node", "-e", js, url, pki["ca"].pem], shim=False)
    r = run(["node", "-e", js, url, pki["ca"].pem], conf=conf)
    assert d.out.strip() == b"200 333" and r.out.strip() == b"200 333", (d.describe(), r.describe())


@pytest.mark.parametrize("case", ["wrong-name", "expired", "untrusted-ca"])
def test_bad_upstream_certificate_fails_as_direct(case, pki, tmp_path_factory, tmp_path, sockdir):
    """The upstream's certificate is for another name, expired, or from a CA the app does
    not trust: the app fails exactly as it does without the shim (the same exception), and
    nothing was minted for it (the connection was tunnelled, counted as unverified or
    not)."""
    ca = pki["other"] if case == "untrusted-ca" else pki["ca"]
    names = ["elsewhere.example"] if case == "wrong-name" else ["localhost", "127.0.0.1"]
    chain, key = ca.leaf(names, stem="ibad-" + case, expired=case == "expired")
    up = Upstream(tmp_path_factory.mktemp("ibad-" + case), tls=(chain, key))
    try:
        url = up.url("/custom/b?n=5", host="localhost")
        # the rule trusts both test CAs (libcurl alone would accept "untrusted-ca"): the
        # app's own store is what must decide
        both = tmp_path / "both.pem"
        both.write_bytes(pki["ca"].pem.read_bytes() + pki["other"].pem.read_bytes())
        conf = intercept_conf(tmp_path, up, both, sockdir)
        direct, _, _ = tls_run("urllib", url, pki["ca"].pem, shim=False, count=1)
        reqs, st, r = tls_run("urllib", url, pki["ca"].pem, conf=conf, sockdir=sockdir, count=1)
        assert "error" in direct[0] and reqs[0].get("error", "").split(":")[0] == direct[0]["error"].split(":")[0], \
            (direct, reqs)
        assert "CERTIFICATE_VERIFY_FAILED" in reqs[0]["error"], reqs
        u = upstream_counters(st, up)
        assert u["tls_intercepted"] == 0 and u["tls_tunnel_unverified"] == 1, u
        assert up.stats()["requests"] == 0
    finally:
        up.stop()


def test_client_certificate_is_tunnelled(tls_upstream, pki, tmp_path, sockdir):
    """A context with a client certificate (mutual TLS): its connection is tunnelled
    untouched (counted), and works."""
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    cert, key = pki["ca"].leaf(["client.example"], stem="client", client=True)
    url = tls_upstream.url("/custom/m?tag=mtls&n=100", host="localhost")
    reqs, st, r = tls_run("urllib", url, pki["ca"].pem, conf=conf, sockdir=sockdir, count=1,
                          extra=["--client-cert", cert, "--client-key", key])
    assert reqs[0].get("status") == 200, r.describe()
    u = upstream_counters(st, tls_upstream)
    assert u["tls_tunnel_client_cert"] == 1 and u["tls_intercepted"] == 0, u


def test_tls_tunnel_upstream_is_tunnelled_and_counted(tls_upstream, pki, tmp_path, sockdir):
    lines = ["[global]", "stats_socket = %s/%%p.sock" % sockdir, "", "[upstream localhost:%d]" % tls_upstream.port]
    conf = write_rules(tmp_path, [], raw="\n".join(lines) + "\n", name="tunnel.conf")
    url = tls_upstream.url("/custom/t?tag=tun&n=100", host="localhost")
    reqs, st, r = tls_run("urllib", url, pki["ca"].pem, conf=conf, sockdir=sockdir, count=2)
    assert all(x.get("status") == 200 for x in reqs), r.describe()
    u = upstream_counters(st, tls_upstream)
    assert u["tls_tunnel_not_configured"] == 2 and u["tunnels"] == 2, u
    # as direct: a connection per app connection, each one handshaking (the cold pool's
    # probe, the app's own connection, carries the first tunnel instead of idling unused)
    up = tls_upstream.stats()
    assert (up["requests"], up["connections"], up["handshakes"], up["handshake_failures"]) == (2, 2, 2, 0), up


def test_interception_creates_no_file(tls_upstream, pki, tmp_path, sockdir):
    """Interception creates no file: every open with O_CREAT or a write mode during an
    intercepted run (strace -f) is one the run makes without the shim too, but for the
    record of its counters the process leaves beside its stats socket at exit."""
    import shutil
    if not shutil.which("strace"):
        pytest.fail("strace is not installed (tools/install-deps installs it)", pytrace=False)
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    url = tls_upstream.url("/custom/f?tag=files&n=100", host="localhost")
    logs = {}
    for shim in (False, True):
        log = tmp_path / ("strace-%d.log" % shim)
        r = run(["strace", "-f", "-qq", "-e", "trace=open,openat,creat", "-o", log, SYS_PY, TLSCLIENT, "--lib",
                 "urllib", "--url", url, "--cafile", pki["ca"].pem, "--count", "2"], shim=shim, conf=conf, timeout=90)
        assert r.rc == 0, r.describe()
        created = set()
        for line in log.read_text().splitlines():
            # (naming the engine thread writes /proc/self/task/N/comm: not a file)
            if ("O_CREAT" in line or "O_WRONLY" in line or "O_RDWR" in line) and '"/proc/' not in line:
                created.add(line.split('"')[1] if '"' in line else line)
        logs[shim] = {f for f in created if not (f.startswith(sockdir + "/") and f.endswith(".sock.exited.tmp"))}
    assert logs[True] <= logs[False], "files the shim created: %s" % (logs[True] - logs[False])


def test_stats_table_shows_tls(tls_upstream, pki, tmp_path, sockdir):
    """`httpshim stats` has a TLS section: a row per upstream with the connections
    intercepted and the tunnels, equal to the process's /stats."""
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    url = tls_upstream.url("/custom/s?tag=table&n=100", host="localhost")
    app = JsonLineProcess([SYS_PY, TLSCLIENT, "--lib", "urllib", "--url", url, "--cafile", pki["ca"].pem,
                           "--count", "3", "--stats-socket", "%s/%%p.sock" % sockdir, "--hold", "30"],
                          client_env(True, conf, SAN_ENV))
    try:
        lines = [app.read() for _ in range(5)]
        assert lines[-1].get("done"), lines
        u = upstream_counters(lines[3]["stats"], tls_upstream)
        r = run([HTTPSHIM, "stats", "-c", conf], shim=False)
        assert r.rc == 0, r.describe()
        text = r.out.decode().splitlines()
        head = [i for i, ln in enumerate(text) if ln.split()[:1] == ["TLS"]]
        assert head and text[head[0]].split()[1:4] == ["INTERCEPT", "HS.FAIL", "TUNNELS"], r.out.decode()
        row = [ln.split() for ln in text[head[0]:] if ln.split()[:1] == ["localhost:%d" % tls_upstream.port]][0]
        assert row[1] == str(u["tls_intercepted"]) == "3" and row[3] == str(u["tunnels"]), (row, u)
    finally:
        app.stop()


@pytest.mark.parametrize("setter", ["set", "set1"])
def test_swapped_store_is_followed(setter, tls_upstream, pki, tmp_path, sockdir):
    """A C client builds its own X509_STORE from its CA file and installs it with
    SSL_CTX_set_cert_store / SSL_CTX_set1_cert_store after SSL_CTX_new (as libcurl's CA
    cache does): the shim adds its CA to the new store and the mark stands for it, so the
    connection is intercepted (the debug log says so) and the GET works; the upstream
    counts the shim's probe and its leg."""
    client = BUILD / "tlsstoreclient"
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    args = ([client] + (["--set1"] if setter == "set1" else []) +
            ["localhost", str(tls_upstream.port), pki["ca"].pem, "/custom/sw?tag=swap&n=444"])
    d = run(args, shim=False)
    assert d.rc == 0 and d.out.strip() == b"200 444", d.describe()
    tls_upstream.reset()
    r = run(args, conf=conf, env=dict(SAN_ENV or {}, HTTPSHIM_DEBUG="1"))
    assert r.rc == 0 and r.out.strip() == b"200 444", r.describe()
    assert b"terminated" in r.err, r.describe()
    assert tls_upstream.stats()["requests"] == 1


def test_verify_callback_is_not_intercepted(tls_upstream, pki, tmp_path, sockdir):
    """A context that verifies through a callback of its own (which could pin the
    upstream's certificate) sends no mark: tunnelled, and it works."""
    client = BUILD / "tlsstoreclient"
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    r = run([client, "--callback", "localhost", str(tls_upstream.port), pki["ca"].pem, "/custom/cb?tag=cb&n=55"],
            conf=conf, env=dict(SAN_ENV or {}, HTTPSHIM_DEBUG="1"))
    assert r.rc == 0 and r.out.strip() == b"200 55", r.describe()
    assert b"no mark" in r.err and b"terminated" not in r.err, r.describe()


def test_trust_loaded_after_the_client_hello_is_waited_for(tls_upstream, pki, tmp_path, sockdir):
    """A client that loads its CA file into its context's store only after it has sent the
    ClientHello (curl does; here 300 ms later): the shim's probe comes back long before, and
    it asks the app's store again (5 ms doubling) instead of tunnelling at once, so the
    connection is intercepted and the GET works."""
    client = BUILD / "tlsstoreclient"
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    args = [client, "--late", "localhost", str(tls_upstream.port), pki["ca"].pem, "/custom/late?tag=late&n=321"]
    d = run(args, shim=False)
    assert d.rc == 0 and d.out.strip() == b"200 321", d.describe()
    r = run(args, conf=conf, env=dict(SAN_ENV or {}, HTTPSHIM_DEBUG="1"))
    assert r.rc == 0 and r.out.strip() == b"200 321", r.describe()
    assert b"terminated" in r.err and b"tunnelled" not in r.err, r.describe()


@pytest.mark.parametrize("mode", ["--latecrl", "--late-unmarked"])
def test_trust_still_being_filled_is_not_judged(mode, tls_upstream, pki, tmp_path, sockdir):
    """curl with --crlfile loads its CA file after its ClientHello, then its revocation list,
    then sets TRUSTED_FIRST, last. Stalled 300 ms between the two (a loaded machine), the
    shim judged the store with the CA and without the list, intercepted, and curl refused
    the shim's leaf (no list for it): exit 60 where direct it works (a CI flake of
    test_an_app_that_checks_revocation_lists_is_tunnelled). A store filled after the hello
    is judged only once curl's last step is taken; one never marked so (another app that
    fills late) is tunnelled after 35 ms. Both work, as direct."""
    client = BUILD / "tlsstoreclient"
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    env = dict(SAN_ENV or {}, TLS_CRL_PEM=str(pki["ca"].empty_crl()))
    args = [client, mode, "localhost", str(tls_upstream.port), pki["ca"].pem, "/custom/lc?tag=lc&n=321"]
    d = run(args, shim=False, env=env)
    assert d.rc == 0 and d.out.strip() == b"200 321", d.describe()
    r = run(args, conf=conf, env=dict(env, HTTPSHIM_DEBUG="1"))
    assert r.rc == 0 and r.out.strip() == b"200 321", r.describe()
    assert b"tunnelled" in r.err and b"terminated" not in r.err, r.describe()


class DualServer(object):
    """HTTP and HTTPS on one port (the first byte tells): answers "SCHEME N", N counting
    the requests of that scheme."""

    def __init__(self, chain, key):
        import socket
        import ssl
        import threading
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(chain), str(key))
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(16)
        self.port = self.srv.getsockname()[1]
        self.counts = {"http": 0, "https": 0}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.accept, daemon=True)
        self.thread.start()

    def accept(self):
        import threading
        while not self.stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        import socket
        try:
            conn.settimeout(10)
            tls = conn.recv(1, socket.MSG_PEEK) == b"\x16"
            if tls:
                conn = self.ctx.wrap_socket(conn, server_side=True)
            scheme = "https" if tls else "http"
            buf = b""
            while True:
                d = conn.recv(65536)
                if not d:
                    return
                buf += d
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    with self.lock:
                        self.counts[scheme] += 1
                        body = ("%s %d" % (scheme, self.counts[scheme])).encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        import socket
        self.stop.set()
        try:
            self.srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.srv.close()
        self.thread.join(5)


def test_an_entry_fetched_over_plaintext_never_answers_the_apps_tls(pki, tmp_path, sockdir):
    """An upstream that speaks HTTP and HTTPS on one port, `tls = intercept`: the app's
    plaintext GET and its HTTPS GET of the same path are two entries (each a hit the second
    time), as direct each is answered over its own scheme. Before, the key said http for
    both: the HTTPS request got the answer that came over plaintext, which anyone on the
    path could have written."""
    chain, key = pki["ca"].leaf(["localhost", "127.0.0.1"], stem="dual")
    srv = DualServer(chain, key)
    try:
        client = r"""
import json, ssl, sys, urllib.request
port, cafile = int(sys.argv[1]), sys.argv[2]
ctx = ssl.create_default_context(cafile=cafile)
op = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
out = []
for scheme in ("http", "https", "http", "https"):
    with op.open("%s://localhost:%d/custom/dual" % (scheme, port), timeout=20) as r:
        out.append(r.read().decode())
print(json.dumps(out))
"""
        conf = write_rules(tmp_path, [], name="dual.conf", raw="[global]\nstats_socket = %s/%%p.sock\n\n"
                           "[upstream localhost:%d]\ntls = intercept\ntls_ca_file = %s\ncache GET /custom* ttl=10m\n"
                           % (sockdir, srv.port, pki["ca"].pem))
        r = run([SYS_PY, "-c", client, srv.port, pki["ca"].pem], conf=conf, timeout=60, env=SAN_ENV)
        assert r.rc == 0, r.describe()
        assert jlines(r.out)[-1] == ["http 1", "https 1", "http 1", "https 1"], r.describe()
    finally:
        srv.close()


STRICT_READER = r"""
import socket, ssl, sys
port, cafile, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=cafile)
s = ctx.wrap_socket(socket.create_connection(("localhost", port), timeout=10), server_hostname="localhost",
                    suppress_ragged_eofs=False)
s.sendall(b"GET " + target.encode() + b" HTTP/1.0\r\nHost: localhost\r\n\r\n")
n = 0
try:
    while True:
        d = s.recv(65536)
        if not d:
            print("clean-end")
            break
        n += len(d)
except OSError as e:
    print(type(e).__name__)
"""


def test_an_upstream_cut_mid_answer_ends_the_apps_tls_cut(tls_upstream, pki, tmp_path, sockdir):
    """The upstream resets (or closes) in the middle of a body: direct, the app's TLS ends
    without close_notify (and its TCP with a reset): a client that does not forgive that
    (Python with suppress_ragged_eofs=False, as an HTTP/1.0 reader of a body its close
    ends must be) sees SSLEOFError, and curl its receive error (56). Through the front it
    ended with a clean close_notify after the part of the body: such a client took the
    part for all of it, and curl said 18. Now the front ends the app's TLS as the cut
    connection ended the upstream's: no close_notify, and a reset for a reset."""
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir, extra=["cache GET /bytes/* ttl=10m"])
    for target in ("/reset/200000", "/truncate/200000"):
        cmd = [SYS_PY, "-c", STRICT_READER, tls_upstream.port, pki["ca"].pem, target]
        d = run(cmd, shim=False)
        r = run(cmd, conf=conf, env=SAN_ENV)
        assert d.out.strip() and r.out.strip() == d.out.strip(), (target, d.describe(), r.describe())
    url = tls_upstream.url("/reset/200000", host="localhost")
    d = run(["curl", "-s", "-o", "/dev/null", "--cacert", pki["ca"].pem, url], shim=False)
    r = run(["curl", "-s", "-o", "/dev/null", "--cacert", pki["ca"].pem, url], conf=conf)
    assert d.rc == 56 and r.rc == 56, "a reset is curl's receive error (56), not a short transfer (18)\n" + r.describe()


def test_large_intercepted_answers_reach_the_end(tls_upstream, pki, tmp_path, sockdir):
    """urllib (a connection per request, Connection: close) fetches 24 bodies of 300 kB to
    900 kB over an intercepted connection, each a miss then a hit: every one whole. Before,
    the front encrypted 64 kB at a time and, once that was sent whole with the engine's end
    already closed, nothing woke it for the rest: an answer in a few stalled, the last tens
    of kB never sent, and the app waited until its timeout."""
    client = r"""
import hashlib, json, ssl, sys, urllib.request
port, cafile = int(sys.argv[1]), sys.argv[2]
op = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                 urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=cafile)))
out = []
for size in range(300000, 900000, 25000):
    for _ in range(2):
        try:
            with op.open("https://localhost:%d/bytes/%d" % (port, size), timeout=10) as r:
                out.append(len(r.read()) == size)
        except OSError as e:
            out.append(repr(e))
print(json.dumps(out))
"""
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir, extra=["cache GET /bytes/* ttl=10m"])
    r = run([SYS_PY, "-c", client, tls_upstream.port, pki["ca"].pem], conf=conf, timeout=200, env=SAN_ENV)
    assert r.rc == 0, r.describe()
    got = jlines(r.out)[-1]
    assert got == [True] * 48, [g for g in got if g is not True]


SNIFFER = r'''
import socket, ssl, sys, threading
chain, key, port_file, log = sys.argv[1:5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(chain, key)
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(64)
open(port_file + ".tmp", "w").write(str(ls.getsockname()[1]))
import os; os.rename(port_file + ".tmp", port_file)
def serve(c):
    try:
        c.settimeout(5)
        first = c.recv(1, socket.MSG_PEEK)
        if first and first != b"\x16":            # not TLS: what a raw tunnel would carry
            data = c.recv(65536)
            open(log, "ab").write(data)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED")
            return
        t = ctx.wrap_socket(c, server_side=True)
        req = b""
        while not req.endswith(b"0\r\n\r\n"):            # (the chunked body's end)
            b = t.recv(65536)
            if not b:
                return
            req += b
        t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        t.close()
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''

CHUNKED_POST = r'''
import http.client, json, ssl, sys
sys.path.insert(0, sys.argv[4])
ctx = ssl.create_default_context(cafile=sys.argv[1])
c = http.client.HTTPSConnection("localhost", int(sys.argv[2]), context=ctx, timeout=20)
try:
    c.request("POST", "/login", body=iter([b"password=", b"hunter2"]),
              headers={"Authorization": "Bearer SECRET-TOKEN"})      # (an iterable body: chunked)
    r = c.getresponse()
    got = [r.status, r.read().decode()]
except (OSError, http.client.HTTPException) as e:
    got = [type(e).__name__]
out = {"got": got}
if sys.argv[3] != "-":
    from ownstats import own_stats
    out["not_relayable"] = own_stats(sys.argv[3])["upstreams"]["localhost:%s" % sys.argv[2]].get("tls_not_relayable", 0)
print(json.dumps(out))
'''


def test_an_intercepted_request_that_cannot_be_relayed_never_goes_out_in_plaintext(pki, tmp_path, sockdir):
    """A request on an intercepted connection that the shim cannot relay as HTTP (a chunked
    body here; an Upgrade, too many fields) went to a raw tunnel, which carried the app's
    decrypted bytes (its Authorization, its body) unencrypted to the upstream's TLS port,
    and what answered there in plaintext reached the app inside its verified session
    (found by an adversarial pass). It ends now, as a connection whose server gave up: the
    app gets an error, and nothing in plaintext reaches the upstream. The upstream here
    logs what comes in plaintext, and answers it with a forged 200."""
    chain, key = pki["ca"].leaf(["localhost", "127.0.0.1"], stem="sniffer")
    log, port_file = tmp_path / "plaintext.log", tmp_path / "sniffer.port"
    srv = subprocess.Popen([SYS_PY, "-c", SNIFFER, str(chain), str(key), str(port_file), str(log)],
                           start_new_session=True)
    try:
        wait_until(lambda: port_file.exists(), 10, "the sniffing upstream's port")
        port = int(port_file.read_text())
        conf = write_rules(tmp_path, [], name="sniff.conf", raw="[global]\nstats_socket = %s/%%p.sock\n"
                           "[upstream localhost:%d]\ntls = intercept\ntls_ca_file = %s\n" % (sockdir, port, pki["ca"].pem))
        d = run([SYS_PY, "-c", CHUNKED_POST, pki["ca"].pem, str(port), "-", str(PYCLIENTS)], shim=False, timeout=60)
        assert d.rc == 0 and jlines(d.out)[0]["got"] == [200, "ok"], d.describe()
        r = run([SYS_PY, "-c", CHUNKED_POST, pki["ca"].pem, str(port), "%s/%%p.sock" % sockdir, str(PYCLIENTS)],
                conf=conf, timeout=60, env=SAN_ENV)
        assert r.rc == 0, r.describe()
        res = jlines(r.out)[0]
        assert res["got"][0] != 200 and res["not_relayable"] == 1, res
        assert not log.exists() or b"SECRET" not in log.read_bytes(), log.read_bytes()
        assert not log.exists() or log.read_bytes() == b"", "plaintext reached the upstream: %r" % log.read_bytes()
    finally:
        kill_group(srv.pid)
        srv.wait(10)


CRL_CLIENT = r'''
import json, ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
try:
    r = urllib.request.urlopen(sys.argv[2], context=ctx, timeout=20)
    print(json.dumps([r.status, len(r.read())]))
except OSError as e:
    print(json.dumps([type(e).__name__, str(e)[:200]]))
'''


def test_an_app_that_checks_revocation_lists_is_tunnelled(tls_upstream, pki, tmp_path, sockdir):
    """A client that checks revocation lists (VERIFY_CRL_CHECK_LEAF, curl's --crlfile) with
    one that revokes nothing: direct, it succeeds. Intercepted, the shim's own leaf has no
    list, and the app refused it ("unable to get certificate CRL") where direct it
    succeeds: such a connection is not marked now, so it is tunnelled, and works."""
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    trust = pki["ca"].empty_crl()
    url = tls_upstream.url("/custom/crl?tag=crl&n=300", host="localhost")
    for shim in (False, True):
        r = run([SYS_PY, "-c", CRL_CLIENT, str(trust), url], shim=shim, conf=conf if shim else None, timeout=60,
                env=SAN_ENV)
        assert r.rc == 0 and jlines(r.out)[0] == [200, 300], r.describe()
    if "curl" not in SANITIZER_SKIP:   # (curl loads its CA and the list after its ClientHello)
        for shim in (False, True):
            r = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(pki["ca"].pem), "--crlfile",
                     str(trust), url], shim=shim, conf=conf if shim else None, timeout=60)
            assert r.rc == 0 and r.out == b"200", r.describe()


HELLO_SNIFFER = r'''
import json, socket, struct, sys, os
port_file, log = sys.argv[1], sys.argv[2]
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(16)
open(port_file + ".tmp", "w").write(str(ls.getsockname()[1])); os.rename(port_file + ".tmp", port_file)
def hello_extensions(c):
    data = b""
    while len(data) < 5 or len(data) < 5 + struct.unpack("!H", data[3:5])[0]:
        b = c.recv(65536)
        if not b:
            return None
        data += b
    body = data[5 + 4:]                        # (record header, handshake header)
    i = 2 + 32
    i += 1 + body[i]                           # session id
    i += 2 + struct.unpack("!H", body[i:i + 2])[0]   # cipher suites
    i += 1 + body[i]                           # compression methods
    end = i + 2 + struct.unpack("!H", body[i:i + 2])[0]
    i += 2
    types, name = [], ""
    while i + 4 <= end:
        t, n = struct.unpack("!HH", body[i:i + 4])
        if t == 0:
            name = body[i + 4 + 5:i + 4 + n].decode()
        types.append(t)
        i += 4 + n
    return {"sni": name, "types": types}
for _ in range(50):
    c, _ = ls.accept()
    c.settimeout(10)
    try:
        seen = hello_extensions(c)
    except (OSError, struct.error, IndexError):
        seen = None
    open(log, "a").write(json.dumps(seen) + "\n")
    c.close()
'''

HELLO_CLIENT = r'''
import asyncio, socket, ssl, sys
ca, port = sys.argv[1], int(sys.argv[2])
ctx = ssl.create_default_context(cafile=ca)
try:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        ctx.wrap_socket(s, server_hostname="localhost")
except (OSError, ssl.SSLError):
    pass
async def through_memory(name):                # asyncio: the hello is written into a memory BIO
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name), 10)
        w.close()
    except (OSError, ssl.SSLError, asyncio.TimeoutError):
        pass
for name in sys.argv[3:]:
    asyncio.run(through_memory(name))
'''


def test_the_mark_goes_only_to_intercepted_upstreams(tls_upstream, pki, tmp_path, sockdir):
    """The private ClientHello extension that marks the app's contexts went into every
    hello of a marked context, to hosts the rules do not list too: a stable per-process
    value any server could read, and a change to the app's TLS fingerprint (found by an
    adversarial pass). A hello written to a socket carries it only where that socket was
    diverted to an intercepting upstream now; one written into a memory BIO (asyncio) only
    when its server name is an intercepting upstream's. The sniffer (a port the rules do
    not list) logs each hello's extensions: the memory-BIO hello named like the listed
    upstream is the control that shows the mark would be seen."""
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    log, port_file = tmp_path / "hellos.log", tmp_path / "sniffer.port"
    srv = subprocess.Popen([SYS_PY, "-c", HELLO_SNIFFER, str(port_file), str(log)], start_new_session=True)
    try:
        wait_until(lambda: port_file.exists(), 10, "the sniffer's port")
        r = run([SYS_PY, "-c", HELLO_CLIENT, pki["ca"].pem, port_file.read_text(), "elsewhere.test", "localhost"],
                conf=conf, timeout=60, env=SAN_ENV)
        assert r.rc == 0, r.describe()
        wait_until(lambda: log.exists() and len(log.read_text().splitlines()) == 3, 10, "three hellos")
        hellos = jlines(log.read_bytes())
        assert [h["sni"] for h in hellos] == ["localhost", "elsewhere.test", "localhost"], hellos
        marked = [0xffa7 in h["types"] for h in hellos]
        assert marked == [False, False, True], hellos
    finally:
        kill_group(srv.pid)
        srv.wait(10)


def test_an_app_that_verifies_with_its_own_function_is_tunnelled(tls_upstream, pki, tmp_path, sockdir):
    """An app that verifies through SSL_CTX_set_cert_verify_callback (OpenSSL's check,
    then a deny list holding the upstream's own certificate): direct, the handshake fails.
    Intercepted, the shim's leaf was not on the list: the app took it and its request
    reached the server it refuses (found by an adversarial pass). Such a context is marked
    no more: tunnelled, the app sees the real certificate and refuses it, as direct, and
    the upstream gets no request."""
    client = BUILD / "tlsstoreclient"
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    args = [client, "--deny", "localhost", str(tls_upstream.port), pki["ca"].pem, "/custom/deny?tag=deny&n=12"]
    deny = {"TLS_DENY_PEM": str(pki["ca"].dir / "upstream.pem")}
    for shim in (False, True):
        tls_upstream.reset()
        r = run(args, shim=shim, conf=conf if shim else None, env=dict(SAN_ENV or {}, **deny))
        assert r.rc == 1 and r.out.strip() == b"error handshake", r.describe()
        assert tls_upstream.stats()["requests"] == 0
    r = run(args, conf=conf, env=dict(SAN_ENV or {}, TLS_DENY_PEM=str(pki["other"].pem)))
    assert r.rc == 0 and r.out.strip() == b"200 12", r.describe()     # (not on the list: works)


@pytest.mark.parametrize("mode", ["--ocsp", "--nosni", "--ipcheck"])
def test_what_the_shims_leaf_cannot_answer_is_tunnelled(mode, tls_upstream, pki, tmp_path, sockdir):
    """--ocsp: an app that asks for a stapled OCSP status and refuses one that says
    revoked (a soft-fail check): the shim's answer carries no staple, so against a revoked
    server the app took the shim's where direct it refuses (found by an adversarial pass).
    --nosni: an app that checks a host name it does not send as SNI: the shim's leaf named
    the dialled address, and the app refused it where direct the real certificate names
    both; --ipcheck: one that sends a name but checks an address, the same the other way.
    None is marked now: tunnelled, they work as direct (here the upstream staples
    nothing and names both)."""
    client = BUILD / "tlsstoreclient"
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    args = [client, mode, "localhost", str(tls_upstream.port), pki["ca"].pem, "/custom/t?tag=t&n=34"]
    d = run(args, shim=False)
    assert d.rc == 0 and d.out.strip() == b"200 34", d.describe()
    r = run(args, conf=conf, env=dict(SAN_ENV or {}, HTTPSHIM_DEBUG="1"))
    assert r.rc == 0 and r.out.strip() == b"200 34", r.describe()
    assert b"no mark" in r.err and b"terminated" not in r.err, r.describe()


def test_an_upstream_that_renegotiates_to_another_certificate_gets_no_answer_through(pki, tmp_path, sockdir):
    """A TLS 1.2 upstream reads the request, then renegotiates to a certificate from a CA
    the app does not trust (only the rule's tls_ca_file does). Direct, the app refuses the
    new certificate and gets no answer. Intercepted, only the first handshake was held to
    what the app trusts: libcurl took the new one and the app got the server's 200 (found
    by an adversarial pass). Every leg now refuses to renegotiate: the app gets no answer,
    and the server never answers after a renegotiation."""
    good, good_key = pki["ca"].leaf(["localhost", "127.0.0.1"], stem="reneg-first")
    other, other_key = pki["other"].leaf(["localhost", "127.0.0.1"], stem="reneg-second")
    both = tmp_path / "both.pem"
    both.write_bytes(pki["ca"].pem.read_bytes() + pki["other"].pem.read_bytes())
    log, port_file = tmp_path / "reneg.log", tmp_path / "reneg.port"
    srv = subprocess.Popen([BUILD / "renegserver", port_file, log, good, good_key, other, other_key],
                           start_new_session=True)
    try:
        wait_until(lambda: port_file.exists(), 10, "the renegotiating upstream's port")
        port = port_file.read_text().strip()
        conf = write_rules(tmp_path, [], name="reneg.conf", raw="[global]\nstats_socket = %s/%%p.sock\n"
                           "[upstream localhost:%s]\ntls = intercept\ntls_ca_file = %s\ncache GET /* ttl=10m\n"
                           % (sockdir, port, both))
        args = [BUILD / "tlsstoreclient", "localhost", port, pki["ca"].pem, "/r"]
        for shim in (False, True):
            r = run(args, shim=shim, conf=conf if shim else None, env=SAN_ENV)
            assert r.rc == 1 and r.out.startswith(b"error"), r.describe()
        assert "REQ" in log.read_text() and "ANSWERED" not in log.read_text(), log.read_text()
    finally:
        kill_group(srv.pid)
        srv.wait(10)


def test_a_close_notify_long_after_the_answer_is_taken_as_tcp_takes_it(tls_upstream, pki, tmp_path, sockdir):
    """A C client reads a Connection: close answer to its end, then says its own
    close_notify 1.5 s later, SIGPIPE at its default. Direct, TCP takes that first write
    after the server has gone. Intercepted, the app's end was kept only a second, and the
    write after it met a closed pair: SIGPIPE killed the client (found by a regression
    pass). The app's next write after its end is closed is taken now, as TCP's is."""
    conf = intercept_conf(tmp_path, tls_upstream, pki["ca"].pem, sockdir)
    args = [BUILD / "tlsstoreclient", "localhost", str(tls_upstream.port), pki["ca"].pem, "/custom/late-end?n=21"]
    for shim in (False, True):
        r = run(args, shim=shim, conf=conf if shim else None, env=dict(SAN_ENV or {}, TLS_SHUTDOWN_DELAY_MS="1500"))
        assert r.rc == 0 and r.out.strip() == b"200 21", r.describe()
