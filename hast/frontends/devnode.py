"""``/dev/hast/<name>`` on Linux: a kernel block device in front of the primary's NBD export.

On FreeBSD hastd creates /dev/hast/<name> with GEOM_GATE.  Linux has no GEOM_GATE; its
counterpart is an NBD server (``hast.frontends.nbd``) plus something in the kernel that
speaks NBD (decisions.md item 4):

* the kernel NBD client, where the nbd module exists (``/sys/module/nbd``): ``nbd-client``
  connects a free ``/dev/nbdN`` to the export's UNIX socket;
* otherwise ``nbdfuse`` (libnbd-bin) presents the export as a file on a private FUSE mount,
  and a loop device (``losetup --direct-io=on``, so the page cache is not doubled) turns that
  file into ``/dev/loopN``.  Kernels built without CONFIG_BLK_DEV_NBD (the development VM of
  this project has neither the module nor modprobe) still get a real block device that
  mkfs/mount/fsync work on, with no home-made FUSE layer in the data path.  nbdfuse's manual
  warns that loop-mounting its file can be slow; it is the price of not having the module.

``/dev/hast/<name>`` is a symlink to that device; names containing ``/`` become
subdirectories, as GEOM names do.  This module owns the whole lifecycle of those pieces:
``attach`` builds them (rolling back on failure), ``DevNode.detach`` takes them down in
reverse order (symlink, loop device, FUSE mount, mountpoint).  Every step that waits is
bounded in time and fails with a ``DevNodeError`` saying which step and why.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from hast import log
from hast.frontends.nbd import export_uri

DEV_DIR = "/dev/hast"
NBD_MODULE = "/sys/module/nbd"
STEP_TIMEOUT = 30.0
_POLL = 0.02


class DevNodeError(Exception):
    """A step of attach/detach failed; the text names the step and the cause."""


def _check_name(name: str) -> None:
    parts = name.split("/")
    if (not name or "\0" in name or name.startswith("/")
            or any(p in ("", ".", "..") for p in parts)):
        raise DevNodeError(f"invalid resource name {name!r} for {DEV_DIR}")


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise DevNodeError(f"{argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise DevNodeError(f"{' '.join(argv)} did not finish within {timeout:g} s") from exc


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """From /proc/self/mountinfo, which (unlike stat) also sees FUSE mounts whose daemon died."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) > 4 and _unescape_mountinfo(fields[4]) == target:
                return True
    return False


def device_mounted(dev: str) -> bool:
    """Whether a filesystem on block device ``dev`` is mounted (matched by major:minor)."""
    try:
        rdev = os.stat(dev).st_rdev
    except OSError:
        return False
    key = f"{os.major(rdev)}:{os.minor(rdev)}"
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ", 3)[2] == key for line in f)


