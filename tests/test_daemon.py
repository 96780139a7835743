"""hastd's main process as a black box: a real ``python -m hast.daemon`` on real sockets.

Covers the command line, start-up failures and their exit codes, the pidfile, signals
(SIGTERM, SIGHUP reload), access control and handshake steps 1-2 as a FreeBSD primary sees
them (a raw-socket test primary speaks the wire protocol), and the daemon's resilience to
garbage on its sockets.  :class:`HastNode` is the harness the control and hook tests share:
a temp dir with hast.conf (control socket, pidfile and listen address inside it) and a
daemon in the foreground whose log is one file, stopped at the end of every test even when
the test fails.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from hast import config, nv, proto
from tests.vectors import WIRE

REPO = Path(__file__).resolve().parents[1]
NODE = "hasta"
NODE_ID = config.NodeIdentity(hostname=NODE, hostuuid="", hostid=0, override=NODE)
WAIT = 30.0   # upper bound of every poll; never part of what a test asserts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon_env() -> dict[str, str]:
    return dict(os.environ, HAST_NODE_NAME=NODE, PYTHONPATH=str(REPO))


def run_hastd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """hastd for commands that end by themselves (usage, start-up failures)."""
    return subprocess.run([sys.executable, "-m", "hast.daemon", *args], cwd=cwd or REPO,
                          env=daemon_env(), capture_output=True, text=True, timeout=60)


def poll(predicate, what: str, timeout: float = WAIT):
    """Wait until ``predicate()`` is truthy and return its value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class HastNode:
    """A temp dir with hast.conf for node "hasta" and, once started, a hastd in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "hast.conf"
        self.control = root / "ctl.sock"
        self.pidfile = root / "hastd.pid"
        self.logfile = root / "hastd.log"
        self.port = free_port()
        self.listen = f"tcp4://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.extra_pids: list[int] = []
        self.write_conf({"test": {}})
        # py-hast's own settings beside hast.conf: a primary worker serves its NBD socket
        # from the temp dir and creates no /dev/hast device (no loop device, no nbdfuse).
        (root / "py-hast.conf").write_text(f"devdir none\nsockdir {root}\n")

    # -- configuration ----------------------------------------------------------------------

    def write_conf(self, resources: dict[str, dict[str, str]], *, control: Path | str | None = None,
                   listen: Iterable[str] | None = None, pidfile: Path | None = None,
                   raw: str | None = None) -> None:
        """hast.conf with these resources; a resource's dict sets exec, remote, local...

        Keys ``exec``/``timeout``/``replication``/... go to the resource level, ``local``,
        ``remote`` (default 127.0.0.1) and ``source`` into ``on hasta``.
        """
        if raw is not None:
            self.conf.write_text(raw)
            return
        lines = [f"control {control or self.control}",
                 f"pidfile {pidfile or self.pidfile}"]
        lines += [f"listen {addr}" for addr in (listen or [self.listen])]
        for name, opts in resources.items():
            node_keys = {"local", "remote", "source"}
            lines.append(f"resource {name} {{")
            lines += [f"\t{k} {v}" for k, v in opts.items() if k not in node_keys]
            lines.append(f"\ton {NODE} {{")
            lines.append(f"\t\tlocal {opts.get('local', self.root / (name + '.img'))}")
            lines.append(f"\t\tremote {opts.get('remote', '127.0.0.1')}")
            if "source" in opts:
                lines.append(f"\t\tsource {opts['source']}")
            lines += ["\t}", "}"]
        self.conf.write_text("\n".join(lines) + "\n")

    def config(self) -> config.Config:
        return config.load(str(self.conf), NODE_ID)

    # -- the daemon -------------------------------------------------------------------------

    def start(self, *args: str, conf: str | None = None, pidfile: bool = True,
              cwd: Path | None = None, wait: bool = True) -> None:
        """``hastd -F -c hast.conf -P hastd.pid`` with its log (stdout+stderr) in one file."""
        assert self.proc is None
        argv = [sys.executable, "-m", "hast.daemon", "-F", "-c", conf or str(self.conf)]
        if pidfile:
            argv += ["-P", str(self.pidfile)]
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen([*argv, *args], cwd=cwd or REPO, env=daemon_env(),
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        if wait:
            self.wait_log(r"\[INFO\] Started successfully, running protocol version 2\.")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if need be; returns the exit status."""
        for pid in self.extra_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.extra_pids.clear()
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(2 * WAIT)  # hastd itself may wait 30 s for a worker
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, count: int = 1, timeout: float = WAIT) -> re.Match:
        """The ``count``-th match of ``pattern`` (a regex) in the log, waiting for it."""
        rx = re.compile(pattern, re.M)

        def found() -> re.Match | None:
            matches = list(rx.finditer(self.log()))
            if len(matches) >= count:
                return matches[count - 1]
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"hastd exited ({self.proc.returncode}) before "
                                     f"{pattern!r} was logged:\n{self.log()}")
            return None

        try:
            return poll(found, pattern, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- hastd log ---\n{self.log()}") from None

    def reload(self, count: int = 1) -> None:
        """SIGHUP and wait for the ``count``-th end of a reload, good or bad."""
        self.signal(signal.SIGHUP)
        self.wait_log(r"Configuration (reloaded successfully|not reloaded)\.", count)

    # -- the control socket -----------------------------------------------------------------

    def request(self, msg: nv.NV) -> nv.NV:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(WAIT)
            s.connect(str(self.control))
            proto.send_frame(s, proto.PROTO_VERSION, msg)
            return proto.recv_frame(s, proto.MAX_NV_CONTROL)[1]

    def status(self, name: str = "test") -> dict[str, object]:
        reply = self.request(nv.NV().add_uint8("cmd", 2).add_string("resource0", name))
        return {k[:-1]: v for k, v in reply.to_dict().items() if k.endswith("0")}

    def role(self, role: str, *names: str) -> nv.NV:
        msg = nv.NV().add_uint8("cmd", 1).add_uint8(
            "role", {"init": 1, "primary": 2, "secondary": 3}[role])
        for ii, name in enumerate(names or ("test",)):
            msg.add_string(f"resource{ii}", name)
        return self.request(msg)


@pytest.fixture
def node(tmp_path: Path):
    n = HastNode(tmp_path)
    try:
        yield n
    finally:
        n.stop()


# -- a raw-socket primary ------------------------------------------------------------------------

def peer_connect(node: HastNode, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.bind((source, 0))
    s.connect(("127.0.0.1", node.port))
    return s


def read_reply(sock: socket.socket) -> tuple[int, nv.NV]:
    return proto.recv_frame(sock)


def assert_closed(sock: socket.socket) -> None:
    """The daemon closed the connection without sending anything (EOF or reset)."""
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return
    assert data == b""


def step1(node: HastNode, resource: str = "test", version: int | None = 2,
          frame_version: int = 1, source: str = "127.0.0.1"
          ) -> tuple[socket.socket, int, nv.NV]:
    """Handshake step 1 as primary.c sends it; returns (conn1, reply version byte, reply)."""
    s = peer_connect(node, source)
    msg = nv.NV().add_string("resource", resource)
    if version is not None:
        msg.add_uint8("version", version)
    proto.send_frame(s, frame_version, msg)
    fv, reply = read_reply(s)
    return s, fv, reply


def step2(node: HastNode, token: bytes, resource: str = "test") -> socket.socket:
    s = peer_connect(node)
    msg = nv.NV().add_string("resource", resource).add_uint8_array("token", token)
    msg.add_int8("virgin", 1).add_uint64("resuid", 0x123456789ABCDEF)
    msg.add_uint64("localcnt", 0).add_uint64("remotecnt", 0)
    proto.send_frame(s, 2, msg)
    return s


def vector(scenario: str, label: str) -> dict:
    return json.loads((WIRE / scenario / f"{label}.json").read_text())


# -- command line --------------------------------------------------------------------------------

USAGE = "hastd: [-dFh] [-c config] [-P pidfile]\n"


def test_usage_h() -> None:
    res = run_hastd("-h")
    assert (res.returncode, res.stdout, res.stderr) == (64, "", USAGE)


def test_illegal_option_then_usage() -> None:
    res = run_hastd("-x")
    assert (res.returncode, res.stderr) == (64, "hastd: illegal option -- x\n" + USAGE)


def test_missing_option_argument() -> None:
    res = run_hastd("-dF", "-c")
    assert (res.returncode, res.stderr) == (
        64, "hastd: option requires an argument -- c\n" + USAGE)


def test_config_syntax_error_prints_freebsd_line_then_location(tmp_path: Path) -> None:
    conf = tmp_path / "hast.conf"
    conf.write_text("control /tmp/x\nresource test {\n\tbogus\n}\n")
    res = run_hastd("-F", "-c", str(conf))
    assert res.returncode == 78
    assert res.stderr == (
        "[ERROR] Unable to parse configuration file at line 2 near 'bogus': syntax error\n"
        f"[ERROR] {conf}:3: Unable to parse configuration file at line 2 near 'bogus': "
        "syntax error\n")


def test_config_unreadable_is_72(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    res = run_hastd("-F", "-c", str(missing))
    assert res.returncode == 72
    assert res.stderr == (f"[ERROR] Unable to open configuration file {missing}: "
                          "No such file or directory.\n")


def test_relative_config_without_file_is_78(tmp_path: Path) -> None:
    res = run_hastd("-F", "-c", "nope.conf", cwd=tmp_path)
    assert res.returncode == 78
    assert res.stderr == ("[ERROR] Unable to obtain full path of nope.conf: "
                          "No such file or directory.\n")


def test_relative_config_is_resolved(node: HastNode) -> None:
    node.start(conf="hast.conf", cwd=node.root)
    node.write_conf({"test": {}, "added": {}})
    node.reload()
    assert "Resource added added." in node.log()


def test_pidfile_too_long(tmp_path: Path) -> None:
    node = HastNode(tmp_path)
    res = run_hastd("-F", "-c", str(node.conf), "-P", "/" + "p" * 1100)
    assert (res.returncode, res.stderr) == (78, "[ERROR] Pidfile path is too long.\n")


def test_listen_failure_is_71_and_leaves_no_pidfile(tmp_path: Path) -> None:
    node = HastNode(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", node.port))
        busy.listen(1)
        res = run_hastd("-F", "-c", str(node.conf), "-P", str(node.pidfile))
    assert res.returncode == 71
    assert res.stderr == (f"[ERROR] Unable to listen on address {node.listen}: "
                          "Address already in use.\n")
    assert not node.pidfile.exists()
    assert not node.control.exists()


# -- start, pidfile, signals ---------------------------------------------------------------------

def test_startup_log_pidfile_and_control_socket(node: HastNode) -> None:
    node.start("-d")
    assert node.log().splitlines()[:4] == [
        f"[DEBUG][1] PID stored in {node.pidfile}.",
        "[INFO] Started successfully, running protocol version 2.",
        f"[DEBUG][1] Listening on control address {node.control}.",
        f"[INFO] Listening on address {node.listen}.",
    ]
    assert node.pidfile.read_text() == str(node.proc.pid)
    assert stat.S_IMODE(node.pidfile.stat().st_mode) == 0o600
    mode = node.control.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) & 0o077 == 0
    # Roles are never restored: everything starts in init.
    assert node.status()["role"] == "init"


def test_sigterm_removes_pidfile_and_control_socket(node: HastNode) -> None:
    node.start()
    assert node.stop() == 0
    assert "[INFO] Termination signal received, exiting." in node.log()
    assert not node.pidfile.exists()
    assert not node.control.exists()


def test_sigint_exits_zero(node: HastNode) -> None:
    node.start()
    node.signal(signal.SIGINT)
    assert node.proc.wait(WAIT) == 0


def test_second_instance_is_refused(node: HastNode) -> None:
    node.start()
    res = run_hastd("-F", "-c", str(node.conf), "-P", str(node.pidfile))
    assert res.returncode == 75
    assert res.stderr == (f"[ERROR] Another hastd is already running, pidfile: "
                          f"{node.pidfile}, pid: {node.proc.pid}.\n")
    # The running one is untouched.
    assert node.pidfile.read_text() == str(node.proc.pid)
    assert node.status()["role"] == "init"


def test_stale_pidfile_is_taken_over(node: HastNode) -> None:
    node.pidfile.write_text("999999")
    node.start()
    assert node.pidfile.read_text() == str(node.proc.pid)


def test_no_pidfile_in_foreground_without_P(node: HastNode) -> None:
    node.start(pidfile=False)
    assert not node.pidfile.exists()


def test_daemonizes_without_F(node: HastNode) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "hast.daemon", "-c", str(node.conf)],
        cwd=REPO, env=daemon_env(), stdin=subprocess.DEVNULL, capture_output=True,
        timeout=60)
    # daemon(3): the invoking process exits 0 at once, the daemon lives on.
    assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")
    pid = int(poll(lambda: node.pidfile.exists() and node.pidfile.read_text(), "pidfile"))
    node.extra_pids.append(pid)
    os.kill(pid, 0)
    poll(node.control.exists, "control socket")
    assert node.status()["role"] == "init"
    os.kill(pid, signal.SIGTERM)
    poll(lambda: not node.pidfile.exists(), "pidfile removal")
    poll(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), "daemon exit")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


