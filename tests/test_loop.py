"""Units on their own: build/loop_test checks shim/loop.c (timer order, cancel and re-arm,
removed sources inside a batch, deferred frees, loop_move, 0 ms timer starvation, a
large heap, wake-ups asked for from another thread never lost, and the gate's look-only
hold that never takes the engine's gate); build/pool_test shim/pool.c's probe slot (taken by
a cold upstream's first connect, never by one to a proven address, not even for an
instant another thread could see); build/resp_test
shim/resp.c's bounds on their edges and shim/redis_slot.c's slots against the cluster
specification's examples. And the loop's busy polling in a real shimmed process."""
import os
import re
import subprocess

from conftest import BUILD, SYS_PY, jlines, pyclient, require_build, run, write_rules


def run_unit(name, checks):
    binary = BUILD / name
    require_build(binary)
    p = subprocess.run([str(binary)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, out
    assert re.search(r"^%d passed, 0 failed$" % checks, out, re.M), out


def test_loop_unit():
    run_unit("loop_test", 12)


def test_pool_probe_slot_unit():
    run_unit("pool_test", 14)


def test_resp_bounds_unit():
    run_unit("resp_test", 11)


def test_busy_polling_spares_sleeps_and_stops_when_quiet(upstream, tmp_path, sockdir):
    """200 GETs one after another on a kept-alive connection, all through the engine: with
    `busy_poll` and CPUs to spare the engine polls between the close-together events
    instead of sleeping (its voluntary context switches, one per sleep in epoll_wait, fall
    to under half of what they are with `busy_poll = off`); with the CPUs under pressure
    (another task waiting for one 50 % of the time, as /proc/pressure/cpu would say) it
    sleeps, as with `busy_poll = off`; and once the traffic stops it stops polling (under
    50 ms of CPU in the quiet second after, where a loop that kept polling would use the
    whole second). The process's /stats count the engine's polls, those that paid and the
    time they took, and none where it did not poll. The pressure is a file of the test's own (HTTPSHIM_TEST_CPU_PRESSURE),
    so that the load of the machine running the suite does not decide; the window is the
    largest allowed, 1 ms, so that a slow shared machine's upstream still answers in it."""
    calm, busy = tmp_path / "calm", tmp_path / "busy"
    calm.write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    busy.write_text("some avg10=50.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    sanitized = bool(os.environ.get("HTTPSHIM_TEST_PRELOAD"))

    def measure():
        got = {}
        for name, poll, pressure in (("polling", "1ms", calm), ("pressed", "1ms", busy), ("off", "off", calm)):
            conf = write_rules(tmp_path, [upstream.port], name="%s.conf" % name,
                               extra_global="busy_poll = %s\nstats_socket = %s/%%p.sock" % (poll, sockdir))
            r = run([SYS_PY, pyclient("pollprobe.py"), upstream.port, 200, "%s/%%p.sock" % sockdir], conf=conf,
                    timeout=60, env={"HTTPSHIM_TEST_CPU_PRESSURE": str(pressure)})
            assert r.rc == 0, r.describe()
            got[name] = jlines(r.out)[0]
            assert "error" not in got[name], (got, r.describe())
        return got

    def polling_spared(got):
        # (under the sanitizer runtime, two to three times slower, an upstream answer can miss
        # the 1 ms window: a polling engine slept 55 times to the others' 58 and 54 once in CI;
        # what polling saves is measured by the plain run, the sanitized one checks the rest)
        return sanitized or (got["polling"]["sleeps"] * 2 < min(got["off"]["sleeps"], got["pressed"]["sleeps"])
                             and got["polling"]["engine"]["polls_paid"] >= 100)

    # (a measurement of the machine as much as of the engine: with the suite's six workers on
    # two CPUs the polling run's answers missed the window 76 times to the pressed run's 111
    # once; it is measured again, up to three times, and one clear run is enough)
    for attempt in range(3):
        got = measure()
        if polling_spared(got):
            break
    # (fewer than one per request on a loaded machine, where events wait queued: how many
    # varies from one run to the next, so each sleeping run is held to the polling one,
    # which sleeps 0 to 2 times)
    # (400 each alone; 42 seen with the suite's four workers on two CPUs; 16 under the
    # sanitizers in a fresh-clone CI run and 19 in a plain run beside a stress, each
    # wake-up finding a dozen events queued: that they did not poll is said by their polls,
    # none, asserted below, and what polling spares by polling_spared's comparison)
    assert got["off"]["sleeps"] >= 5 and got["pressed"]["sleeps"] >= 5, got
    assert polling_spared(got), got
    assert all(g["quiet_cpu_ms"] <= 50 for g in got.values()), got
    eng = {k: g["engine"] for k, g in got.items()}
    assert eng["polling"]["busy_poll_us"] == 1000 and eng["off"]["busy_poll_us"] == 0, eng
    assert sanitized or eng["polling"]["poll_seconds"] > 0, eng
    assert eng["polling"]["polls_paid"] <= eng["polling"]["polls"], eng
    assert all(eng[k]["polls"] == 0 and eng[k]["poll_seconds"] == 0 for k in ("pressed", "off")), eng
    assert all(e["sleeps"] > 0 for e in eng.values()), eng