def _loop_backing_file(dev: str) -> str | None:
    try:
        return Path(f"/sys/block/{os.path.basename(dev)}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def _wait(cond, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)


class DevNode:
    """An attached ``/dev/hast/<name>``; ``detach()`` undoes it (idempotent, retryable)."""

    def __init__(self, name: str, devdir: str = DEV_DIR, timeout: float = STEP_TIMEOUT) -> None:
        self.name = name
        self.devdir = devdir
        self.path = os.path.join(devdir, name)
        self.timeout = timeout
        self.method = ""                 # "nbdfuse" or "kernel-nbd"
        self.device: str | None = None   # /dev/loopN or /dev/nbdN
        self.direct_io = False
        self._made_dirs: list[str] = []  # directories under devdir we created, outer first
        self._link = False
        # nbdfuse state
        self._private: str | None = None
        self._mnt: str | None = None
        self._image: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: str | None = None

    def __repr__(self) -> str:
        return f"<DevNode {self.path} -> {self.device} ({self.method})>"

    def __enter__(self) -> DevNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ---- symlink -------------------------------------------------------------------------

    def _make_link(self) -> None:
        assert self.device is not None
        parent = os.path.dirname(self.path)
        missing = []
        p = parent
        while not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        for d in reversed(missing):
            os.mkdir(d, 0o755)
            self._made_dirs.append(d)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISLNK(st.st_mode):
                raise DevNodeError(f"{self.path} exists and is not a symlink")
            log.warning(f"Replacing stale {self.path} -> {os.readlink(self.path)}.")
            os.unlink(self.path)
        os.symlink(self.device, self.path)
        self._link = True

    def _remove_link(self) -> None:
        if self._link:
            try:
                if os.readlink(self.path) == self.device:
                    os.unlink(self.path)
            except OSError:
                pass
            self._link = False
        for d in reversed(self._made_dirs):
            try:
                os.rmdir(d)
            except OSError:
                pass  # not empty: another resource lives there too
        self._made_dirs = []

    # ---- nbdfuse + loop ------------------------------------------------------------------

    def _log_tail(self) -> str:
        try:
            text = Path(self._log).read_text(errors="replace").strip() if self._log else ""
        except OSError:
            text = ""
        return f" (nbdfuse said: {text[-500:]})" if text else ""

    def _attach_nbdfuse(self, uri: str, workdir: str, direct_io: bool,
                        sector_size: int | None) -> None:
        self.method = "nbdfuse"
        os.makedirs(workdir, exist_ok=True)
        self._private = tempfile.mkdtemp(prefix="nbdfuse-", dir=workdir)
        self._mnt = os.path.join(self._private, "mnt")
        os.mkdir(self._mnt, 0o700)
        self._image = os.path.join(self._mnt, "disk")
        pidfile = os.path.join(self._private, "nbdfuse.pid")
        self._log = os.path.join(self._private, "nbdfuse.log")
        with open(self._log, "wb") as logf:
            try:
                # Own session: a ^C meant for hastd must not kill the FUSE daemon under a
                # loop device; output to a file, never to a pipe nobody reads.
                self._proc = subprocess.Popen(
                    ["nbdfuse", "-P", pidfile, self._image, uri],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    start_new_session=True)
            except FileNotFoundError as exc:
                raise DevNodeError("nbdfuse is not installed (Debian: libnbd-bin)") from exc
        proc = self._proc

        def ready() -> bool:
            if proc.poll() is not None:
                return True
            try:
                return os.path.getsize(pidfile) > 0 and os.path.exists(self._image)
            except OSError:
                return False

        if not _wait(ready, self.timeout):
            raise DevNodeError(f"nbdfuse did not present {self._image} within "
                               f"{self.timeout:g} s{self._log_tail()}")
        if proc.poll() is not None:
            raise DevNodeError(f"nbdfuse exited with status {proc.returncode}"
                               f"{self._log_tail()}")
        log.debug(1, f"nbdfuse (pid {proc.pid}) serves {uri} as {self._image}.")

        extra = ["--sector-size", str(sector_size)] if sector_size else []
        dio = "on" if direct_io else "off"
        r = _run(["losetup", "--find", "--show", f"--direct-io={dio}", *extra, self._image],
                 self.timeout)
        if r.returncode != 0 and direct_io:
            log.warning(f"losetup --direct-io=on {self._image} refused ({r.stderr.strip()}); "
                        "using the page cache of the loop device.")
            r = _run(["losetup", "--find", "--show", "--direct-io=off", *extra, self._image],
                     self.timeout)
        if r.returncode != 0:
            raise DevNodeError(f"losetup {self._image} failed: {r.stderr.strip()}")
        self.device = r.stdout.strip()
        try:
            dio_now = Path(f"/sys/block/{os.path.basename(self.device)}/loop/dio").read_text()
            self.direct_io = dio_now.strip() == "1"
        except OSError:
            self.direct_io = False
        if direct_io and not self.direct_io:
            log.warning(f"{self.device} runs without direct I/O (kernel refused it).")

    def _detach_loop(self) -> None:
        dev = self.device
        if dev is None:
            return
        if _loop_backing_file(dev) == self._image:
            r = _run(["losetup", "-d", dev], self.timeout)
            if r.returncode != 0 and _loop_backing_file(dev) == self._image:
                raise DevNodeError(f"losetup -d {dev} failed: {r.stderr.strip()}")
            # A busy loop device (still mounted) is only marked autoclear by losetup -d.
            if not _wait(lambda: _loop_backing_file(dev) != self._image, self.timeout):
                raise DevNodeError(f"{dev} is still in use (mounted?) {self.timeout:g} s "
                                   "after losetup -d")
        self.device = None

    def _stop_nbdfuse(self) -> None:
        mnt, proc = self._mnt, self._proc
        if mnt is None:
            return
        if is_mounted(mnt):
            # nbdfuse's manual: unmount, do not kill; nbdfuse then exits by itself.
            r = _run(["fusermount3", "-u", mnt], self.timeout)
            if r.returncode != 0:
                log.warning(f"fusermount3 -u {mnt} failed: {r.stderr.strip()}")
        if proc is not None and not _wait(lambda: proc.poll() is not None, self.timeout):
            log.warning(f"nbdfuse (pid {proc.pid}) still running {self.timeout:g} s after "
                        "unmount; killing it.")
            proc.send_signal(signal.SIGTERM)
            if not _wait(lambda: proc.poll() is not None, self.timeout):
                proc.kill()
                proc.wait(self.timeout)
        if is_mounted(mnt):
            # The daemon is gone; only a lazy unmount can clear a dead FUSE mount.
            r = _run(["fusermount3", "-u", "-z", mnt], self.timeout)
            if is_mounted(mnt):
                raise DevNodeError(f"cannot unmount {mnt}: {r.stderr.strip()}")
        self._proc = None
        assert self._private is not None
        for leftover in ("nbdfuse.pid", "nbdfuse.log"):
            try:
                os.unlink(os.path.join(self._private, leftover))
            except FileNotFoundError:
                pass
        os.rmdir(mnt)
        os.rmdir(self._private)
        self._mnt = self._private = self._image = None

    # ---- kernel NBD client ---------------------------------------------------------------

    def _attach_kernel(self, name: str, socket_path: str, workdir: str) -> None:
        self.method = "kernel-nbd"
        devs = sorted((p for p in Path("/sys/block").glob("nbd*")),
                      key=lambda p: int(p.name[3:]) if p.name[3:].isdigit() else 1 << 30)
        if not devs:
            raise DevNodeError("no /dev/nbdN devices (is the nbd module loaded?)")
        free = [p.name for p in devs if not (p / "pid").exists()]
        if not free:
            raise DevNodeError("every /dev/nbdN is in use")
        dev = f"/dev/{free[0]}"
        os.makedirs(workdir, exist_ok=True)
        logpath = os.path.join(workdir, f"nbd-client-{free[0]}.log")
        # nbd-client (Debian: nbd-client) configures the device over netlink when it can;
        # without netlink it leaves a daemon holding the socket, so its output goes to a
        # file: a pipe would keep subprocess waiting for that daemon's EOF.
        argv = ["nbd-client", "-N", name, "-unix", socket_path, dev]
        with open(logpath, "wb") as logf:
            try:
                rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, timeout=self.timeout).returncode
            except FileNotFoundError as exc:
                raise DevNodeError("nbd-client is not installed (Debian: nbd-client)") from exc
            except subprocess.TimeoutExpired as exc:
                raise DevNodeError(f"nbd-client {dev} did not finish within "
                                   f"{self.timeout:g} s") from exc
        output = Path(logpath).read_text(errors="replace").strip()
        if rc != 0:
            raise DevNodeError(f"nbd-client {dev} failed (status {rc}): {output[-500:]}")
        self.device = dev
        size = Path(f"/sys/block/{free[0]}/size")
        if not _wait(lambda: size.exists() and int(size.read_text() or 0) > 0, self.timeout):
            raise DevNodeError(f"{dev} has no size {self.timeout:g} s after nbd-client")

    def _detach_kernel(self) -> None:
        if self.device is None:
            return
        r = _run(["nbd-client", "-d", self.device], self.timeout)
        if r.returncode != 0:
            raise DevNodeError(f"nbd-client -d {self.device} failed: "
                               f"{(r.stderr or r.stdout).strip()}")
        self.device = None

    # ---- public --------------------------------------------------------------------------

    def detach(self) -> None:
        """Remove the symlink, the loop/nbd device, the FUSE mount and the mountpoint.

        Refuses (DevNodeError, nothing changed) while a filesystem on the device is mounted;
        after any other failure a later call continues where this one stopped.
        """
        if self.device is not None and device_mounted(self.device):
            raise DevNodeError(f"{self.path} ({self.device}) is mounted; unmount it first")
        self._remove_link()
        if self.method == "kernel-nbd":
            self._detach_kernel()
        else:
            self._detach_loop()
            self._stop_nbdfuse()
        log.debug(1, f"{self.path} detached.")


