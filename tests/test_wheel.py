"""The distribution as the FreeBSD port and pip see it: sdist, wheel, console scripts.

``python -m build --no-isolation`` (the PyPI package ``build``; ``--no-isolation`` is what the
ports framework runs, against the build requirements installed here) makes the sdist, then
the wheel from the sdist, which compiles the Cython extensions; it takes a minute.  Then:

* the sdist holds what the port takes from it (${WRKSRC}: LICENSE, man/, tests/) and the wheel
  every module of the package, every extension setup.py builds on this platform (the list is
  taken from setup.py itself, so a new extension cannot be forgotten here) and both console
  scripts;
* the wheel installed in a fresh venv runs ``hastctl`` and ``hastd`` from a directory outside
  the repository, so the source tree cannot be imported by accident: FreeBSD's usage texts and
  exit statuses, create/dump on a file provider, and a daemon answering hastctl;
* the port's own install steps run under BSD make (Debian package bmake) against a stand-in
  bsd.port.mk that does what the framework's pep517 do-install does (the PyPI package
  ``installer``): hastd and hastctl end up in ${PREFIX}/sbin with the interpreter rc.subr is
  told about, RECORD agrees with the staged files, and RECORD plus pkg-plist list exactly the
  files staged.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

import hast

REPO = Path(__file__).resolve().parents[1]
VERSION = hast.__version__
SCRIPTS = ("hastctl", "hastd")
MiB = 1024 * 1024

HASTCTL_USAGE = (
    "usage: hastctl create [-d] [-c config] [-e extentsize] [-k keepdirty]\n"
    "\t\t[-m mediasize] name ...\n"
    "       hastctl role [-d] [-c config] <init | primary | secondary> all | name ...\n"
    "       hastctl list [-d] [-c config] [all | name ...]\n"
    "       hastctl status [-d] [-c config] [all | name ...]\n"
    "       hastctl dump [-d] [-c config] [all | name ...]\n"
)
HASTD_USAGE = "hastd: [-dFh] [-c config] [-P pidfile]\n"


def need_module(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.fail(f"the Python package {name!r} is required in {sys.executable} "
                    f"(pip install {name})")


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is required (Debian package {package})")
    return path


def run(argv: list[str], cwd: Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    need_module("build")
    out = tmp_path_factory.mktemp("dist")
    res = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
               str(REPO)], cwd=out, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    sdists = list(out.glob("*.tar.gz"))
    wheels = list(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return {"dir": out, "sdist": sdists[0], "wheel": wheels[0]}


def test_file_names_are_what_the_port_expects(dist: dict[str, Path]) -> None:
    # MASTER_SITES=PYPI fetches ${PORTNAME}-${DISTVERSION}.tar.gz; PEP517_INSTALL_CMD installs
    # dist/${PORTNAME}-${DISTVERSION}*.whl
    assert dist["sdist"].name == f"hast-{VERSION}.tar.gz"
    assert re.fullmatch(rf"hast-{re.escape(VERSION)}-cp3\d+-cp3\d+-\w+\.whl",
                        dist["wheel"].name), dist["wheel"].name


def test_sdist_holds_what_the_port_uses(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {"LICENSE", "README.md", "pyproject.toml", "setup.py"}
    # post-install installs the manual pages from ${WRKSRC}/man
    wanted |= {f"man/{p.name}" for p in (REPO / "man").iterdir()}
    # TEST_WRKSRC=${WRKSRC}/tests
    wanted |= {f"tests/{p.name}" for p in (REPO / "tests").glob("*.py")}
    # every source file of the package, subpackages included
    wanted |= {str(p.relative_to(REPO)) for p in (REPO / "hast").rglob("*")
               if p.suffix in (".py", ".pyx", ".pxd", ".h")}
    missing = sorted(wanted - names)
    assert not missing, f"the sdist lacks {missing}"


def built_extensions() -> list[str]:
    """The Cython extension modules setup.py builds on this platform, as dotted names.

    setup.py is run with setuptools.setup and Cython's cythonize replaced by recorders, so the
    list is the one the build uses (platform conditions included), not a copy of it.
    """
    import Cython.Build
    import setuptools

    recorded: dict = {}
    saved = (setuptools.setup, Cython.Build.cythonize)
    setuptools.setup = lambda **kw: recorded.update(kw)
    Cython.Build.cythonize = lambda extensions, **kw: list(extensions)
    try:
        code = compile((REPO / "setup.py").read_text(), str(REPO / "setup.py"), "exec")
        exec(code, {"__name__": "setup_py_under_test", "__file__": str(REPO / "setup.py")})
    finally:
        setuptools.setup, Cython.Build.cythonize = saved
    return [ext.name for ext in recorded["ext_modules"]]


def test_setup_builds_every_cython_module() -> None:
    names = built_extensions()
    assert {"hast._bitmap", "hast._io", "hast._codec", "hast._wire", "hast._aio"} <= set(names)
    # every .pyx is built here, except the FreeBSD-only GEOM Gate frontend
    pyx = {f"hast.{p.stem}" for p in (REPO / "hast").glob("*.pyx")}
    if not sys.platform.startswith("freebsd"):
        pyx.discard("hast._ggate")
    assert pyx == set(names)


def test_wheel_holds_the_package_and_its_scripts(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = set(whl.namelist())
        entry_points = whl.read(f"hast-{VERSION}.dist-info/entry_points.txt").decode()
    modules = {str(p.relative_to(REPO)) for p in (REPO / "hast").rglob("*.py")}
    missing = sorted(modules - names)
    assert not missing, f"the wheel lacks {missing}"
    for ext in built_extensions():
        path = ext.replace(".", "/")
        assert any(re.fullmatch(rf"{path}\.cpython-3\d+-[\w-]+\.so", n) for n in names), ext
    assert any(re.fullmatch(r"hast/_os\.(abi3|cpython-3\d+-[\w-]+)\.so", n) for n in names)
    assert "[console_scripts]" in entry_points
    assert re.search(r"^hastctl = hast\.ctl:main$", entry_points, re.M)
    assert re.search(r"^hastd = hast\.daemon:main$", entry_points, re.M)


# -- the wheel in a fresh venv -----------------------------------------------------------------

@pytest.fixture(scope="module")
def venv(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    res = run([sys.executable, "-m", "venv", str(root / "v")], cwd=root)
    assert res.returncode == 0, res.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = run([str(root / "v/bin/python"), "-m", "pip", "install", "--quiet",
               str(dist["wheel"])], cwd=root, timeout=600, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    return root / "v"


@pytest.fixture
def outside(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A working directory outside the repository and an environment without PYTHONPATH."""
    assert REPO not in tmp_path.parents
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "HAST_PURE_PYTHON", "HAST_NODE_NAME")}
    return tmp_path, env


