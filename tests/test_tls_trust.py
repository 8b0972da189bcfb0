"""Trust kept per upstream (issue 21, item 1): a kept TLS verdict (the upstream's chain
verified by libcurl, then against the app context's own store) answers only for the exact
name, dialled address and port, and upstream section it was computed for; every upstream
leg of an intercepted connection is held to what the app approved. Each case runs the same
fetches in two long-lived processes, one without the shim and one with it, and requires
the same outcome (status, or the exception's type and CERTIFICATE_VERIFY_FAILED) from
both, and that a server the app would refuse never receives a request."""
import os
import shutil
import time

import pytest

from conftest import BUILD, SYS_PY, JsonLineProcess, Upstream, client_env, java_fetch, jlines, pyclient, run, write_rules
from test_tls import SAN_ENV
from tlsca import CA

TLSFETCH = pyclient("tlsfetch.py")


@pytest.fixture(scope="module")
def cas(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust-pki")
    return {"app": CA(d / "app", name="the CA the app trusts"), "other": CA(d / "other", name="another CA")}


def bundle(tmp, *cas):
    """A CA file with every CA given (what libcurl trusts for the upstream)."""
    p = tmp / ("bundle-%d.pem" % len(cas))
    p.write_bytes(b"".join(c.pem.read_bytes() for c in cas))
    return p


def conf_for(tmp, sockdir, ports, ca_file, extra=()):
    lines = ["[global]", "upstream_timeout = 5s", "stats_socket = %s/%%p.sock" % sockdir]
    for port in ports:
        lines += ["", "[upstream 127.0.0.1:%d]" % port, "tls = intercept", "tls_ca_file = %s" % ca_file]
        lines += list(extra) + ["cache GET /custom* ttl=10m"]
    return write_rules(tmp, [], raw="\n".join(lines) + "\n", name="trust.conf")


class Fetcher(JsonLineProcess):
    NAME = "tlsfetch.py"

    def __init__(self, cafile, conf=None, sockdir=None):
        argv = [SYS_PY, TLSFETCH, "--cafile", cafile]
        if sockdir:
            argv += ["--stats-socket", "%s/%%p.sock" % sockdir]
        env = dict(SAN_ENV or {}, **({"HTTPSHIM_DEBUG": "1"} if os.environ.get("TRUST_DEBUG") else {}))
        JsonLineProcess.__init__(self, argv, client_env(conf is not None, conf, env))
        assert self.read().get("ready"), self.describe()

    def get(self, url, **settings):
        self.send(dict(settings, url=url))
        return self.read()

    def stats(self, port):
        self.send({"stats": True})
        return self.read()["stats"]["upstreams"]["127.0.0.1:%d" % port]


def outcome(r):
    """What the app saw, as comparable: 200, or the exception's type (and whether the
    certificate was refused)."""
    if "error" in r:
        kind = r["error"].split(":")[0]
        return (kind, "CERTIFICATE_VERIFY_FAILED" in r["error"])
    return r["status"]


@pytest.fixture
def pair(cas, tmp_path, sockdir):
    """(direct, shimmed) fetchers, made by the test with its rules, stopped after it."""
    made = []

    def make(conf):
        d = Fetcher(cas["app"].pem)
        s = Fetcher(cas["app"].pem, conf=conf, sockdir=sockdir)
        made.extend([d, s])
        return d, s
    yield make
    for f in made:
        f.stop()


def both_get(direct, shimmed, url, **settings):
    d, s = direct.get(url, **settings), shimmed.get(url, **settings)
    assert outcome(d) == outcome(s), ("direct", d, "shim", s, shimmed.describe())
    return outcome(s)


def test_a_verdict_for_one_port_is_not_used_for_another(cas, pair, tmp_path, tmp_path_factory, sockdir):
    """Port A has a valid certificate for 127.0.0.1, port B one for 127.0.0.2 from the same
    CA; both are intercepted. A first, then B: B fails with the app's own verification
    error, as direct, and B receives no request (before the fix its handshake was answered
    from A's verdict and the app saw RemoteDisconnected)."""
    good = Upstream(tmp_path_factory.mktemp("port-a"), tls=cas["app"].leaf(["127.0.0.1"], stem="a"))
    bad = Upstream(tmp_path_factory.mktemp("port-b"), tls=cas["app"].leaf(["127.0.0.2"], stem="b"))
    try:
        direct, shimmed = pair(conf_for(tmp_path, sockdir, [good.port, bad.port], cas["app"].pem))
        assert both_get(direct, shimmed, good.url("/custom/a?n=100")) == 200
        bad.reset()
        assert both_get(direct, shimmed, bad.url("/custom/b?n=100")) == ("URLError", True)
        assert bad.stats()["requests"] == 0, bad.stats()
        assert shimmed.stats(good.port)["tls_intercepted"] == 1
        assert shimmed.stats(bad.port)["tls_tunnel_unverified"] == 1
    finally:
        good.stop()
        bad.stop()


def test_same_name_on_two_ports_with_two_cas(cas, pair, tmp_path, tmp_path_factory, sockdir):
    """127.0.0.1 on port A (the app's CA) and on port B (another CA, which libcurl trusts
    too: the rule's tls_ca_file holds both). The app trusts only its own: B fails as direct,
    whichever is asked first, and B never sees a request (its credentials would have gone
    to a server the app refuses)."""
    good = Upstream(tmp_path_factory.mktemp("ca-a"), tls=cas["app"].leaf(["127.0.0.1"], stem="ca-a"))
    bad = Upstream(tmp_path_factory.mktemp("ca-b"), tls=cas["other"].leaf(["127.0.0.1"], stem="ca-b"))
    try:
        conf = conf_for(tmp_path, sockdir, [good.port, bad.port], bundle(tmp_path, cas["app"], cas["other"]))
        direct, shimmed = pair(conf)
        for i in range(2):
            assert both_get(direct, shimmed, good.url("/custom/a?n=100&i=%d" % i)) == 200
            assert both_get(direct, shimmed, bad.url("/custom/b?n=100&i=%d" % i)) == ("URLError", True)
        assert bad.stats()["requests"] == 0, bad.stats()
        assert good.stats()["requests"] == 4, good.stats()   # 2 direct, 2 through the shim
    finally:
        good.stop()
        bad.stop()


@pytest.mark.parametrize("who_refuses", ["app", "libcurl"])
def test_a_certificate_swapped_within_the_keep_window_gets_no_request(who_refuses, cas, pair, tmp_path,
                                                                      tmp_path_factory, sockdir):
    """The upstream is intercepted (its verdict kept), then restarted on the same port with
    a certificate the app would refuse: from another CA that libcurl trusts too ("app"), or
    that libcurl refuses as well ("libcurl"). The next request's upstream leg is a new
    connection that does not present what the app approved: the request is not sent, the
    app's connection fails as a server failing mid-connection would, and it is counted
    (tls_upstream_verify_failed). The kept verdict is dropped with it, so the request after
    fails exactly as direct (the app meets the real certificate)."""
    port_dir = tmp_path_factory.mktemp("swap")
    good = Upstream(port_dir / "good", tls=cas["app"].leaf(["127.0.0.1"], stem="swap-good"))
    port, bad = good.port, None
    try:
        cafile = bundle(tmp_path, cas["app"], cas["other"]) if who_refuses == "app" else cas["app"].pem
        direct, shimmed = pair(conf_for(tmp_path, sockdir, [port], cafile))
        assert both_get(direct, shimmed, good.url("/custom/s?n=100&i=1")) == 200
        assert shimmed.stats(port)["tls_intercepted"] == 1
        good.stop()
        bad = None
        for _ in range(50):            # the port is free again at once (SO_REUSEADDR); bounded
            try:
                bad = Upstream(port_dir / "bad", tls=cas["other"].leaf(["127.0.0.1"], stem="swap-bad"), port=port)
                break
            except RuntimeError:
                time.sleep(0.1)
        assert bad is not None and bad.port == port
        d = outcome(direct.get(bad.url("/custom/s?n=100&i=2")))
        s = outcome(shimmed.get(bad.url("/custom/s?n=100&i=2")))
        assert d == ("URLError", True)
        assert s not in (200, ("URLError", True)) and isinstance(s, tuple), (s, shimmed.describe())  # mid-connection
        assert bad.stats()["requests"] == 0, bad.stats()
        st = shimmed.stats(port)
        assert st["tls_upstream_verify_failed"] == 1, st
        assert both_get(direct, shimmed, bad.url("/custom/s?n=100&i=3")) == ("URLError", True)
        assert bad.stats()["requests"] == 0, bad.stats()
        assert shimmed.stats(port)["tls_tunnel_unverified"] == 1
    finally:
        good.stop()
        if bad:
            bad.stop()


def test_a_background_refresh_of_an_intercepted_entry_is_https(cas, pair, tmp_path, tmp_path_factory, sockdir):
    """An intercepted entry past its TTL is served stale and refreshed in the background:
    the refresh is an HTTPS request held to the same approval, never the plaintext request
    sent to the TLS port (before the fix it was: the upstream saw a failed handshake)."""
    up = Upstream(tmp_path_factory.mktemp("refresh"), tls=cas["app"].leaf(["127.0.0.1"], stem="refresh"))
    try:
        lines = ["[global]", "upstream_timeout = 5s", "stats_socket = %s/%%p.sock" % sockdir, "",
                 "[upstream 127.0.0.1:%d]" % up.port, "tls = intercept", "tls_ca_file = %s" % cas["app"].pem,
                 "cache GET /custom* ttl=1s stale_while_revalidate=30s"]
        conf = write_rules(tmp_path, [], raw="\n".join(lines) + "\n", name="refresh.conf")
        shimmed = Fetcher(cas["app"].pem, conf=conf, sockdir=sockdir)
        try:
            url = up.url("/custom/r?n=100")
            assert outcome(shimmed.get(url)) == 200
            time.sleep(1.3)
            assert outcome(shimmed.get(url)) == 200     # stale, at once; refreshed behind it
            for _ in range(100):                        # bounded: 5 s
                if up.stats()["requests"] >= 2:
                    break
                time.sleep(0.05)
            st = up.stats()
            assert st["requests"] == 2 and st["handshake_failures"] == 0, st
            assert shimmed.stats(up.port)["refreshes"] == 1
        finally:
            shimmed.stop()
    finally:
        up.stop()



def test_curl_fails_natively_on_the_second_port(cas, tmp_path, tmp_path_factory, sockdir):
    """The two-port case with curl, one process, A then B: exit 60 and the same output with
    and without the shim, and B receives no request. (Perl's IO::Socket::SSL verifies
    through a callback of its own, so its connections are never intercepted.)"""
    good = Upstream(tmp_path_factory.mktemp("cl-a"), tls=cas["app"].leaf(["127.0.0.1"], stem="cl-a"))
    bad = Upstream(tmp_path_factory.mktemp("cl-b"), tls=cas["app"].leaf(["127.0.0.2"], stem="cl-b"))
    try:
        conf = conf_for(tmp_path, sockdir, [good.port, bad.port], cas["app"].pem)
        cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\n", "--cacert", cas["app"].pem,
               good.url("/custom/c?n=50"), bad.url("/custom/c?n=50")]
        direct = run(cmd, shim=False)
        bad.reset()
        shimmed = run(cmd, conf=conf)
        assert (direct.rc, direct.out) == (shimmed.rc, shimmed.out), (direct.describe(), shimmed.describe())
        assert direct.rc == 60 and direct.out.split() == [b"200", b"000"], direct.describe()
        assert bad.stats()["requests"] == 0, bad.stats()
    finally:
        good.stop()
        bad.stop()