def attach(name: str, socket_path: str | os.PathLike[str], workdir: str | os.PathLike[str],
           *, devdir: str = DEV_DIR, method: str | None = None, direct_io: bool = True,
           sector_size: int | None = None, timeout: float = STEP_TIMEOUT) -> DevNode:
    """Make ``<devdir>/<name>`` a block device for export ``name`` on ``socket_path``.

    ``method`` is "kernel-nbd", "nbdfuse" or None (the kernel client when the nbd module is
    loaded, else nbdfuse).  ``workdir`` holds nbdfuse's private mountpoint, pidfile and log.
    """
    _check_name(name)
    socket_path = os.fspath(socket_path)
    if method is None:
        method = "kernel-nbd" if os.path.isdir(NBD_MODULE) else "nbdfuse"
    if method not in ("kernel-nbd", "nbdfuse"):
        raise ValueError(f"unknown devnode method {method!r}")
    node = DevNode(name, devdir, timeout)
    try:
        if method == "kernel-nbd":
            log.info(f"{node.path}: kernel NBD client ({NBD_MODULE} present).")
            node._attach_kernel(name, socket_path, os.fspath(workdir))
        else:
            log.info(f"{node.path}: no nbd kernel module, using nbdfuse and a loop device.")
            node._attach_nbdfuse(export_uri(name, socket_path), os.fspath(workdir),
                                 direct_io, sector_size)
        node._make_link()
    except BaseException:
        try:
            node.detach()
        except Exception as exc:
            log.error(f"{node.path}: cleanup after the failed attach failed: {exc}")
        raise
    log.info(f"{node.path} -> {node.device}.")
    return node
