"""An upstream that accepts and then stays silent: the shim gives up after upstream_timeout
and closes the app's connection (the app sees a failed request), and the pooled upstream
path keeps working for the next request. Bounds are generous: the point is "never hangs"."""
import time

from conftest import SYS_PY, run, write_rules


SILENT = """
import sys, time, urllib.request
start = time.monotonic()
try:
    urllib.request.urlopen(sys.argv[1], timeout=60).read()
    print("answered")
except Exception as e:
    print("failed", type(e).__name__, getattr(e, "code", ""))
print("elapsed %.2f" % (time.monotonic() - start))
print(urllib.request.urlopen(sys.argv[2], timeout=60).read().decode()[:20])
"""


def test_silent_upstream_times_out_then_pool_recovers(upstream, tmp_path):
    conf = write_rules(tmp_path, [upstream.port], timeout="1s")
    r = run([SYS_PY, "-c", SILENT, upstream.url("/delay/8000/bytes/10"), upstream.url("/status/200")],
            shim=True, conf=conf, timeout=60)
    assert r.rc == 0, r.describe()
    lines = r.out.decode().splitlines()
    # a gateway's answer, not an end of file a client may take for a dropped kept-alive
    # connection and answer by sending the request again
    assert lines[0] == "failed HTTPError 504", r.describe()
    assert len([e for e in upstream.stats()["log"] if "/delay/8000/" in (e.get("target") or "")]) == 1
    elapsed = float(lines[1].split()[1])
    assert elapsed < 6.0, "gave up after %.2fs; upstream_timeout is 1s" % elapsed
    # the same silent request without the shim waits the full delay and is answered
    start = time.monotonic()
    d = run([SYS_PY, "-c", SILENT, upstream.url("/delay/2000/bytes/10"), upstream.url("/status/200")],
            shim=False, timeout=60)
    assert d.out.decode().startswith("answered") and time.monotonic() - start >= 2.0, d.describe()
    assert lines[2].startswith("status 200"), r.describe()   # the pool still serves


def test_a_request_with_a_body_to_a_silent_upstream_gets_its_504_on_time(upstream, tmp_path):
    """POST with a body, upstream silent: the 504 comes upstream_timeout (1 s) after the
    last byte, as for a GET. libcurl's low-speed check, which measured the silence, counts
    what was sent in its 5 s average: the 504 came 6 s late (found by an adversarial pass)."""
    conf = write_rules(tmp_path, [upstream.port], timeout="1s")
    t0 = time.monotonic()
    r = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-d", "payload",
             upstream.url("/delay/8000/bytes/10")], conf=conf, timeout=30)
    took = time.monotonic() - t0
    assert r.rc == 0 and r.out == b"504", r.describe()
    assert took < 3.5, "the 504 came after %.1f s; upstream_timeout is 1 s" % took
    assert len([e for e in upstream.stats()["log"] if e.get("method") == "POST"]) == 1

