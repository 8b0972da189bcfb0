"""The fuzz harnesses' committed corpora, replayed without libFuzzer (no clang needed).

Each target tests/fuzz/<name>.c with a corpus directory tests/fuzz/corpus/<name>/ is built
as BUILD/fuzz-replay/<name> (the harness plus tests/fuzz/replay_main.c, with the normal
compiler and, under `make test-asan`, the sanitizers) and run on every file of its corpus:
every invariant the harness checks must hold, and nothing may leak (LSan, test-asan)."""
import os
import re
import subprocess

import pytest

from conftest import BUILD, PRELOAD, ROOT

FUZZ = ROOT / "tests" / "fuzz"
TARGETS = sorted(p.stem for p in FUZZ.glob("fuzz_*.c") if (FUZZ / "corpus" / p.stem).is_dir())
_BUILT = {}


def _build():
    """`make fuzz-replay-bins` once per session (`all` builds them too; this catches a
    stale or missing binary). Returns (rc, output)."""
    if "rc" not in _BUILT:
        p = subprocess.run(["make", "-C", str(ROOT), "BUILD=%s" % BUILD, "fuzz-replay-bins"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
        _BUILT["rc"], _BUILT["out"] = p.returncode, p.stdout.decode(errors="replace")
    return _BUILT["rc"], _BUILT["out"]


def _sanitizer_env():
    """Sanitizer reports on stderr (so the failure shows them) instead of test-asan's
    log files; every other option is kept."""
    env = dict(os.environ)
    for var in ("ASAN_OPTIONS", "UBSAN_OPTIONS"):
        if var in env:
            env[var] = ":".join(o for o in env[var].split(":") if o and not o.startswith("log_path="))
    return env


def test_every_target_has_a_corpus():
    assert TARGETS, "no tests/fuzz/fuzz_*.c with a tests/fuzz/corpus/<name>/ directory"
    for name in TARGETS:
        files = [f for f in (FUZZ / "corpus" / name).iterdir() if f.is_file() and not f.name.startswith(".")]
        assert files, "tests/fuzz/corpus/%s/ is empty" % name


@pytest.mark.parametrize("name", TARGETS)
def test_corpus_replays(name):
    rc, out = _build()
    assert rc == 0, "make fuzz-replay-bins failed:\n" + out[-6000:]
    binary = BUILD / "fuzz-replay" / name
    corpus = FUZZ / "corpus" / name
    files = sorted(f for f in corpus.iterdir() if f.is_file() and not f.name.startswith("."))
    p = subprocess.run([str(binary), "-v", str(corpus)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=_sanitizer_env(), timeout=300)
    out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    # with -v the last path on stderr is the input that failed
    detail = "%s %s: rc=%s\nstdout:\n%s\nstderr:\n%s" % (binary, corpus, p.returncode, out, err[-8000:])
    assert p.returncode == 0, detail
    m = re.search(r"^replay: (\d+) inputs ran( \(asan\))?$", out, re.M)
    assert m, detail
    assert int(m.group(1)) == len(files), "ran %s of %d files\n%s" % (m.group(1), len(files), detail)
    if "libasan" in PRELOAD:
        # make test-asan: the replay must be the sanitizer build, not a plain leftover
        assert m.group(2), "%s was not built with ASan (is it in `all`?)\n%s" % (binary, detail)
