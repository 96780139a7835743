"""A HAST pair on one machine: two nodes in namespaces (tests.cluster), each with its own
hast.conf (the same text on both, as the Handbook deploys it), py-hast.conf, provider file and
a running ``hastd -F``.  Used by the two-node tests and by the demo.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.cluster import Cluster, Node

RESOURCE = "test"


class HastPair:
    def __init__(self, workdir: Path, size: int = 64 * 1024 * 1024, resource: str = RESOURCE,
                 resource_extra: str = "", settings_extra: str = "",
                 devdir: str | None = None, names: tuple[str, str] = ("hasta", "hastb")) -> None:
        self.workdir = workdir
        self.resource = resource
        self.size = size
        self.cluster = Cluster(list(names), workdir)
        self.names = names
        self.daemons: dict[str, subprocess.Popen] = {}
        try:
            self._configure(resource_extra, settings_extra, devdir)
        except BaseException:
            self.close()
            raise

    # -- set-up ------------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        return self.cluster[name]

    def dir(self, name: str) -> Path:
        return self.workdir / name

    def conf(self, name: str) -> Path:
        return self.dir(name) / "hast.conf"

    def disk(self, name: str) -> Path:
        return self.dir(name) / "disk.img"

    def _configure(self, resource_extra: str, settings_extra: str, devdir: str | None) -> None:
        a, b = (self.cluster[n] for n in self.names)
        text = ""
        for node in (a, b):
            d = self.dir(node.hostname)
            text += (f"on {node.hostname} {{\n\tcontrol {d}/hastctl.sock\n"
                     f"\tpidfile {d}/hastd.pid\n\tlisten {node.addr}\n}}\n")
        text += f"resource {self.resource} {{\n{resource_extra}"
        for node, peer in ((a, b), (b, a)):
            text += (f"\ton {node.hostname} {{\n\t\tlocal {self.disk(node.hostname)}\n"
                     f"\t\tremote {peer.addr}\n\t}}\n")
        text += "}\n"
        for node in (a, b):
            d = self.dir(node.hostname)
            d.mkdir(parents=True, exist_ok=True)
            self.conf(node.hostname).write_text(text)
            # per-node NBD sockets and /dev/hast directory: both nodes share this machine
            nodedev = devdir if devdir is not None else "none"
            (d / "py-hast.conf").write_text(
                f"sockdir {d}/run\ndevdir {nodedev}\n{settings_extra}")
            with open(self.disk(node.hostname), "wb") as fh:
                fh.truncate(self.size)

    # -- commands ----------------------------------------------------------------------------
    def ctl(self, name: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "hast.ctl", args[0], "-c", str(self.conf(name)),
                *args[1:]]
        res = self.cluster[name].run(*argv, cwd=str(Path(__file__).resolve().parents[1]))
        if check and res.returncode != 0:
            raise AssertionError(f"hastctl {' '.join(args)} on {name}: exit {res.returncode}: "
                                 f"{res.stdout}{res.stderr}")
        return res

    def create(self, name: str, *opts: str) -> None:
        self.ctl(name, "create", *opts, self.resource, check=True)

    def start(self, name: str, *flags: str) -> None:
        log = open(self.dir(name) / "hastd.log", "a")
        self.daemons[name] = self.cluster[name].popen(
            sys.executable, "-m", "hast.daemon", "-F", "-c", str(self.conf(name)), *flags,
            stdout=log, stderr=subprocess.STDOUT, cwd=str(Path(__file__).resolve().parents[1]))
        self.wait(f"hastd on {name}", lambda: self.ctl(name, "status").returncode == 0)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.daemons.pop(name, None)
        if proc is None:
            return
        if sig == signal.SIGKILL:
            self.kill_all(name)
        else:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill_all(name)
            proc.wait(timeout=10)

    def kill_all(self, name: str) -> None:
        """Every process of the node (hastd and its workers): a power cut."""
        node = self.cluster[name]
        pids = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def role(self, name: str, role: str, wait: bool = True) -> None:
        self.ctl(name, "role", role, self.resource, check=True)
        if role == "primary" and wait:
            # like /dev/hast/<name> on FreeBSD, the export appears once the worker runs
            self.wait(f"the NBD export of {name}", lambda: self.serving(name))

    def serving(self, name: str) -> bool:
        """The primary's NBD socket accepts connections (a stale file does not count)."""
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(str(self.socket(name)))
            except OSError:
                return False
        return True

    def list_fields(self, name: str) -> dict[str, str]:
        out = self.ctl(name, "list", self.resource).stdout
        fields = {}
        for line in out.splitlines():
            if ":" in line and line.startswith("  "):
                key, value = line.strip().split(":", 1)
                fields.setdefault(key, value.strip())
        return fields

    def dirty(self, name: str) -> int:
        value = self.list_fields(name).get("dirty", "")
        return int(value.split()[0]) if value else -1

    def wait(self, what: str, check, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.1)
        logs = "".join(f"\n--- {n} ---\n{self.log(n)[-3000:]}" for n in self.names)
        raise AssertionError(f"timed out waiting for {what}{logs}")

    def wait_complete(self, name: str, timeout: float = 60.0) -> None:
        self.wait(f"{name} complete with dirty 0",
                  lambda: self.list_fields(name).get("status") == "complete"
                  and self.dirty(name) == 0, timeout)

    def log(self, name: str) -> str:
        path = self.dir(name) / "hastd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def socket(self, name: str) -> Path:
        return self.dir(name) / "run" / f"{self.resource}.sock"

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{self.resource}?socket={self.socket(name)}"

    def localoff(self, name: str) -> int:
        out = self.ctl(name, "dump", self.resource, check=True).stdout
        for line in out.splitlines():
            if line.strip().startswith("localoff:"):
                return int(line.split(":")[1])
        raise AssertionError(out)

    def data(self, name: str) -> bytes:
        off = self.localoff(name)
        with open(self.disk(name), "rb") as fh:
            fh.seek(off)
            return fh.read()

    def close(self) -> None:
        for name in list(self.daemons):
            try:
                self.stop(name)
            except Exception:
                self.kill_all(name)
        self.cluster.close()