@pytest.mark.skipif(not shutil.which("javac") or not shutil.which("keytool"), reason="no JDK")
def test_the_jdks_own_tls_is_tunnelled_and_fails_natively(cas, tmp_path, tmp_path_factory, sockdir):
    """The JDK speaks TLS itself (JSSE, not OpenSSL) and trusts its own store: the shim
    cannot add its CA there nor mark the ClientHello, so an intercepting upstream is
    tunnelled to the JVM. The two-port case, A then B, in one JVM, with HttpClient then
    HttpURLConnection: the same statuses and the same SSLHandshakeException as direct, and
    B receives no request."""
    good = Upstream(tmp_path_factory.mktemp("jv-a"), tls=cas["app"].leaf(["127.0.0.1"], stem="jv-a"))
    bad = Upstream(tmp_path_factory.mktemp("jv-b"), tls=cas["app"].leaf(["127.0.0.2"], stem="jv-b"))
    try:
        store = tmp_path / "truststore.p12"
        r = run(["keytool", "-importcert", "-noprompt", "-alias", "app", "-file", cas["app"].pem, "-keystore",
                 store, "-storetype", "PKCS12", "-storepass", "changeit"], shim=False)
        assert r.rc == 0, r.describe()
        conf = conf_for(tmp_path, sockdir, [good.port, bad.port], cas["app"].pem)
        cmd = java_fetch("java-httpclient", "--then-urlconnection", good.url("/custom/j?n=50"), bad.url("/custom/j?n=50"))
        cmd[1:1] = ["-Djavax.net.ssl.trustStore=%s" % store, "-Djavax.net.ssl.trustStorePassword=changeit"]
        direct = run(cmd, shim=False, timeout=120)
        good.reset()
        bad.reset()
        shimmed = run(cmd, conf=conf, timeout=120)
        seen = [[(x["status"], x["sha256"], x["error"]) for x in jlines(p.out)] for p in (direct, shimmed)]
        assert seen[0] == seen[1], (direct.describe(), shimmed.describe())
        assert [s for s, _, _ in seen[0]] == [200, 0, 200, 0], seen
        assert all("SSLHandshakeException" in seen[0][i][2] for i in (1, 3)), seen
        assert good.stats()["requests"] == 2 and bad.stats()["requests"] == 0, (good.summary(), bad.summary())
    finally:
        good.stop()
        bad.stop()


