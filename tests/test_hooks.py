"""Event hooks (``exec``): what the hook program receives and what hastd logs about it.

Through a running daemon: the ``role`` hook's arguments, the exit-status texts (graceful,
ungraceful, killed, exec failure), the child's descriptors, signal state and stdio, and that a
slow hook never blocks hastd.  In-process on hast.hooks itself: argv[0] is the basename,
shell metacharacters in paths and arguments stay literal, the 60-second reports, vanished
hooks and over-long command lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hast import hooks, log, proto
from tests.test_daemon import (
    REPO,
    HastNode,
    daemon_env,
    poll,
    read_reply,
    step1,
    step2,
    wait_hooks,
)
from tests.test_daemon import _recording_hook as recording_hook


@pytest.fixture
def node(tmp_path: Path):
    n = HastNode(tmp_path)
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture
def inproc(capsys):
    """hast.hooks in this process, debug level 1, forgetting its children afterwards."""
    log.init(log.MODE_STD)
    log.set_prefix("")
    log.set_debug(1)
    hooks.init(foreground=False)
    try:
        yield capsys
    finally:
        for hp in hooks.running():
            try:
                os.kill(hp.pid, signal.SIGKILL)
                os.waitpid(hp.pid, 0)
            except OSError:
                pass
        hooks.fini()
        log.set_debug(0)


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


# -- through the daemon ------------------------------------------------------------------------

def test_role_change_runs_the_role_hook(node: HastNode) -> None:
    hook = recording_hook(node.root)
    node.write_conf({"test": {"exec": str(hook)}})
    node.start("-d")
    node.role("secondary")
    node.role("secondary")  # unchanged: no hook
    node.role("init")
    wait_hooks(node.root, [["role", "test", "init", "secondary"],
                           ["role", "test", "secondary", "init"]])
    node.wait_log(rf"\[DEBUG\]\[1\] Hook exited gracefully \(pid=\d+, "
                  rf"cmd=\[{re.escape(str(hook))} role test secondary init\]\)\.")
    log_text = node.log()
    assert f"[DEBUG][1] Executing hook: {hook} role test init secondary\n" in log_text
    assert log_text.count("Executing hook:") == 2


def test_exit_status_texts(node: HastNode) -> None:
    root = node.root
    ok = script(root / "ok.sh", "exit 0\n")
    fail = script(root / "fail.sh", "exit 3\n")
    killed = script(root / "killed.sh", "kill -9 $$\n")
    noexec = root / "noexec.sh"
    noexec.write_text("#!/bin/sh\nexit 0\n")
    noexec.chmod(0o644)
    missing = root / "missing.sh"
    node.write_conf({name: {"exec": str(path)} for name, path in (
        ("ok", ok), ("fail", fail), ("killed", killed), ("noexec", noexec),
        ("missing", missing))})
    node.start("-d")
    node.role("secondary", "all")

    def cmd(path: Path, name: str) -> str:
        return re.escape(f"[{path} role {name} init secondary]")

    node.wait_log(rf"^\[DEBUG\]\[1\] Hook exited gracefully \(pid=\d+, cmd={cmd(ok, 'ok')}\)\.$")
    node.wait_log(rf"^\[ERROR\] Hook exited ungracefully \(pid=\d+, exitcode=3, "
                  rf"cmd={cmd(fail, 'fail')}\)\.$")
    node.wait_log(rf"^\[ERROR\] Hook was killed \(pid=\d+, signal=9, "
                  rf"cmd={cmd(killed, 'killed')}\)\.$")
    node.wait_log(rf"^\[ERROR\] Unable to execute {re.escape(str(noexec))}: "
                  r"Permission denied\.$")
    node.wait_log(rf"^\[ERROR\] Hook exited ungracefully \(pid=\d+, exitcode=70, "
                  rf"cmd={cmd(noexec, 'noexec')}\)\.$")
    node.wait_log(rf"^\[ERROR\] Unable to execute {re.escape(str(missing))}: "
                  r"No such file or directory\.$")
    node.wait_log(rf"^\[ERROR\] Hook exited ungracefully \(pid=\d+, exitcode=70, "
                  rf"cmd={cmd(missing, 'missing')}\)\.$")


PROBE = r'''
import json, os, sys
fds = []
for fd in range(3, 1024):
    try:
        os.fstat(fd)
    except OSError:
        continue
    fds.append(fd)
stdio = [os.readlink(f"/proc/self/fd/{fd}") for fd in (0, 1, 2)]
print("probe on stdout")
with open(os.environ["PROBE_OUT"] + f".{os.getpid()}", "w") as f:
    json.dump({"argv": sys.argv, "fds": fds, "cwd": os.getcwd(), "stdio": stdio}, f)
'''


def probe_hook(root: Path) -> Path:
    """A hook that reports its descriptors, stdio, cwd and arguments (in Python)."""
    hook = root / "probe.py"
    hook.write_text(f"#!{sys.executable}\n{PROBE}")
    hook.chmod(0o755)
    return hook


def signal_probe_hook(root: Path) -> Path:
    """A hook that reports the signal mask and ignored set it was started with.

    Not in Python, which ignores SIGPIPE itself: grep replaces the shell and reads its own
    /proc/self/status, i.e. what execv() handed over.
    """
    out = root / "sig.out"
    return script(root / "sig.sh",
                  f"exec grep -E '^Sig(Blk|Ign):' /proc/self/status > '{out}'\n")


def probe_results(root: Path, count: int = 1) -> list[dict]:
    def done() -> list[dict] | None:
        files = sorted(root.glob("probe.out.*"))
        if len(files) < count:
            return None
        try:
            return [json.loads(f.read_text()) for f in files]
        except ValueError:
            return None  # still being written
    return poll(done, "probe hook output")


def signal_results(root: Path) -> dict[str, int]:
    out = root / "sig.out"
    text = poll(lambda: out.exists() and out.read_text().count("\n") == 2 and out.read_text(),
                "signal probe output")
    return {k: int(v, 16) for k, v in (line.split(":") for line in text.splitlines())}


def test_foreground_hook_environment(node: HastNode, monkeypatch) -> None:
    monkeypatch.setenv("PROBE_OUT", str(node.root / "probe.out"))
    node.write_conf({"test": {"exec": str(probe_hook(node.root))},
                     "sig": {"exec": str(signal_probe_hook(node.root))}})
    node.start()
    node.role("secondary", "all")
    (res,) = probe_results(node.root)
    # execv: the script sees its path as argv[0] only because the kernel runs the interpreter.
    assert res["argv"][1:] == ["role", "test", "init", "secondary"]
    assert res["fds"] == []
    # -F: the hook shares hastd's output.
    node.wait_log(r"^probe on stdout$")
    sig = signal_results(node.root)
    assert sig["SigBlk"] == 0
    assert sig["SigIgn"] & (1 << (signal.SIGPIPE - 1)) == 0


def test_daemonized_hook_gets_dev_null(node: HastNode, monkeypatch) -> None:
    monkeypatch.setenv("PROBE_OUT", str(node.root / "probe.out"))
    hook = probe_hook(node.root)
    node.write_conf({"test": {"exec": str(hook)}})
    res = subprocess.run([sys.executable, "-m", "hast.daemon", "-c", str(node.conf)],
                         cwd=REPO, env=dict(daemon_env(), PROBE_OUT=str(node.root / "probe.out")),
                         stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert res.returncode == 0
    pid = int(poll(lambda: node.pidfile.exists() and node.pidfile.read_text(), "pidfile"))
    node.extra_pids.append(pid)
    poll(node.control.exists, "control socket")
    node.role("secondary")
    (probe,) = probe_results(node.root)
    assert probe["stdio"] == ["/dev/null"] * 3
    assert probe["fds"] == []
    assert probe["cwd"] == "/"
    os.kill(pid, signal.SIGTERM)
    poll(lambda: not node.pidfile.exists(), "daemon exit")


def test_slow_hook_does_not_block_hastd(node: HastNode) -> None:
    pidfile = node.root / "slow.pid"
    hook = script(node.root / "slow.sh", f"echo $$ > '{pidfile}'\nexec sleep 600\n")
    node.write_conf({"test": {"exec": str(hook)}})
    node.start()
    node.role("secondary")
    hook_pid = int(poll(lambda: pidfile.exists() and pidfile.read_text().strip(), "hook"))
    node.extra_pids.append(hook_pid)
    # The hook is still running and hastd answers anyway.
    os.kill(hook_pid, 0)
    assert node.role("init").get_string("role0") == "secondary"
    assert node.status()["role"] == "init"


def test_worker_events_run_hooks(node: HastNode) -> None:
    hook = recording_hook(node.root)
    node.write_conf({"test": {"exec": str(hook)}})
    with open(node.root / "test.img", "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run([sys.executable, "-m", "hast.ctl", "create", "-c", str(node.conf), "test"],
                   cwd=REPO, env=daemon_env(), check=True, timeout=60, capture_output=True)
    node.start()
    node.role("secondary")
    conn1, _, reply = step1(node)
    with conn1, step2(node, reply.get_uint8_array("token")):
        # Step 3 comes from the worker on connection #1; then it reports "connect".
        _fv, answer = read_reply(conn1)
        assert not answer.exists("errmsg"), answer.get_string("errmsg")
        proto.recv_exact(conn1, proto.payload_size(answer))  # the activemap, if any
        wait_hooks(node.root, [["role", "test", "init", "secondary"], ["connect", "test"]])
    # The primary went away: the worker reports "disconnect" and ends.
    wait_hooks(node.root, [["role", "test", "init", "secondary"], ["connect", "test"],
                           ["disconnect", "test"]])


# -- hast.hooks in this process ------------------------------------------------------------------

def test_argv0_is_the_basename(tmp_path: Path, inproc) -> None:
    out = tmp_path / "argv.json"
    code = f"import json, sys; json.dump(sys.orig_argv, open({str(out)!r}, 'w'))"
    pid = hooks.run(sys.executable, "-c", code, "role", "r0", "init", "primary")
    assert pid is not None
    poll(lambda: hooks.collect() or not hooks.running(), "hook end")
    argv = json.loads(out.read_text())
    assert argv == [os.path.basename(sys.executable), "-c", code, "role", "r0", "init",
                    "primary"]
    err = inproc.readouterr()
    assert f"[DEBUG][1] Executing hook: {sys.executable} -c {code} role r0 init primary\n" \
        in err.out


def test_shell_metacharacters_stay_literal(tmp_path: Path, inproc) -> None:
    evil_dir = tmp_path / "d i r;$(touch pwned1)`touch pwned2`"
    evil_dir.mkdir()
    out = tmp_path / "args.json"
    hook = evil_dir / "hook & touch pwned3 |"
    hook.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"json.dump(sys.argv[1:], open({str(out)!r}, 'w'))\n")
    hook.chmod(0o755)
    args = ["role", "r0; touch pwned4", "$(touch pwned5)", "`touch pwned6` * ?"]
    assert hooks.run(str(hook), *args) is not None
    poll(lambda: hooks.collect() or not hooks.running(), "hook end")
    assert json.loads(out.read_text()) == args
    for base in (tmp_path, evil_dir, Path.cwd(), Path("/")):
        assert not list(base.glob("pwned*"))
    assert "Hook exited gracefully" in inproc.readouterr().out


def test_long_running_hook_is_reported_every_60_seconds(inproc) -> None:
    pid = hooks.run("/bin/sleep", "600")
    assert pid is not None
    (hp,) = hooks.running()
    inproc.readouterr()
    hooks.check(hp.birthtime + 59)
    assert inproc.readouterr().err == ""
    hooks.check(hp.birthtime + 61)
    assert inproc.readouterr().err == (
        f"[WARNING] Hook is running for 61 seconds (pid={pid}, cmd=[/bin/sleep 600]).\n")
    hooks.check(hp.birthtime + 100)
    assert inproc.readouterr().err == ""
    hooks.check(hp.birthtime + 122)
    assert inproc.readouterr().err == (
        f"[WARNING] Hook is running for 122 seconds (pid={pid}, cmd=[/bin/sleep 600]).\n")
    os.kill(pid, signal.SIGKILL)
    poll(hooks.collect, "hook end")
    assert inproc.readouterr().err == (
        f"[ERROR] Hook was killed (pid={pid}, signal=9, cmd=[/bin/sleep 600]).\n")


def test_hook_reaped_elsewhere_is_reported_disappeared(inproc) -> None:
    pid = hooks.run("/bin/true")
    assert pid is not None
    os.waitpid(pid, 0)
    inproc.readouterr()
    hooks.check()
    assert inproc.readouterr().err == (
        f"[WARNING] Hook disappeared (pid={pid}, cmd=[/bin/true]).\n")
    assert hooks.running() == []


def test_command_line_too_long(inproc) -> None:
    assert hooks.run("/" + "x" * 1010, "role", "r0", "init", "primary") is None
    assert inproc.readouterr().err == "[ERROR] Exec path too long, correct configuration file.\n"
    assert hooks.running() == []


def test_no_exec_configured(inproc) -> None:
    assert hooks.run("", "role", "r0", "init", "primary") is None
    assert inproc.readouterr() == ("", "")


def test_unknown_pid(inproc) -> None:
    assert hooks.reap(2**22 + 12345, 0) is False
    assert inproc.readouterr().out == f"[DEBUG][1] Unknown process pid={2**22 + 12345}\n"


def test_exit_text() -> None:
    assert hooks.exit_text(7, 0, "/x a") == (True, "Hook exited gracefully (pid=7, cmd=[/x a]).")
    assert hooks.exit_text(7, 3 << 8, "/x") == (
        False, "Hook exited ungracefully (pid=7, exitcode=3, cmd=[/x]).")
    assert hooks.exit_text(7, signal.SIGTERM, "/x") == (
        False, f"Hook was killed (pid=7, signal={int(signal.SIGTERM)}, cmd=[/x]).")
