"""A first `make` on a machine without the build's packages (issue 21, item 2): it stops
before compiling anything, with one line naming the missing Debian packages and the
command that installs them; `make` builds the library and the CLI only, never what only
the tests need."""
import os
import subprocess

import pytest

from conftest import ROOT


def make(build_dir, *args, env=None, prefix=()):
    e = dict(os.environ, **(env or {}))
    p = subprocess.run(list(prefix) + ["make", "-C", str(ROOT), "BUILD=%s" % build_dir] + list(args),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=e, timeout=300)
    return p.returncode, p.stdout.decode(errors="replace")


def one_clear_line(out, packages):
    lines = [ln for ln in out.splitlines() if ln.startswith("httpshim: cannot build")]
    assert len(lines) == 1, out
    for pkg in packages:
        assert pkg in lines[0], (pkg, lines[0])
    assert "tools/install-deps" in lines[0] and "apt-get install" in lines[0], lines[0]
    assert " -c shim/" not in out and "-o " not in out, "compiled before it stopped:\n" + out


def test_missing_headers_are_named_before_anything_compiles(tmp_path):
    """A compiler that finds neither uthash.h nor jansson.h (a wrapper around cc that fails
    to preprocess them, as a machine without uthash-dev and libjansson-dev does)."""
    cc = tmp_path / "cc-without"
    cc.write_text("#!/bin/sh\n"
                  "input=$(cat)\n"
                  "case \"$input\" in *uthash.h*|*jansson.h*) exit 1;; esac\n"
                  "printf '%s\\n' \"$input\" | exec cc \"$@\"\n")
    cc.chmod(0o755)
    rc, out = make(tmp_path / "build", "CC=%s" % cc)
    assert rc != 0, out
    one_clear_line(out, ["uthash-dev", "libjansson-dev"])
    assert "libhiredis-dev" not in out and "libcurl4-openssl-dev" not in out, out


def test_a_header_directory_really_missing(tmp_path):
    """The hiredis headers are really gone (an empty directory mounted over them in a mount
    namespace of the test's own): the plain `make` names libhiredis-dev."""
    probe = subprocess.run(["unshare", "-m", "true"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if probe.returncode != 0 or not os.path.isdir("/usr/include/hiredis"):
        pytest.skip("no mount namespace here (or no hiredis headers to hide)")
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out = make(tmp_path / "build", prefix=["unshare", "-m", "sh", "-c",
                                               'mount --bind "$0" /usr/include/hiredis && exec "$@"', str(empty)])
    assert rc != 0, out
    one_clear_line(out, ["libhiredis-dev"])


def test_make_builds_the_library_and_the_cli_only(tmp_path):
    """What `make` would run (make -n): the library and the CLI, none of the test clients,
    fuzz-replay binaries or benchmark programs."""
    rc, out = make(tmp_path / "build", "-n")
    assert rc == 0, out
    assert "libhttpshim.so" in out and "/httpshim " in out, out
    for test_only in ("epollclient", "tlsstoreclient", "renegserver", "sockstate", "closerace", "forkrace", "sigclient", "loop_test", "resp_test", "fuzz-replay", "delayline", "fanin"):
        assert test_only not in out, (test_only, out)
