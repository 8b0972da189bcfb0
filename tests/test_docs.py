"""The documentation names what the code does (curl's test 1139 pattern): every [global]
key of rules.conf, from the one table in shim/rules.c that defaults and reads them
(`httpshim check --defaults`), appears in the README's table with its default and in the
man page as `.B key = default`; and no key is documented that the code does not know."""
import re

from conftest import BUILD, ROOT, require_build, run

HTTPSHIM = BUILD / "httpshim"


def code_keys():
    require_build(HTTPSHIM)
    r = run([HTTPSHIM, "check", "--defaults"], shim=False)
    assert r.rc == 0, r.describe()
    keys = {}
    for line in r.out.decode().splitlines():
        name, default = line.split(None, 1)
        keys[name] = default.strip()
    assert len(keys) >= 15, keys
    return keys


def readme_rows():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| `[global]` key | default | meaning |"):]
    table = table[:table.index("\n\n")]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1].strip("`")
    return rows


def man_entries():
    text = (ROOT / "docs" / "httpshim.1").read_text()
    section = text[text.index(".SS [global] settings"):]
    section = section[:section.index(".SS ", 4)]
    return dict(re.findall(r"^\.B ([a-z_]+) = (.+)$", section, flags=re.M))


def test_readme_names_every_global_key_with_its_default():
    keys, rows = code_keys(), readme_rows()
    missing = [k for k in keys if k not in rows]
    assert not missing, "README's [global] table lacks %s" % missing
    wrong = {k: (rows[k], d) for k, d in keys.items() if rows[k] != d}
    assert not wrong, "README's defaults differ from the code's (README, code): %s" % wrong
    unknown = [k for k in rows if k not in keys]
    assert not unknown, "README documents keys the code does not know: %s" % unknown


def test_man_page_names_every_global_key_with_its_default():
    keys, entries = code_keys(), man_entries()
    missing = [k for k in keys if k not in entries]
    assert not missing, "the man page's [global] settings lack %s" % missing
    # a key without a default is shown with what it takes (redis_secret_file = PATH)
    # (and only that: a placeholder in capitals, never a value the reader would take for one)
    wrong = {k: (entries[k], d) for k, d in keys.items()
             if entries[k] != d and not (d == "none" and re.fullmatch(r"[A-Z]+", entries[k]))}
    assert not wrong, "the man page's defaults differ from the code's (man, code): %s" % wrong
    unknown = [k for k in entries if k not in keys]
    assert not unknown, "the man page documents keys the code does not know: %s" % unknown


def test_every_default_is_a_value_the_parser_takes(tmp_path):
    """The defaults, written into a file, parse: the table's defaults are real values."""
    keys = code_keys()
    conf = tmp_path / "defaults.conf"
    conf.write_text("[global]\n" + "".join("%s = %s\n" % (k, d) for k, d in keys.items() if d != "none"))
    r = run([HTTPSHIM, "check", conf], shim=False)
    assert r.rc == 0, r.describe()


def test_readme_layout_names_every_library_file():
    """The README's layer picture names every file of the library (three were left out of
    it while they were written: an acceptance pass found them)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Layout")
    block = text[text.index("```", start):text.index("```", text.index("```", start) + 3)]
    named = set(re.findall(r"\b([a-z_0-9]+\.c)\b", block))
    files = {p.name for p in (ROOT / "shim").glob("*.c")}
    assert files - named == set(), "the README's layout lacks %s" % sorted(files - named)
    assert named - files == set(), "the README's layout names files that are gone: %s" % sorted(named - files)