# -- SIGHUP ----------------------------------------------------------------------------------------

def test_reload_adds_and_removes_resources(node: HastNode) -> None:
    hook = _recording_hook(node.root)
    node.write_conf({"test": {"exec": str(hook)}})
    node.start()
    node.role("secondary")
    node.write_conf({"other": {"exec": str(hook)}})
    node.reload()
    log = node.log()
    assert "[INFO] Reloading configuration..." in log
    assert "[INFO] [test] (secondary) Role changed to init." in log
    assert "[INFO] Resource test removed." in log
    assert "[INFO] Resource other added." in log
    assert "[INFO] Configuration reloaded successfully." in log
    assert node.status("test")["error"] == 1
    assert node.status("other")["role"] == "init"
    wait_hooks(node.root, [["role", "test", "init", "secondary"],
                                            ["role", "test", "secondary", "init"]])


def test_reload_with_bad_config_keeps_the_old_one(node: HastNode) -> None:
    node.start()
    node.role("secondary")
    node.write_conf({}, raw="resource {\n")
    node.reload()
    log = node.log()
    assert "[ERROR] Unable to parse configuration file at line 0 near '{': syntax error" in log
    assert "[WARNING] Configuration not reloaded." in log
    assert node.status()["role"] == "secondary"


def test_reload_restarts_a_modified_secondary(node: HastNode) -> None:
    hook = _recording_hook(node.root)
    node.write_conf({"test": {"exec": str(hook)}})
    node.start()
    node.role("secondary")
    node.write_conf({"test": {"exec": str(hook), "timeout": "7"}})
    node.reload()
    assert ("[INFO] Resource test configuration was modified, restarting it."
            in node.log())
    assert node.status()["role"] == "secondary"
    wait_hooks(node.root, [["role", "test", "init", "secondary"],
                                            ["role", "test", "secondary", "init"],
                                            ["role", "test", "init", "secondary"]])