def test_venv_imports_the_installed_package(venv: Path, outside) -> None:
    cwd, env = outside
    imports = ", ".join(["hast", *built_extensions(), "hast._os", "hast.activemap",
                         "hast.daemon", "hast.frontends.nbd"])
    code = (f"import {imports}; print(hast.__file__); print(hast._bitmap.__file__); "
            "print(hast.__version__)")
    res = run([str(venv / "bin/python"), "-c", code], cwd=cwd, env=env)
    assert res.returncode == 0, res.stderr
    init, bitmap, version = res.stdout.splitlines()
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv)}))
    assert Path(init).parent == site / "hast"
    assert bitmap.endswith(".so") and Path(bitmap).parent == site / "hast"
    assert version == VERSION


def test_console_scripts_usage(venv: Path, outside) -> None:
    cwd, env = outside
    res = run([str(venv / "bin/hastctl"), "-h"], cwd=cwd, env=env)
    assert (res.returncode, res.stdout, res.stderr) == (64, "", HASTCTL_USAGE)
    res = run([str(venv / "bin/hastctl")], cwd=cwd, env=env)
    assert (res.returncode, res.stderr) == (64, HASTCTL_USAGE)
    res = run([str(venv / "bin/hastd"), "-h"], cwd=cwd, env=env)
    assert (res.returncode, res.stdout, res.stderr) == (64, "", HASTD_USAGE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(cwd: Path, provider: Path) -> Path:
    conf = cwd / "hast.conf"
    conf.write_text(
        f"control uds://{cwd}/ctl.sock\n"
        f"pidfile {cwd}/hastd.pid\n"
        f"listen tcp4://127.0.0.1:{_free_port()}\n"
        "resource r0 {\n"
        "\ton wheeltest {\n"
        f"\t\tlocal {provider}\n"
        "\t\tremote none\n"
        "\t}\n"
        "}\n")
    return conf


DUMP_64M = (
    "resource: r0\n"
    "    datasize: 67104256 (64MB)\n"
    "    extentsize: 2097152 (2.0MB)\n"
    "    keepdirty: 64\n"
    "    localoff: 4608\n"
    "    resuid: 0\n"
    "    localcnt: 0\n"
    "    remotecnt: 0\n"
    "    prevrole: init\n"
)


def test_hastctl_create_and_dump(venv: Path, outside) -> None:
    cwd, env = outside
    env["HAST_NODE_NAME"] = "wheeltest"
    provider = cwd / "r0.img"
    with open(provider, "wb") as fh:
        fh.truncate(64 * MiB)
    conf = _conf(cwd, provider)
    hastctl = str(venv / "bin/hastctl")
    res = run([hastctl, "create", "-c", str(conf), "-e", "3M", "r0"], cwd=cwd, env=env)
    assert res.returncode == 65
    assert res.stderr == "[ERROR] [r0] Extent size (3145728) is not power of 2.\n"
    assert provider.read_bytes()[:4096] == bytes(4096), "provider touched"
    res = run([hastctl, "create", "-c", str(conf), "r0"], cwd=cwd, env=env)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    res = run([hastctl, "dump", "-c", str(conf), "r0"], cwd=cwd, env=env)
    assert (res.returncode, res.stdout, res.stderr) == (0, DUMP_64M, "")
    res = run([hastctl, "dump", "-c", str(conf), "nope"], cwd=cwd, env=env)
    assert (res.returncode, res.stderr) == (65, "[ERROR] Unknown resource nope.\n")


def test_hastd_answers_hastctl(venv: Path, outside) -> None:
    cwd, env = outside
    env["HAST_NODE_NAME"] = "wheeltest"
    provider = cwd / "r0.img"
    with open(provider, "wb") as fh:
        fh.truncate(64 * MiB)
    conf = _conf(cwd, provider)
    hastctl = str(venv / "bin/hastctl")
    res = run([hastctl, "status", "-c", str(conf)], cwd=cwd, env=env)
    assert res.returncode == 71
    assert res.stderr == (f"[ERROR] Unable to connect to hastd via uds://{cwd}/ctl.sock: "
                          "No such file or directory.\n")
    daemon = subprocess.Popen([str(venv / "bin/hastd"), "-F", "-c", str(conf)], cwd=cwd,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 30
        while not (cwd / "ctl.sock").exists():
            assert daemon.poll() is None, daemon.communicate()
            assert time.monotonic() < deadline, "hastd did not create its control socket"
            time.sleep(0.05)
        res = run([hastctl, "status", "-c", str(conf)], cwd=cwd, env=env)
        assert res.returncode == 0, res.stderr
        assert res.stdout == ("Name\tStatus\t Role\t\tComponents\n"
                              f"r0\t-        init           {provider}\tnone\n")
        res = run([hastctl, "list", "--json", "-c", str(conf), "r0"], cwd=cwd, env=env)
        assert res.returncode == 0, res.stderr
        assert '"resource": "r0"' in res.stdout and '"role": "init"' in res.stdout
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, out + err
    assert not (cwd / "ctl.sock").exists()


# -- the port's install steps under BSD make ---------------------------------------------------

STANDIN_PORT_MK = """\
# bsd.port.mk stand-in written by tests/test_wheel.py: the steps of the framework's stage
# that matter here (Mk/bsd.port.mk stage-dir, Mk/Uses/python.mk pep517 do-install).
stage-dir:
\t@${MKDIR} ${STAGEDIR}${PREFIX}/bin ${STAGEDIR}${PREFIX}/sbin ${STAGEDIR}${PREFIX}/etc \\
\t    ${STAGEDIR}${PREFIX}/share/man/man5 ${STAGEDIR}${PREFIX}/share/man/man8
do-install:
\t@${MKDIR} ${STAGEDIR}${PYTHONPREFIX_SITELIBDIR}
\t@cd ${INSTALL_WRKSRC} && ${SETENV} ${MAKE_ENV} ${PEP517_INSTALL_CMD}
"""


def _record_hash(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _autoplist_entry(path: str, rel_sitelib: str) -> str:
    """python.mk's rewrite of one RECORD path into a plist entry (relative to PREFIX)."""
    if path.startswith("../../../"):
        return path.removeprefix("../../../")
    return f"{rel_sitelib}/{path}"


@pytest.fixture(scope="module")
def staged(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    need_module("installer")
    bmake = need("bmake", "bmake")
    strip = need("strip", "binutils")
    root = tmp_path_factory.mktemp("port")
    with tarfile.open(dist["sdist"]) as tar:
        tar.extractall(root / "work", filter="data")
    wrksrc = root / "work" / f"hast-{VERSION}"
    (wrksrc / "dist").mkdir()
    shutil.copy(dist["wheel"], wrksrc / "dist")
    mk = root / "mk"
    mk.mkdir()
    (mk / "sys.mk").write_text("# empty: no system rules\n")
    (mk / "bsd.port.mk").write_text(STANDIN_PORT_MK)
    prefix = "/usr/local"
    sitelib = sysconfig.get_path("platlib", vars={"base": prefix, "platbase": prefix})
    # the layout the port's RECORD rewrite (and python.mk's) relies on
    assert os.path.relpath(f"{prefix}/bin", sitelib) == "../../../bin", sitelib
    stage = root / "stage"
    wrkdir = root / "wrkdir"
    wrkdir.mkdir()
    # what the framework does with SUB_FILES: files/X.in, %%PLACEHOLDERS%% substituted
    (wrkdir / "hast-switch").write_text(
        (REPO / "files" / "hast-switch.in").read_text().replace("%%PREFIX%%", prefix))
    variables = {
        "STAGEDIR": str(stage), "PREFIX": prefix, "PYTHON_CMD": sys.executable,
        "PYTHONPREFIX_SITELIBDIR": sitelib, "WRKSRC": str(wrksrc),
        "BUILD_WRKSRC": str(wrksrc), "INSTALL_WRKSRC": str(wrksrc),
        "FILESDIR": str(REPO / "files"), "MKDIR": "mkdir -p", "MV": "mv", "RM": "rm -f",
        "REINPLACE_CMD": "sed -i.bak", "FIND": "find", "STRIP_CMD": strip, "SETENV": "env",
        "MAKE_ENV": "", "INSTALL_DATA": "install -m 0644", "INSTALL_MAN": "install -m 0444",
        "INSTALL_SCRIPT": "install -m 0555", "WRKDIR": str(wrkdir),
    }
    res = run([bmake, "-m", str(mk), "-f", str(REPO / "Makefile"),
               *(f"{k}={v}" for k, v in variables.items()),
               "stage-dir", "do-install", "post-install"], cwd=root, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return {"stage": stage, "prefix": stage / prefix.lstrip("/"), "sitelib": sitelib,
            "rel_sitelib": os.path.relpath(sitelib, prefix)}


def test_port_installs_scripts_under_sbin(staged: dict) -> None:
    prefix: Path = staged["prefix"]
    for script in SCRIPTS:
        path = prefix / "sbin" / script
        assert path.is_file() and os.access(path, os.X_OK), path
        assert not (prefix / "bin" / script).exists()
        # rc.subr matches the daemon by command_interpreter="%%PYTHON_CMD%%", which must be
        # the script's interpreter: the one the framework runs installer with
        assert path.read_text().splitlines()[0] == f"#!{sys.executable}"


def test_port_record_matches_the_stage(staged: dict) -> None:
    site = staged["stage"] / staged["sitelib"].lstrip("/")
    distinfo = site / f"hast-{VERSION}.dist-info"
    assert not (distinfo / "RECORD.bak").exists()
    rows = [line.split(",") for line in (distinfo / "RECORD").read_text().splitlines()]
    paths = {row[0] for row in rows}
    for script in SCRIPTS:
        assert f"../../../sbin/{script}" in paths
        assert f"../../../bin/{script}" not in paths
    for path, digest, size in rows:
        target = (site / path).resolve()
        assert target.is_file(), f"RECORD lists {path}, not staged"
        if digest and not path.endswith(".so"):  # .so files were stripped after installer
            assert digest == _record_hash(target), path
            assert int(size) == target.stat().st_size, path


def test_port_plist_lists_exactly_the_staged_files(staged: dict) -> None:
    prefix: Path = staged["prefix"]
    site = staged["stage"] / staged["sitelib"].lstrip("/")
    record = (site / f"hast-{VERSION}.dist-info" / "RECORD").read_text().splitlines()
    plist = {_autoplist_entry(line.split(",")[0], staged["rel_sitelib"]) for line in record}
    # python.mk also adds every .pyc under lib; compress-man (not run here) gzips the pages
    plist |= {str(p.relative_to(prefix)) for p in (prefix / "lib").rglob("*.pyc")}
    for entry in (REPO / "pkg-plist").read_text().splitlines():
        plist.add(entry.removeprefix("@sample ").removesuffix(".gz"))
    staged_files = {str(p.relative_to(prefix)) for p in prefix.rglob("*") if p.is_file()}
    assert not plist - staged_files, f"in the plist, not staged: {sorted(plist - staged_files)}"
    assert not staged_files - plist, f"staged, not in the plist: {sorted(staged_files - plist)}"
    for page in ("man5/hast.conf.5", "man5/py-hast.conf.5", "man8/hastd.8", "man8/hastctl.8"):
        assert (prefix / "share/man" / page).read_bytes() == \
            (REPO / "man" / page.split("/")[1]).read_bytes()
    for sample in ("hast.conf.sample", "py-hast.conf.sample"):
        assert (prefix / "etc" / sample).read_bytes() == (REPO / "files" / sample).read_bytes()


def test_port_strips_the_extensions(staged: dict) -> None:
    readelf = need("readelf", "binutils")
    site = staged["stage"] / staged["sitelib"].lstrip("/")
    objects = list((site / "hast").glob("*.so"))
    assert len(objects) >= 4
    for so in objects:
        res = run([readelf, "-S", "-W", str(so)], cwd=site)
        assert res.returncode == 0, res.stderr
        assert ".symtab" not in res.stdout, f"{so.name} not stripped"


def test_port_staged_scripts_run(staged: dict, tmp_path: Path) -> None:
    # what TEST_ENV does: the staged site-packages, not the source tree
    env = {k: v for k, v in os.environ.items() if k != "HAST_PURE_PYTHON"}
    env["PYTHONPATH"] = str(staged["stage"] / staged["sitelib"].lstrip("/"))
    res = run([str(staged["prefix"] / "sbin/hastctl"), "-h"], cwd=tmp_path, env=env)
    assert (res.returncode, res.stderr) == (64, HASTCTL_USAGE)
    res = run([str(staged["prefix"] / "sbin/hastd"), "-h"], cwd=tmp_path, env=env)
    assert (res.returncode, res.stderr) == (64, HASTD_USAGE)
