"""The py-hast demo: two HAST nodes on one machine, a file system, a crash and a failover.

Each node runs in its own network and UTS namespace (hostnames hasta and hastb, a veth link
between them), backed by a sparse file.  The demo follows the Handbook: hastctl create, start
hastd, roles, a file system on /dev/hast/demo, files written; then the primary is killed (as
if the machine lost power), hastb is promoted, and the files are verified there.

Run it as root with ``make demo``.  Everything it creates (namespaces, processes, mounts,
loop devices, files) is removed at the end, also when it fails or is interrupted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.hastpair import HastPair  # noqa: E402

SIZE = 256 * 1024 * 1024
STEP = 0


def say(text: str) -> None:
    global STEP
    STEP += 1
    print(f"\n\033[1m[{STEP}] {text}\033[0m", flush=True)


def show(pair: HastPair, node: str, *args: str) -> subprocess.CompletedProcess:
    res = pair.ctl(node, *args)
    print(f"{node}# hastctl {' '.join(args)}")
    for line in (res.stdout + res.stderr).rstrip().splitlines():
        print(f"    {line}")
    if res.returncode != 0:
        raise SystemExit(f"demo: hastctl {' '.join(args)} failed (exit {res.returncode})")
    return res


def run(*argv: str) -> None:
    print(f"# {' '.join(argv)}")
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"demo: {argv[0]} failed: {(res.stderr or res.stdout).strip()}")


def checksums(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.iterdir()) if p.is_file()}


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (namespaces, loop devices, mounts)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="hast-demo-"))
    mnt = work / "mnt"
    mnt.mkdir()
    dev = Path("/dev/hast/demo")
    pair: HastPair | None = None
    started = time.monotonic()

    def interrupted(_signo: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        say("Two nodes, hasta and hastb, each in its own network and UTS namespace")
        pair = HastPair(work, size=SIZE, resource="demo", devdir="/dev/hast")
        print(f"hasta = {pair.node('hasta').addr}, hastb = {pair.node('hastb').addr}")
        print(f"namespaces: {pair.node('hasta').netns} {pair.node('hastb').netns}")
        print(f"hast.conf (the same on both nodes):\n{pair.conf('hasta').read_text()}")

        say("hastctl create on both nodes, then start hastd on both")
        for node in ("hasta", "hastb"):
            show(pair, node, "create", "demo")
            pair.start(node)
        show(pair, "hasta", "dump", "demo")

        say("hasta becomes primary, hastb secondary; they connect and synchronize")
        show(pair, "hastb", "role", "secondary", "demo")
        show(pair, "hasta", "role", "primary", "demo")
        pair.wait_complete("hasta")
        show(pair, "hasta", "status")
        show(pair, "hastb", "status")

        say("A file system on /dev/hast/demo of the primary, files written")
        pair.wait("/dev/hast/demo", dev.exists)
        print(f"/dev/hast/demo -> {os.path.realpath(dev)}")
        run("mkfs.ext4", "-q", "-F", str(dev))
        run("mount", str(dev), str(mnt))
        for i in range(8):
            (mnt / f"file{i}.bin").write_bytes(os.urandom(1024 * 1024 + i * 4096))
        (mnt / "README").write_text("written on hasta through /dev/hast/demo\n")
        before = checksums(mnt)
        run("sync", "-f", str(mnt))
        print(f"wrote {len(before)} files and synced them")
        show(pair, "hasta", "list", "demo")

        say("hasta dies: every one of its processes is killed, like a power cut")
        pair.kill_all("hasta")
        pair.daemons.pop("hasta", None)
        # What the dead machine would have taken with it, but this one shares: the mounted
        # file system, its loop device, its FUSE mount and the /dev/hast/demo link.
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        release_leftovers(dev, work / "hasta")
        pair.wait("hastb to notice", lambda: pair.list_fields("hastb").get("status") != "complete")
        show(pair, "hastb", "status")

        say("Failover: hastb becomes primary, fsck, mount, verify every file")
        show(pair, "hastb", "role", "primary", "demo")
        pair.wait("/dev/hast/demo on hastb",
                  lambda: dev.exists() and os.path.realpath(dev).startswith("/dev/loop"))
        subprocess.run(["fsck.ext4", "-p", str(dev)], capture_output=True)
        run("mount", str(dev), str(mnt))
        after = checksums(mnt)
        for name, digest in before.items():
            state = "ok" if after.get(name) == digest else "DIFFERS"
            print(f"    {name:<10} {digest[:16]}  {state}")
        show(pair, "hastb", "list", "demo")
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if after != before:
            print("\ndemo: FAILED: files differ after the failover", file=sys.stderr)
            return 1
        print(f"\ndemo: PASSED: every file intact on hastb after the failover "
              f"({time.monotonic() - started:.0f} s)")
        return 0
    except KeyboardInterrupt:
        print("\ndemo: interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        if pair is not None:
            pair.close()
        release_leftovers(dev, work)
        shutil.rmtree(work, ignore_errors=True)


def release_leftovers(dev: Path, work: Path) -> None:
    """A node killed with SIGKILL cannot take down its loop device and FUSE mount."""
    with open("/proc/mounts") as fh:
        mounts = [line.split()[1] for line in fh if str(work) in line]
    for line in subprocess.run(["losetup", "-a"], capture_output=True, text=True,
                               check=False).stdout.splitlines():
        if str(work) in line:
            subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True)
    for mount in mounts:
        subprocess.run(["umount", "-l", mount], capture_output=True)
    if dev.is_symlink():
        dev.unlink()


if __name__ == "__main__":
    sys.exit(main())
