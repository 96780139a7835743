"""Two nodes in namespaces replicating for real: roles, status, data through real NBD clients,
degraded mode and dirty-only resync, split-brain, and the modes x compression x checksum."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hastpair import HastPair

MiB = 1024 * 1024


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required (tools/sysdeps.sh installs it)"
    return path


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[HastPair]:
    p = HastPair(tmp_path)
    try:
        yield p
    finally:
        p.close()


def bring_up(p: HastPair, primary: str = "hasta", secondary: str = "hastb") -> None:
    for name in (primary, secondary):
        p.create(name)
        p.start(name)
    p.role(secondary, "secondary")
    p.role(primary, "primary")
    p.wait_complete(primary)


def qemu_io(p: HastPair, name: str, *cmds: str) -> subprocess.CompletedProcess:
    argv = [tool("qemu-io"), "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    return subprocess.run([*argv, p.uri(name)], capture_output=True, text=True, timeout=120)


def assert_identical(p: HastPair, a: str = "hasta", b: str = "hastb") -> None:
    da, db = p.data(a), p.data(b)
    assert len(da) == len(db)
    if da != db:
        first = next(i for i in range(len(da)) if da[i] != db[i])
        raise AssertionError(f"data areas differ, first at byte {first}")


def test_roles_and_status_complete_on_both(pair: HastPair) -> None:
    bring_up(pair)
    a, b = pair.list_fields("hasta"), pair.list_fields("hastb")
    assert a["role"] == "primary" and a["status"] == "complete"
    assert b["role"] == "secondary" and b["status"] == "complete"
    status = pair.ctl("hasta", "status").stdout.splitlines()
    assert status[0] == "Name\tStatus\t Role\t\tComponents"
    assert status[1].startswith(f"{pair.resource}\tcomplete primary        ")
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"hastd: {pair.resource} (primary)" in ps
    assert f"hastd: {pair.resource} (secondary)" in ps


def test_nbd_clients_land_byte_identical_on_the_secondary(pair: HastPair,
                                                          tmp_path: Path) -> None:
    bring_up(pair)
    res = qemu_io(pair, "hasta", "write -P 0xab 0 1M", "write -P 0xcd 3M 64k",
                  "write -z 5M 1M", "discard 7M 1M", "flush", "read -P 0xab 0 1M",
                  "read -P 0xcd 3M 64k")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Pattern verification failed" not in res.stdout
    src = tmp_path / "random.img"
    src.write_bytes(os.urandom(8 * MiB))
    copy = subprocess.run([tool("nbdcopy"), str(src), pair.uri("hasta")],
                          capture_output=True, text=True, timeout=120)
    assert copy.returncode == 0, copy.stderr
    fio = subprocess.run(
        [tool("fio"), "--name=verify", "--ioengine=nbd", f"--uri={pair.uri('hasta')}",
         "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M", "--offset=16M",
         "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
         "--verify_state_save=0"],
        capture_output=True, text=True, timeout=300)
    assert fio.returncode == 0, fio.stdout[-2000:] + fio.stderr
    assert pair.data("hasta")[: 8 * MiB] == src.read_bytes()
    assert_identical(pair)


def test_secondary_lost_then_only_dirty_extents_resync(pair: HastPair) -> None:
    bring_up(pair)
    pair.stop("hastb", signal.SIGKILL)
    pair.wait("primary degraded", lambda: pair.list_fields("hasta").get("status") == "degraded")
    res = qemu_io(pair, "hasta", "write -P 0x11 0 64k", "write -P 0x22 10M 64k",
                  "write -P 0x33 40M 4k")
    assert res.returncode == 0, res.stdout + res.stderr
    dirty = pair.dirty("hasta")
    assert dirty == 3 * 2 * MiB  # three 2 MiB extents, whatever the write sizes
    pair.start("hastb")
    pair.role("hastb", "secondary")
    pair.wait_complete("hasta", timeout=60)
    log = pair.log("hasta")
    assert "Synchronization started. 6.0MB to go." in log
    assert "Synchronization complete. 6.0MB synchronized" in log
    assert_identical(pair)


def test_buffered_providers_replicate_and_clear_bits_after_a_sync(tmp_path: Path) -> None:
    # py-hast.conf 'direct off' on both nodes: the data goes through the page cache, and the
    # primary clears a bit on disk only once an fdatasync() covers the extent's writes.
    from hast.metadata import METADATA_SIZE

    pair = HastPair(tmp_path, settings_extra="direct off\n")
    try:
        for name in ("hasta", "hastb"):
            pair.create(name, "-k", "2")
            pair.start(name)
        pair.role("hastb", "secondary")
        pair.role("hasta", "primary")
        pair.wait_complete("hasta")
        res = qemu_io(pair, "hasta", *(f"write -P {0x40 + i} {2 * i}M 64k" for i in range(6)))
        assert res.returncode == 0, res.stdout + res.stderr

        def ondisk_bits() -> set[int]:
            with open(pair.disk("hasta"), "rb") as fh:
                fh.seek(METADATA_SIZE)
                first = fh.read(1)[0]
            return {ext for ext in range(8) if first >> ext & 1}

        # keepdirty 2: the two extents written last stay dirty, the four others are cleared
        pair.wait("bits of evicted extents cleared on disk", lambda: ondisk_bits() == {4, 5})
        res = qemu_io(pair, "hasta", *(f"read -P {0x40 + i} {2 * i}M 64k" for i in range(6)))
        assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, \
            res.stdout
        assert_identical(pair)
    finally:
        pair.close()


def test_split_brain_detected_refused_and_recovered(tmp_path: Path) -> None:
    hook = tmp_path / "hook.sh"
    events = tmp_path / "events"
    hook.write_text(f"#!/bin/sh\necho \"$(hostname) $*\" >> {events}\n")
    hook.chmod(0o755)
    pair = HastPair(tmp_path / "pair", resource_extra=f"\texec {hook}\n")
    try:
        bring_up(pair)
        pair.stop("hastb", signal.SIGKILL)
        assert qemu_io(pair, "hasta", "write -P 0x41 0 4k").returncode == 0
        pair.stop("hasta", signal.SIGKILL)
        # hastb comes back alone and is promoted: both now wrote while apart
        pair.start("hastb")
        pair.role("hastb", "primary")
        assert qemu_io(pair, "hastb", "write -P 0x42 1M 4k").returncode == 0
        pair.role("hastb", "init")
        pair.start("hasta")
        pair.role("hasta", "primary")
        pair.role("hastb", "secondary")
        pair.wait("split-brain hook on both nodes",
                  lambda: events.exists() and "hasta split-brain" in events.read_text()
                  and "hastb split-brain" in events.read_text(), timeout=40)
        assert "Split-brain condition!" in pair.log("hasta") + pair.log("hastb")
        assert pair.list_fields("hasta")["status"] == "degraded"
        # the Handbook's recovery, on the node whose data is discarded (hastb)
        pair.role("hastb", "init")
        pair.create("hastb")
        pair.role("hastb", "secondary")
        pair.wait_complete("hasta", timeout=90)
        assert_identical(pair)
    finally:
        pair.close()


COMBINATIONS = [(c, k) for c in ("none", "hole", "lzf") for k in ("none", "crc32", "sha256")]


@pytest.mark.parametrize("mode", ["fullsync", "memsync", "async"])
def test_every_mode_compression_and_checksum(tmp_path: Path, mode: str) -> None:
    """Each mode with every compression x checksum, switched live on the primary (SIGHUP)."""
    pair = HastPair(tmp_path, resource_extra=f"\treplication {mode}\n")
    text = tmp_path / "text.img"
    lines = b"".join(b"HAST line %08d ........\n" % i for i in range(20000))
    text.write_bytes(lines.ljust(MiB, b"\0"))  # text, then zeros: lzf and hole both apply
    try:
        bring_up(pair)
        assert pair.list_fields("hasta")["replication"] == mode
        for n, (compression, checksum) in enumerate(COMBINATIONS):
            conf = pair.conf("hasta")
            text_conf = re.sub(r"\t(compression|checksum) \S+\n", "", conf.read_text())
            conf.write_text(text_conf.replace(
                f"\treplication {mode}\n",
                f"\treplication {mode}\n\tcompression {compression}\n\tchecksum {checksum}\n"))
            pair.daemons["hasta"].send_signal(signal.SIGHUP)
            pair.wait(f"reload {n + 1}", lambda n=n: pair.log("hasta").count(
                "Configuration reloaded successfully.") >= n + 1)
            offset = 4 * MiB * (n + 1)
            copy = subprocess.run([tool("nbdcopy"), "--destination-is-zero", str(text),
                                   f"{pair.uri('hasta')}"], capture_output=True, timeout=120)
            assert copy.returncode == 0, copy.stderr
            res = qemu_io(pair, "hasta", f"write -P 0x5a {offset} 1M",
                          f"write -z {offset + MiB} 1M", "flush", f"read -P 0x5a {offset} 1M")
            assert res.returncode == 0, (compression, checksum, res.stdout + res.stderr)
        # async/memsync may still be completing the secondary's copy: a role change to
        # init on the primary waits for its worker, which drains what is in flight
        pair.role("hasta", "init")
        assert_identical(pair)
        assert pair.data("hasta")[:MiB] == text.read_bytes()
    finally:
        pair.close()


def test_filesystem_on_dev_hast_survives_a_role_switch(tmp_path: Path) -> None:
    devdir = tmp_path / "dev"
    pair = HastPair(tmp_path / "pair", devdir=str(devdir))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    dev = devdir / pair.resource
    try:
        bring_up(pair)
        pair.wait("/dev/hast/test on hasta", dev.exists)
        assert Path(os.path.realpath(dev)).name.startswith("loop")
        subprocess.run([tool("mkfs.ext4"), "-q", "-F", str(dev)], check=True)
        subprocess.run(["mount", str(dev), str(mnt)], check=True)
        files = {f"f{i}": os.urandom(300_000 + i * 4096) for i in range(6)}
        for name, data in files.items():
            (mnt / name).write_bytes(data)
        subprocess.run(["umount", str(mnt)], check=True)
        # Handbook role switch: demote the primary first, then promote the other node
        pair.role("hasta", "secondary")
        pair.wait("/dev/hast/test gone with the demotion", lambda: not dev.exists())
        pair.role("hastb", "primary")
        pair.wait("/dev/hast/test on hastb", dev.exists)
        pair.wait_complete("hastb")
        subprocess.run(["mount", str(dev), str(mnt)], check=True)
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data, name
        subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        pair.close()
    assert not dev.exists()


def test_primary_out_of_date_reads_and_resyncs_from_the_secondary(pair: HastPair) -> None:
    bring_up(pair)
    pair.stop("hasta", signal.SIGKILL)
    # hastb carries on alone as primary and writes; hasta misses it
    pair.role("hastb", "primary")
    assert qemu_io(pair, "hastb", "write -P 0x77 2M 64k").returncode == 0
    pair.role("hastb", "secondary")
    # hasta comes back as primary: its copy is the stale one (hast-internals §9.4 case 3)
    pair.start("hasta")
    pair.role("hasta", "primary")
    res = qemu_io(pair, "hasta", "read -P 0x77 2M 64k")
    assert res.returncode == 0, res.stdout + res.stderr
    pair.wait_complete("hasta")
    assert pair.data("hasta")[2 * MiB:2 * MiB + 65536] == b"\x77" * 65536
    assert_identical(pair)


def test_a_killed_primary_leaves_nothing_for_the_next_one(tmp_path: Path) -> None:
    devdir = tmp_path / "dev"
    pair = HastPair(tmp_path / "pair", devdir=str(devdir))
    dev = devdir / pair.resource
    workdir = pair.dir("hasta") / "run" / f"{pair.resource}.devnode"

    def leftovers() -> list[str]:
        loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        mounts = Path("/proc/mounts").read_text()
        return [line for line in (loops + mounts).splitlines() if str(workdir) in line]

    try:
        bring_up(pair)
        pair.wait("/dev/hast/test", dev.exists)
        assert leftovers()
        pair.kill_all("hasta")      # worker, hastd and the worker's nbdfuse
        pair.daemons.pop("hasta")
        assert leftovers()          # a SIGKILLed worker cannot clean up
        pair.start("hasta")
        pair.role("hasta", "primary")
        def ready() -> bool:
            # the new worker's own device: a loop device with a size, nothing else left over
            loop = Path(os.path.realpath(dev)).name
            size = Path(f"/sys/block/{loop}/size")
            return (dev.exists() and loop.startswith("loop") and size.exists()
                    and int(size.read_text()) > 0 and len(leftovers()) == 2)

        pair.wait("/dev/hast/test again", ready)
        res = qemu_io(pair, "hasta", "write -P 0x19 0 4k", "read -P 0x19 0 4k")
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        pair.close()
    assert not leftovers()
