"""The port's rc.d script (files/py_hastd.in), checked on Linux.

Every shell script of files/ is substituted as the ports framework does (%%PREFIX%%,
%%PYTHON_CMD%%), then parsed by dash (the closest to FreeBSD's sh), posh (strict POSIX) and
bash, and linted by shellcheck with the three rc.subr codes excluded (SC1091 sourcing
/etc/rc.subr, SC2034 variables consumed by rc.subr, SC2223 unquoted ``: ${x:=...}``).

The script is then run for real against a stand-in for /etc/rc.subr written here: its
load_rc_config reads an rc.conf written by the test, its run_rc_command prints what the script
set and runs the pre-commands as rc.subr would.  That checks the variables rc.subr consumes,
that the knobs are honoured, that start is refused beside a base hastd (enabled, holding its
locked pidfile, or accepting connections on its control socket) and what stop_precmd runs.

Debian packages: dash, posh, bash, shellcheck, procps (pgrep: the script uses pgrep -L -F,
which FreeBSD's pgrep has too).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = REPO / "files"
RC_SCRIPT = FILES / "py_hastd.in"
RC_SUBR_LINE = ". /etc/rc.subr"

TOOLS = {"dash": "dash", "posh": "posh", "bash": "bash", "shellcheck": "shellcheck",
         "pgrep": "procps"}
SHELLCHECK_EXCLUDES = "SC1091,SC2034,SC2223"

# What run_rc_command of the stand-in prints, one "var=value" line each.
PRINTED = ("name", "desc", "rcvar", "command", "command_interpreter", "command_args",
           "pidfile", "required_files", "required_modules", "extra_commands",
           "start_precmd", "stop_precmd", "py_hastd_svcj", "py_hastd_enable",
           "py_hastd_config", "py_hastd_pidfile", "py_hastd_base_pidfile",
           "py_hastd_base_control")

RC_SUBR_STANDIN = r"""# /etc/rc.subr stand-in written by tests/test_rc.py
load_rc_config()
{
	echo "load_rc_config=$1"
	if [ -n "${TEST_RC_CONF}" ]; then
		. "${TEST_RC_CONF}"
	fi
}

# rc.subr's semantics: YES/TRUE/ON/1 true, NO/FALSE/OFF/0 false, else warn and false.
checkyesno()
{
	eval _value=\$${1}
	case $_value in
	[Yy][Ee][Ss]|[Tt][Rr][Uu][Ee]|[Oo][Nn]|1)
		return 0 ;;
	[Nn][Oo]|[Ff][Aa][Ll][Ss][Ee]|[Oo][Ff][Ff]|0)
		return 1 ;;
	*)
		echo "\$${1} is not set properly" >&2
		return 1 ;;
	esac
}

err()
{
	_code=$1
	shift
	echo "ERR $_code: $*" >&2
	exit "$_code"
}

run_rc_command()
{
	for _v in @PRINTED@; do
		eval "_val=\${$_v}"
		printf '%s=%s\n' "$_v" "$_val"
	done
	case "$1" in
	start)
		if [ -n "$start_precmd" ]; then
			$start_precmd || exit $?
		fi
		echo "start_precmd passed"
		;;
	stop)
		if [ -n "$stop_precmd" ]; then
			$stop_precmd
			echo "stop_precmd_rc=$?"
		fi
		;;
	esac
}
""".replace("@PRINTED@", " ".join(PRINTED))

HASTCTL_STUB = """#!/bin/sh
# hastctl stand-in written by tests/test_rc.py: records its arguments, one per line.
for a in "$@"; do
	printf '%s\\n' "$a"
