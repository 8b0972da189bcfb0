"""HTTPS upstreams (issue 14): `origin = https://HOST[:PORT]` carries a legacy app's plain
HTTP over TLS that libcurl verifies (the system store plus the rule's tls_ca_file);
`httpshim check` warns about cache rules on an upstream whose connections will be
TLS-tunnelled. The TLS upstream is tests/upstream.py with a certificate from a test CA
of the test's own (tests/tlsca.py); it counts its handshakes."""
import pytest

from conftest import BUILD, SYS_PY, Upstream, free_port, jlines, pyclient, run, write_rules
from tlsca import CA

HTTPSHIM = BUILD / "httpshim"


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
                sockdir=None):
    lines = ["[global]", "upstream_timeout = 5s"]
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
    request GETs (distinct URLs) reach the origin over a few pooled TLS connections."""
    legacy = free_port()
    conf = origin_conf(tmp_path, legacy, "https://localhost:%d" % tls_upstream.port, pki["ca"].pem,
                       sockdir=sockdir)
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
    assert up["requests"] == 40 and up["handshakes"] <= 8, up


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
