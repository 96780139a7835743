"""A real hastd for the socket-level targets: one daemon process, reused across inputs.

``Hastd`` writes a hast.conf into a temp dir (control socket, pidfile, listen address on
127.0.0.1 and two resources: ``test`` -- remote 127.0.0.1, a 2 MiB provider laid out as
``hastctl create`` does -- and ``other``, whose remote is an address we never connect from),
starts hastd in the foreground (``fuzz/hastd_main.py -F``: hast.daemon.main with its log
encoded as syslog(3) encodes it, so a peer-supplied string that cannot be logged fails as it
would in the daemonized hastd) with its log in one file, and offers what the targets need to
judge an input: is the process alive, did it log a traceback or a CRIT (hastd's catch-all for
an unexpected exception), does it still answer a STATUS on the control socket and a
handshake step 1, how many descriptors does it hold.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuzz.common import FUZZ_DIR, REPO, Finding, open_fds
from hast import metadata, proto
from hast import nv as nvmod

NODE = "hasta"
MEDIASIZE = 2 * 1024 * 1024
LOG_LIMIT = 32 * 1024 * 1024
FD_SLACK = 64
RSS_SLACK = 256 * 1024 * 1024     # growth of hastd's resident memory over a run


def rss(pid: int) -> int:
    """Resident memory of a process in bytes (0 where /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_provider(path: Path, resource: str = "test", resuid: int = 0) -> None:
    """A provider right after ``hastctl create`` (plus an optional resuid)."""
    mapsize, datasize, localoff = metadata.layout(MEDIASIZE, metadata.HAST_EXTENTSIZE, 512)
    with open(path, "wb") as f:
        f.truncate(MEDIASIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        metadata.write(fd, metadata.Metadata(resource, datasize, metadata.HAST_EXTENTSIZE,
                                             metadata.HAST_KEEPDIRTY, localoff, resuid))
    finally:
        os.close(fd)


class Hastd:
    def __init__(self, role: str | None = None) -> None:
        self.role = role
        self.root = Path(tempfile.mkdtemp(prefix="hast-fuzz-hastd-"))
        self.conf = self.root / "hast.conf"
        self.control = self.root / "ctl.sock"
        self.logfile = self.root / "hastd.log"
        self.provider = self.root / "test.img"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.fd_baseline = 0
        self.rss_baseline = 0
        self._log_pos = 0
        make_provider(self.provider)
        make_provider(self.root / "other.img", "other")
        self.conf.write_text(
            f"control uds://{self.control}\n"
            f"pidfile {self.root / 'hastd.pid'}\n"
            f"listen tcp4://127.0.0.1:{self.port}\n"
            f"timeout 5\n"
            f"resource test {{\n\ton {NODE} {{\n\t\tlocal {self.provider}\n"
            f"\t\tremote tcp4://127.0.0.1\n\t}}\n}}\n"
            f"resource other {{\n\ton {NODE} {{\n\t\tlocal {self.root / 'other.img'}\n"
            f"\t\tremote tcp4://10.255.255.1\n\t}}\n}}\n")

    # -- process ----------------------------------------------------------------------------

    def start(self) -> None:
        env = dict(os.environ, HAST_NODE_NAME=NODE, PYTHONPATH=str(REPO))
        argv = [sys.executable, str(FUZZ_DIR / "hastd_main.py"), "-F", "-c", str(self.conf),
                "-P", str(self.root / "hastd.pid")]
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while b"Started successfully" not in self.logfile.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hastd did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        if self.role is not None:
            self.set_role("test", self.role)
        self._log_pos = self.logfile.stat().st_size
        self.fd_baseline = open_fds(self.proc.pid)
        self.rss_baseline = rss(self.proc.pid)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, size: int = 3000) -> str:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - size))
                return f.read().decode("utf-8", "backslashreplace")
        except OSError:
            return ""

    def new_log(self) -> str:
        """What the daemon logged since the last call (the file is cut when it grows)."""
        try:
            with open(self.logfile, "rb") as f:
                f.seek(self._log_pos)
                text = f.read()
                self._log_pos = f.tell()
            if self._log_pos > LOG_LIMIT:
                os.truncate(self.logfile, 0)
                self._log_pos = 0
        except OSError:
            return ""
        return text.decode("utf-8", "backslashreplace")

    def check_log(self, data: bytes | None = None) -> None:
        """A traceback or a CRIT in what hastd logged since the last look is a finding."""
        log = self.new_log()
        for marker in ("Traceback", "[CRIT]"):
            if marker in log:
                finding = Finding(f"hastd logged {marker}: {log[log.index(marker):][:2000]}")
                finding.data = data  # type: ignore[attr-defined]
                raise finding

    def restart_after_death(self, data: bytes | None = None) -> Finding:
        """The daemon died: a Finding with its last words, and a fresh daemon."""
        code = self.proc.returncode if self.proc is not None else None
        tail = self.log_tail()
        self.proc = None
        self.start()
        finding = Finding(f"hastd exited with status {code}: {tail}")
        finding.data = data  # type: ignore[attr-defined]
        return finding

    # -- talking to it -----------------------------------------------------------------------

    def control_request(self, msg: nvmod.NV, timeout: float = 10.0) -> nvmod.NV:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(str(self.control))
            proto.send_frame(s, proto.PROTO_VERSION, msg)
            return proto.recv_frame(s, proto.MAX_NV_CONTROL)[1]

    def set_role(self, name: str, role: str) -> None:
        number = {"init": 1, "primary": 2, "secondary": 3}[role]
        msg = nvmod.NV().add_uint8("cmd", 1).add_uint8("role", number)
        self.control_request(msg.add_string("resource0", name))

    def peer(self, timeout: float = 10.0) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def step1(self) -> tuple[socket.socket, bytes]:
        """A valid handshake step 1 for ``test``: (connection #1, token)."""
        s = self.peer()
        msg = nvmod.NV().add_string("resource", "test").add_uint8("version", 2)
        proto.send_frame(s, 1, msg)
        _v, reply = proto.recv_frame(s)
        token = reply.get_uint8_array("token")
        if token is None or len(token) != 16:
            s.close()
            raise Finding(f"step 1 of a valid primary is not answered with a token: {reply!r}")
        return s, token

    def check(self) -> None:
        """Still serving: with two connections stalled mid-header, a STATUS and (role
        secondary) a step 1 are answered; no descriptor leak, no memory growth, no
        traceback or CRIT logged."""
        if not self.alive():
            raise self.restart_after_death()
        self.check_log()
        # Others are served while some connections stall mid-frame (the parent reads
        # first frames without blocking its loop).
        stalled = [self.peer(), socket.socket(socket.AF_UNIX)]
        try:
            stalled[1].connect(str(self.control))
            for s in stalled:
                s.sendall(b"\x02\x40")             # 2 of the 5 header bytes
            self._serving()
        finally:
            for s in stalled:
                s.close()

    def _serving(self) -> None:
        try:
            reply = self.control_request(nvmod.NV().add_uint8("cmd", 2)
                                         .add_string("resource0", "test"))
        except OSError as exc:
            raise Finding(f"hastd does not answer a STATUS: {exc!r}") from None
        if reply.get_string("resource0") != "test" or reply.get_string("role0") is None:
            raise Finding(f"hastd answers a STATUS with nonsense: {reply!r}")
        if reply.get_string("role0") == "secondary":
            sock, _token = self.step1()
            sock.close()
        # The daemon's own descriptors: connections of finished inputs must be gone.
        assert self.proc is not None
        deadline = time.monotonic() + 5
        while True:
            fds = open_fds(self.proc.pid)
            if fds <= self.fd_baseline + FD_SLACK:
                break
            if time.monotonic() > deadline:
                raise Finding(f"hastd descriptor leak: {fds} open, {self.fd_baseline} at start")
            time.sleep(0.1)
        now = rss(self.proc.pid)
        if self.rss_baseline and now > self.rss_baseline + RSS_SLACK:
            raise Finding(f"hastd memory grows: {now >> 20} MiB resident, "
                          f"{self.rss_baseline >> 20} MiB at start")
