"""pair: tests.hastpair.HastPair with what the torture harness adds around it.

* A node's provider may live on an eiofs mount (torture/eiofs.py) so that chosen ranges fail
  with a kernel EIO; the backing file stays reachable for the checker.
* Raw access to what is on the disks, bypassing hastd: the metadata, the on-disk activemap and
  the data area of each node (read from the backing file, so an active EIO rule does not stop
  the checker).
* Process-level facts the harness waits on: whether a node still runs a worker, and the
  primary's queues (idle = no request in flight).
* Everything the harness created -- namespaces, processes, FUSE mounts -- goes in ``close()``,
  which is also what runs on Ctrl-C.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from hast import metadata
from tests.hastpair import HastPair

HERE = Path(__file__).resolve().parent


class TorturePair(HastPair):
    def __init__(self, workdir: Path, size: int, resource_extra: str,
                 eio_nodes: tuple[str, ...] = ()) -> None:
        self.eio_nodes = set(eio_nodes)
        self.fuse: dict[str, subprocess.Popen] = {}
        super().__init__(workdir, size=size, resource_extra=resource_extra)

    # -- providers -----------------------------------------------------------------------------
    def mountpoint(self, name: str) -> Path:
        return self.dir(name) / "eio"

    def backing(self, name: str) -> Path:
        """The file that really holds the node's bytes."""
        if name in self.eio_nodes:
            return self.dir(name) / "backing.img"
        return self.dir(name) / "disk.img"

    def disk(self, name: str) -> Path:
        if name in self.eio_nodes:
            return self.mountpoint(name) / "disk"
        return super().disk(name)

    def _configure(self, resource_extra: str, settings_extra: str, devdir: str | None) -> None:
        for name in self.eio_nodes:
            self._mount(name)
        super()._configure(resource_extra, settings_extra, devdir)

    def _mount(self, name: str) -> None:
        d = self.dir(name)
        d.mkdir(parents=True, exist_ok=True)
        with open(self.backing(name), "wb") as fh:
            fh.truncate(self.size)
        mnt = self.mountpoint(name)
        mnt.mkdir(exist_ok=True)
        log = open(d / "eiofs.log", "ab")
        self.fuse[name] = subprocess.Popen(
            [sys.executable, str(HERE / "eiofs.py"), str(self.backing(name)), str(mnt)],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not (mnt / "ctl").exists():
            if self.fuse[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"eiofs for {name} did not come up: "
                                   f"{(d / 'eiofs.log').read_text(errors='replace')}")
            time.sleep(0.05)

    def eio(self, name: str, command: str) -> None:
        with open(self.mountpoint(name) / "ctl", "w") as fh:
            fh.write(command + "\n")

    def eio_status(self, name: str) -> str:
        return (self.mountpoint(name) / "ctl").read_text()

    # -- raw views of the disks ----------------------------------------------------------------
    def md(self, name: str) -> metadata.Metadata:
        with open(self.backing(name), "rb") as fh:
            return metadata.Metadata.unpack(fh.read(metadata.METADATA_SIZE))

    def activemap(self, name: str) -> bytes:
        md = self.md(name)
        with open(self.backing(name), "rb") as fh:
            fh.seek(metadata.METADATA_SIZE)
            return fh.read(md.localoff - metadata.METADATA_SIZE)

    def data_area(self, name: str) -> bytes:
        md = self.md(name)
        with open(self.backing(name), "rb") as fh:
            fh.seek(md.localoff)
            return fh.read(md.datasize)

    # -- processes -------------------------------------------------------------------------------
    def workers(self, name: str) -> list[str]:
        """Titles of the node's hastd worker processes ("hastd: test (secondary)")."""
        node = self.node(name)
        pids = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True,
                              text=True).stdout.split()
        out = []
        for pid in pids:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            text = title.decode(errors="replace").strip()
            if text.startswith("hastd:") and "(" in text:
                out.append(text)
        return out

    def queues(self, name: str) -> dict[str, int]:
        text = self.list_fields(name).get("queues", "")
        out = {}
        for part in text.split(","):
            if ":" in part:
                key, value = part.split(":", 1)
                out[key.strip()] = int(value)
        return out

    def status(self, name: str) -> str:
        return self.list_fields(name).get("status", "")

    def close(self) -> None:
        try:
            super().close()
        finally:
            for name, proc in list(self.fuse.items()):
                mnt = self.mountpoint(name)
                subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
                    proc.kill()
                    proc.wait(timeout=10)
                del self.fuse[name]

