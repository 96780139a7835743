"""The FreeBSD port (Makefile, pkg-descr, pkg-plist, files/), checked on Linux.

What portlint and the Porter's Handbook check, as far as it can be done without a ports tree
(docs: shared/docs/freebsd-port.md): the order of the Makefile's variables per section,
USES before USE_*, tab after the assignment operator, one .include at the end; the port's
names and versions agree with pyproject.toml and hast.__version__; every USE_RC_SUBR and
SUB_FILES entry has its files/X.in and every placeholder is substituted; dependencies are
written the ports way with the same floors as pyproject.toml; pkg-descr's limits; every
pkg-plist entry comes from a file of this tree that post-install installs; the sample
configurations parse.  BSD make itself (Debian package bmake) parses the Makefile against a
stand-in bsd.port.mk and expands the port's install command.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

import hast
from hast import config, settings

REPO = Path(__file__).resolve().parents[1]
MAKEFILE = REPO / "Makefile"
FILES = REPO / "files"

# Porter's Handbook order, as freebsd-port.md lists it: each tuple is one block of the
# Makefile (blocks are separated by blank lines), variables in this order, none missing
# except where OPTIONAL says so.
SECTIONS = (
    ("PORTNAME", "DISTVERSION", "CATEGORIES", "MASTER_SITES", "PKGNAMEPREFIX"),
    ("MAINTAINER", "COMMENT", "WWW"),
    ("LICENSE", "LICENSE_FILE"),
    ("BUILD_DEPENDS", "LIB_DEPENDS", "RUN_DEPENDS", "TEST_DEPENDS"),
    ("USES", "USE_PYTHON", "USE_RC_SUBR"),
    ("SUB_FILES", "SUB_LIST"),
    ("TEST_ENV", "TEST_WRKSRC"),
)
OPTIONAL = {"LIB_DEPENDS"}
# Placeholders bsd.port.mk substitutes in SUB_FILES/USE_RC_SUBR without help from SUB_LIST.
FRAMEWORK_SUB = {"PREFIX", "LOCALBASE", "DATADIR", "DOCSDIR", "EXAMPLESDIR", "WWWDIR",
                 "ETCDIR"}


@dataclass
class Assignment:
    name: str
    op: str
    value: str
    lineno: int
    raw: str


@dataclass
class Makefile:
    assignments: list[Assignment]
    blocks: list[list[str]]          # variable names, per blank-line separated block
    targets: dict[str, list[str]]    # target -> recipe lines (without the leading tab)
    lines: list[str]

    def get(self, name: str) -> str:
        found = [a for a in self.assignments if a.name == name]
        assert found, f"{name} is not set in the Makefile"
        return " ".join(a.value for a in found)

    def words(self, name: str) -> list[str]:
        return self.get(name).split()


_ASSIGN = re.compile(r"^([A-Z_][A-Z0-9_]*)([+?:!]?=)(.*)$")


def parse_makefile(path: Path = MAKEFILE) -> Makefile:
    lines = path.read_text(encoding="ascii").splitlines()
    assignments: list[Assignment] = []
    blocks: list[list[str]] = [[]]
    targets: dict[str, list[str]] = {}
    current_target: str | None = None
    ii = 0
    while ii < len(lines):
        start = ii
        line = lines[ii]
        while line.endswith("\\"):
            ii += 1
            line = line[:-1].rstrip() + " " + lines[ii].strip()
        ii += 1
        if not line.strip() or line.startswith("#"):
            if blocks[-1] and not line.strip():
                blocks.append([])
            if not line.strip():
                current_target = None
            continue
        if line.startswith("\t") and current_target is not None:
            targets[current_target].append(line[1:])
            continue
        m = _ASSIGN.match(line)
        if m:
            assignments.append(Assignment(m.group(1), m.group(2), m.group(3).strip(),
                                          start + 1, lines[start]))
            blocks[-1].append(m.group(1))
            continue
        t = re.match(r"^([a-z][a-z0-9-]*):\s*$", line)
        if t:
            current_target = t.group(1)
            targets[current_target] = []
            continue
        assert line.startswith("."), f"Makefile:{start + 1}: cannot read {line!r}"
    return Makefile(assignments, [b for b in blocks if b], targets, lines)


MK = parse_makefile()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is required (Debian package {package})")
    return path


# -- Makefile layout -----------------------------------------------------------------------

def test_sections_in_handbook_order() -> None:
    known = {name for section in SECTIONS for name in section}
    blocks = [b for b in MK.blocks if known & set(b)]
    names = {a.name for a in MK.assignments}
    expected = [[n for n in section if n in names or n not in OPTIONAL] for section in SECTIONS]
    got = [[n for n in b if n in known] for b in blocks]
    assert got[:len(expected)] == expected, f"Makefile blocks: {got}"
    # the standard blocks come first, before any variable of the port's own
    first_blocks = MK.blocks[:len(SECTIONS)]
    assert all(set(b) <= known for b in first_blocks), first_blocks


def test_uses_before_use_star() -> None:
    order = [a.name for a in MK.assignments]
    uses = order.index("USES")
    use_star = [i for i, n in enumerate(order) if n.startswith("USE_")]
    assert use_star and uses < min(use_star)


def test_assignment_style() -> None:
    for a in MK.assignments:
        after = a.raw.split(a.op, 1)[1]
        assert after.startswith("\t"), f"Makefile:{a.lineno}: a tab must follow {a.op}"
        assert after.lstrip("\t") == after.lstrip(), f"Makefile:{a.lineno}: blanks after tab"
    for no, line in enumerate(MK.lines, 1):
        assert line == line.rstrip(), f"Makefile:{no}: trailing blanks"
    names = [a.name for a in MK.assignments]
    assert len(names) == len(set(names)) or all(
        a.op == "+=" for a in MK.assignments if names.count(a.name) > 1)
    for obsolete in ("PORTREVISION", "PORTEPOCH", "PORTVERSION"):
        assert obsolete not in names
    assert "$FreeBSD$" not in MAKEFILE.read_text()
    content = [ln for ln in MK.lines if ln.strip()]
    assert content[-1] == ".include <bsd.port.mk>"
    assert sum(ln.startswith(".include") for ln in MK.lines) == 1


def test_names_and_version_match_the_distribution() -> None:
    assert MK.get("PORTNAME") == PYPROJECT["project"]["name"] == "hast"
    assert MK.get("DISTVERSION") == hast.__version__
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hast.__version__"}
    assert MK.get("PKGNAMEPREFIX") == "py-"
    assert MK.get("MASTER_SITES") == "PYPI"
    assert MK.words("CATEGORIES")[0] == "sysutils" and "python" in MK.words("CATEGORIES")


def test_header_fields() -> None:
    assert re.fullmatch(r"[^@\s]+@[^@\s]+\.[a-z]+", MK.get("MAINTAINER"))
    comment = MK.get("COMMENT")
    assert len(comment) <= 70 and comment[0].isupper() and not comment.endswith(".")
    assert not re.match(r"(A|An|The) ", comment)
    assert MK.get("WWW").startswith("https://")
    assert MK.get("LICENSE") == "BSD2CLAUSE"
    assert MK.get("LICENSE_FILE") == "${WRKSRC}/LICENSE" and (REPO / "LICENSE").is_file()
    assert "BSD 2-Clause" in (REPO / "LICENSE").read_text() or \
        "Redistribution and use" in (REPO / "LICENSE").read_text()


def test_use_python_features() -> None:
    assert MK.get("USES") == "python:3.11+"
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert sorted(MK.words("USE_PYTHON")) == MK.words("USE_PYTHON")
    assert set(MK.words("USE_PYTHON")) == {"autoplist", "cython", "noflavors", "pep517",
                                           "pytest"}


def test_tests_run_against_the_staged_tree() -> None:
    assert MK.get("TEST_ENV") == \
        "${MAKE_ENV} PYTHONPATH=${STAGEDIR}${PYTHONPREFIX_SITELIBDIR}"
    assert MK.get("TEST_WRKSRC") == "${WRKSRC}/tests"


_DEP = re.compile(r"^\$\{PYTHON_PKGNAMEPREFIX\}([a-z0-9-]+)(>=|>)([0-9.]+)"
                  r":([a-z]+)/py-([a-z0-9-]+)@\$\{PY_FLAVOR\}$")


def _deps(var: str) -> dict[str, tuple[str, str]]:
    out = {}
    for entry in MK.words(var):
        m = _DEP.match(entry)
        assert m, f"{var}: {entry!r} is not ${{PYTHON_PKGNAMEPREFIX}}<name><op><ver>:" \
                  "<cat>/py-<name>@${PY_FLAVOR}"
        assert m.group(1) == m.group(5), entry
        out[m.group(1)] = (m.group(2), m.group(3))
    return out


def _requirements(reqs: list[str]) -> dict[str, tuple[str, str]]:
    out = {}
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_-]+)(>=|>)([0-9.]+)(,<[0-9.]+)?", req.replace(" ", ""))
        assert m, req
        out[m.group(1).lower()] = (m.group(2), m.group(3))
    return out


def test_dependencies_match_pyproject() -> None:
    build = _deps("BUILD_DEPENDS")
    run = _deps("RUN_DEPENDS")
    _deps("TEST_DEPENDS")
    wanted = _requirements(PYPROJECT["build-system"]["requires"])
    # USE_PYTHON=cython brings lang/cython; build and installer come with pep517
    wanted.pop("cython")
    for name, floor in wanted.items():
        assert build.get(name) == floor, f"BUILD_DEPENDS {name}: {build.get(name)} != {floor}"
    assert "wheel" in build
    for name, floor in _requirements(PYPROJECT["project"]["dependencies"]).items():
        assert run.get(name) == floor, f"RUN_DEPENDS {name}: {run.get(name)} != {floor}"


# -- files/ --------------------------------------------------------------------------------

def test_every_sub_file_and_rc_script_has_its_in_file() -> None:
    used = MK.words("USE_RC_SUBR") + MK.words("SUB_FILES")
    assert MK.words("USE_RC_SUBR") == ["py_hastd"]
    assert "pkg-message" in MK.words("SUB_FILES")
    for name in used:
        assert (FILES / f"{name}.in").is_file(), f"files/{name}.in is missing"
    orphans = {p.name.removesuffix(".in") for p in FILES.glob("*.in")} - set(used)
    assert not orphans, f"files/*.in used by neither USE_RC_SUBR nor SUB_FILES: {orphans}"


def test_placeholders_are_substituted() -> None:
    sub_list = dict(w.split("=", 1) for w in MK.words("SUB_LIST"))
    assert sub_list.get("PYTHON_CMD") == "${PYTHON_CMD}"
    for path in sorted(FILES.iterdir()):
        found = set(re.findall(r"%%([A-Z_]+)%%", path.read_text(encoding="utf-8")))
        if path.suffix == ".in":
            missing = found - FRAMEWORK_SUB - set(sub_list)
            assert not missing, f"files/{path.name}: {missing} not in SUB_LIST"
        else:
            # installed as they are by post-install: nothing would replace a placeholder
            assert not found, f"files/{path.name} is not substituted but holds {found}"


def test_pkg_message_is_ucl() -> None:
    text = (FILES / "pkg-message.in").read_text(encoding="ascii")
    assert text.startswith("[\n{ type: install\n  message: <<EOM\n")
    assert text.endswith("EOM\n}\n]\n")
    body = text.split("<<EOM\n", 1)[1].rsplit("EOM\n", 1)[0]
    assert all(len(ln) <= 80 for ln in body.splitlines())
    for fact in ("py_hastd", "%%PREFIX%%/etc/hast.conf", "fullsync", "memsync"):
        assert fact in body


# -- pkg-descr and pkg-plist ---------------------------------------------------------------

def test_pkg_descr() -> None:
    raw = (REPO / "pkg-descr").read_bytes()
    assert raw.isascii()
    text = raw.decode("ascii")
    assert text.endswith("\n") and not text.endswith("\n\n")
    lines = text.splitlines()
    assert 2 <= len(lines) <= 24, len(lines)
    for no, line in enumerate(lines, 1):
        assert len(line.expandtabs()) <= 80, f"pkg-descr:{no}: {len(line)} columns"
        assert line == line.rstrip(), f"pkg-descr:{no}: trailing blanks"
        assert "\t" not in line
        assert not line.startswith("WWW:"), "WWW belongs in the Makefile"


def _plist() -> list[str]:
    return (REPO / "pkg-plist").read_text(encoding="ascii").splitlines()


def _install_lines() -> str:
    return "\n".join(MK.targets["post-install"])


def test_pkg_plist_entries_come_from_this_tree() -> None:
    entries = _plist()
    assert entries, "pkg-plist is empty"
    post = _install_lines()
    for entry in entries:
        assert entry == entry.strip() and entry
        if entry.startswith("@sample "):
            target = entry.split(None, 1)[1]
            m = re.fullmatch(r"etc/([a-z.-]+\.sample)", target)
            assert m, entry
            assert (FILES / m.group(1)).is_file(), f"{entry}: files/{m.group(1)} is missing"
            assert f"${{FILESDIR}}/{m.group(1)}" in post
            assert f"${{STAGEDIR}}${{PREFIX}}/{target}" in post
            continue
        assert not entry.startswith("@"), f"{entry}: only @sample is expected"
        script = re.fullmatch(r"sbin/([a-z-]+)", entry)
        if script:
            # a SUB_FILES script: the framework substitutes files/X.in into ${WRKDIR}/X
            name = script.group(1)
            assert name in MK.words("SUB_FILES"), f"{entry}: not in SUB_FILES"
            assert (FILES / f"{name}.in").is_file(), f"{entry}: files/{name}.in is missing"
            assert (f"${{INSTALL_SCRIPT}} ${{WRKDIR}}/{name}" in post
                    and f"${{STAGEDIR}}${{PREFIX}}/sbin/{name}" in post), entry
            continue
        m = re.fullmatch(r"share/man/man([1-9])/([a-z.-]+\.\1)\.gz", entry)
        assert m, f"{entry}: not a file this port installs by hand"
        page = REPO / "man" / m.group(2)
        assert page.is_file(), f"{entry}: man/{m.group(2)} is missing"
        assert f"${{WRKSRC}}/man/{m.group(2)}" in post
        assert re.search(rf"\$\{{WRKSRC\}}/man/{re.escape(m.group(2))}\b[^\n]*"
                         rf"\$\{{STAGEDIR\}}\$\{{PREFIX\}}/share/man/man{m.group(1)}\b", post)


def test_pkg_plist_covers_every_installed_file_and_nothing_autoplisted() -> None:
    entries = set(_plist())
    pages = {p.name for p in (REPO / "man").iterdir()}
    assert pages == {"hastd.8", "hastctl.8", "hast.conf.5", "py-hast.conf.5"}
    for page in pages:
        section = page.rsplit(".", 1)[1]
        assert f"share/man/man{section}/{page}.gz" in entries
    samples = {p.name for p in FILES.glob("*.sample")}
    assert {f"@sample etc/{s}" for s in samples} <= entries
    for entry in entries:
        # the wheel's RECORD (autoplist) and USE_RC_SUBR list these themselves
        if entry == "sbin/hast-switch":
            continue  # a shell script of files/, not a console script of the wheel
        assert not re.match(r"(lib/python|bin/|sbin/|etc/rc\.d/)", entry), entry
        assert not entry.startswith(("@unexec", "@exec", "@dirrm")), entry
    assert _plist() == sorted(_plist(), key=lambda e: (not e.startswith("@"), e))


def test_post_install_strips_extensions() -> None:
    post = _install_lines()
    assert re.search(r"\$\{FIND\} \$\{STAGEDIR\}\$\{PYTHONPREFIX_SITELIBDIR\} -name '\*\.so'"
                     r" -exec \$\{STRIP_CMD\} \{\} \+", post), post


# -- console scripts under sbin --------------------------------------------------------------

def test_sbin_scripts_are_the_console_scripts() -> None:
    scripts = PYPROJECT["project"].get("scripts", {})
    assert set(MK.words("SBIN_SCRIPTS")) == {"hastctl", "hastd"}
    assert set(scripts) == set(MK.words("SBIN_SCRIPTS")), \
        f"pyproject console scripts {sorted(scripts)} != SBIN_SCRIPTS"
    assert scripts["hastctl"] == "hast.ctl:main"
    assert scripts["hastd"] == "hast.daemon:main"
    cmd = MK.get("PEP517_INSTALL_CMD")
    assert cmd.startswith("${PYTHON_CMD} -m installer --destdir ${STAGEDIR} --prefix ${PREFIX}"
                          " ${BUILD_WRKSRC}/dist/${PORTNAME}-${DISTVERSION}*.whl && ")


def _bmake(tmp_path: Path, *args: str) -> str:
    """BSD make on the port's Makefile, with a stand-in for the ports framework."""
    mk = tmp_path / "mk"
    mk.mkdir(exist_ok=True)
    (mk / "sys.mk").write_text("# empty: no system rules\n")
    (mk / "bsd.port.mk").write_text("# stand-in: the port's own variables only\n")
    res = subprocess.run([need("bmake", "bmake"), "-m", str(mk), "-f", str(MAKEFILE), *args],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
    return res.stdout


def test_bsd_make_reads_the_makefile(tmp_path: Path) -> None:
    out = _bmake(tmp_path, "-V", "PORTNAME", "-V", "DISTVERSION", "-V", "USE_PYTHON",
                 "-V", "SBIN_SCRIPTS").splitlines()
    assert out == ["hast", hast.__version__, "autoplist cython noflavors pep517 pytest",
                   "hastctl hastd"]


def test_bsd_make_expands_the_install_command(tmp_path: Path) -> None:
    cmd = _bmake(tmp_path, "PYTHON_CMD=/usr/local/bin/python3.11", "STAGEDIR=/stage",
                 "PREFIX=/usr/local", "BUILD_WRKSRC=/w", "MKDIR=mkdir -p", "MV=mv",
                 "REINPLACE_CMD=sed -i.bak", "RM=rm -f",
                 "PYTHONPREFIX_SITELIBDIR=/usr/local/lib/python3.11/site-packages",
                 "-V", "${PEP517_INSTALL_CMD}")
    cmd = " ".join(cmd.split())  # as the framework's recipe hands it to sh
    assert cmd.startswith("/usr/local/bin/python3.11 -m installer --destdir /stage --prefix"
                          " /usr/local /w/dist/hast-" + hast.__version__ + "*.whl && ")
    record = f"/stage/usr/local/lib/python3.11/site-packages/hast-{hast.__version__}" \
             ".dist-info/RECORD"
    assert "mv /stage/usr/local/bin/$s /stage/usr/local/sbin/$s" in cmd
    assert f'sed -i.bak -e "s|^\\.\\./\\.\\./\\.\\./bin/$s,|../../../sbin/$s,|" {record}' in cmd
    assert f"rm -f {record}.bak" in cmd
    res = subprocess.run([need("dash", "dash"), "-n", "-c", cmd], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr


# -- the sample configurations ---------------------------------------------------------------

def _uncommented_example(text: str) -> str:
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("#resource "))
    return "\n".join(ln[1:] for ln in lines[start:]) + "\n"


def test_hast_conf_sample_parses() -> None:
    text = (FILES / "hast.conf.sample").read_text(encoding="ascii")
    node = config.NodeIdentity(hostname="hasta", hostuuid="", hostid=0)
    assert config.parse(text, "hast.conf.sample", node=node).resources == {}
    example = _uncommented_example(text)
    for name, remote in (("hasta", "172.16.0.2"), ("hastb", "172.16.0.1")):
        node = config.NodeIdentity(hostname=name, hostuuid="", hostid=0)
        res = config.parse(example, "hast.conf.sample", node=node).resources["shared"]
        assert (res.local, res.remote, res.replication) == ("/dev/ada1", remote, "fullsync")
    assert "fullsync" in text and "memsync" in text


def test_py_hast_conf_sample_shows_the_defaults(tmp_path: Path) -> None:
    text = (FILES / "py-hast.conf.sample").read_text(encoding="ascii")
    keywords = ("maxio", "direct", "devdir", "sockdir", "nbd")
    # every keyword of hast/settings.py is shown
    for keyword in keywords:
        assert re.search(rf"^#{keyword} ", text, re.M), keyword
    global_lines = [ln[1:] for ln in text.splitlines()
                    if re.match(rf"^#({'|'.join(keywords)}) \S+$", ln)]
    (tmp_path / "py-hast.conf").write_text("\n".join(global_lines) + "\n")
    assert settings.load(str(tmp_path / "hast.conf")) == \
        settings.Settings(path=str(tmp_path / "py-hast.conf"))
    every = [ln[1:] for ln in text.splitlines() if re.match(rf"^#({'|'.join(keywords)}) ", ln)]
    (tmp_path / "py-hast.conf").write_text("\n".join(every) + "\n")
    loaded = settings.load(str(tmp_path / "hast.conf"))
    assert loaded.res_maxio == {"shared": 128 * 1024}
    assert loaded.nbd_tcp == {"shared": "127.0.0.1:10809"}
