"""/dev/hast/<name> from an NBD export: nbdfuse + loop device (this kernel has no nbd module).

Real FUSE mount, real loop device, real ext4: attach, mkfs, mount, write, detach, attach
again and find the files intact.  Needs nbdfuse (libnbd-bin), fusermount3 (fuse3), losetup
and blockdev (util-linux), mkfs.ext4/e2fsck (e2fsprogs).  Every mount, loop device and
process is taken down by the fixtures, also when a test fails.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hast.frontends import devnode
from hast.frontends.devnode import DevNode, DevNodeError, attach, is_mounted
from hast.frontends.nbd import FileBackend, NBDServer

SIZE = 128 << 20
TOOLS = ("nbdfuse", "fusermount3", "losetup", "blockdev", "mkfs.ext4", "e2fsck", "mount",
         "umount")


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in TOOLS:
        assert shutil.which(tool), f"{tool} is required for the devnode tests"


@dataclass
class Export:
    name: str
    image: Path
    sock: str
    workdir: Path
    mnt: Path
    nodes: list[DevNode] = field(default_factory=list)

    def attach(self) -> DevNode:
        node = attach(self.name, self.sock, self.workdir)
        self.nodes.append(node)
        return node


@pytest.fixture
def export(tmp_path: Path) -> Iterator[Export]:
    # A name with a slash: GEOM-style names become subdirectories of /dev/hast.
    name = f"pytest-{uuid.uuid4().hex[:8]}/disk"
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    backend = FileBackend(image)
    server = NBDServer(backend, export_name=name)
    exp = Export(name, image, "", tmp_path / "work", tmp_path / "mnt")
    exp.mnt.mkdir()
    try:
        exp.sock = server.listen_unix(tmp_path / "nbd.sock")
        server.start()
        yield exp
    finally:
        if is_mounted(exp.mnt):
            if _run("umount", str(exp.mnt)).returncode != 0:
                _run("umount", "-l", str(exp.mnt))
        for node in exp.nodes:
            try:
                node.detach()
            except DevNodeError as exc:
                print(f"cleanup: {exc}")
        server.stop()
        backend.close()


def _loop_devices() -> str:
    return _run("losetup", "-l", "-n", "-O", "NAME,BACK-FILE").stdout


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_attach_mkfs_mount_detach_reattach(export: Export) -> None:
    node = export.attach()
    assert node.method == "nbdfuse"  # no /sys/module/nbd on this kernel
    link = Path(devnode.DEV_DIR) / export.name
    assert node.path == str(link)
    assert link.is_symlink()
    assert os.readlink(link) == node.device
    assert stat.S_ISBLK(os.stat(link).st_mode)
    r = _run("blockdev", "--getsize64", str(link))
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == SIZE

    r = _run("mkfs.ext4", "-q", "-F", str(link))
    assert r.returncode == 0, r.stderr
    r = _run("mount", str(link), str(export.mnt))
    assert r.returncode == 0, r.stderr
    digests = {}
    for i in range(20):
        f = export.mnt / f"file{i}.bin"
        f.write_bytes(os.urandom(4096 * (1 + i * 37)))
        digests[f.name] = _sha256(f)
    big = export.mnt / "big.bin"
    with open(big, "wb") as f:
        for _ in range(8):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    digests[big.name] = _sha256(big)
    r = _run("umount", str(export.mnt))
    assert r.returncode == 0, r.stderr
    r = _run("e2fsck", "-fn", str(link))
    assert r.returncode == 0, r.stdout + r.stderr

    device, private = node.device, node._private
    assert device is not None and private is not None
    node.detach()
    assert not link.is_symlink()
    assert not os.path.exists(os.path.dirname(link))  # the subdirectory we made is gone
    assert device not in _loop_devices()
    assert not is_mounted(os.path.join(private, "mnt"))
    assert not os.path.exists(private)
    node.detach()  # idempotent

    # The data is in the export, not in anything detach threw away.
    node = export.attach()
    r = _run("mount", str(link), str(export.mnt))
    assert r.returncode == 0, r.stderr
    assert {f.name: _sha256(f) for f in export.mnt.iterdir() if f.is_file()} == digests
    r = _run("umount", str(export.mnt))
    assert r.returncode == 0, r.stderr
    node.detach()
    assert not link.is_symlink()


def test_detach_refuses_while_mounted(export: Export) -> None:
    node = attach(export.name, export.sock, export.workdir, timeout=3)
    export.nodes.append(node)
    assert _run("mkfs.ext4", "-q", "-F", node.path).returncode == 0
    assert _run("mount", node.path, str(export.mnt)).returncode == 0
    with pytest.raises(DevNodeError, match="is mounted"):
        node.detach()
    # Nothing was taken down under the mounted filesystem.
    assert os.readlink(node.path) == node.device
    (export.mnt / "after").write_bytes(b"still here")
    os.sync()
    assert _run("umount", str(export.mnt)).returncode == 0
    node.detach()  # finishes what the first attempt could not
    assert node.device is None
    assert not os.path.exists(node.path)


def test_attach_errors_leave_nothing_behind(export: Export, tmp_path: Path) -> None:
    before = _loop_devices()
    with pytest.raises(DevNodeError, match="nbdfuse"):
        attach("nosuch", str(tmp_path / "missing.sock"), export.workdir, timeout=5)
    assert _loop_devices() == before
    assert not os.path.lexists(os.path.join(devnode.DEV_DIR, "nosuch"))
    assert not list(export.workdir.glob("nbdfuse-*"))
    for bad in ("", "/abs", "a//b", "a/../b", "."):
        with pytest.raises(DevNodeError, match="invalid resource name"):
            attach(bad, export.sock, export.workdir)


def test_kernel_nbd_client(export: Export) -> None:
    """The kernel-client branch; on kernels without the nbd module it must fail cleanly."""
    if not os.path.isdir(devnode.NBD_MODULE):
        with pytest.raises(DevNodeError, match="nbd module"):
            attach(export.name, export.sock, export.workdir, method="kernel-nbd")
        assert not os.path.lexists(os.path.join(devnode.DEV_DIR, export.name))
        return
    assert shutil.which("nbd-client"), "nbd-client is required where the nbd module exists"
    node = attach(export.name, export.sock, export.workdir, method="kernel-nbd")
    export.nodes.append(node)
    assert node.device is not None and node.device.startswith("/dev/nbd")
    assert os.readlink(node.path) == node.device
    assert int(_run("blockdev", "--getsize64", node.path).stdout) == SIZE
    node.detach()
    assert not os.path.lexists(node.path)
