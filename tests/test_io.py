"""hast._io on real files, real O_DIRECT and real block devices (loop devices, 512 and 4K sectors).

Loop devices and mounts need root and util-linux/e2fsprogs; those tests fail otherwise
(a missing tool is a failure, not a skip).  Every
loop device and mount made here is torn down in a finally, also when the test fails.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hast import _io

AlignedBuffer = _io.AlignedBuffer
NotAProvider = _io.NotAProvider

# Filesystems known to accept O_DIRECT (coreutils prints ext2/ext3 for ext4 too).
DIRECT_FS = {"ext2/ext3", "ext4", "xfs", "btrfs"}
MiB = 1 << 20
IS_ROOT = os.geteuid() == 0


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/sbin:/usr/sbin")


def _fstype(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def direct_dir() -> Iterator[Path]:
    """A directory on a disk filesystem: /var/tmp if it is one, else a loop-mounted ext4."""
    base = Path("/var/tmp")
    if _fstype(base) in DIRECT_FS:
        d = Path(tempfile.mkdtemp(prefix="hast-io-", dir=base))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return
    if not IS_ROOT or not _tool("mkfs.ext4"):
        pytest.fail("/var/tmp is not a disk filesystem and no ext4 image can be mounted "
                    "(needs root and e2fsprogs)")
    work = Path(tempfile.mkdtemp(prefix="hast-io-"))
    img, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    try:
        with open(img, "wb") as f:
            f.truncate(64 * MiB)
        subprocess.run([_tool("mkfs.ext4"), "-q", "-F", str(img)], check=True)
        subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def loop_device(backing: Path, size: int, sector_size: int = 512) -> Iterator[str]:
    if not IS_ROOT or not _tool("losetup"):
        pytest.fail("loop devices need root and losetup (util-linux)")
    with open(backing, "wb") as f:
        f.truncate(size)
    cmd = [_tool("losetup"), "-f", "--show"]
    if sector_size != 512:
        cmd += ["--sector-size", str(sector_size)]
    res = subprocess.run(cmd + [str(backing)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"losetup failed: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run([_tool("losetup"), "-d", dev], check=False)


@contextmanager
def opened(path: str | Path, flags: int = os.O_RDWR) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- AlignedBuffer -----------------------------------------------------------------------

@pytest.mark.parametrize("alignment", [512, 4096, 65536])
def test_aligned_buffer_alignment_and_protocol(alignment: int) -> None:
    buf = AlignedBuffer(12345, alignment)
    assert buf.address % alignment == 0
    assert buf.size == len(buf) == 12345 and buf.alignment == alignment
    view = memoryview(buf)
    assert not view.readonly and view.nbytes == 12345 and view.format == "B"
    assert view.tobytes() == bytes(12345)
    view[100:104] = b"HAST"
    assert bytes(memoryview(buf)[100:104]) == b"HAST"
    buf.zero()
    assert bytes(buf) == bytes(12345)


def test_aligned_buffer_default_and_errors() -> None:
    assert AlignedBuffer(4096).address % 4096 == 0
    assert len(AlignedBuffer(0)) == 0
    for bad in (0, 3, 4095, 6):
        with pytest.raises(ValueError):
            AlignedBuffer(4096, bad)
    with pytest.raises(ValueError):
        AlignedBuffer(-1)


def test_aligned_buffer_outlives_through_its_views() -> None:
    view = memoryview(AlignedBuffer(8192))
    view[:5] = b"alive"
    assert bytes(view[:5]) == b"alive"


# -- pread / pwrite ------------------------------------------------------------------------

def test_pread_pwrite_any_buffer_type(tmp_path: Path) -> None:
    path = _file(tmp_path / "f", bytes(16384))
    with opened(path) as fd:
        assert _io.pwrite(fd, b"bytes", 0) == 5
        assert _io.pwrite(fd, bytearray(b"bytearray"), 100) == 9
        assert _io.pwrite(fd, memoryview(b"..view..")[2:6], 200) == 4
        ab = AlignedBuffer(4096)
        memoryview(ab)[:7] = b"aligned"
        assert _io.pwrite(fd, ab, 8192) == 4096
        out = bytearray(16)
        assert _io.pread(fd, out, 0) == 16 and out[:5] == b"bytes"
        mv = memoryview(bytearray(32))
        assert _io.pread(fd, mv[4:13], 100) == 9 and bytes(mv[4:13]) == b"bytearray"
        rb = AlignedBuffer(4096)
        assert _io.pread(fd, rb, 8192) == 4096 and bytes(rb)[:7] == b"aligned"
        assert _io.pread(fd, bytearray(4), 200) == 4
    assert path.read_bytes()[200:204] == b"view"


def test_pread_short_only_at_eof(tmp_path: Path) -> None:
    path = _file(tmp_path / "f", b"x" * 6000)
    with opened(path, os.O_RDONLY) as fd:
        buf = bytearray(8192)
        assert _io.pread(fd, buf, 0) == 6000
        assert _io.pread(fd, buf, 6000) == 0
        assert _io.pread(fd, bytearray(0), 0) == 0


def test_pread_rejects_readonly_buffer(tmp_path: Path) -> None:
    path = _file(tmp_path / "f", b"x" * 10)
    with opened(path, os.O_RDONLY) as fd, pytest.raises(BufferError):
        _io.pread(fd, b"immutable!", 0)


def test_errors_carry_errno(tmp_path: Path) -> None:
    path = _file(tmp_path / "f", b"x" * 10)
    with opened(path, os.O_RDONLY) as fd:
        with pytest.raises(OSError) as exc:
            _io.pwrite(fd, b"nope", 0)
        assert exc.value.errno == errno.EBADF
    with pytest.raises(OSError) as exc:
        _io.pread(fd, bytearray(4), 0)
    assert exc.value.errno == errno.EBADF
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as exc:
            _io.pread(r, bytearray(4), 0)
        assert exc.value.errno == errno.ESPIPE
    finally:
        os.close(r)
        os.close(w)


def _short_write_child(path: str) -> None:
    # RLIMIT_FSIZE makes the kernel accept only part of the write; the loop must come back
    # for the rest and then surface the EFBIG of the second call.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _io.pwrite(fd, b"w" * 8192, 0)
    except OSError as exc:
        os._exit(0 if exc.errno == errno.EFBIG else 2)
    os._exit(1)


def test_pwrite_continues_after_short_write(tmp_path: Path) -> None:
    path = tmp_path / "limited"
    pid = os.fork()
    if pid == 0:
        try:
            _short_write_child(str(path))
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert path.read_bytes() == b"w" * 5000


def test_preadv_pwritev(tmp_path: Path) -> None:
    path = _file(tmp_path / "f", b"")
    with opened(path) as fd:
        parts = [b"a" * 100, bytearray(b"b" * 4096), memoryview(b"c" * 7), AlignedBuffer(512), b""]
        assert _io.pwritev(fd, parts, 10) == 100 + 4096 + 7 + 512
        data = path.read_bytes()
        assert data == bytes(10) + b"a" * 100 + b"b" * 4096 + b"c" * 7 + bytes(512)
        a, b, c = bytearray(5), AlignedBuffer(4096), bytearray(8192)
        got = _io.preadv(fd, [a, b, c], 10)
        assert got == len(data) - 10
        assert bytes(a) + bytes(b) + bytes(c[: got - 4101]) == data[10:]
        assert _io.preadv(fd, [], 0) == 0 and _io.pwritev(fd, [], 0) == 0


def test_pwritev_more_buffers_than_iov_max(tmp_path: Path) -> None:
    path = _file(tmp_path / "f", b"")
    chunks = [bytes([i % 251]) * 8 for i in range(3000)]
    with opened(path) as fd:
        assert _io.pwritev(fd, chunks, 0) == 24000
        outs = [bytearray(8) for _ in range(3000)]
        assert _io.preadv(fd, outs, 0) == 24000
    assert [bytes(o) for o in outs] == chunks
    assert path.read_bytes() == b"".join(chunks)


# -- O_DIRECT --------------------------------------------------------------------------------

def test_open_provider_direct_on_disk_filesystem(direct_dir: Path) -> None:
    path = _file(direct_dir / "prov", bytes(1 * MiB))
    fd, is_direct = _io.open_provider(path)
    try:
        assert is_direct and _io.fd_is_direct(fd)
        assert os.get_inheritable(fd) is False
        buf = AlignedBuffer(65536)
        memoryview(buf)[:] = os.urandom(65536)
        assert _io.pwrite(fd, buf, 4096) == 65536
        back = AlignedBuffer(65536)
        assert _io.pread(fd, back, 4096) == 65536
        assert bytes(back) == bytes(buf)
    finally:
        os.close(fd)
    fd, is_direct = _io.open_provider(str(path).encode(), writable=False, direct=False)
    try:
        assert not is_direct and not _io.fd_is_direct(fd)
        with pytest.raises(OSError):
            _io.pwrite(fd, b"x", 0)
    finally:
        os.close(fd)


def test_open_provider_falls_back_when_direct_refused() -> None:
    # procfs has no direct I/O: open(O_DIRECT) fails with EINVAL there.
    fd, is_direct = _io.open_provider("/proc/version", writable=False)
    try:
        assert not is_direct
        buf = bytearray(64)
        assert _io.pread(fd, buf, 0) > 0 and buf.startswith(b"Linux")
    finally:
        os.close(fd)


def test_open_provider_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as exc:
        _io.open_provider(tmp_path / "absent")
    assert exc.value.filename == tmp_path / "absent"


def test_direct_unaligned_memory_bounces(direct_dir: Path) -> None:
    data = os.urandom(2 * MiB)
    path = _file(direct_dir / "prov", data)
    fd, is_direct = _io.open_provider(path)
    try:
        assert is_direct
        big = AlignedBuffer(8192 + 1)
        odd = memoryview(big)[1:]           # address 1 past a page: O_DIRECT refuses it
        assert _io.pread(fd, odd, 8192) == 8192
        assert bytes(odd) == data[8192:16384]
        odd[:] = b"Z" * 8192
        assert _io.pwrite(fd, odd, 16384) == 8192
        assert _io.pwrite(fd, bytes(b"Y" * 4096), 0) == 4096       # bytes: unaligned heap
    finally:
        os.close(fd)
    expect = b"Y" * 4096 + data[4096:16384] + b"Z" * 8192 + data[24576:]
    assert path.read_bytes() == expect


def test_direct_unaligned_offset_and_length_bounce(direct_dir: Path) -> None:
    data = os.urandom(1 * MiB)
    path = _file(direct_dir / "prov", data)
    fd, is_direct = _io.open_provider(path)
    try:
        assert is_direct
        out = bytearray(100)
        assert _io.pread(fd, out, 12345) == 100 and bytes(out) == data[12345:12445]
        assert _io.pwrite(fd, b"odd offset and length", 777) == 21
        tail = bytearray(4096)
        assert _io.pread(fd, tail, len(data) - 10) == 10         # EOF through the bounce
        assert bytes(tail[:10]) == data[-10:]
        vecs = [bytearray(3), AlignedBuffer(4096), bytearray(5)]
        assert _io.preadv(fd, vecs, 4093) == 4104
        assert b"".join(bytes(v) for v in vecs) == data[4093:8197]
        assert _io.pwritev(fd, [b"12", b"345"], 4094) == 5
    finally:
        os.close(fd)
    expect = bytearray(data)
    expect[777:798] = b"odd offset and length"
    expect[4094:4099] = b"12345"
    assert path.read_bytes() == bytes(expect)


# -- provider_info, NotAProvider ------------------------------------------------------------

def test_provider_info_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "prov"
    with open(path, "wb") as f:
        f.truncate(256 * MiB + 1234)
    with opened(path, os.O_RDONLY) as fd:
        assert _io.provider_info(fd) == (256 * MiB + 1234, 512)


def _not_provider(fd: int) -> None:
    with pytest.raises(NotAProvider) as exc:
        _io.provider_info(fd)
    assert isinstance(exc.value, OSError)
    assert exc.value.errno == _io.ENOTPROVIDER
    assert exc.value.errno == getattr(errno, "EFTYPE", errno.ENOTBLK)


def test_not_a_provider_directory_pipe_chardev(tmp_path: Path) -> None:
    with opened(tmp_path, os.O_RDONLY) as fd:
        _not_provider(fd)
    r, w = os.pipe()
    try:
        _not_provider(r)
    finally:
        os.close(r)
        os.close(w)
    with opened("/dev/null", os.O_RDONLY) as fd:
        assert stat.S_ISCHR(os.fstat(fd).st_mode)
        _not_provider(fd)


@pytest.mark.parametrize("sector", [512, 4096])
def test_provider_info_loop_device(direct_dir: Path, sector: int) -> None:
    with loop_device(direct_dir / "backing", 64 * MiB, sector) as dev:
        fd, _ = _io.open_provider(dev)
        try:
            assert _io.provider_info(fd) == (64 * MiB, sector)
        finally:
            os.close(fd)


def test_loop_device_direct_io_4k_sectors(direct_dir: Path) -> None:
    with loop_device(direct_dir / "backing", 16 * MiB, 4096) as dev:
        fd, is_direct = _io.open_provider(dev)
        try:
            assert is_direct
            buf = AlignedBuffer(8192)
            memoryview(buf)[:] = os.urandom(8192)
            assert _io.pwrite(fd, buf, 4096 * 10) == 8192
            # 512-aligned but not 4K: the device refuses, the bounce path must not.
            assert _io.pwrite(fd, b"s" * 512, 4096 * 10 + 512) == 512
            back = AlignedBuffer(8192)
            assert _io.pread(fd, back, 4096 * 10) == 8192
            expect = bytearray(bytes(buf))
            expect[512:1024] = b"s" * 512
            assert bytes(back) == bytes(expect)
            odd = bytearray(700)
            assert _io.pread(fd, odd, 4096 * 10 + 100) == 700
            assert bytes(odd) == bytes(expect[100:800])
            _io.flush(fd)
        finally:
            os.close(fd)


# -- flush / delete / lock ------------------------------------------------------------------

def test_flush_file_and_unsupported(tmp_path: Path) -> None:
    path = _file(tmp_path / "f", b"data")
    with opened(path) as fd:
        _io.flush(fd)
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as exc:
            _io.flush(w)
        assert exc.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(r)
        os.close(w)


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_delete_punches_hole_in_file(direct_dir: Path) -> None:
    data = os.urandom(4 * MiB)
    path = _file(direct_dir / "prov", data)
    with opened(path) as fd:
        os.fsync(fd)
        before = _allocated(path)
        _io.delete(fd, 1 * MiB, 2 * MiB)
        _io.flush(fd)
        assert os.fstat(fd).st_size == 4 * MiB
        assert before - _allocated(path) >= 2 * MiB
        out = bytearray(4 * MiB)
        assert _io.pread(fd, out, 0) == 4 * MiB
    assert out[: 1 * MiB] == data[: 1 * MiB]
    assert out[1 * MiB: 3 * MiB] == bytes(2 * MiB)
    assert out[3 * MiB:] == data[3 * MiB:]


def test_delete_unsupported_and_empty(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as exc:
            _io.delete(w, 0, 4096)
        assert exc.value.errno == errno.EOPNOTSUPP
        _io.delete(w, 0, 0)         # nothing to discard: no error, no syscall
    finally:
        os.close(r)
        os.close(w)


def test_loop_device_discard_and_flush(direct_dir: Path) -> None:
    backing = direct_dir / "backing"
    with loop_device(backing, 16 * MiB) as dev:
        fd, _ = _io.open_provider(dev)
        try:
            buf = AlignedBuffer(4 * MiB)
            memoryview(buf)[:] = os.urandom(4 * MiB)
            assert _io.pwrite(fd, buf, 0) == 4 * MiB
            _io.flush(fd)
            before = _allocated(backing)
            assert before >= 4 * MiB
            _io.delete(fd, 1 * MiB, 2 * MiB)
            _io.flush(fd)
            back = AlignedBuffer(4 * MiB)
            assert _io.pread(fd, back, 0) == 4 * MiB
            view, orig = memoryview(back), memoryview(buf)
            assert view[: 1 * MiB] == orig[: 1 * MiB]
            assert view[1 * MiB: 3 * MiB] == bytes(2 * MiB)
            assert view[3 * MiB:] == orig[3 * MiB:]
            assert before - _allocated(backing) >= 2 * MiB
            with pytest.raises(OSError) as exc:
                _io.delete(fd, 100, 4096)           # not sector aligned
            assert exc.value.errno == errno.EINVAL
        finally:
            os.close(fd)


def test_lock_exclusive_between_open_file_descriptions(tmp_path: Path) -> None:
    path = _file(tmp_path / "prov", b"x")
    fd1 = os.open(path, os.O_RDWR)
    fd2 = os.open(path, os.O_RDWR)
    try:
        _io.lock_exclusive(fd1)
        _io.lock_exclusive(fd1)                 # re-locking our own lock is fine
        dup = os.dup(fd1)                       # same open file description: same lock
        try:
            _io.lock_exclusive(dup)
        finally:
            os.close(dup)
        with pytest.raises(BlockingIOError) as exc:
            _io.lock_exclusive(fd2)
        assert exc.value.errno == errno.EWOULDBLOCK
        os.close(fd1)
        fd1 = -1
        _io.lock_exclusive(fd2)
    finally:
        for fd in (fd1, fd2):
            if fd >= 0:
                os.close(fd)
