"""The primary's frontend on Linux: its data served over NBD, and /dev/hast/<name>.

hast.frontends.nbd speaks the protocol; this module adapts NBD requests to the primary's
submit_* calls (hast.primary) and, like GEOM_GATE on FreeBSD, makes /dev/hast/<name> appear
while the resource is primary and disappear on demotion (hast.frontends.devnode).  The UNIX
socket is always served; TCP only where py-hast.conf says so (``nbd <resource> <addr>``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import TYPE_CHECKING

from hast import log
from hast.config import parse_address
from hast.frontends import Join, nbd

if TYPE_CHECKING:
    from hast.primary import Primary


class PrimaryBackend:
    """The NBD backend contract of hast.frontends.nbd, served by a primary."""

    def __init__(self, primary: Primary) -> None:
        self.primary = primary
        self.size = primary.datasize
        self.sector_size = primary.sectorsize
        self.max_request = primary.maxio
        self.read_only = False
        self.can_trim = True
        self.can_flush = True
        # a FLUSH flushes both components entirely, whatever connection it came on
        self.multi_conn = True
        self._zeros = memoryview(bytes(primary.maxio))

    def submit_many(self, reqs: list[nbd.Request]) -> None:
        """READs and WRITEs parsed from one recv(): one io_submit for the local reads and
        one dispatch (one sendmsg, one io_submit) for the writes whose extents are dirty
        on disk already; anything else as submit() does it."""
        p = self.primary
        reads: list = []
        writes: list = []
        try:
            for req in reqs:
                cmd = req.cmd
                if cmd == nbd.CMD_READ:
                    p.submit_read(req.offset, req.length, req.buf, req.complete, reads)
                elif cmd == nbd.CMD_WRITE:
                    p.submit_write(req.offset, req.length, req.buf, req.complete,
                                   fua=bool(req.flags & nbd.CMD_FLAG_FUA), batch=writes)
                else:
                    self.submit(req)
        finally:
            p.dispatch_batch(reads, writes)

    def submit(self, req: nbd.Request) -> None:
        p = self.primary
        cmd = req.cmd
        if cmd == nbd.CMD_READ:
            p.submit_read(req.offset, req.length, req.buf, req.complete)
        elif cmd == nbd.CMD_WRITE:
            p.submit_write(req.offset, req.length, req.buf, req.complete,
                           fua=bool(req.flags & nbd.CMD_FLAG_FUA))
        elif cmd == nbd.CMD_FLUSH:
            p.submit_flush(req.complete)
        elif cmd == nbd.CMD_TRIM:
            p.submit_delete(req.offset, req.length, req.complete)
        elif cmd == nbd.CMD_WRITE_ZEROES:
            # zeros travel as 4-byte "hole" payloads, so plain WRITEs are cheap on the wire
            step = self.max_request
            starts = range(req.offset, req.offset + req.length, step)
            join = Join(len(starts), req.complete)
            fua = bool(req.flags & nbd.CMD_FLAG_FUA)
            for start in starts:
                length = min(step, req.offset + req.length - start)
                p.submit_write(start, length, self._zeros[:length], join.part, fua=fua)
        else:
            req.complete(22)  # EINVAL


def reap_leftovers(workdir: str) -> None:
    """Take down what a worker killed with SIGKILL left in ``workdir``.

    Such a worker cannot detach its device: its loop device, its nbdfuse process and the
    FUSE mount stay behind, pointing at an export that no longer exists.  The next primary
    worker of the same resource clears them before it builds its own.
    """
    if not os.path.isdir(workdir):
        return
    listing = subprocess.run(["losetup", "--list", "--noheadings", "--raw",
                              "--output", "NAME,BACK-FILE"], capture_output=True, text=True,
                             timeout=30)
    for line in listing.stdout.splitlines():
        name, _, backing = line.partition(" ")
        if backing.startswith(workdir + os.sep):
            log.warning(f"Detaching {name}, left behind by a previous worker.")
            subprocess.run(["losetup", "-d", name], capture_output=True, timeout=30)
    for private in sorted(os.listdir(workdir)):
        base = os.path.join(workdir, private)
        try:
            with open(os.path.join(base, "nbdfuse.pid")) as fh:
                os.kill(int(fh.read().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        # a dead FUSE mount fails even stat() (ENOTCONN): unmount without looking first
        mnt = os.path.join(base, "mnt")
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


class LinuxFrontend:
    def __init__(self, primary: Primary) -> None:
        self.primary = primary
        self.server: nbd.NBDServer | None = None
        self.devnode = None

    def start(self) -> None:
        p = self.primary
        settings = p.settings
        name = p.res.provname
        self.server = nbd.NBDServer(PrimaryBackend(p), export_name=name)
        sockpath = settings.socket_for(p.res.name)
        os.makedirs(os.path.dirname(sockpath), mode=0o700, exist_ok=True)
        self.server.listen_unix(sockpath)
        tcp = settings.nbd_tcp.get(p.res.name)
        if tcp:
            _scheme, host, port = parse_address(tcp, 10809)
            self.server.listen_tcp(host, port)
        self.server.start()
        # completion threads answer a burst of requests with one sendmsg per connection
        p.defer_replies = nbd.defer_replies
        p.send_replies = nbd.send_deferred_replies
        log.info(f"Serving NBD export '{name}' on {sockpath}"
                 + (f" and tcp://{tcp}" if tcp else "") + ".")
        if settings.devdir != "none":
            from hast.frontends import devnode
            workdir = os.path.join(settings.sockdir, f"{p.res.name}.devnode")
            reap_leftovers(workdir)
            os.makedirs(workdir, mode=0o700, exist_ok=True)
            try:
                self.devnode = devnode.attach(name, sockpath, workdir, devdir=settings.devdir,
                                              sector_size=p.sectorsize)
            except (OSError, devnode.DevNodeError) as exc:
                log.error(f"Unable to create {settings.devdir}/{name}: {exc}")
                raise OSError(f"{settings.devdir}/{name}: {exc}") from exc

    def stop(self) -> None:
        if self.devnode is not None:
            from hast.frontends import devnode
            try:
                self.devnode.detach()
            except (OSError, devnode.DevNodeError) as exc:
                log.error(f"Unable to remove {self.devnode!r}: {exc}")
            self.devnode = None
        if self.server is not None:
            self.server.stop()
            self.server = None