# Checks the app's own connection makes and libcurl's does not (issue 21's rule: intercept
# only what the app is proven to accept): what the app's context and connection set on
# their verification (a security level, strict X.509, no common-name fallback) and what
# its ClientHello offers (a protocol floor, forward-secret suites only), and an upstream
# that asks for a client certificate the app does not have. Each: (leaf options, upstream
# options, the app's settings, the host name to ask for). The app fails as it does direct,
# the upstream never sees a request, and the connection is tunnelled (before, libcurl's
# leg carried the request and the app got a 200).
REFUSED = {
    "security-level-3-and-an-rsa-2048-leaf": ({"rsa_bits": 2048}, [], {"ciphers": "DEFAULT:@SECLEVEL=3"}, "127.0.0.1"),
    "strict-x509-and-no-authority-key-id": ({"key_id": False}, [], {"strict": True}, "127.0.0.1"),
    "no-common-name-fallback": ({"san": False}, [], {"no_cn": True}, "localhost"),
    "a-tls-1.3-floor-and-a-tls-1.2-upstream": ({}, ["--tls-max-version", "1.2"], {"min_tls": "1.3"}, "127.0.0.1"),
    "forward-secrecy-and-an-rsa-key-exchange": ({"rsa_bits": 2048},
                                                ["--tls-max-version", "1.2", "--tls-ciphers", "AES128-SHA"],
                                                {"ciphers": "ECDHE+AESGCM"}, "127.0.0.1"),
    "a-client-certificate-the-app-does-not-have": ({}, ["--tls-client-ca", "CA"], {}, "127.0.0.1"),
}


