"""Failover with files/hast-switch.in: the CARP/devd and VRRP/keepalived switch, for real.

Two nodes in namespaces (tests/hastpair.py), each with its own /dev/hast (a per-test devdir
in py-hast.conf), its own mount point, lock and hast-switch.conf, and a VRRP address on its
loopback that this test adds and removes as keepalived would before it runs the notify
commands of files/keepalived-hast.conf.sample (keepalived itself is not started).  ext4 on
/dev/hast/test is really checked, mounted, written, unmounted and mounted on the other node.

The flapping test fires master/backup/fault notifications at both nodes in a seeded random
order and with random delays, concurrently, while a monitor reads the primary workers and
/dev/hast devices of both nodes: a reading A, B, A where A is primary both times and B is
primary in between is two primaries at one instant, and fails the test.

The FreeBSD side (ufs: fsck -p -y -t ufs and mount; zfs: zpool import/export; the CARP state
from ifconfig; umount -f; fstat) runs against stand-ins for those tools and a hastctl
stand-in, and the devd rule of files/devd-hast.conf.sample is checked and run through it.

Debian packages: dash, posh, bash, shellcheck (the lint), util-linux (flock, nsenter,
mount), bsdutils (logger), coreutils (timeout, realpath), procps (pgrep), psmisc (fuser),
e2fsprogs (mkfs.ext4, fsck.ext4), iproute2 (ip); the pair needs what tests/hastpair.py needs.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hastpair import HastPair

REPO = Path(__file__).resolve().parents[1]
FILES = REPO / "files"
SCRIPT = FILES / "hast-switch.in"
DEVD = FILES / "devd-hast.conf.sample"
KEEPALIVED = FILES / "keepalived-hast.conf.sample"
PREFIX = "/usr/local"
INSTALLED = f"{PREFIX}/sbin/hast-switch"

TOOLS = {"dash": "dash", "posh": "posh", "bash": "bash", "shellcheck": "shellcheck",
         "flock": "util-linux", "logger": "bsdutils", "timeout": "coreutils",
         "realpath": "coreutils", "pgrep": "procps", "fuser": "psmisc",
         "mkfs.ext4": "e2fsprogs", "fsck.ext4": "e2fsprogs", "ip": "iproute2"}
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def need(tool: str) -> str:
    path = shutil.which(tool, path=SBIN_PATH)
    if path is None:
        pytest.fail(f"{tool} is required (Debian package {TOOLS[tool]})")
    return path


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hast-switch as the port installs it (%%PREFIX%% substituted)."""
    for tool in TOOLS:
        need(tool)
    out = tmp_path_factory.mktemp("sbin") / "hast-switch"
    text = SCRIPT.read_text(encoding="utf-8").replace("%%PREFIX%%", PREFIX)
    assert not re.findall(r"%%[A-Z_]+%%", text)
    out.write_text(text, encoding="utf-8")
    out.chmod(0o755)
    return out


def keepalived_notify() -> dict[str, list[str]]:
    """notify_<state> -> argv, from the keepalived sample."""
    text = KEEPALIVED.read_text(encoding="ascii")
    return {m.group(1): shlex.split(m.group(2))
            for m in re.finditer(r'^\s*notify_(\w+)\s+"([^"]+)"\s*$', text, re.M)}


# -- the cluster ----------------------------------------------------------------------------