def test_reload_unchanged_resource_runs_no_hook(node: HastNode) -> None:
    hook = _recording_hook(node.root)
    node.write_conf({"test": {"exec": str(hook)}})
    node.start("-d")
    node.role("secondary")
    node.reload()
    assert "modified" not in node.log()
    assert node.log().count("Executing hook:") == 1
    wait_hooks(node.root, [["role", "test", "init", "secondary"]])


def test_reload_moves_listen_and_control_sockets(node: HastNode) -> None:
    node.start()
    old_listen, old_control = node.listen, node.control
    new_port = free_port()
    new_listen = f"tcp4://127.0.0.1:{new_port}"
    new_control = node.root / "ctl2.sock"
    node.write_conf({"test": {}}, control=new_control, listen=[new_listen])
    node.reload()
    log = node.log()
    assert f"[INFO] Listening on new address {new_listen}." in log
    assert f"[INFO] Control socket changed from {old_control} to {new_control}." in log
    assert f"[INFO] No longer listening on address {old_listen}." in log
    assert not old_control.exists()
    node.control, node.port = new_control, new_port
    assert node.status()["role"] == "init"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(old_listen.rsplit(":", 1)[1])), 5)
    node.role("secondary")
    _, _, reply = step1(node)
    assert reply.get_uint8("version") == 2