def test_what_the_apps_own_connection_refuses_is_tunnelled(cas, pair, tmp_path, tmp_path_factory, sockdir):
    """Every case of REFUSED, each against an upstream of its own, from one direct and one
    shimmed process (one rules file names them all: upstreams by address and one by name,
    so that the process's CA is constrained to both kinds; an address's leaf whose common
    name was the address failed OpenSSL's name-constraint check then, and the app saw
    "permitted subtree violation" where direct it succeeded)."""
    ups = {}
    try:
        blocks = ["[global]", "upstream_timeout = 5s", "stats_socket = %s/%%p.sock" % sockdir]
        for case, (leaf_opts, up_args, settings, host) in sorted(REFUSED.items()):
            chain = cas["app"].leaf([host], stem=case, **leaf_opts)
            args = [cas["app"].pem if a == "CA" else a for a in up_args]
            ups[case] = Upstream(tmp_path_factory.mktemp("refused"), tls=chain, tls_args=args)
            blocks += ["", "[upstream %s:%d]" % (host, ups[case].port), "tls = intercept",
                       "tls_ca_file = %s" % cas["app"].pem, "cache GET /custom* ttl=10m"]
        direct, shimmed = pair(write_rules(tmp_path, [], raw="\n".join(blocks) + "\n", name="refused.conf"))
        for case, (leaf_opts, up_args, settings, host) in sorted(REFUSED.items()):
            up = ups[case]
            url = "https://%s:%d/custom/secret?n=100" % (host, up.port)
            d, s = direct.get(url, **settings), shimmed.get(url, **settings)
            assert "error" in d and "error" in s, (case, "direct", d, "shim", s, shimmed.describe())
            if "client-certificate" not in case:   # (direct's own error there depends on timing)
                assert outcome(d) == outcome(s), (case, "direct", d, "shim", s, shimmed.describe())
            assert up.stats()["requests"] == 0, (case, up.stats())
            shimmed.send({"stats": True})
            st = shimmed.read()["stats"]["upstreams"]["%s:%d" % (host, up.port)]
            assert st["tls_intercepted"] == 0 and st["tls_tunnel_unverified"] == 1, (case, st)
            # the same connection without the stricter setting is intercepted: the refusal was the setting's
            if case in ("strict-x509-and-no-authority-key-id", "a-tls-1.3-floor-and-a-tls-1.2-upstream"):
                assert both_get(direct, shimmed, url + "&plain=1") == 200, case
                assert up.stats()["requests"] == 2, (case, up.stats())
    finally:
        for up in ups.values():
            up.stop()