class Failover:
    """A HastPair with hast-switch wired up on both nodes, ext4 on the resource."""

    def __init__(self, tmp: Path, script: Path, **settings: str) -> None:
        self.tmp = tmp
        self.script = script
        self.procs: list[subprocess.Popen] = []
        self.pair = HastPair(tmp / "pair")
        self.names = self.pair.names
        try:
            self.vip = f"{self.pair.cluster.subnet}.100"
            for name in self.names:
                d = self.pair.dir(name)
                # each node its own /dev/hast: the nodes share this machine's file system
                (d / "py-hast.conf").write_text(f"sockdir {d}/run\ndevdir {self.devdir(name)}\n")
                self.mnt(name).mkdir()
                self.configure(name, **settings)
                self.pair.create(name)
                self.pair.start(name, "-P", str(self.pidfile(name)))
            a, b = self.names
            self.pair.role(b, "secondary")
            self.pair.role(a, "primary")
            self.pair.wait("/dev/hast/test on hasta", self.dev(a).exists)
            self.pair.wait_complete(a)
            subprocess.run([need("mkfs.ext4"), "-q", "-F", str(self.dev(a))], check=True,
                           capture_output=True)
            self.pair.wait_complete(a)
            self.pair.role(a, "secondary")
            self.pair.wait("/dev/hast/test gone", lambda: not self.dev(a).exists())
        except BaseException:
            self.close()
            raise

    # -- per node ---------------------------------------------------------------------------
    def devdir(self, name: str) -> Path:
        return self.pair.dir(name) / "dev"

    def dev(self, name: str) -> Path:
        return self.devdir(name) / self.pair.resource

    def mnt(self, name: str) -> Path:
        return self.tmp / f"mnt-{name}"

    def pidfile(self, name: str) -> Path:
        return self.pair.dir(name) / "hastd.pid"

    def conffile(self, name: str) -> Path:
        return self.pair.dir(name) / "hast-switch.conf"

    def configure(self, name: str, **settings: str) -> None:
        values = {
            "resources": self.pair.resource,
            "hastctl": f"{sys.executable} -m hast.ctl",
            "hast_conf": str(self.pair.conf(name)),
            "hastd_pidfile": str(self.pidfile(name)),
            "devdir": str(self.devdir(name)),
            f"mountpoint_{self.pair.resource}": str(self.mnt(name)),
            "fstype": "ext4",
            "vip": self.vip,
            "statedir": str(self.pair.dir(name) / "switch"),
            "promote_hold": "2",
            "secondary_timeout": "60",
            "poll": "0.2",
            **settings,
        }
        self.conffile(name).write_text(
            "# written by tests/test_failover.py\n"
            + "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))

    def env(self, name: str, **extra: str) -> dict[str, str]:
        return {"PATH": SBIN_PATH, "PYTHONPATH": str(REPO), "LANG": "C.UTF-8",
                "HAST_SWITCH_CONF": str(self.conffile(name)), **extra}

    def argv(self, notify: str) -> list[str]:
        """The keepalived sample's notify_<notify> command, pointing at this script."""
        argv = keepalived_notify()[notify]
        assert argv[0] == INSTALLED, argv
        return [str(self.script), *argv[1:]]

    def switch(self, name: str, *args: str, timeout: float = 240,
               **extra: str) -> subprocess.CompletedProcess:
        return self.pair.node(name).run(str(self.script), *args, env=self.env(name, **extra),
                                        timeout=timeout)

    def notify(self, name: str, state: str, **extra: str) -> subprocess.CompletedProcess:
        return self.pair.node(name).run(*self.argv(state), env=self.env(name, **extra),
                                        timeout=240)

    def notify_async(self, name: str, state: str, log: Path) -> subprocess.Popen:
        fh = open(log, "w")
        proc = self.pair.node(name).popen(*self.argv(state), env=self.env(name),
                                          stdout=fh, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        fh.close()
        self.procs.append(proc)
        return proc

    def set_vip(self, name: str, on: bool) -> None:
        node = self.pair.node(name)
        have = self.vip in subprocess.run(["ip", "-n", node.netns, "-o", "addr", "show", "dev",
                                           "lo"], capture_output=True, text=True).stdout
        if have != on:
            subprocess.run(["ip", "-n", node.netns, "addr", "add" if on else "del",
                            f"{self.vip}/32", "dev", "lo"], check=True)

    def master(self, name: str) -> None:
        """Where keepalived would have the address: on `name` only."""
        for other in self.names:
            if other != name:
                self.set_vip(other, False)
        self.set_vip(name, True)

    def role(self, name: str) -> str:
        return self.pair.list_fields(name).get("role", "")

    def mounted(self, name: str) -> bool:
        target = os.path.realpath(self.mnt(name))
        with open("/proc/self/mounts") as fh:
            return any(line.split()[1] == target for line in fh)

    def primary_worker(self, name: str) -> bool:
        """A primary worker of this node's hastd runs (it writes while it lives)."""
        try:
            hastd = int(self.pidfile(name).read_text().strip())
        except (OSError, ValueError):
            return False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                if ppid != hastd:
                    continue
                with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                    cmd = fh.read()
            except (OSError, ValueError, IndexError):
                continue
            if cmd.startswith(f"hastd: {self.pair.resource} (primary)".encode()):
                return True
        return False

    def acting_primary(self, name: str) -> bool:
        return self.primary_worker(name) or self.dev(name).exists()

    def close(self) -> None:
        for proc in self.procs:
            # the switch, and flock and the locked run it started
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        for name in self.names:
            for _ in range(20):
                if not self.mounted(name):
                    break
                res = subprocess.run(["umount", str(self.mnt(name))], capture_output=True)
                if res.returncode != 0:
                    subprocess.run(["fuser", "-k", "-M", "-m", str(self.mnt(name))],
                                   capture_output=True)
                    time.sleep(0.5)
            else:
                subprocess.run(["umount", "-l", str(self.mnt(name))], capture_output=True)
        self.pair.close()
        # whatever a failure left mounted under this test's directory (an nbdfuse export)
        root = os.path.realpath(self.tmp) + "/"
        with open("/proc/self/mounts") as fh:
            left = [line.split()[1] for line in fh if line.split()[1].startswith(root)]
        for target in reversed(left):
            subprocess.run(["umount", "-l", target], capture_output=True)


@pytest.fixture
def cluster(tmp_path: Path, script: Path) -> Iterator[Failover]:
    c = Failover(tmp_path, script)
    try:
        yield c
    finally:
        c.close()


def ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}{res.stderr}"
    return res.stdout + res.stderr


def files_of(size: int = 6) -> dict[str, bytes]:
    rnd = random.Random(size)
    return {f"f{i}": rnd.randbytes(200_000 + i * 4096) for i in range(size)}


def write_files(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with open(mnt / name, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def check_files(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (mnt / name).read_bytes() == data, name


def bring_up(c: Failover, name: str = "hasta") -> None:
    c.master(name)
    ok(c.notify(name, "master"))
    assert c.role(name) == "primary" and c.mounted(name)


# -- becoming master and backup ---------------------------------------------------------------

def test_master_promotes_checks_and_mounts_then_backup_unmounts_and_demotes(
        cluster: Failover, tmp_path: Path) -> None:
    a, b = cluster.names
    hooks = tmp_path / "hooks"
    # the services: started once everything is up, stopped before unmounting
    cluster.configure(a, on_primary=f"mountpoint -q {cluster.mnt(a)} && echo up >> {hooks}",
                      on_secondary=f"mountpoint -q {cluster.mnt(a)} && echo down >> {hooks}")
    cluster.master(a)
    log = ok(cluster.notify(a, "master"))
    assert cluster.role(a) == "primary"
    assert cluster.mounted(a)
    assert f"fsck.ext4 -p {cluster.dev(a)}" in log
    assert f"mount -t ext4 {cluster.dev(a)} {os.path.realpath(cluster.mnt(a))}" in log
    assert "primary: test" in log
    files = files_of()
    write_files(cluster.mnt(a), files)
    # the same event again changes nothing
    log = ok(cluster.notify(a, "master"))
    assert "already mounted" in log and "role primary" not in log
    assert "already primary: test" in log
    assert cluster.role(a) == "primary" and cluster.mounted(a)
    assert hooks.read_text() == "up\n"

    cluster.set_vip(a, False)
    log = ok(cluster.notify(a, "backup"))
    assert f"umount {os.path.realpath(cluster.mnt(a))}" in log
    assert "role secondary" in log
    assert not cluster.mounted(a) and cluster.role(a) == "secondary"
    assert not cluster.dev(a).exists()
    log = ok(cluster.notify(a, "backup"))
    assert "role secondary" not in log and "umount" not in log
    assert "already secondary: test" in log
    assert hooks.read_text() == "up\ndown\n"

    # the other node takes over: the data written on the first is there
    cluster.master(b)
    ok(cluster.notify(b, "master"))
    assert cluster.role(b) == "primary" and cluster.mounted(b)
    check_files(cluster.mnt(b), files)
    assert cluster.role(a) == "secondary" and not cluster.mounted(a)
    cluster.pair.wait_complete(b)


def test_master_waits_for_the_peer_to_let_go(cluster: Failover, tmp_path: Path) -> None:
    a, b = cluster.names
    bring_up(cluster, a)
    files = files_of(3)
    write_files(cluster.mnt(a), files)
    cluster.master(b)
    # b's notification comes first: b must not promote while a is primary and connected
    waiting = cluster.notify_async(b, "master", tmp_path / "b.log")
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert not cluster.acting_primary(b), "b promoted while a was primary"
        time.sleep(0.1)
    assert waiting.poll() is None
    assert "still primary and connected" in (tmp_path / "b.log").read_text()
    ok(cluster.notify(a, "backup"))
    assert waiting.wait(timeout=120) == 0, (tmp_path / "b.log").read_text()
    log = (tmp_path / "b.log").read_text()
    assert "the peer let go" in log
    assert cluster.role(b) == "primary" and cluster.mounted(b)
    check_files(cluster.mnt(b), files)


def test_master_gives_up_while_the_peer_stays_primary(cluster: Failover) -> None:
    a, b = cluster.names
    bring_up(cluster, a)
    # both nodes believe they are master (a partition of the VRRP link only)
    cluster.set_vip(b, True)
    res = cluster.notify(b, "master", HAST_SWITCH_SECONDARY_TIMEOUT="4")
    assert res.returncode == 1
    assert "did not let go within 4s" in res.stderr and "not promoting" in res.stderr
    assert cluster.role(b) == "secondary" and not cluster.mounted(b)
    assert cluster.role(a) == "primary" and cluster.mounted(a)


def test_a_node_in_init_becomes_secondary_first_and_sees_the_primary(
        cluster: Failover) -> None:
    a, b = cluster.names
    bring_up(cluster, a)
    ok(cluster.pair.ctl(b, "role", "init", cluster.pair.resource))
    # a boot-time MASTER flap on b: the primary peer reconnects within promote_hold
    cluster.set_vip(b, True)
    res = cluster.notify(b, "master", HAST_SWITCH_SECONDARY_TIMEOUT="25",
                         HAST_SWITCH_PROMOTE_HOLD="12")
    assert res.returncode == 1, res.stderr
    assert "role init: secondary first" in res.stderr
    assert "still primary and connected" in res.stderr
    assert cluster.role(b) == "secondary" and cluster.role(a) == "primary"


def test_a_stale_event_does_not_win(cluster: Failover) -> None:
    a, b = cluster.names
    bring_up(cluster, a)
    # a BACKUP delivered late, after the newer MASTER: the address says master
    log = ok(cluster.notify(a, "backup"))
    assert "event BACKUP is stale: the state is MASTER now" in log
    assert cluster.role(a) == "primary" and cluster.mounted(a)
    # and a stale MASTER on the node without the address promotes nothing
    log = ok(cluster.notify(b, "master"))
    assert "event MASTER is stale: the state is BACKUP now" in log
    assert cluster.role(b) == "secondary"


def test_the_state_changing_during_a_switch_is_followed(cluster: Failover,
                                                         tmp_path: Path) -> None:
    a, _ = cluster.names
    cluster.configure(a, promote_hold="5")
    cluster.master(a)
    proc = cluster.notify_async(a, "master", tmp_path / "a.log")
    time.sleep(1.5)  # inside the promote_hold of 5 s
    cluster.set_vip(a, False)
    assert proc.wait(timeout=60) == 0
    log = (tmp_path / "a.log").read_text()
    assert "state is BACKUP now: not promoting" in log
    assert cluster.role(a) == "secondary" and not cluster.mounted(a)


def test_busy_mount_is_reported_then_forced(cluster: Failover, tmp_path: Path) -> None:
    a, _ = cluster.names
    bring_up(cluster, a)
    holder = subprocess.Popen(["sleep", "600"], cwd=cluster.mnt(a))
    try:
        cluster.set_vip(a, False)
        # force_umount off: loud failure, the resource stays primary
        res = cluster.notify(a, "backup", HAST_SWITCH_UMOUNT_TIMEOUT="2",
                             HAST_SWITCH_FORCE_UMOUNT="NO")
        assert res.returncode == 1
        assert "is busy: " in res.stderr and "sleep" in res.stderr, res.stderr
        assert "force_umount is off: not demoting" in res.stderr
        assert cluster.role(a) == "primary" and cluster.mounted(a)
        assert holder.poll() is None
        # default: after umount_timeout the holders are ended and the demotion goes on
        res = cluster.notify(a, "backup", HAST_SWITCH_UMOUNT_TIMEOUT="2")
        assert res.returncode == 0, res.stderr
        assert "killing the processes using" in res.stderr
        assert holder.wait(timeout=10) == -signal.SIGKILL
        assert cluster.role(a) == "secondary" and not cluster.mounted(a)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_reconcile_and_lock(cluster: Failover) -> None:
    a, b = cluster.names
    cluster.master(b)
    ok(cluster.switch(b, "reconcile"))
    assert cluster.role(b) == "primary" and cluster.mounted(b)
    ok(cluster.switch(a, "reconcile"))
    assert cluster.role(a) == "secondary"
    # a switch that cannot get the lock gives up with EX_TEMPFAIL
    lock = cluster.pair.dir(b) / "switch" / "lock"
    holder = subprocess.Popen(["flock", str(lock), "sleep", "30"])
    try:
        time.sleep(0.5)
        res = cluster.switch(b, "master", HAST_SWITCH_LOCK_TIMEOUT="1")
        assert res.returncode == 75
        assert "held" in res.stderr and "lock" in res.stderr
    finally:
        holder.kill()
        holder.wait()


# -- flapping ---------------------------------------------------------------------------------

class Monitor(threading.Thread):
    """Reads both nodes over and over; records two primaries seen at one instant."""

    def __init__(self, c: Failover) -> None:
        super().__init__(daemon=True)
        self.c = c
        self.stop = threading.Event()
        self.violations: list[str] = []
        self.readings = 0
        self.primaries = {name: 0 for name in c.names}

    def run(self) -> None:
        first, second = self.c.names
        while not self.stop.is_set():
            r1 = self.c.acting_primary(first)
            r2 = self.c.acting_primary(second)
            r3 = self.c.acting_primary(first)
            self.readings += 1
            self.primaries[first] += r1
            self.primaries[second] += r2
            if r1 and r2 and r3:
                self.violations.append(f"{second} primary while {first} was, "
                                       f"at {time.monotonic():.3f}")
            first, second = second, first
            time.sleep(0.01)


@pytest.mark.parametrize("seed", [1, 2])
def test_flapping_never_makes_two_primaries(tmp_path: Path, script: Path, seed: int) -> None:
    rnd = random.Random(seed)
    c = Failover(tmp_path, script, promote_hold="3", lock_timeout="600")
    monitor = Monitor(c)
    try:
        a, b = c.names
        bring_up(c, a)
        files = files_of(4)
        write_files(c.mnt(a), files)
        monitor.start()
        # VRRP elections with dwell times below and above promote_hold, each followed by
        # the notifications keepalived sends, delivered late and out of order
        events: list[tuple[float, str, str]] = []
        t = 0.0
        master = a
        steps = [rnd.choice([0.2, 0.5, 1.0, 1.5, 5.0, 8.0]) for _ in range(10)] + [0.0]
        plan: list[tuple[float, str]] = []
        for dwell in steps:
            master = b if master == a else a
            if rnd.random() < 0.2:
                master = b if master == a else a   # a re-election of the same node
            other = b if master == a else a
            plan.append((t, master))
            events.append((t + rnd.uniform(0, 1.5), master, "master"))
            events.append((t + rnd.uniform(0, 1.5), other, rnd.choice(["backup", "fault"])))
            if rnd.random() < 0.3:  # a duplicate, late
                events.append((t + rnd.uniform(1, 4), master, "master"))
            t += dwell
        final = plan[-1][1]
        # one timeline: an election moves the address, then notifications follow
        timeline = sorted([(when, 0, node, "vip") for when, node in plan]
                          + [(when, 1, node, state) for when, node, state in events])
        start = time.monotonic()
        procs: list[tuple[str, str, subprocess.Popen]] = []
        for n, (when, _, node, state) in enumerate(timeline):
            delay = start + when - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if state == "vip":
                c.master(node)
                continue
            procs.append((node, state, c.notify_async(node, state,
                                                      tmp_path / f"ev{n:02}-{node}-{state}.log")))
        for node, state, proc in procs:
            rc = proc.wait(timeout=300)
            assert rc in (0, 1), f"{node} {state}: exit {rc}"
        monitor.stop.set()
        monitor.join()
        logs = "".join(f"\n--- {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("ev*")))
        assert not monitor.violations, f"{monitor.violations}{logs}"
        other = b if final == a else a
        assert c.role(final) == "primary" and c.mounted(final), logs
        assert c.role(other) == "secondary" and not c.mounted(other), logs
        check_files(c.mnt(final), files)
        assert monitor.readings > 100
        # the file system is intact: unmount it, check it read-only, mount it back
        subprocess.run(["umount", str(c.mnt(final))], check=True)
        fsck = subprocess.run([need("fsck.ext4"), "-n", "-f", str(c.dev(final))],
                              capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        monitor.stop.set()
        c.close()


# -- FreeBSD: CARP, ufs and zfs, with stand-ins for the tools -------------------------------

HASTCTL_STUB = r"""#!/bin/sh
# hastctl stand-in: roles in $STUB/role.<res>; primary creates $DEVDIR/<res>
sub=$1; shift
[ "$1" = -c ] && shift 2
echo "hastctl $sub $*" >> "$STUB/calls"
case $sub in
list)
	# $STUB/listfail: how many more lists fail as hastd's do while a worker exits
	n=$(cat "$STUB/listfail" 2>/dev/null || echo 0)
	if [ "$n" -gt 0 ]; then
		echo $((n - 1)) > "$STUB/listfail"
		echo "[ERROR] Error 104 received from hastd." >&2
		exit 70
	fi
	for r in ${*:-r0 r1}; do
		echo "$r:"
		echo "  role: $(cat "$STUB/role.$r" 2>/dev/null || echo init)"
	done ;;
role)
	role=$1; shift
	for r in "$@"; do
		echo "$role" > "$STUB/role.$r"
		if [ "$role" = primary ]; then : > "$DEVDIR/$r"; else rm -f "$DEVDIR/$r"; fi
	done ;;
esac
"""

TOOL_STUB = r"""#!/bin/sh
# stand-in for FreeBSD's @NAME@: records the call
echo "@NAME@ $*" >> "$STUB/calls"
case @NAME@ in
uname) echo FreeBSD ;;
ifconfig)
	printf 'em0: flags=8843<UP,BROADCAST,RUNNING,SIMPLEX,MULTICAST> mtu 1500\n'
	printf '\tinet 172.16.0.254 netmask 0xffffff00 broadcast 172.16.0.255 vhid 1\n'
	printf '\tcarp: %s vhid 1 advbase 1 advskew 0\n' "$(cat "$STUB/carp")" ;;
mount)
	if [ "$1" = -p ]; then cat "$STUB/mounts" 2>/dev/null; exit 0; fi
	eval "dev=\${$(($# - 1))} mnt=\${$#}"
	printf '%s\t%s\tufs\trw\t0 0\n' "$dev" "$mnt" >> "$STUB/mounts" ;;
umount)
	mnt=$1; [ "$1" = -f ] && mnt=$2
	if [ "$1" != -f ] && [ -e "$STUB/busy" ]; then
		echo "umount: unmount of $mnt failed: Device busy" >&2; exit 1
	fi
	grep -v "	$mnt	" "$STUB/mounts" > "$STUB/mounts.new"
	mv "$STUB/mounts.new" "$STUB/mounts" ;;
fstat) echo "USER CMD PID FD MOUNT INUM MODE SZ|DV R/W"
	echo "root nfsd 812 wd $2 2 drwxr-xr-x 512 r" ;;
zpool)
	case $1 in
	list) [ -e "$STUB/pool.$5" ]; exit $? ;;
	import) : > "$STUB/pool.$5" ;;
	export) [ "$2" = -f ] && p=$3 || p=$2
		if [ "$2" != -f ] && [ -e "$STUB/busy" ]; then exit 1; fi
		rm -f "$STUB/pool.$p" ;;
	esac ;;
esac
exit 0
"""


@pytest.fixture
def freebsd(tmp_path: Path, script: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    stub = tmp_path / "stub"
    bindir = stub / "bin"
    bindir.mkdir(parents=True)
    devdir = tmp_path / "dev"
    devdir.mkdir()
    (bindir / "hastctl").write_text(HASTCTL_STUB)
    for name in ("uname", "ifconfig", "mount", "umount", "fsck", "fstat", "zpool"):
        (bindir / name).write_text(TOOL_STUB.replace("@NAME@", name))
    for path in bindir.iterdir():
        path.chmod(0o755)
    (stub / "carp").write_text("BACKUP\n")
    conf = tmp_path / "hast-switch.conf"
    conf.write_text(f"hastctl={bindir}/hastctl\nhast_conf=/usr/local/etc/hast.conf\n"
                    f"devdir={devdir}\nmountdir={tmp_path}/hast\nfstype_r1=zfs\npool_r1=tank\n"
                    f"statedir={tmp_path}/state\npromote_hold=0\npoll=0.1\n"
                    f"hastd_pidfile={tmp_path}/none.pid\numount_timeout=1\n"
                    "carp=1@em0\n")
    env = {"PATH": f"{bindir}:{SBIN_PATH}", "STUB": str(stub), "DEVDIR": str(devdir),
           "HAST_SWITCH_CONF": str(conf)}
    yield stub, env


def devd_action() -> list[str]:
    text = DEVD.read_text(encoding="ascii")
    rules = re.findall(r"^notify \d+ \{\n(.*?)^\};", text, re.M | re.S)
    assert len(rules) == 1, "one uncommented rule"
    matches = dict(re.findall(r'^\s*match\s+"(\w+)"\s+"([^"]+)";', rules[0], re.M))
    assert matches["system"] == "CARP"
    assert re.fullmatch(matches["type"], "MASTER") and re.fullmatch(matches["type"], "BACKUP")
    assert re.fullmatch(matches["type"], "INIT")
    assert re.search(matches["subsystem"], "1@em0") and not re.search(matches["subsystem"],
                                                                      "11@em0")
    action = re.search(r'^\s*action\s+"([^"]+)";', rules[0], re.M)
    assert action
    return action.group(1).replace("$subsystem", "1@em0").split()


def run_devd(script: Path, env: dict[str, str], carp_type: str) -> subprocess.CompletedProcess:
    argv = [a.replace("$type", carp_type) for a in devd_action()]
    assert argv[0] == INSTALLED and argv[-1] == "&", argv
    return subprocess.run([str(script), *argv[1:-1]], env=env, capture_output=True, text=True,
                          timeout=60)


def calls(stub: Path) -> list[str]:
    text = (stub / "calls").read_text() if (stub / "calls").exists() else ""
    (stub / "calls").write_text("")
    # the actions, not the queries
    return [ln for ln in text.splitlines()
            if not ln.startswith(("uname", "hastctl list", "mount -p", "zpool list"))]


def test_freebsd_carp_ufs_and_zfs(freebsd: tuple[Path, dict[str, str]], script: Path,
                                  tmp_path: Path) -> None:
    stub, env = freebsd
    dev = tmp_path / "dev"
    mnt = tmp_path / "hast" / "r0"
    # MASTER from devd while ifconfig says so: ufs checked and mounted, zfs imported
    (stub / "carp").write_text("MASTER\n")
    res = run_devd(script, env, "MASTER")
    assert res.returncode == 0, res.stderr
    assert calls(stub) == [
        "ifconfig em0",
        "hastctl role secondary r0", "hastctl role secondary r1", "ifconfig em0",
        "hastctl role primary r0", "hastctl role primary r1",
        f"fsck -p -y -t ufs {dev}/r0", f"mount -t ufs {dev}/r0 {mnt}",
        f"zpool import -f -d {dev} tank",
        "ifconfig em0"]
    # an event of another vhid is not ours
    other = subprocess.run([str(script), "carp", "2@em1", "BACKUP"], env=env,
                           capture_output=True, text=True)
    assert other.returncode == 0 and "ignoring CARP event for 2@em1" in other.stderr
    # BACKUP, with a busy file system: fstat tells who, then umount -f; the pool exported
    (stub / "carp").write_text("BACKUP\n")
    (stub / "busy").touch()
    res = run_devd(script, env, "BACKUP")
    assert res.returncode == 0, res.stderr
    assert "nfsd 812" in res.stderr
    got = calls(stub)
    assert got.index(f"umount {mnt}") < got.index(f"fstat -f {mnt}") \
        < got.index(f"umount -f {mnt}") < got.index("hastctl role secondary r0")
    assert got.index("zpool export tank") < got.index("zpool export -f tank") \
        < got.index("hastctl role secondary r1")
    assert not (dev / "r0").exists() and not (stub / "pool.tank").exists()
    # INIT (the CARP interface went down) is a BACKUP: nothing left to do
    (stub / "busy").unlink()
    res = run_devd(script, env, "INIT")
    assert res.returncode == 0, res.stderr
    assert not [c for c in calls(stub) if not c.startswith("ifconfig")]
    # a stale MASTER while ifconfig says BACKUP promotes nothing
    res = run_devd(script, env, "MASTER")
    assert res.returncode == 0
    assert "event MASTER is stale: the state is BACKUP now" in res.stderr
    assert not any("role primary" in c for c in calls(stub))


def test_a_worker_restarting_does_not_stop_a_switch(freebsd: tuple[Path, dict[str, str]],
                                                    script: Path) -> None:
    # hastd answers hastctl list with an error (exit 70) while the resource's worker exits,
    # e.g. a secondary whose primary just went away: the switch asks again.
    stub, env = freebsd
    (stub / "carp").write_text("MASTER\n")
    (stub / "listfail").write_text("2\n")
    res = run_devd(script, env, "MASTER")
    assert res.returncode == 0, res.stderr
    assert "hastctl role primary r0" in calls(stub)
    assert (stub / "listfail").read_text().strip() == "0"
    # a hastd that keeps failing is reported, not retried forever
    (stub / "carp").write_text("BACKUP\n")
    run_devd(script, env, "BACKUP")
    (stub / "carp").write_text("MASTER\n")
    (stub / "listfail").write_text("100\n")
    res = run_devd(script, env, "MASTER")
    assert res.returncode != 0
    assert "hastctl list failed: [ERROR] Error 104 received from hastd." in res.stderr
    assert int((stub / "listfail").read_text()) == 95   # asked 5 times, then reported


def test_usage_and_configuration_errors(freebsd: tuple[Path, dict[str, str]],
                                        script: Path, tmp_path: Path) -> None:
    _, env = freebsd

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(script), *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=60)

    for args in ((), ("promote",), ("carp", "em0", "MASTER"), ("carp", "1@em0", "UP"),
                 ("-f", "reconcile"), ("-x", "master")):
        res = run(*args)
        assert res.returncode == 64, args
        assert "usage: hast-switch" in res.stderr
    res = run("-c", str(tmp_path / "missing.conf"), "master")
    assert res.returncode == 78 and "cannot read" in res.stderr
    res = run("master", HAST_SWITCH_PROMOTE_HOLD="soon")
    assert res.returncode == 78 and "promote_hold must be a number" in res.stderr
    res = run("master", HAST_SWITCH_PROMOTE_HOLD="30", HAST_SWITCH_SECONDARY_TIMEOUT="20")
    assert res.returncode == 78 and "shorter than promote_hold" in res.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text("resources=\"r0\nif then\n")
    res = run("-c", str(bad), "master")
    assert res.returncode == 78
    # the CARP state is known: reconcile follows it
    res = run("reconcile")
    assert res.returncode == 0 and "secondary: r0 r1" in res.stderr
    res = run("reconcile", HAST_SWITCH_STATEDIR=str(tmp_path / "empty"), HAST_SWITCH_CARP="")
    assert res.returncode == 64 and "no CARP/VRRP state" in res.stderr


# -- the scripts themselves -------------------------------------------------------------------

@pytest.mark.parametrize("shell", ["dash", "posh", "bash"])
def test_script_parses(shell: str, script: Path) -> None:
    res = subprocess.run([need(shell), "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_script_is_shellcheck_clean(script: Path) -> None:
    res = subprocess.run([need("shellcheck"), "-s", "sh", str(script)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_samples_call_the_installed_script() -> None:
    assert devd_action()[:2] == [INSTALLED, "carp"]
    devd = DEVD.read_text(encoding="ascii")
    # the Handbook's rules are explained, never active
    assert "IFNET" in devd and "LINK_UP" in devd
    assert not re.search(r'^\s*match "system"\s+"IFNET"', devd, re.M)
    notify = keepalived_notify()
    assert {k: v[1:] for k, v in notify.items()} == {
        "master": ["master"], "backup": ["backup"], "fault": ["fault"], "stop": ["stop"]}
    assert all(v[0] == INSTALLED for v in notify.values())
    text = KEEPALIVED.read_text(encoding="ascii")
    assert re.search(r"^vrrp_instance \w+ \{$", text, re.M)
    assert text.count("{") == text.count("}")
    for sample in (DEVD, KEEPALIVED):
        assert "%%" not in sample.read_text(encoding="ascii")