def test_reload_control_address_spelled_differently(node: HastNode) -> None:
    node.start()
    node.write_conf({"test": {}}, control=f"uds://{node.control}")
    node.reload()
    assert (f"[INFO] Control socket changed from {node.control} to uds://{node.control}."
            in node.log())
    assert node.status()["role"] == "init"


def test_reload_keeps_listening(node: HastNode) -> None:
    node.start()
    node.write_conf({"test": {}, "more": {}})
    node.reload()
    assert f"[INFO] Keep listening on address {node.listen}." in node.log()


def test_reload_without_usable_listen_address_changes_nothing(node: HastNode) -> None:
    node.start()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = f"tcp4://127.0.0.1:{busy.getsockname()[1]}"
        node.write_conf({"test": {}, "more": {}}, listen=[taken])
        node.reload()
    log = node.log()
    assert f"[WARNING] Unable to listen on address {taken}: Address already in use." in log
    assert "[ERROR] No addresses to listen on." in log
    assert "[WARNING] Configuration not reloaded." in log
    assert node.status("more")["error"] == 1


def test_reload_switches_pidfile_only_when_daemonized_without_P(node: HastNode) -> None:
    # With -P (our harness), the pidfile in hast.conf is not ours to follow.
    node.start()
    node.write_conf({"test": {}}, pidfile=node.root / "other.pid")
    node.reload()
    assert "Pidfile changed" not in node.log()
    assert node.pidfile.exists() and not (node.root / "other.pid").exists()


# -- roles and workers -------------------------------------------------------------------------

