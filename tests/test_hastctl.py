"""hastctl as scripts see it: the real CLI in a subprocess, real files, FreeBSD's outputs.

Every `hastctl create` vector is replayed with the same arguments on a sparse 256 MiB file;
the first MiB must equal what FreeBSD's hastctl wrote (name padding zeroed) and `dump` must
print FreeBSD's text.  Usage, argument, configuration and no-daemon cases check the exact
stderr and exit status.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from hast import ctl
from hast.metadata import Metadata
from tests.vectors import METADATA, metadata_cases

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
PROVIDER_SIZE = 256 * MiB

USAGE = (
    "usage: hastctl create [-d] [-c config] [-e extentsize] [-k keepdirty]\n"
    "\t\t[-m mediasize] name ...\n"
    "       hastctl role [-d] [-c config] <init | primary | secondary> all | name ...\n"
    "       hastctl list [-d] [-c config] [all | name ...]\n"
    "       hastctl status [-d] [-c config] [all | name ...]\n"
    "       hastctl dump [-d] [-c config] [all | name ...]\n"
)


@dataclass
class Result:
    rc: int
    out: str
    err: str


def run(*args: str, cwd: Path | None = None) -> Result:
    env = dict(os.environ, HAST_NODE_NAME="hasta", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "hast.ctl", *args], cwd=cwd or REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    return Result(proc.returncode, proc.stdout, proc.stderr)


class Node:
    """A temp dir with hast.conf for node "hasta" and sparse provider files."""

    def __init__(self, root: Path, resources: dict[str, Path] | None = None) -> None:
        self.root = root
        self.control = root / "ctl.sock"
        self.conf = root / "hast.conf"
        self.resources = resources if resources is not None else {"test": root / "test.img"}
        lines = [f"control {self.control}"]
        for name, local in self.resources.items():
            lines += [f"resource {name} {{", "\ton hasta {", f"\t\tlocal {local}",
                      "\t\tremote 127.0.0.1", "\t}", "}"]
        self.conf.write_text("\n".join(lines) + "\n")

    def provider(self, name: str = "test", size: int = PROVIDER_SIZE) -> Path:
        path = self.resources[name]
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def ctl(self, cmd: str, *args: str) -> Result:
        return run(cmd, "-c", str(self.conf), *args)


def head(path: Path, size: int = MiB) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


# -- FreeBSD vectors ------------------------------------------------------------------------

CREATED = [c for c in metadata_cases() if not c.startswith("secondary-written/")]


def _parse_dump_txt(case: str) -> tuple[list[str], list[str]]:
    """(create arguments, expected dump lines) of one vector."""
    text = (METADATA / f"{case}.dump.txt").read_text().splitlines()
    create = next(line for line in text if line.startswith("$ hastctl create"))
    args = shlex.split(create)[3:]
    start = text.index(next(line for line in text if line.startswith("$ hastctl dump")))
    end = next(i for i in range(start, len(text)) if text[i].startswith("rc="))
    assert text[end] == "rc=0" and text[text.index(create) + 1] == "rc=0"
    return args, text[start + 1:end]


@pytest.mark.parametrize("case", CREATED)
def test_create_and_dump_reproduce_freebsd(tmp_path: Path, case: str) -> None:
    node = Node(tmp_path)
    path = node.provider()
    args, dump_lines = _parse_dump_txt(case)
    res = node.ctl("create", *args)
    assert (res.rc, res.out, res.err) == (0, "", "")
    canonical = (METADATA / f"{case}.img-first1MiB.canonical.bin").read_bytes()
    assert head(path) == canonical
    assert path.stat().st_size == PROVIDER_SIZE
    res = node.ctl("dump", "test")
    assert (res.rc, res.err) == (0, "")
    assert res.out.splitlines() == dump_lines


def _error_cases() -> list[tuple[list[str], list[str], int]]:
    out = []
    lines = (METADATA / "errors.txt").read_text().splitlines()
    i = 0
    while i < len(lines):
        assert lines[i].startswith("$ hastctl create")
        args = shlex.split(lines[i])[3:]
        j = i + 1
        while not lines[j].startswith("rc="):
            j += 1
        out.append((args, lines[i + 1:j], int(lines[j][3:])))
        i = j + 1
    return out


ERRORS = _error_cases()


@pytest.mark.parametrize("args,expected,rc", ERRORS, ids=[" ".join(e[0]) for e in ERRORS])
def test_create_errors_like_freebsd(tmp_path: Path, args: list[str], expected: list[str],
                                    rc: int) -> None:
    node = Node(tmp_path)
    path = node.provider()
    res = node.ctl("create", *args)
    if rc == 134:
        # FreeBSD aborts on an assertion; py-hast reports it (decisions.md item 5).
        extent = args[args.index("-e") + 1]
        expected, rc = [f"[ERROR] [test] Extent size ({extent}) is not power of 2."], 65
    expected = [line.replace("/var/hast/err.img", str(path)) for line in expected]
    assert (res.rc, res.out) == (rc, "")
    assert res.err.splitlines() == expected
    assert head(path) == bytes(MiB)  # nothing written


def test_error_vectors_include_the_assertion_case() -> None:
    assert [e[2] for e in ERRORS].count(134) == 1 and len(ERRORS) >= 4


# -- create ---------------------------------------------------------------------------------

def test_create_never_touches_the_data_area(tmp_path: Path) -> None:
    node = Node(tmp_path)
    path = node.resources["test"]
    path.write_bytes(b"\xaa" * (4 * MiB))
    res = node.ctl("create", "-e", "64k", "test")
    assert res.rc == 0, res.err
    data = path.read_bytes()
    md = Metadata.unpack(data[:4096], "test")
    assert (md.extentsize, md.localoff, md.datasize) == (65536, 4608, 4 * MiB - 4608)
    assert data[4096:4608] == bytes(512)
    assert data[4608:] == b"\xaa" * (4 * MiB - 4608)


def test_create_unknown_resource_continues_with_later_names(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.provider()
    res = node.ctl("create", "nosuch", "test")
    assert (res.rc, res.out, res.err) == (65, "", "[ERROR] Unknown resource nosuch.\n")
    assert node.ctl("dump", "test").rc == 0


def test_create_first_failure_code_wins(tmp_path: Path) -> None:
    node = Node(tmp_path, {"a": tmp_path / "missing.img", "b": tmp_path / "b.img"})
    node.provider("b")
    res = node.ctl("create", "a", "nosuch", "b")
    assert res.rc == 66
    assert res.err.splitlines() == [
        f"[ERROR] [a] Unable to open {tmp_path / 'missing.img'}: No such file or directory.",
        "[ERROR] Unknown resource nosuch.",
    ]
    assert node.ctl("dump", "b").rc == 0


def test_create_local_not_openable_or_not_a_provider(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    node = Node(tmp_path, {"dir": tmp_path, "fifo": fifo})
    res = node.ctl("create", "dir")
    assert (res.rc, res.err) == (66, f"[ERROR] [dir] Unable to open {tmp_path}: Is a directory.\n")
    res = node.ctl("create", "fifo")
    assert (res.rc, res.err) == (
        66, f"[ERROR] [fifo] {fifo} is neither GEOM provider nor regular file.\n")


def test_create_on_a_too_small_provider_is_refused(tmp_path: Path) -> None:
    node = Node(tmp_path)
    path = node.provider(size=4096)
    res = node.ctl("create", "test")
    assert (res.rc, res.err) == (
        65, "[ERROR] [test] Mediasize (4096) is too small for metadata and activemap.\n")
    assert head(path) == bytes(4096)


@pytest.mark.parametrize("opt,value,message", [
    ("-e", "4g", "[ERROR] [test] Extent size (4294967296) is too large."),
    ("-e", "2g", "[ERROR] [test] Extent size (2147483648) is too large."),
    ("-k", "2147483648", "[ERROR] [test] Keepdirty (2147483648) is too large."),
])
def test_create_values_hastd_cannot_hold(tmp_path: Path, opt: str, value: str,
                                         message: str) -> None:
    node = Node(tmp_path)
    path = node.provider()
    res = node.ctl("create", opt, value, "test")
    assert (res.rc, res.err) == (65, message + "\n")
    assert head(path) == bytes(MiB)


@pytest.mark.parametrize("opt,what", [("-e", "extentsize"), ("-k", "keepdirty"),
                                      ("-m", "mediasize")])
@pytest.mark.parametrize("value", ["foo", "12q", "-1", "", "9223372036854775808"])
def test_create_invalid_size_argument(tmp_path: Path, opt: str, what: str, value: str) -> None:
    node = Node(tmp_path)
    path = node.provider()
    res = node.ctl("create", opt, value, "test")
    assert (res.rc, res.out, res.err) == (64, "", f"hastctl: Invalid {what}\n")
    assert head(path) == bytes(MiB)


def test_create_options_grouped_and_zero_means_default(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.provider()
    res = node.ctl("create", "-dde0", "-k0", "-m", "0", "test")
    assert res.rc == 0, res.err
    out = node.ctl("dump", "test").out
    assert "    extentsize: 2097152 (2.0MB)\n    keepdirty: 64\n" in out
    assert "    datasize: 268430848 (256MB)\n" in out


def test_size_suffixes_are_case_insensitive(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.provider()
    assert node.ctl("create", "-e", "64K", "-m", "128m", "test").rc == 0
    out = node.ctl("dump", "test").out
    assert "extentsize: 65536 (64KB)" in out and "datasize: 134213120 (128MB)" in out


# -- dump -----------------------------------------------------------------------------------

def test_dump_never_created_provider(tmp_path: Path) -> None:
    # An all-zero block is a valid, empty nv blob for FreeBSD: the read fails on the missing
    # "resource" field (ENOENT), not in the nv validator.
    node = Node(tmp_path)
    path = node.provider()
    res = node.ctl("dump", "test")
    assert (res.rc, res.out) == (255, "")
    assert res.err == f"[ERROR] Unable to read metadata from {path}: No such file or directory.\n"
    res = node.ctl("dump", "-d", "test")
    assert res.out == "[DEBUG][1] metadata field 'resource' is missing\n"


def test_dump_garbage_provider(tmp_path: Path) -> None:
    node = Node(tmp_path)
    path = node.resources["test"]
    path.write_bytes(b"\x7fELF" + b"\x42" * 8188)
    res = node.ctl("dump", "test")
    assert (res.rc, res.out) == (255, "")
    assert res.err == f"[ERROR] Metadata read from {path} is invalid: Invalid argument.\n"


def test_dump_provider_of_another_resource(tmp_path: Path) -> None:
    shared = tmp_path / "shared.img"
    node = Node(tmp_path, {"test": shared, "other": shared})
    node.provider("test")
    assert node.ctl("create", "test").rc == 0
    res = node.ctl("dump", "other")
    assert (res.rc, res.out) == (255, "")
    assert res.err == f"[ERROR] Provider {shared} is not part of resource other.\n"


def test_dump_missing_local(tmp_path: Path) -> None:
    node = Node(tmp_path)
    res = node.ctl("dump")
    assert (res.rc, res.out) == (255, "")
    assert res.err == (f"[ERROR] Unable to open {node.resources['test']}: "
                       "No such file or directory.\n")


def _two_created(tmp_path: Path) -> Node:
    node = Node(tmp_path, {"beta": tmp_path / "b.img", "alpha": tmp_path / "a.img"})
    node.provider("beta")
    node.provider("alpha", 64 * MiB)
    assert node.ctl("create", "beta", "alpha").rc == 0
    return node


def _names(out: str) -> list[str]:
    return re.findall(r"^resource: (\S+)$", out, re.M)


def test_dump_all_and_no_names_follow_config_order(tmp_path: Path) -> None:
    node = _two_created(tmp_path)
    every = node.ctl("dump")
    assert (every.rc, every.err) == (0, "")
    assert _names(every.out) == ["beta", "alpha"]
    assert node.ctl("dump", "all").out == every.out
    one = node.ctl("dump", "alpha", "beta", "alpha")
    assert (one.rc, _names(one.out)) == (0, ["alpha", "beta", "alpha"])
    assert "datasize: 67104256 (64MB)" in one.out


def test_dump_all_with_other_names_is_a_resource_name(tmp_path: Path) -> None:
    node = _two_created(tmp_path)
    res = node.ctl("dump", "all", "alpha")
    assert res.rc == 65
    assert res.err == "[ERROR] Unknown resource all.\n"
    assert _names(res.out) == ["alpha"]


def test_dump_first_failure_wins(tmp_path: Path) -> None:
    node = Node(tmp_path, {"bad": tmp_path / "bad.img", "good": tmp_path / "good.img"})
    node.provider("bad")
    node.provider("good")
    assert node.ctl("create", "good").rc == 0
    res = node.ctl("dump")
    assert res.rc == 255 and _names(res.out) == ["good"]
    res = node.ctl("dump", "nosuch", "bad")
    assert res.rc == 65 and len(res.err.splitlines()) == 2


def test_dump_after_secondary_wrote_metadata(tmp_path: Path) -> None:
    node = Node(tmp_path)
    path = node.provider()
    block = (METADATA / "secondary-written/after-virgin.img-first1MiB.bin").read_bytes()
    with open(path, "r+b") as f:
        f.write(block)
    res = node.ctl("dump", "test")
    expected = (METADATA / "secondary-written/after-virgin.dump.txt").read_text().splitlines()
    start = next(i for i, line in enumerate(expected) if line.startswith("resource:"))
    assert (res.rc, res.err) == (0, "")
    assert res.out.splitlines() == expected[start:start + 9]
    assert "    prevrole: secondary" in res.out


# -- usage and options ----------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    [], ["bogus"], ["create", "-h"], ["dump", "-h", "test"], ["-c", "/etc/hast.conf", "status"],
    ["-h"], ["create"], ["create", "-d"], ["role"], ["status", "-x"], ["create", "-e"],
    ["dump", "-e", "4096"], ["create", "--bad", "test"],
])
def test_usage(args: list[str]) -> None:
    res = run(*args)
    assert (res.rc, res.out) == (64, "")
    assert res.err.endswith(USAGE)


@pytest.mark.parametrize("args,diagnostic", [
    (["status", "-x"], "hastctl: illegal option -- x\n"),
    (["create", "-e"], "hastctl: option requires an argument -- e\n"),
    (["dump", "-e", "4096"], "hastctl: illegal option -- e\n"),
    (["create", "--bad", "test"], "hastctl: illegal option -- -\n"),
    (["create", "-h"], ""),
])
def test_getopt_diagnostics(args: list[str], diagnostic: str) -> None:
    assert run(*args).err == diagnostic + USAGE


def test_option_order_is_getopt_order(tmp_path: Path) -> None:
    # -e is parsed (and rejected) before -h is seen, and the reverse.
    assert run("create", "-e", "foo", "-h").err == "hastctl: Invalid extentsize\n"
    assert run("create", "-h", "-e", "foo").err == USAGE


@pytest.mark.parametrize("words", [["bad", "test"], ["primary"], ["Primary", "test"]])
def test_role_word_checked_after_the_config(tmp_path: Path, words: list[str]) -> None:
    node = Node(tmp_path)
    res = node.ctl("role", *words)
    assert (res.rc, res.out, res.err) == (64, "", USAGE)
    # FreeBSD parses the configuration before looking at the role word.
    res = run("role", "-c", str(tmp_path / "none.conf"), *words)
    assert res.rc == 72


def test_options_stop_at_first_operand(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.provider()
    assert node.ctl("create", "test").rc == 0
    # "-d" after a name is a resource name, not an option.
    res = node.ctl("dump", "test", "-d")
    assert res.rc == 65 and res.err == "[ERROR] Unknown resource -d.\n"
    res = node.ctl("dump", "--", "test")
    assert res.rc == 0 and _names(res.out) == ["test"]


def test_console_script_name_in_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["-h"], prog="py-hastctl") == 64
    err = capsys.readouterr().err
    assert err.startswith("usage: py-hastctl create [-d]")
    assert "       py-hastctl dump [-d]" in err
    assert ctl.main(["create", "-m", "x", "r"], prog="py-hastctl") == 64
    assert capsys.readouterr().err == "py-hastctl: Invalid mediasize\n"


@pytest.mark.parametrize("argv0,name", [
    ("/usr/local/sbin/py-hastctl", "py-hastctl"), ("hastctl", "hastctl"),
    (str(REPO / "hast" / "ctl.py"), "hastctl"),
])
def test_getprogname(argv0: str, name: str) -> None:
    assert ctl.getprogname(argv0) == name


# -- configuration errors -------------------------------------------------------------------

def test_missing_config_is_72(tmp_path: Path) -> None:
    conf = tmp_path / "nope.conf"
    for cmd in (["create", "r"], ["dump"], ["status"], ["role", "init", "r"]):
        res = run(cmd[0], "-c", str(conf), *cmd[1:])
        assert (res.rc, res.out) == (72, "")
        assert res.err == (f"[ERROR] Unable to open configuration file {conf}: "
                           "No such file or directory.\n")


def test_invalid_config_is_78_freebsd_line_first(tmp_path: Path) -> None:
    conf = tmp_path / "hast.conf"
    conf.write_text("# comment\ntimeout 0\n")
    res = run("dump", "-c", str(conf))
    assert (res.rc, res.out) == (78, "")
    assert res.err.splitlines() == ["[ERROR] Negative or zero timeout.",
                                    f"[ERROR] {conf}:2: Negative or zero timeout."]
    conf.write_text("\n\ntimeout 20s\n")
    res = run("status", "-c", str(conf))
    assert res.rc == 78
    assert res.err.splitlines()[0] == (
        "[ERROR] Unable to parse configuration file at line 2 near '20s': syntax error")
    assert res.err.splitlines()[1].startswith(f"[ERROR] {conf}:3: ")


def test_resource_for_another_node_is_78(tmp_path: Path) -> None:
    conf = tmp_path / "hast.conf"
    conf.write_text("resource r0 {\n\ton hostb {\n\t\tlocal /dev/null\n"
                    "\t\tremote 10.0.0.1\n\t}\n}\n")
    res = run("dump", "-c", str(conf))
    assert res.rc == 78
    assert res.err.splitlines()[0] == (
        "[ERROR] No resource r0 configuration for this node (acceptable node names: hasta).")


# -- requests to hastd ------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["role", "primary", "test"], ["role", "init", "all"], ["role", "secondary", "-d", "test"],
    ["list"], ["list", "all"], ["status"], ["status", "test", "nosuch"],
])
def test_control_commands_without_hastd(tmp_path: Path, args: list[str]) -> None:
    node = Node(tmp_path)
    res = node.ctl(*args)
    assert (res.rc, res.out) == (71, "")
    assert res.err == (f"[ERROR] Unable to connect to hastd via {node.control}: "
                       "No such file or directory.\n")


def test_control_stale_socket_is_connection_refused(tmp_path: Path) -> None:
    import socket

    node = Node(tmp_path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(node.control))
    stale.close()  # the file stays, nobody listens: what a crashed hastd leaves behind
    res = node.ctl("status")
    assert (res.rc, res.err) == (
        71, f"[ERROR] Unable to connect to hastd via {node.control}: Connection refused.\n")


def test_control_request_built_like_freebsd(tmp_path: Path, monkeypatch) -> None:
    """The bytes hastctl sends over a real control socket, answered by a scripted peer."""
    from hast import nv as nvmod
    from hast import proto

    sent: list[nvmod.NV] = []
    node = Node(tmp_path)
    server = proto.listen(str(node.control))

    def answer() -> None:
        for _ in range(3):
            conn, _ = server.accept()
            with conn:
                _version, msg = proto.recv_frame(conn, proto.MAX_NV_CONTROL)
                sent.append(msg)
                proto.send_frame(conn, 2, nvmod.NV().add_string("resource0", "test")
                                 .add_int16("error0", 1))

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    monkeypatch.setenv("HAST_NODE_NAME", "hasta")
    try:
        assert ctl.main(["role", "-c", str(node.conf), "primary", "test", "all"]) == 1
        assert ctl.main(["status", "-c", str(node.conf)]) == 1
        assert ctl.main(["list", "-c", str(node.conf), "test", "x"]) == 1
        thread.join(10)
    finally:
        server.close()
    r1, r2, r3 = sent
    assert list(r1) == [("cmd", 2, 1), ("role", 2, 2), ("resource0", 17, "test"),
                        ("resource1", 17, "all")]
    assert list(r2) == [("cmd", 2, 2), ("resource0", 17, "all")]
    assert list(r3) == [("cmd", 2, 2), ("resource0", 17, "test"), ("resource1", 17, "x")]


# -- block devices ----------------------------------------------------------------------------

@contextmanager
def loop_device(backing: Path, size: int, sector_size: int) -> Iterator[str]:
    """A loop device over a sparse file (needs root and util-linux, like tests/test_io.py)."""
    losetup = shutil.which("losetup")
    if os.geteuid() != 0 or losetup is None:
        pytest.fail("loop devices need root and losetup (util-linux)")
    with open(backing, "wb") as f:
        f.truncate(size)
    res = subprocess.run([losetup, "-f", "--show", "--sector-size", str(sector_size),
                          str(backing)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"losetup failed: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run([losetup, "-d", dev], check=False)


def test_create_and_dump_on_a_4k_sector_block_device(tmp_path: Path) -> None:
    with loop_device(tmp_path / "backing", 64 * MiB, 4096) as dev:
        node = Node(tmp_path, {"test": Path(dev)})
        res = node.ctl("create", "-e", "2048", "test")
        assert (res.rc, res.err) == (
            65, "[ERROR] [test] Extent size (2048) is less than sector size (4096).\n")
        res = node.ctl("create", "test")
        assert (res.rc, res.err) == (0, "")
        res = node.ctl("dump", "test")
        assert res.rc == 0, res.err
        # 32 extents: an 8-byte bitmap rounded up to one 4096-byte sector.
        assert "    datasize: 67100672 (64MB)\n" in res.out
        assert "    localoff: 8192\n" in res.out
        with open(dev, "rb") as f:
            data = f.read(8192)
        assert Metadata.unpack(data[:4096], "test").localoff == 8192
        assert data[4096:] == bytes(4096)
