"""Units on their own: build/loop_test checks shim/loop.c (timer order, cancel and re-arm,
removed sources inside a batch, deferred frees, loop_move, 0 ms timer starvation, a
large heap, and wake-ups asked for from another thread never lost); build/resp_test shim/resp.c's bounds on their edges and shim/redis_slot.c's
slots against the cluster specification's examples."""
import re
import subprocess

from conftest import BUILD, require_build


def run_unit(name, checks):
    binary = BUILD / name
    require_build(binary)
    p = subprocess.run([str(binary)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, out
    assert re.search(r"^%d passed, 0 failed$" % checks, out, re.M), out


def test_loop_unit():
    run_unit("loop_test", 11)


def test_resp_bounds_unit():
    run_unit("resp_test", 10)