def test_primary_worker_failure_reverts_to_init_without_hook(node: HastNode) -> None:
    hook = _recording_hook(node.root)
    # The local component does not exist: whatever the worker does, it cannot serve.
    node.write_conf({"test": {"exec": str(hook), "local": str(node.root / "missing")}})
    node.start("-d")
    reply = node.role("primary")
    assert reply.get_string("role0") == "init"
    node.wait_log(r"\[ERROR\] \[test\] \(primary\) Worker process exited ungracefully "
                  r"\(pid=\d+, exitcode=\d+\)\.")
    node.wait_log(r"\[INFO\] \[test\] \(primary\) Changing resource role back to init\.")
    status = node.status()
    assert (status["role"], status["workerpid"]) == ("init", 0)
    # The loop is sequential: had the revert run a hook, it would be logged by now.
    assert node.log().count("Executing hook:") == 1
    wait_hooks(node.root, [["role", "test", "init", "primary"]])


# -- replication connections ---------------------------------------------------------------------

def test_step1_reply_is_typed_like_freebsd(node: HastNode) -> None:
    node.start("-d")
    node.role("secondary")
    sock, fv, reply = step1(node)
    with sock:
        ref = vector("virgin", "02-s2c-handshake1-reply")
        assert fv == ref["header"]["version"]
        assert [(n, nv.TYPE_NAMES[t]) for n, t, _v in reply] == [
            (f["name"], f["type"]) for f in ref["nv"]]
        assert len(reply.pack()) == ref["header"]["nv_size"]
        assert reply.get_uint8("version") == 2
        assert len(reply.get_uint8_array("token")) == 16
    log = node.log()
    assert re.search(r"\[INFO\] Connection from tcp://127\.0\.0\.1:\d+ to "
                     rf"tcp://127\.0\.0\.1:{node.port}\.", log)
    assert "Negotiated protocol version 2." in log


def test_tokens_are_random(node: HastNode) -> None:
    node.start()
    node.role("secondary")
    a, _, r1 = step1(node)
    b, _, r2 = step1(node)
    a.close()
    b.close()
    assert r1.get_uint8_array("token") != r2.get_uint8_array("token")


@pytest.mark.parametrize("sent,expected", [(None, 1), (1, 1), (2, 2), (7, 2)])
def test_version_negotiation(node: HastNode, sent: int | None, expected: int) -> None:
    node.start("-d")
    node.role("secondary")
    sock, fv, reply = step1(node, version=sent)
    sock.close()
    # The reply travels with the negotiated version in its frame header, as hr_version.
    assert (fv, reply.get_uint8("version")) == (expected, expected)
    if sent == 7:
        assert ("[INFO] [test] (secondary) Remote protocol version 7 is not supported, "
                "falling back to version 2." in node.log())


def test_unknown_resource(node: HastNode) -> None:
    node.start()
    sock, fv, reply = step1(node, resource="nosuch")
    with sock:
        ref = vector("error-unknown-resource", "02-s2c-handshake1-reply")
        assert fv == 2
        assert reply.pack() == nv.from_fields(
            (f["name"], f["type"], f["value"]) for f in ref["nv"]).pack()
        assert_closed(sock)
    assert re.search(r"\[ERROR\] No resource 'nosuch' as requested by "
                     r"tcp://127\.0\.0\.1:\d+\.", node.log())


def test_role_init_refuses(node: HastNode) -> None:
    node.start()
    sock, fv, reply = step1(node)
    with sock:
        ref = (WIRE / "error-role-init" / "02-s2c-handshake1-reply.canonical.bin").read_bytes()
        assert proto.HEADER.pack(fv, len(reply.pack())) + reply.pack() == ref
        assert not reply.exists("wait")
        assert_closed(sock)
    assert re.search(r"\[WARNING\] \[test\] \(init\) We act as init for the resource and not "
                     r"as secondary as requested by tcp://127\.0\.0\.1:\d+\.", node.log())


def needs_primary(fn):  # type: ignore[no-untyped-def]
    """Marks the tests that run a real primary worker (kept as a name for grep)."""
    return fn


def start_primary(node: HastNode, *args: str) -> tuple[str, int]:
    """A resource in role primary with a live worker: (resource name, worker pid).

    The provider is created with hastctl; the peer is a closed port, so the worker runs
    degraded and stays up.  Skips the test when the worker cannot run here.
    """
    name = "prim"
    node.write_conf({name: {"remote": f"tcp4://127.0.0.1:{free_port()}", "timeout": "5"}})
    with open(node.root / f"{name}.img", "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run([sys.executable, "-m", "hast.ctl", "create", "-c", str(node.conf), name],
                   cwd=REPO, env=daemon_env(), check=True, timeout=60, capture_output=True)
    node.start(*args)
    node.role("primary", name)
    status = poll(lambda: (s := node.status(name)) and ("status" in s or s["role"] == "init")
                  and s, "primary worker")
    assert status["role"] == "primary", "the primary worker did not stay up"
    return name, int(status["workerpid"])