done > "$(dirname "$0")/hastctl.argv"
exit "${TEST_HASTCTL_EXIT:-0}"
"""


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is required (Debian package {TOOLS[tool]})")
    return path


def substitute(text: str, prefix: str, python: str) -> str:
    """What the framework's SUB_LIST does for this port (USE_RC_SUBR and SUB_FILES)."""
    out = text.replace("%%PREFIX%%", prefix).replace("%%PYTHON_CMD%%", python)
    left = re.findall(r"%%[A-Z_]+%%", out)
    assert not left, f"placeholders the port does not substitute: {left}"
    return out


def shell_scripts() -> list[Path]:
    scripts = sorted(p for p in FILES.iterdir()
                     if p.is_file() and p.read_text(encoding="utf-8").startswith("#!"))
    assert RC_SCRIPT in scripts, "files/py_hastd.in is missing or has no #! line"
    return scripts


@pytest.fixture(params=[p.name for p in shell_scripts()])
def substituted(request, tmp_path: Path) -> Path:
    src = FILES / request.param
    out = tmp_path / src.name.removesuffix(".in")
    out.write_text(substitute(src.read_text(encoding="utf-8"), "/usr/local",
                              "/usr/local/bin/python3.11"), encoding="utf-8")
    return out


@pytest.mark.parametrize("shell", ["dash", "posh", "bash"])
def test_parses(shell: str, substituted: Path) -> None:
    res = subprocess.run([need(shell), "-n", str(substituted)], capture_output=True, text=True)
    assert res.returncode == 0, f"{shell} -n {substituted.name}:\n{res.stderr}"
    assert res.stderr == ""


