"""eiofs: a provider file that fails chosen ranges with a real kernel EIO (FUSE, pyfuse3).

The kernel here has no device-mapper (no dm-error/dm-flakey) and no fault injection
(linux-frontends.md §6), so the torture harness serves a HAST provider through FUSE: the
mount point holds two files,

* ``disk`` -- the provider, backed by a regular file; every READ/WRITE that overlaps an
  active rule of its kind fails, and the process doing the pread/pwrite (hastd) gets EIO from
  the kernel exactly as from a failing disk;
* ``ctl``  -- the control file: write ``fail r|w|rw OFFSET LENGTH`` (byte range of the
  provider file, metadata included) or ``clear``; read it for the rules and the number of
  requests failed so far (``failed r=N w=N``).

Both files are opened with FOPEN_DIRECT_IO, so only the requests that really overlap a rule
fail (no page-cache readahead widening the range, and O_DIRECT opens work).  This module owns
nothing but this file system; torture.pair mounts it and torture.faults drives ``ctl``.

Run: ``python torture/eiofs.py BACKING MOUNTPOINT`` (foreground; unmount with
``fusermount3 -u MOUNTPOINT`` to stop it).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading

import pyfuse3
import trio

DISK_INODE = pyfuse3.ROOT_INODE + 1
CTL_INODE = pyfuse3.ROOT_INODE + 2
NAMES = {b"disk": DISK_INODE, b"ctl": CTL_INODE}


class EioFS(pyfuse3.Operations):
    def __init__(self, backing: str) -> None:
        super().__init__()
        self.fd = os.open(backing, os.O_RDWR | os.O_CLOEXEC)
        self.rules: list[tuple[str, int, int]] = []
        self.failed = {"r": 0, "w": 0}
        self.lock = threading.Lock()

    # -- fault rules ---------------------------------------------------------------------------
    def _fails(self, kind: str, offset: int, length: int) -> bool:
        end = offset + length
        with self.lock:
            for ops, start, rlen in self.rules:
                if kind in ops and offset < start + rlen and start < end:
                    self.failed[kind] += 1
                    return True
        return False

    def _control(self, text: str) -> None:
        for line in text.splitlines():
            words = line.split()
            if not words:
                continue
            if words == ["clear"]:
                with self.lock:
                    self.rules.clear()
            elif len(words) == 4 and words[0] == "fail" and words[1] in ("r", "w", "rw"):
                with self.lock:
                    self.rules.append((words[1], int(words[2]), int(words[3])))
            else:
                raise pyfuse3.FUSEError(errno.EINVAL)

    def _status(self) -> bytes:
        with self.lock:
            lines = [f"fail {ops} {start} {length}" for ops, start, length in self.rules]
            lines.append(f"failed r={self.failed['r']} w={self.failed['w']}")
        return ("\n".join(lines) + "\n").encode()

    # -- file system ---------------------------------------------------------------------------
    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_nlink = 1
        attr.st_uid = attr.st_gid = 0
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2
        elif inode == DISK_INODE:
            attr.st_mode = stat.S_IFREG | 0o600
            attr.st_size = os.fstat(self.fd).st_size
        elif inode == CTL_INODE:
            attr.st_mode = stat.S_IFREG | 0o600
            attr.st_size = 0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_blksize = 4096
        attr.st_blocks = (attr.st_size + 511) // 512
        attr.attr_timeout = attr.entry_timeout = 0
        return attr

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name not in NAMES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(NAMES[name])

    async def setattr(self, inode, attr, fields, fh, ctx):
        if inode == DISK_INODE and fields.update_size:
            os.ftruncate(self.fd, attr.st_size)
        return self._attr(inode)

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        for i, (name, inode) in enumerate(NAMES.items()):
            if i >= start_id and not pyfuse3.readdir_reply(token, name, self._attr(inode),
                                                           i + 1):
                return

    async def releasedir(self, fh):
        return None

    async def open(self, inode, flags, ctx):
        if inode not in (DISK_INODE, CTL_INODE):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        if fh == CTL_INODE:
            return self._status()[off:off + size]
        if self._fails("r", off, size):
            raise pyfuse3.FUSEError(errno.EIO)
        return os.pread(self.fd, size, off)

    async def write(self, fh, off, buf):
        if fh == CTL_INODE:
            self._control(bytes(buf).decode())
            return len(buf)
        if self._fails("w", off, len(buf)):
            raise pyfuse3.FUSEError(errno.EIO)
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh, datasync):
        if fh == DISK_INODE:
            os.fdatasync(self.fd)

    async def flush(self, fh):
        return None

    async def release(self, fh):
        return None

    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        size = os.fstat(self.fd).st_size
        st.f_blocks = size // 4096
        st.f_namemax = 255
        return st


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: eiofs.py BACKING MOUNTPOINT", file=sys.stderr)
        return 64
    fs = EioFS(argv[1])
    options = set(pyfuse3.default_options)
    options.add("fsname=hast-eiofs")
    pyfuse3.init(fs, argv[2], options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