@needs_primary
def test_role_primary_refuses_with_wait(node: HastNode) -> None:
    name, _pid = start_primary(node)
    sock, fv, reply = step1(node, resource=name)
    with sock:
        assert fv == 2
        assert reply.get_string("errmsg") == (
            "Remote node acts as primary for the resource and not as secondary.")
        assert reply.get_uint8("wait") == 1
        assert_closed(sock)


@needs_primary
def test_primary_status_comes_from_its_worker(node: HastNode) -> None:
    name, pid = start_primary(node)
    status = node.status(name)
    assert (status["role"], status["status"], status["workerpid"]) == ("primary", "degraded", pid)
    assert (status["extentsize"], status["keepdirty"]) == (2097152, 64)
    reply = node.request(nv.NV().add_uint8("cmd", 2).add_string("resource0", name))
    fields = [(n[:-1], nv.TYPE_NAMES[t]) for n, t, _v in reply]
    worker_fields = fields[fields.index(("workerpid", "int32")) + 1:]
    assert worker_fields == [
        ("status", "string"), ("dirty", "uint64"), ("extentsize", "uint32"),
        ("keepdirty", "uint32")] + [(f, "uint64") for f in (
            "stat_read", "stat_write", "stat_delete", "stat_flush", "stat_activemap_update",
            "stat_read_error", "stat_write_error", "stat_delete_error", "stat_flush_error",
            "idle_queue_size", "local_queue_size", "send_queue_size", "recv_queue_size",
            "done_queue_size")]


@needs_primary
def test_primary_worker_killed_by_a_signal_is_restarted(node: HastNode) -> None:
    name, pid = start_primary(node)
    os.kill(pid, signal.SIGKILL)
    node.wait_log(rf"\[ERROR\] \[{name}\] \(primary\) Worker process killed "
                  rf"\(pid={pid}, signal=9\)\.")
    node.wait_log(rf"\[INFO\] \[{name}\] \(primary\) Restarting worker process\.")
    status = poll(lambda: (s := node.status(name)) and s["workerpid"] not in (0, pid) and s,
                  "restarted worker")
    assert status["role"] == "primary"


@needs_primary
def test_primary_role_change_stops_the_worker(node: HastNode) -> None:
    name, pid = start_primary(node, "-d")
    assert node.role("init", name).get_string("role0") == "primary"
    # The reply comes only after the worker is gone.
    assert f"[DEBUG][1] [{name}] (init) Worker process {pid} stopped." in node.log()
    assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    assert node.status(name)["workerpid"] == 0


@needs_primary
def test_primary_takes_tunables_live(node: HastNode) -> None:
    name, pid = start_primary(node)
    conf = node.conf.read_text()
    node.conf.write_text(conf.replace("timeout 5", "timeout 9"))
    node.reload()
    log_text = node.log()
    assert f"[INFO] Resource {name} configuration was modified, reloading it." in log_text
    assert "Reload failed" not in log_text and "reload message" not in log_text
    assert node.status(name)["workerpid"] == pid


@needs_primary
def test_termination_stops_the_primary_worker(node: HastNode) -> None:
    name, pid = start_primary(node)
    assert node.stop() == 0
    assert (f"[INFO] Terminating worker process (resource={name}, role=primary, pid={pid})."
            in node.log())
    assert not Path(f"/proc/{pid}").exists() or _zombie(pid)


def test_unknown_client_is_closed_silently(node: HastNode) -> None:
    node.start()
    sock = peer_connect(node, source="127.0.0.2")
    with sock:
        proto.send_frame(sock, 1, nv.NV().add_string("resource", "test").add_uint8("version", 2))
        assert_closed(sock)
    node.wait_log(r"\[ERROR\] Client tcp://127\.0\.0\.2:\d+ isn't known\.")


def test_client_without_access_to_this_resource(node: HastNode) -> None:
    node.write_conf({"test": {"remote": "127.0.0.2"}, "mine": {}})
    node.start()
    node.role("secondary", "test")
    sock, fv, reply = step1(node)
    with sock:
        assert (fv, reply.get_string("errmsg")) == (2, "No access to the resource.")
        assert_closed(sock)
    assert re.search(r"\[ERROR\] \[test\] \(secondary\) Client tcp://127\.0\.0\.1:\d+ has no "
                     r"access to the resource\.", node.log())