def test_shellcheck(substituted: Path) -> None:
    res = subprocess.run([need("shellcheck"), "-s", "sh", "-e", SHELLCHECK_EXCLUDES,
                          str(substituted)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# -- the shape freebsd-port.md asks for ---------------------------------------------------

def _text() -> str:
    return RC_SCRIPT.read_text(encoding="utf-8")


def test_header_and_order() -> None:
    lines = _text().splitlines()
    assert lines[0] == "#!/bin/sh"
    assert "# PROVIDE: py_hastd" in lines
    assert "# REQUIRE: NETWORKING syslogd" in lines
    assert "# BEFORE: DAEMON" in lines
    assert "# KEYWORD: nojail shutdown" in lines
    # never base hastd's rc name
    assert not any(re.fullmatch(r"# PROVIDE:.*\bhastd\b.*", ln) for ln in lines)
    # obsolete idioms
    assert "%%RC_SUBR%%" not in _text()
    assert "set_rcvar" not in _text()
    assert lines.count(RC_SUBR_LINE) == 1

    def index(pattern: str) -> int:
        hits = [i for i, ln in enumerate(lines) if re.match(pattern, ln)]
        assert len(hits) == 1, f"{pattern!r} found {len(hits)} times"
        return hits[0]

    order = [index(p) for p in (r"# PROVIDE:", re.escape(RC_SUBR_LINE), r'name="py_hastd"$',
                                r"desc=", r'rcvar="py_hastd_enable"$',
                                r"load_rc_config \$name$", r": \$\{py_hastd_enable:=",
                                r"command=", r'run_rc_command "\$1"$')]
    assert order == sorted(order), "rc script blocks out of order"
    assert lines[-1] == 'run_rc_command "$1"'


def test_every_knob_is_documented_with_its_default() -> None:
    text = _text()
    defaults = dict(re.findall(r'^: \$\{(py_hastd_\w+):="([^"]*)"\}$', text, re.M))
    assert {"py_hastd_enable", "py_hastd_config", "py_hastd_pidfile"} <= defaults.keys()
    comment = "\n".join(ln for ln in text.splitlines() if ln.startswith("#"))
    for knob, default in defaults.items():
        doc = re.search(rf"^# {knob} \((bool|path|str)\):.*?Default: \"([^\"]*)\"",
                        comment, re.M | re.S)
        assert doc, f"{knob} is not documented in the comment block"
        assert doc.group(2) == default, f"{knob}: documented default {doc.group(2)!r}"
    # py_hastd_flags is rc.subr's; documented even though the script never sets it
    assert re.search(r"^# py_hastd_flags \(str\):", comment, re.M)
    assert "hastd_enable" in comment and "py_hastd_svcj" in comment


# -- running the script against the rc.subr stand-in ---------------------------------------

class RcRun:
    def __init__(self, tmp_path: Path, shell: str) -> None:
        self.shell = need(shell)
        self.tmp = tmp_path
        self.prefix = tmp_path / "prefix"
        (self.prefix / "sbin").mkdir(parents=True)
        (self.prefix / "etc").mkdir()
        self.hastctl = self.prefix / "sbin" / "hastctl"
        self.hastctl.write_text(HASTCTL_STUB)
        self.hastctl.chmod(0o755)
        self.subr = tmp_path / "rc.subr"
        self.subr.write_text(RC_SUBR_STANDIN)
        text = substitute(_text(), str(self.prefix), sys.executable)
        assert text.count(RC_SUBR_LINE) == 1
        self.script = tmp_path / "py_hastd"
        self.script.write_text(text.replace(RC_SUBR_LINE, f". {self.subr}"))
        self.rc_conf = tmp_path / "rc.conf"
        # Base hastd's paths point into tmp unless a test says otherwise, so that a hastd
        # really running on this machine cannot decide a test.
        self.base_pidfile = tmp_path / "hastd.pid"
        self.base_control = tmp_path / "hastctl.sock"

    def run(self, action: str, hastctl_exit: int = 0, base_paths: bool = True,
            **conf: str) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
        if base_paths:
            conf.setdefault("py_hastd_base_pidfile", str(self.base_pidfile))
            conf.setdefault("py_hastd_base_control", str(self.base_control))
        self.rc_conf.write_text("".join(f'{k}="{v}"\n' for k, v in conf.items()))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "TEST_RC_CONF": str(self.rc_conf), "TEST_HASTCTL_EXIT": str(hastctl_exit)}
        res = subprocess.run([self.shell, str(self.script), action], capture_output=True,
                             text=True, env=env, timeout=60)
        values = {}
        for line in res.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep and key in PRINTED + ("load_rc_config", "stop_precmd_rc"):
                values[key] = value
        return res, values


@pytest.fixture(params=["dash", "posh"])
def rc(request, tmp_path: Path) -> RcRun:
    return RcRun(tmp_path, request.param)


def test_variables_for_rc_subr(rc: RcRun) -> None:
    res, v = rc.run("rcvar", base_paths=False)
    assert res.returncode == 0, res.stderr
    conf = f"{rc.prefix}/etc/hast.conf"
    assert v["load_rc_config"] == "py_hastd"
    assert v["name"] == "py_hastd"
    assert v["rcvar"] == "py_hastd_enable"
    assert v["py_hastd_enable"] == "NO"
    assert v["command"] == f"{rc.prefix}/sbin/hastd"
    assert v["command_interpreter"] == sys.executable
    assert v["pidfile"] == "/var/run/py_hastd.pid"
    assert v["command_args"] == f"-c {conf} -P /var/run/py_hastd.pid"
    assert v["required_files"] == conf
    assert v["required_modules"] == "geom_gate:g_gate"
    assert v["extra_commands"] == "reload"
    assert v["start_precmd"] and v["stop_precmd"]
    assert v["py_hastd_svcj"] == "NO"
    assert v["py_hastd_base_pidfile"] == "/var/run/hastd.pid"
    assert v["py_hastd_base_control"] == "/var/run/hastctl"
    assert v["desc"]


def test_knobs_are_honoured(rc: RcRun) -> None:
    res, v = rc.run("rcvar", py_hastd_enable="YES", py_hastd_config="/srv/ha/hast.conf",
                    py_hastd_pidfile="/run/ph.pid", py_hastd_svcj="YES")
    assert res.returncode == 0, res.stderr
    assert v["py_hastd_enable"] == "YES"
    assert v["command_args"] == "-c /srv/ha/hast.conf -P /run/ph.pid"
    assert v["pidfile"] == "/run/ph.pid"
    assert v["required_files"] == "/srv/ha/hast.conf"
    assert v["py_hastd_svcj"] == "NO", "a service jail must stay off whatever rc.conf says"


def test_start_when_nothing_else_runs(rc: RcRun) -> None:
    # a stale base pidfile (dead pid) and a stale control socket (nobody listening) are fine
    rc.base_pidfile.write_text("999999999\n")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(rc.base_control))
    stale.close()
    res, _ = rc.run("start", hastd_enable="NO")
    assert res.returncode == 0, res.stderr
    assert "start_precmd passed" in res.stdout