def test_an_app_that_accepts_only_rsa_suites_is_tunnelled_and_served(cas, pair, tmp_path, tmp_path_factory, sockdir):
    """The shim's own leaf is ECDSA P-256: an app that offers only RSA-signed TLS 1.2 suites
    could never complete a handshake with it (it used to get an EOF); it is tunnelled and
    talks to the upstream as direct."""
    up = Upstream(tmp_path_factory.mktemp("rsa-only"), tls=cas["app"].leaf(["127.0.0.1"], stem="rsa", rsa_bits=2048))
    try:
        direct, shimmed = pair(conf_for(tmp_path, sockdir, [up.port], cas["app"].pem))
        settings = {"max_tls": "1.2", "ciphers": "ECDHE-RSA-AES128-GCM-SHA256"}
        assert both_get(direct, shimmed, up.url("/custom/rsa?n=100"), **settings) == 200
        st = shimmed.stats(up.port)
        assert st["tls_intercepted"] == 0 and st["tls_tunnel_unverified"] == 1, st
    finally:
        up.stop()


def test_a_chain_longer_than_the_apps_depth_is_tunnelled(cas, tmp_path, tmp_path_factory, sockdir):
    """An OpenSSL client that allows no chain beyond the leaf (SSL_CTX_set_verify_depth 0)
    against a leaf issued by an intermediate: its handshake fails as direct, and the server
    gets no request; the same client without the limit is intercepted."""
    inter = CA(tmp_path_factory.mktemp("inter"), name="an intermediate", parent=cas["app"])
    up = Upstream(tmp_path_factory.mktemp("deep"), tls=inter.leaf(["localhost"], stem="deep"))
    try:
        conf = write_rules(tmp_path, [], raw="[upstream localhost:%d]\ntls = intercept\ntls_ca_file = %s\n"
                           "cache GET /custom* ttl=10m\n" % (up.port, cas["app"].pem), name="deep.conf")
        client = str(BUILD / "tlsstoreclient")
        for args, want in ((["--depth0"], "error handshake"), ([], "200 100")):
            argv = [client] + args + ["localhost", str(up.port), str(cas["app"].pem), "/custom/d?n=100"]
            d, s = run(argv, shim=False), run(argv, conf=conf, env={"HTTPSHIM_DEBUG": "1"})
            assert d.out.decode().strip() == s.out.decode().strip() == want, (args, d.out, s.out, s.err[-3000:])
            if args:
                assert up.stats()["requests"] == 0, up.stats()
                assert "does not verify as the app would" in s.err.decode(), s.err[-3000:]
            else:
                assert "TLS from the app for localhost terminated" in s.err.decode(), s.err[-3000:]
    finally:
        up.stop()


def test_an_app_that_offers_only_what_the_front_lacks_is_tunnelled(cas, tmp_path, tmp_path_factory, sockdir):
    """curl offering only TLS 1.3's CCM suite, which neither the shim's front nor this
    upstream speaks: tunnelled (the shim's front would have failed the handshake with an
    error of its own), so curl meets the upstream's own refusal, as direct."""
    up = Upstream(tmp_path_factory.mktemp("ccm"), tls=cas["app"].leaf(["127.0.0.1"], stem="ccm"))
    try:
        conf = conf_for(tmp_path, sockdir, [up.port], cas["app"].pem)
        argv = ["curl", "-sS", "-o", "/dev/null", "--cacert", cas["app"].pem, "--tlsv1.3", "--tls13-ciphers",
                "TLS_AES_128_CCM_SHA256", up.url("/custom/ccm?n=10")]
        d, s = run(argv, shim=False), run(argv, conf=conf, env={"HTTPSHIM_DEBUG": "1"})
        assert d.rc == s.rc == 35, (d.describe(), s.describe())
        assert "an offer the shim's leaf cannot answer" in s.err.decode(), s.describe()
        assert up.stats()["requests"] == 0
    finally:
        up.stop()