def test_unparsable_remote_matches_nobody(node: HastNode) -> None:
    # hast.conf does not check addresses; hastd meets them only when a peer connects.
    node.write_conf({"odd": {"remote": "tcp6://[::1]"}, "test": {}})
    node.start()
    node.role("secondary", "odd", "test")
    sock, _, reply = step1(node, resource="odd")
    with sock:
        assert reply.get_string("errmsg") == "No access to the resource."
    sock, _, reply = step1(node)
    with sock:
        assert len(reply.get_uint8_array("token")) == 16


def test_header_without_resource_is_closed(node: HastNode) -> None:
    node.start()
    sock = peer_connect(node)
    with sock:
        proto.send_frame(sock, 1, nv.NV().add_uint8("version", 2))
        assert_closed(sock)
    node.wait_log(r"\[ERROR\] No 'resource' field in the header received from "
                  r"tcp://127\.0\.0\.1:\d+\.")


def test_token_of_wrong_size_is_closed(node: HastNode) -> None:
    node.start()
    node.role("secondary")
    sock = peer_connect(node)
    with sock:
        proto.send_frame(sock, 2, nv.NV().add_string("resource", "test")
                         .add_uint8_array("token", b"x" * 15))
        assert_closed(sock)
    node.wait_log(r"Received token of invalid size from tcp://127\.0\.0\.1:\d+ "
                  r"\(expected 16, got 15\)\.")


def test_wrong_token(node: HastNode) -> None:
    node.start()
    node.role("secondary")
    conn1, _, reply = step1(node)
    with conn1:
        token = reply.get_uint8_array("token")
        wrong = bytes(b ^ 0xFF for b in token)
        with step2(node, wrong) as conn2:
            fv, err = read_reply(conn2)
            assert (fv, err.get_string("errmsg")) == (2, "Token doesn't match.")
            assert_closed(conn2)
    assert re.search(r"\[ERROR\] \[test\] \(secondary\) Token received from "
                     r"tcp://127\.0\.0\.1:\d+ doesn't match\.", node.log())


def test_token_before_any_step1_does_not_match(node: HastNode) -> None:
    # FreeBSD's token buffer starts zeroed; a zero token must not pass for a real one.
    node.start()
    node.role("secondary")
    with step2(node, bytes(16)) as conn2:
        assert read_reply(conn2)[1].get_string("errmsg") == "Token doesn't match."


def test_step2_starts_a_secondary_worker_and_consumes_the_token(node: HastNode) -> None:
    node.start("-d")
    node.role("secondary")
    conn1, _, reply = step1(node)
    token = reply.get_uint8_array("token")
    with conn1, step2(node, token):
        node.wait_log(r"\[DEBUG\]\[1\] \[test\] \(secondary\) Outgoing connection to "
                      r"tcp://127\.0\.0\.1:\d+ configured\.")
        # There is no provider: whatever the worker makes of the handshake, it ends.
        node.wait_log(r"\[test\] \(secondary\) Worker process (exited|killed) [^\n]*pid=\d+")
        # The token was for that one session only.
        with step2(node, token) as again:
            assert read_reply(again)[1].get_string("errmsg") == "Token doesn't match."
    assert node.status()["role"] == "secondary"


def test_new_primary_session_replaces_the_secondary_worker(node: HastNode) -> None:
    with open(node.root / "test.img", "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run([sys.executable, "-m", "hast.ctl", "create", "-c", str(node.conf), "test"],
                   cwd=REPO, env=daemon_env(), check=True, timeout=60, capture_output=True)
    node.start("-d")
    node.role("secondary")
    conn1, _, reply = step1(node)
    with conn1, step2(node, reply.get_uint8_array("token")):
        _fv, answer = read_reply(conn1)  # step 3, from the worker
        assert not answer.exists("errmsg"), answer.get_string("errmsg")
        pid = poll(lambda: node.status()["workerpid"], "secondary worker")
        # The same primary starts over (say, after a restart): the old session must go.
        again, _, reply = step1(node)
        with again:
            assert len(reply.get_uint8_array("token")) == 16
    log_text = node.log()
    assert (f"[DEBUG][1] [test] (secondary) Worker process exists (pid={pid}), stopping it."
            in log_text)
    assert (f"[ERROR] [test] (secondary) Worker process killed (pid={pid}, signal=2)."
            in log_text)
    assert node.status()["workerpid"] == 0


