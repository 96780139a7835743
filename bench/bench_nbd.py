"""The data-path benchmark: py-hast's NBD export against nbdkit, qemu-nbd and a Python server.

Everything runs in one invocation on this machine, so every ratio compares figures measured
minutes apart under the same conditions:

* references, each serving its own 2 GiB file on the same filesystem as py-hast's providers:
  ``nbdkit file`` (C, buffered), ``qemu-nbd --cache=none --aio=native`` (C, O_DIRECT),
  nbdkit's python plugin running bench/nbdkit_pyfile.py (what plain Python costs), and
  ``fio-direct``: fio's libaio engine with O_DIRECT on its file, no server at all -- the
  disk's own ceiling for one copy (py-hast writes two, to the same disk);
* py-hast: two nodes in network namespaces (tests.hastpair), each provider a file on the same
  filesystem, the primary's NBD UNIX socket driven by the same clients, in ``fullsync``,
  ``memsync``, ``async`` and ``degraded`` (the secondary stopped: local overhead only).

Clients: fio's nbd engine (libnbd, no kernel block layer) for the matrix -- seq write 1 MiB
QD1/QD8, rand write 4 KiB QD1/QD32, rand write 4 KiB QD1 with a FLUSH after each, seq read
1 MiB QD8, rand read 4 KiB QD32 -- and nbdcopy for the copy reference.  py-hast's own copies:
the initial synchronization of the whole resource and the resync after 1% of the extents
became dirty, timed between the primary's "Synchronization started" and "Synchronization
complete" log lines.  Each figure is the median of ``--runs`` runs with min..max; the fio jobs
of the references and of py-hast fullsync are interleaved run by run.

CPU placement is pinned and reported: clients (fio, nbdcopy) on ``--client-cpus``, every
server process (nbdkit, qemu-nbd, both hastd nodes and their workers) on ``--server-cpus``
(default: client CPU 0, servers CPU 1 on a machine with two or more CPUs);
``--secondary-cpus`` moves py-hast's secondary elsewhere, as it would be on its own host.  A
wake-up across CPUs costs ~30 us on this VM, so QD1 figures depend on the placement more than
on anything else (linux-frontends.md §3.2).

Output: a table (absolute figures, then ratios against the references, then the targets),
``nbd.json`` and ``nbd.png`` (throughput and latency against queue depth) in ``--out``
(default bench/results).  ``--quick`` is a smoke run (small files, 1 s jobs, one run, fullsync
and degraded only).  run() is what bench/run.py calls: the full suite, rows for its table.
Timing decides nothing here: targets are reported as met or missed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from tests.hastpair import HastPair  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
RESOURCE = "bench"
PRIMARY, SECONDARY = "hasta", "hastb"
REFS = ("nbdkit-file", "qemu-nbd", "nbdkit-python", "fio-direct")
MODES = ("fullsync", "memsync", "async", "degraded")


@dataclass(frozen=True)
class Job:
    key: str
    label: str
    rw: str
    bs: int
    qd: int
    flush: bool = False

    @property
    def writes(self) -> bool:
        return "write" in self.rw

    @property
    def unit(self) -> str:
        return "MiB/s" if self.bs >= MiB else "IOPS"


JOBS = (
    Job("seqwrite-1m-qd1", "seq write 1 MiB QD1", "write", MiB, 1),
    Job("seqwrite-1m-qd8", "seq write 1 MiB QD8", "write", MiB, 8),
    Job("randwrite-4k-qd1", "rand write 4 KiB QD1", "randwrite", 4 * KiB, 1),
    Job("randwrite-4k-qd32", "rand write 4 KiB QD32", "randwrite", 4 * KiB, 32),
    Job("randwrite-4k-qd1-flush", "rand write 4 KiB QD1 +flush", "randwrite", 4 * KiB, 1,
        flush=True),
    Job("seqread-1m-qd8", "seq read 1 MiB QD8", "read", MiB, 8),
    Job("randread-4k-qd32", "rand read 4 KiB QD32", "randread", 4 * KiB, 32),
)
JOB_BY_KEY = {j.key: j for j in JOBS}


@dataclass
class Options:
    size: int = 2 * GiB
    runs: int = 3
    runtime: float = 5.0
    ramp: float = 1.0
    modes: tuple[str, ...] = MODES
    jobs: tuple[str, ...] = tuple(j.key for j in JOBS)
    refs: tuple[str, ...] = REFS
    client_cpus: str = "0"
    server_cpus: str = "1"
    secondary_cpus: str = ""    # empty: the secondary runs on server_cpus with the rest
    out: Path = HERE / "results"
    workdir: Path | None = None
    sync_runs: int = 3
    resync_fraction: float = 0.01
    direct: bool = True
    keepdirty: int = 0          # hastctl create -k (0: its default, FreeBSD's 64)
    quick: bool = False
    keep: bool = False


def log(msg: str) -> None:
    print(f"[bench_nbd {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_cpus() -> tuple[str, str]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        return str(cpus[0]), ",".join(str(c) for c in cpus[1:])
    return str(cpus[0]), str(cpus[0])


def parse_cpus(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


# -- files ---------------------------------------------------------------------------------

_RANDOM_BLOCK = 64 * MiB


def fill_random(path: Path, size: int, offset: int = 0) -> None:
    """Random (incompressible, never zero) data over [offset, size), on the disk and out of
    the page cache: every file starts the measurements in the same (cold) state."""
    block = memoryview(os.urandom(_RANDOM_BLOCK))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        pos = offset
        while pos < size:
            n = min(len(block), size - pos)
            os.pwrite(fd, block[:n], pos)
            pos += n
        os.fsync(fd)  # nothing of the set-up left for writeback during the measurements
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- servers -------------------------------------------------------------------------------

def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class RefServer:
    """One reference NBD server on a UNIX socket, serving its own file."""

    def __init__(self, name: str, workdir: Path, image: Path) -> None:
        self.name = name
        self.sock = workdir / f"{name}.sock"
        self.image = image
        self.logpath = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        if name == "nbdkit-file":
            self.argv = ["nbdkit", "-f", "--unix", str(self.sock), "file", str(image)]
        elif name == "qemu-nbd":
            self.argv = ["qemu-nbd", "-f", "raw", "--cache=none", "--aio=native", "-t",
                         "--shared=16", "-k", str(self.sock), str(image)]
        elif name == "nbdkit-python":
            self.argv = ["nbdkit", "-f", "--unix", str(self.sock), "python",
                         str(HERE / "nbdkit_pyfile.py"), f"file={image}"]
        elif name == "fio-direct":
            self.argv = []      # no server: fio's libaio engine on the file itself
        else:
            raise ValueError(name)

    @property
    def uri(self) -> str:
        if not self.argv:
            return f"file:{self.image}"
        return f"nbd+unix:///?socket={self.sock}"

    def start(self) -> None:
        if not self.argv:
            return
        with open(self.logpath, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while not _connectable(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: {self.logpath.read_text()}")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


class Hast:
    """The py-hast pair: providers, daemons, roles, modes, and the sync measurements."""

    def __init__(self, workdir: Path, size: int, direct: bool, keepdirty: int = 0,
                 secondary_cpus: str = "") -> None:
        # provider = metadata + activemap + data: 1 MiB more leaves at least `size` of data
        self.size = size
        self.secondary_cpus = parse_cpus(secondary_cpus) if secondary_cpus else None
        self.create_opts = ("-k", str(keepdirty)) if keepdirty else ()
        self.mode = "fullsync"
        self.degraded = False
        self.pair = HastPair(workdir, size=size + MiB, resource=RESOURCE,
                             resource_extra="\treplication fullsync\n",
                             settings_extra=f"direct {'on' if direct else 'off'}\n")
        self.extentsize = 0

    @property
    def uri(self) -> str:
        return self.pair.uri(PRIMARY)

    def _set_mode(self, mode: str) -> None:
        for node in (PRIMARY, SECONDARY):
            conf = self.pair.conf(node)
            text = re.sub(r"\treplication \w+\n", f"\treplication {mode}\n", conf.read_text())
            conf.write_text(text)
        self.mode = mode

    def ctl(self, node: str, *args: str) -> None:
        self.pair.ctl(node, *args, check=True)

    def create_and_start(self) -> None:
        p = self.pair
        fill_random(p.disk(PRIMARY), self.size + MiB)
        for node in (PRIMARY, SECONDARY):
            p.create(node, *self.create_opts)
            self._start(node)
        # First pairing: the primary is virgin, nothing is synchronized.
        p.role(SECONDARY, "secondary")
        p.role(PRIMARY, "primary")
        p.wait_complete(PRIMARY)
        self.extentsize = int(p.list_fields(PRIMARY)["extentsize"].split()[0])

    def restart(self, mode: str) -> None:
        """Both daemons restarted with ``replication mode``; connected and complete."""
        p = self.pair
        if mode != self.mode:
            self._set_mode(mode)
        for node in (PRIMARY, SECONDARY):
            p.stop(node)
        for node in (PRIMARY, SECONDARY):
            self._start(node)
        p.role(SECONDARY, "secondary")
        p.role(PRIMARY, "primary")
        p.wait_complete(PRIMARY, timeout=600)
        self.degraded = False

    def _start(self, node: str) -> None:
        """Start a daemon; the secondary's goes to its own CPUs if asked (as on its own host):
        the worker it forks for the role inherits the placement."""
        self.pair.start(node)
        if node == SECONDARY and self.secondary_cpus is not None:
            pid = self.pair.daemons[node].pid
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), self.secondary_cpus)

    def degrade(self) -> None:
        """The secondary goes away: the primary serves alone (local overhead only)."""
        self.pair.stop(SECONDARY)
        self.degraded = True
        self.pair.wait("the primary degraded",
                       lambda: self.pair.list_fields(PRIMARY).get("status") == "degraded")

    def daemon_pids(self) -> list[int]:
        return [proc.pid for proc in self.pair.daemons.values()]

    def worker_pids(self) -> dict[str, int]:
        """role -> pid of each hastd worker (children of our two daemons)."""
        parents = set(self.daemon_pids())
        out: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid in parents:
                for role in ("primary", "secondary"):
                    if f"({role})".encode() in cmd:
                        out[role] = int(entry.name)
        return out

    def _promote_timed(self, client_cpus: str, timeout: float = 900.0) -> tuple[float, int]:
        """``role primary`` on the primary; seconds between its "Synchronization started"
        and "Synchronization complete" lines, and the bytes it announced.

        A watcher thread on the client CPUs polls the log every 0.5 ms from before the role
        change, so a resync of a few MiB is timed to about a millisecond.
        """
        path = self.pair.dir(PRIMARY) / "hastd.log"
        mark = path.stat().st_size if path.exists() else 0
        result: list = []
        stop = threading.Event()

        def watch() -> None:
            os.sched_setaffinity(0, parse_cpus(client_cpus))   # this thread only
            try:
                result.append(self._poll_sync(path, mark, stop, timeout))
            except Exception as exc:  # reported by the caller
                result.append(exc)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            self.pair.role(PRIMARY, "primary")
            watcher.join(timeout)
        finally:
            stop.set()
            watcher.join(10)
        if not result or isinstance(result[0], Exception):
            raise RuntimeError(f"synchronization not timed: {result[0] if result else '?'}")
        self.pair.wait_complete(PRIMARY, timeout=600)
        return result[0]

    @staticmethod
    def _poll_sync(path: Path, mark: int, stop: threading.Event,
                   timeout: float) -> tuple[float, int]:
        started: float | None = None
        todo = 0
        deadline = time.monotonic() + timeout
        pos = mark
        pending = b""
        while time.monotonic() < deadline and not stop.is_set():
            with open(path, "rb") as fh:
                fh.seek(pos)
                chunk = fh.read()
            now = time.perf_counter()
            pos += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                if "Synchronization started." in text and started is None:
                    started = now
                    m = re.search(r"started\. (\S+)B to go", text)
                    todo = _unhumanize(m.group(1)) if m else 0
                elif "Synchronization complete." in text and started is not None:
                    return now - started, todo
                elif "Nothing to synchronize." in text:
                    return 0.0, 0
            time.sleep(0.0005)
        raise RuntimeError(f"no synchronization completed within {timeout:g} s")

    def initial_sync(self, client_cpus: str) -> tuple[float, int]:
        """A fresh secondary (hastctl create): the whole resource is copied to it."""
        p = self.pair
        self.ctl(PRIMARY, "role", "init", RESOURCE)
        self.ctl(SECONDARY, "role", "init", RESOURCE)
        p.create(SECONDARY, *self.create_opts)
        p.role(SECONDARY, "secondary")
        return self._promote_timed(client_cpus)

    def resync(self, fraction: float, salt: int, client_cpus: str) -> tuple[float, int]:
        """Write into ``fraction`` of the extents while the secondary is away, then resync."""
        p = self.pair
        nextents = self.size // self.extentsize
        count = max(1, round(nextents * fraction))
        step = nextents // count
        self.ctl(SECONDARY, "role", "init", RESOURCE)
        p.wait("the primary degraded",
               lambda: p.list_fields(PRIMARY).get("status") == "degraded")
        cmds: list[str] = []
        for i in range(count):
            ext = (i * step + salt) % nextents
            cmds += ["-c", f"write -P {0x41 + salt % 64} {ext * self.extentsize} 4k"]
        res = subprocess.run(["taskset", "-c", client_cpus, "qemu-io", "-f", "raw", *cmds,
                              p.uri(PRIMARY)], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"qemu-io failed: {res.stdout}{res.stderr}")
        # A new primary worker connects at once (a running one retries every 10 s).
        self.ctl(PRIMARY, "role", "init", RESOURCE)
        p.role(SECONDARY, "secondary")
        return self._promote_timed(client_cpus)

    def close(self) -> None:
        self.pair.close()


_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}


def _unhumanize(text: str) -> int:
    m = re.fullmatch(r"([\d.]+)([KMGT]?)", text)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0


# -- clients -------------------------------------------------------------------------------

def run_fio(uri: str, job: Job, opts: Options, tmp: Path) -> dict:
    out = tmp / "fio.json"
    if uri.startswith("file:"):
        # The disk's own figure (one copy, no server): fio submits O_DIRECT through native
        # AIO from the server CPUs, as the servers' disk I/O would be.
        where = ["taskset", "-c", opts.server_cpus, "fio", "--name=bench", "--ioengine=libaio",
                 "--direct=1", f"--filename={uri[5:]}"]
    else:
        where = ["taskset", "-c", opts.client_cpus, "fio", "--name=bench", "--ioengine=nbd",
                 f"--uri={uri}"]
    argv = [*where, f"--size={opts.size}", f"--rw={job.rw}", f"--bs={job.bs}",
            f"--iodepth={job.qd}", f"--runtime={opts.runtime:g}", "--time_based",
            f"--ramp_time={opts.ramp:g}", "--output-format=json", f"--output={out}"]
    if job.flush:
        argv.append("--fsync=1")
    res = subprocess.run(argv, capture_output=True, text=True,
                         timeout=opts.runtime + opts.ramp + 120)
    if res.returncode != 0:
        raise RuntimeError(f"fio {job.key} on {uri}: {res.stdout}{res.stderr}")
    data = json.loads(out.read_text())["jobs"][0]
    io = data["write" if job.writes else "read"]
    row = {"iops": io["iops"], "mibs": io["bw_bytes"] / MiB,
           "lat_us": io["lat_ns"]["mean"] / 1000,
           "p99_us": io["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000}
    if job.flush:
        row["flush_lat_us"] = data["sync"]["lat_ns"]["mean"] / 1000
    if data.get("error"):
        raise RuntimeError(f"fio {job.key} on {uri}: error {data['error']}")
    return row


def run_nbdcopy(src: Path, uri: str, opts: Options) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(["taskset", "-c", opts.client_cpus, "nbdcopy", "--flush", str(src),
                          uri], capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"nbdcopy: {res.stdout}{res.stderr}")
    return took


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the largest resident set the process ever had."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# -- statistics and output -----------------------------------------------------------------

def summarize(runs: list[dict]) -> dict:
    out: dict = {"runs": runs}
    for key in runs[0]:
        values = [r[key] for r in runs]
        out[key] = {"median": statistics.median(values), "min": min(values),
                    "max": max(values)}
    return out


def figure(job: Job) -> str:
    """The throughput figure of a job: MiB/s for 1 MiB requests, IOPS for 4 KiB."""
    return "mibs" if job.unit == "MiB/s" else "iops"


@dataclass
class Results:
    opts: Options
    meta: dict = field(default_factory=dict)
    fio: dict[str, dict[str, dict]] = field(default_factory=dict)     # system -> job -> summary
    copies: dict[str, dict] = field(default_factory=dict)
    rss: dict[str, dict[str, int]] = field(default_factory=dict)      # system -> role -> KiB
    activemap: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)

    def median(self, system: str, job: str, key: str) -> float | None:
        s = self.fio.get(system, {}).get(job)
        return s[key]["median"] if s and key in s else None

    def systems(self) -> list[str]:
        return [s for s in (*REFS, *(f"hast-{m}" for m in MODES)) if s in self.fio]


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _cell(summary: dict | None, key: str) -> str:
    if not summary or key not in summary:
        return "-"
    s = summary[key]
    if len(summary["runs"]) == 1:
        return _fmt(s["median"])
    return f"{_fmt(s['median'])} ({_fmt(s['min'])}..{_fmt(s['max'])})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)


def compute_targets(res: Results) -> None:
    t: list[dict] = []

    def ratio_target(name: str, system: str, job: str, key: str, ref: str, goal: float,
                     higher: bool = True) -> None:
        v, b = res.median(system, job, key), res.median(ref, job, key)
        if v is None or b is None or b == 0:
            return
        ratio = v / b
        t.append({"name": name, "value": v, "reference": b, "ref": ref, "ratio": ratio,
                  "goal": goal, "higher_is_better": higher,
                  "met": ratio >= goal if higher else ratio <= goal})

    fs = "hast-fullsync"
    ratio_target("seq write 1 MiB QD8 fullsync (MiB/s) vs nbdkit file", fs,
                 "seqwrite-1m-qd8", "mibs", "nbdkit-file", 0.5)
    ratio_target("rand write 4 KiB QD32 fullsync (IOPS) vs nbdkit file", fs,
                 "randwrite-4k-qd32", "iops", "nbdkit-file", 0.6)
    ratio_target("rand write 4 KiB QD32 fullsync (IOPS) vs nbdkit python", fs,
                 "randwrite-4k-qd32", "iops", "nbdkit-python", 1.0)
    ratio_target("rand write 4 KiB QD1 fullsync mean latency (us) vs nbdkit file", fs,
                 "randwrite-4k-qd1", "lat_us", "nbdkit-file", 2.0, higher=False)
    ratio_target("seq read 1 MiB QD8 (MiB/s) vs nbdkit file", fs, "seqread-1m-qd8", "mibs",
                 "nbdkit-file", 0.8)
    ratio_target("rand read 4 KiB QD32 (IOPS) vs nbdkit file", fs, "randread-4k-qd32", "iops",
                 "nbdkit-file", 0.5)
    sync, copy = res.copies.get("hast-initial-sync"), res.copies.get("nbdcopy-nbdkit-file")
    if sync and copy:
        v, b = sync["mibs"]["median"], copy["mibs"]["median"]
        t.append({"name": "initial sync (MiB/s) vs nbdcopy file -> nbdkit file", "value": v,
                  "reference": b, "ref": "nbdcopy", "ratio": v / b, "goal": 0.8,
                  "higher_is_better": True, "met": v / b >= 0.8})
    resync = res.copies.get("hast-resync")
    if sync and resync:
        v, b = resync["seconds"]["median"], sync["seconds"]["median"]
        t.append({"name": f"resync after {res.opts.resync_fraction:.0%} dirty (s) vs initial "
                          "sync (s)", "value": v, "reference": b, "ref": "initial sync",
                  "ratio": v / b, "goal": 0.03, "higher_is_better": False,
                  "met": v / b <= 0.03})
    for row in res.activemap:
        if row["unit"] == "GB/s":
            t.append({"name": "activemap next-dirty scan (GB/s of bitmap)",
                      "value": row["value"], "reference": 5.0, "ref": "goal 5 GB/s",
                      "ratio": row["value"] / 5.0, "goal": 1.0, "higher_is_better": True,
                      "met": row["value"] >= 5.0})
        else:
            t.append({"name": "activemap write_start+write_complete (us/call pair)",
                      "value": row["value"], "reference": 1.0, "ref": "goal 1 us",
                      "ratio": row["value"] / 1.0, "goal": 1.0, "higher_is_better": False,
                      "met": row["value"] <= 1.0})
    if res.rss:
        worst = max(kib for roles in res.rss.values() for kib in roles.values())
        t.append({"name": "largest worker peak RSS at QD32 (MiB)", "value": worst / 1024,
                  "reference": 100.0, "ref": "goal 100 MiB", "ratio": worst / 1024 / 100,
                  "goal": 1.0, "higher_is_better": False, "met": worst / 1024 <= 100})
    res.targets = t


def render(res: Results) -> str:
    systems = res.systems()
    out: list[str] = []
    m = res.meta
    out.append(f"py-hast NBD benchmark, {m.get('date')}: {m.get('cpu')} x{m.get('ncpu')}, "
               f"kernel {m.get('kernel')}")
    secondary = (f" (py-hast's secondary on CPU {res.opts.secondary_cpus})"
                 if res.opts.secondary_cpus else "")
    out.append(f"placement: clients on CPU {res.opts.client_cpus}, servers on CPU "
               f"{res.opts.server_cpus}{secondary}; {res.opts.runs} runs x {res.opts.runtime:g} s "
               f"(+{res.opts.ramp:g} s ramp), {res.opts.size // MiB} MiB files on "
               f"{m.get('filesystem')}; py-hast direct={'on' if res.opts.direct else 'off'}, "
               f"keepdirty {res.opts.keepdirty or 'default'}; "
               f"load average {m.get('loadavg_start')} -> {m.get('loadavg_end')}")
    out.append("median (min..max); MiB/s for 1 MiB jobs, IOPS for 4 KiB jobs")
    rows = []
    for job in JOBS:
        if not any(job.key in res.fio[s] for s in systems):
            continue
        rows.append([job.label, *(_cell(res.fio[s].get(job.key), figure(job))
                                  for s in systems)])
    out.append(_table(["throughput", *systems], rows))
    out.append("")
    rows = []
    for job in JOBS:
        if not any(job.key in res.fio[s] for s in systems):
            continue
        rows.append([job.label, *(_cell(res.fio[s].get(job.key), "lat_us") for s in systems)])
        if job.flush:
            rows.append(["  of which FLUSH", *(_cell(res.fio[s].get(job.key), "flush_lat_us")
                                               for s in systems)])
    out.append(_table(["mean latency (us)", *systems], rows))
    out.append("")
    hast = [s for s in systems if s.startswith("hast-")]
    refs = [s for s in systems if s in REFS]
    header = ["ratio (latency: lower is better)"]
    for h in hast:
        header += [f"{h[5:]}/{r.split('-')[-1]}" for r in refs]
    rows = []
    for job in JOBS:
        for key, what in ((figure(job), job.label), ("lat_us", "  mean latency")):
            row = [what]
            for h in hast:
                for r in refs:
                    v, b = res.median(h, job.key, key), res.median(r, job.key, key)
                    row.append(f"{v / b:.2f}" if v and b else "-")
            if any(c != "-" for c in row[1:]):
                rows.append(row)
    out.append(_table(header, rows))
    out.append("")
    if res.copies:
        rows = []
        for name, c in res.copies.items():
            rows.append([name, _cell(c, "seconds"), _cell(c, "mibs"),
                         f"{c['bytes'] / MiB:,.0f}"])
        out.append(_table(["copy", "seconds", "MiB/s", "MiB"], rows))
        out.append("")
    if res.rss:
        rows = [[s, *(f"{res.rss[s].get(r, 0) / 1024:.1f}" for r in ("primary", "secondary"))]
                for s in res.rss]
        out.append(_table(["peak RSS at QD32 (MiB)", "primary", "secondary"], rows))
        out.append("")
    if res.targets:
        rows = []
        for t in res.targets:
            cmp = ">=" if t["higher_is_better"] else "<="
            rows.append([t["name"], _fmt(t["value"]), _fmt(t["reference"]),
                         f"{t['ratio']:.3g}", f"{cmp} {t['goal']:g}",
                         "met" if t["met"] else "MISSED"])
        out.append(_table(["target", "py-hast", "reference", "ratio", "goal", ""], rows))
    return "\n".join(out)


def plot(res: Results, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return False
    systems = res.systems()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = (("1 MiB", ("seqwrite-1m-qd1", "seqwrite-1m-qd8"), ("seqread-1m-qd8",), "mibs",
               "MiB/s"),
              ("4 KiB", ("randwrite-4k-qd1", "randwrite-4k-qd32"), ("randread-4k-qd32",),
               "iops", "IOPS"))
    cmap = plt.get_cmap("tab10")
    for col, (size, writes, reads, key, unit) in enumerate(panels):
        for row, (k, ylabel) in enumerate(((key, unit), ("lat_us", "mean latency (us)"))):
            ax = axes[row][col]
            for i, s in enumerate(systems):
                for jobs, style, kind in ((writes, "-o", "write"), (reads, "--s", "read")):
                    pts = [(JOB_BY_KEY[j].qd, res.median(s, j, k)) for j in jobs]
                    pts = [(q, v) for q, v in pts if v is not None]
                    if pts:
                        ax.plot([q for q, _ in pts], [v for _, v in pts], style,
                                color=cmap(i % 10), label=f"{s} {kind}")
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 8, 32])
            ax.set_xticklabels(["1", "8", "32"])
            ax.set_xlabel("queue depth")
            ax.set_ylabel(ylabel)
            ax.set_yscale("log")
            ax.set_title(f"{size} requests: {ylabel}")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"py-hast vs references (clients CPU {res.opts.client_cpus}, servers CPU "
                 f"{res.opts.server_cpus}; median of {res.opts.runs})")
    fig.tight_layout(rect=(0, 0.1, 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# -- the suite -----------------------------------------------------------------------------

def _meta(opts: Options, workdir: Path) -> dict:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = subprocess.run(["df", "--output=source,fstype", str(workdir)], capture_output=True,
                        text=True).stdout.split("\n")[1].split()

    def version(*argv: str) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu, "ncpu": os.cpu_count(),
            "kernel": platform.release(), "filesystem": " ".join(fs), "workdir": str(workdir),
            "client_cpus": opts.client_cpus, "server_cpus": opts.server_cpus,
            "secondary_cpus": opts.secondary_cpus or opts.server_cpus,
            "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "versions": {"fio": version("fio", "--version"),
                         "nbdkit": version("nbdkit", "--version"),
                         "qemu-nbd": version("qemu-nbd", "--version"),
                         "nbdcopy": version("nbdcopy", "--version"),
                         "python": platform.python_version()}}


def suite(opts: Options) -> Results:
    res = Results(opts)
    started = time.monotonic()
    base = opts.workdir or Path(tempfile.mkdtemp(prefix="hast-bench-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / "tmp"
    tmp.mkdir(exist_ok=True)
    old_affinity = os.sched_getaffinity(0)
    # Everything this process starts from here (servers, hastd, hastctl) runs on the server
    # CPUs; clients are started under taskset on the client CPUs.
    os.sched_setaffinity(0, parse_cpus(opts.server_cpus))
    res.meta = _meta(opts, base)
    servers: dict[str, RefServer] = {}
    hast: Hast | None = None
    try:
        log(f"work directory {base}; preparing {len(opts.refs) + 2} files of "
            f"{opts.size // MiB} MiB")
        for name in opts.refs:
            image = base / f"{name}.img"
            fill_random(image, opts.size)
            servers[name] = RefServer(name, base, image)
            servers[name].start()
        src = base / "source.img"
        fill_random(src, opts.size)
        hast = Hast(base / "pair", opts.size, opts.direct, opts.keepdirty, opts.secondary_cpus)
        hast.create_and_start()

        # Copies: nbdcopy into nbdkit file against the initial sync, interleaved.
        nbdcopy_runs, sync_runs = [], []
        for i in range(opts.sync_runs):
            if "nbdkit-file" in servers:
                secs = run_nbdcopy(src, servers["nbdkit-file"].uri, opts)
                nbdcopy_runs.append({"seconds": secs, "mibs": opts.size / MiB / secs})
                log(f"nbdcopy -> nbdkit-file run {i + 1}: {secs:.2f} s")
            secs, todo = hast.initial_sync(opts.client_cpus)
            sync_runs.append({"seconds": secs, "mibs": todo / MiB / secs if secs else 0})
            log(f"initial sync run {i + 1}: {todo / MiB:.0f} MiB in {secs:.2f} s")
        if nbdcopy_runs:
            res.copies["nbdcopy-nbdkit-file"] = {**summarize(nbdcopy_runs), "bytes": opts.size}
        res.copies["hast-initial-sync"] = {**summarize(sync_runs), "bytes": todo}
        resync_runs = []
        for i in range(opts.sync_runs):
            secs, todo = hast.resync(opts.resync_fraction, 3 + i, opts.client_cpus)
            resync_runs.append({"seconds": secs, "mibs": todo / MiB / secs if secs else 0})
            log(f"resync run {i + 1}: {todo / MiB:.0f} MiB in {secs:.3f} s")
        res.copies["hast-resync"] = {**summarize(resync_runs), "bytes": todo}

        jobs = [JOB_BY_KEY[k] for k in opts.jobs]
        for mode in opts.modes:
            system = f"hast-{mode}"
            if mode == "degraded":
                hast.degrade()
            elif mode != hast.mode or hast.degraded:
                hast.restart(mode)
            targets: dict[str, str] = {system: hast.uri}
            if mode == "fullsync":
                # the references run interleaved with the mode every target is about
                targets = {**{n: s.uri for n, s in servers.items()}, **targets}
            for job in jobs:
                if mode in ("memsync", "async") and not job.writes:
                    continue  # reads take the same path in every mode
                runs: dict[str, list[dict]] = {s: [] for s in targets}
                for i in range(opts.runs):
                    for s, uri in targets.items():
                        r = run_fio(uri, job, opts, tmp)
                        runs[s].append(r)
                        log(f"{s:14} {job.key:24} run {i + 1}: {r[figure(job)]:10,.0f} "
                            f"{job.unit:5} {r['lat_us']:9.1f} us")
                for s, rs in runs.items():
                    res.fio.setdefault(s, {})[job.key] = summarize(rs)
                if job.qd >= 32:
                    pids = hast.worker_pids()
                    peak = res.rss.setdefault(system, {})
                    for role, pid in pids.items():
                        peak[role] = max(peak.get(role, 0), peak_rss_kib(pid))
        import bench_activemap
        res.activemap = bench_activemap.run()
    finally:
        for server in servers.values():
            server.stop()
        if hast is not None:
            hast.close()
        os.sched_setaffinity(0, old_affinity)
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)
    res.meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    res.meta["elapsed_s"] = round(time.monotonic() - started, 1)
    compute_targets(res)
    return res


def write_outputs(res: Results) -> dict[str, Path]:
    out = res.opts.out
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "nbd.json", "table": out / "nbd.txt", "png": out / "nbd.png"}
    opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(res.opts).items()}
    doc = {"meta": res.meta, "options": opts, "jobs": {j.key: vars(j) for j in JOBS},
           "fio": res.fio, "copies": res.copies, "rss_kib": res.rss,
           "activemap": res.activemap, "targets": res.targets}
    paths["json"].write_text(json.dumps(doc, indent=1))
    paths["table"].write_text(render(res) + "\n")
    if not plot(res, paths["png"]):
        del paths["png"]
    return paths


def options(argv: list[str]) -> Options:
    client, server = default_cpus()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small, short, one run")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--runtime", type=float, help="seconds per fio job (after the ramp)")
    ap.add_argument("--ramp", type=float)
    ap.add_argument("--size", help="file/resource size, e.g. 2G")
    ap.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--jobs", help="comma-separated subset of " + ",".join(JOB_BY_KEY))
    ap.add_argument("--refs", help=f"comma-separated subset of {','.join(REFS)}")
    ap.add_argument("--sync-runs", type=int)
    ap.add_argument("--client-cpus", default=client)
    ap.add_argument("--server-cpus", default=server)
    ap.add_argument("--buffered", action="store_true",
                    help="py-hast.conf 'direct off' (default: py-hast's default, O_DIRECT)")
    ap.add_argument("--secondary-cpus", default="",
                    help="run py-hast's secondary on these CPUs, as on its own host "
                         "(default: with the other servers)")
    ap.add_argument("--keepdirty", type=int, default=0,
                    help="hastctl create -k for both nodes (default: hastctl's, 64)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--workdir", type=Path, help="keep files here (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="do not delete the work directory")
    a = ap.parse_args(argv)
    o = Options(client_cpus=a.client_cpus, server_cpus=a.server_cpus, out=a.out,
                workdir=a.workdir, direct=not a.buffered, keepdirty=a.keepdirty,
                secondary_cpus=a.secondary_cpus,
                keep=a.keep or a.workdir is not None)
    if a.quick:
        o.quick = True
        o.size, o.runs, o.runtime, o.ramp, o.sync_runs = 256 * MiB, 1, 1.0, 0.0, 1
        o.modes = ("fullsync", "degraded")
    if a.runs is not None:
        o.runs = a.runs
    if a.runtime is not None:
        o.runtime = a.runtime
    if a.ramp is not None:
        o.ramp = a.ramp
    if a.sync_runs is not None:
        o.sync_runs = a.sync_runs
    if a.size:
        from hast.subr import expand_number
        o.size = expand_number(a.size)
    if a.modes:
        o.modes = tuple(m for m in a.modes.split(",") if m)
        bad = set(o.modes) - set(MODES)
        if bad:
            ap.error(f"unknown modes {bad}")
    if a.jobs:
        o.jobs = tuple(j for j in a.jobs.split(",") if j)
        bad = set(o.jobs) - set(JOB_BY_KEY)
        if bad:
            ap.error(f"unknown jobs {bad}")
    if a.refs is not None:
        o.refs = tuple(r for r in a.refs.split(",") if r)
        bad = set(o.refs) - set(REFS)
        if bad:
            ap.error(f"unknown references {bad}")
    return o


def _rows(res: Results) -> list[dict]:
    """bench/run.py rows: each target as value / baseline."""
    return [{"name": f"nbd: {t['name']}", "unit": "", "value": t["value"],
             "baseline": t["reference"], "ratio": t["ratio"]} for t in res.targets
            if not t["name"].startswith("activemap")]


def run() -> list[dict]:
    """The full suite with default options (bench/run.py)."""
    res = suite(options([]))
    paths = write_outputs(res)
    print(render(res))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return _rows(res)


def main(argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("bench_nbd needs root (network namespaces for the two nodes)", file=sys.stderr)
        return 77
    for tool in ("fio", "nbdkit", "qemu-nbd", "nbdcopy", "qemu-io", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench_nbd needs {tool} (tools/sysdeps.sh installs it)", file=sys.stderr)
            return 69
    opts = options(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res = suite(opts)
    paths = write_outputs(res)
    print(render(res))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