@pytest.mark.parametrize("value", ["YES", "yes", "TRUE", "on", "1"])
def test_start_refused_when_base_hastd_enabled(rc: RcRun, value: str) -> None:
    res, _ = rc.run("start", hastd_enable=value)
    assert res.returncode == 1
    assert "start_precmd passed" not in res.stdout
    assert "ERR 1:" in res.stderr and "hastd_enable" in res.stderr
    assert "py_hastd" in res.stderr


def _locked_pidfile_holder(path: Path) -> subprocess.Popen[str]:
    """A real process holding ``path`` the way pidfile(3) does: its pid in it, flock'ed."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "os.ftruncate(fd, 0)\n"
        "os.write(fd, str(os.getpid()).encode())\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_start_refused_while_base_hastd_runs(rc: RcRun) -> None:
    holder = _locked_pidfile_holder(rc.base_pidfile)
    try:
        assert rc.base_pidfile.read_text() == str(holder.pid)
        res, _ = rc.run("start", hastd_enable="NO")
        assert res.returncode == 1
        assert "start_precmd passed" not in res.stdout
        assert "running" in res.stderr and str(rc.base_pidfile) in res.stderr
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=30)
    # the same file once its holder is gone: a stale pidfile does not block the start
    res, _ = rc.run("start", hastd_enable="NO")
    assert res.returncode == 0, res.stderr


def test_live_pid_without_lock_is_stale(rc: RcRun) -> None:
    # a leftover pidfile whose pid now belongs to another process (here: this test)
    rc.base_pidfile.write_text(f"{os.getpid()}\n")
    fd = os.open(rc.base_pidfile, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # proves nobody holds it
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    res, _ = rc.run("start", hastd_enable="NO")
    assert res.returncode == 0, res.stderr


def test_start_refused_while_control_socket_answers(rc: RcRun) -> None:
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(rc.base_control))
        listener.listen(8)
        res, _ = rc.run("start", hastd_enable="NO")
        assert res.returncode == 1
        assert "start_precmd passed" not in res.stdout
        assert "control socket" in res.stderr and str(rc.base_control) in res.stderr
    finally:
        listener.close()


def test_stop_precmd_demotes_every_resource(rc: RcRun) -> None:
    res, v = rc.run("stop", py_hastd_config="/srv/ha/hast.conf")
    assert res.returncode == 0, res.stderr
    assert v["stop_precmd_rc"] == "0"
    argv = (rc.hastctl.parent / "hastctl.argv").read_text().splitlines()
    assert argv == ["role", "-c", "/srv/ha/hast.conf", "init", "all"]


def test_stop_precmd_reports_hastctl_failure(rc: RcRun) -> None:
    # rc.subr does not stop the daemon when stop_precmd fails, as with base rc.d/hastd
    res, v = rc.run("stop", hastctl_exit=71)
    assert res.returncode == 0, res.stderr
    assert v["stop_precmd_rc"] == "71"
    argv = (rc.hastctl.parent / "hastctl.argv").read_text().splitlines()
    assert argv == ["role", "-c", f"{rc.prefix}/etc/hast.conf", "init", "all"]