def test_new_step1_cancels_a_half_open_connection(node: HastNode) -> None:
    node.start("-d")
    node.role("secondary")
    first, _, reply = step1(node)
    with first:
        old = reply.get_uint8_array("token")
        second, _, _ = step1(node)
        with second:
            node.wait_log(r"Canceling half-open connection from tcp://127\.0\.0\.1:\d+ on "
                          r"connection from tcp://127\.0\.0\.1:\d+\.")
            assert_closed(first)
            with step2(node, old) as conn2:
                assert read_reply(conn2)[1].get_string("errmsg") == "Token doesn't match."


def test_role_change_closes_a_half_open_connection(node: HastNode) -> None:
    node.start()
    node.role("secondary")
    conn1, _, _ = step1(node)
    with conn1:
        node.role("init")
        assert_closed(conn1)


# -- garbage never kills the daemon ------------------------------------------------------------

def _still_serving(node: HastNode) -> None:
    assert node.status()["role"] in ("init", "secondary")
    assert node.proc.poll() is None


@pytest.mark.parametrize("payload,errtext", [
    (b"\xff" * 64, os.strerror(getattr(errno, "ERPCMISMATCH", errno.EPROTO))),  # version 255
    (proto.HEADER.pack(2, 1 << 31), os.strerror(errno.EMSGSIZE)),     # oversized nv
    (proto.HEADER.pack(2, 8) + b"\x01" * 8, os.strerror(errno.EINVAL)),  # malformed nv
    (proto.HEADER.pack(2, 100) + b"\x11\x02", None),                 # stops mid-message
    (b"\x02\x00", None),                                             # half a header
], ids=["version", "oversized", "malformed", "mid-message", "half-header"])
def test_garbage_from_a_known_peer(node: HastNode, payload: bytes,
                                   errtext: str | None) -> None:
    node.start()
    node.role("secondary")
    sock = peer_connect(node)
    with sock:
        sock.sendall(payload)
        if errtext is not None:
            node.wait_log(r"\[ERROR\] Unable to receive header from "
                          rf"tcp://127\.0\.0\.1:\d+: {re.escape(errtext)}\.")
            assert_closed(sock)
        else:
            # The daemon waits for the rest without blocking anybody else...
            _still_serving(node)
            conn, _, reply = step1(node)
            conn.close()
            assert reply.get_uint8("version") == 2
            # ...and drops the unfinished frame at EOF, saying why.
            sock.shutdown(socket.SHUT_WR)
            node.wait_log(r"\[ERROR\] Unable to receive header from "
                          r"tcp://127\.0\.0\.1:\d+: "
                          + re.escape(os.strerror(errno.ENOTCONN)) + r"\.")
    _still_serving(node)


def test_empty_nv_is_handled(node: HastNode) -> None:
    node.start()
    sock = peer_connect(node)
    with sock:
        sock.sendall(proto.HEADER.pack(1, 0))
        assert_closed(sock)
    node.wait_log(r"No 'resource' field in the header received from")
    _still_serving(node)


def test_stalled_peer_times_out(node: HastNode) -> None:
    node.start()
    sock = peer_connect(node)
    with sock:
        sock.sendall(b"\x01\x10")
        _still_serving(node)
        node.wait_log(r"\[ERROR\] Unable to receive header from tcp://127\.0\.0\.1:\d+: "
                      + re.escape(os.strerror(errno.ETIMEDOUT)) + r"\.", timeout=60)
        assert_closed(sock)
    _still_serving(node)


def test_many_idle_connections_do_not_block(node: HastNode) -> None:
    node.start()
    socks = [peer_connect(node) for _ in range(20)]
    try:
        _still_serving(node)
        node.role("secondary")
        conn, _, reply = step1(node)
        conn.close()
        assert len(reply.get_uint8_array("token")) == 16
    finally:
        for s in socks:
            s.close()


# -- helpers for hooks ---------------------------------------------------------------------------

def _recording_hook(root: Path) -> Path:
    """A hook that appends its arguments (one JSON list per call) to root/hook.calls."""
    hook = root / "hook.sh"
    out = root / "hook.calls"
    hook.write_text(
        "#!/bin/sh\n"
        f"{sys.executable} -c 'import json,sys; print(json.dumps(sys.argv[1:]))' \"$@\" "
        f">> '{out}'\n")
    hook.chmod(0o755)
    return hook


def wait_hooks(root: Path, expected: list[list[str]]) -> None:
    """Wait for as many hook calls as expected; hooks run concurrently, so order is free."""
    calls = poll(lambda: len(c := _hook_calls(root)) >= len(expected) and c, "hook calls")
    assert sorted(calls) == sorted(expected)


def _hook_calls(root: Path) -> list[list[str]]:
    try:
        text = (root / "hook.calls").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
