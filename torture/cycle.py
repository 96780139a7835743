"""cycle: one torture cycle -- a fresh pair, load, one fault, recovery, and the checks.

A cycle owns its pair from creation to teardown: two namespaces with hastd, providers sized
by the plan (on eiofs when the fault is an EIO), the writer on the primary's NBD export, the
fault at its planned instant, then the recovery the plan chose (failover, restart, heal) and
the three checks of torture.checker.  Whatever happens, ``close()`` removes the namespaces,
processes and mounts; the cycle's directory (hastd logs of both nodes) is kept only when the
cycle found a violation.

Waits are all bounded: a pair that does not come back ``complete`` in time is itself a
violation (liveness), reported with the tail of both nodes' logs.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from torture import checker, faults
from torture.checker import (
    Totals,
    compare_areas,
    dirty_map_check,
    verify_export,
)
from torture.nbdclient import NbdClient, NbdError
from torture.pair import TorturePair
from torture.workload import (
    ACKED,
    BLOCK,
    FAILED,
    UNKNOWN,
    History,
    LossWindow,
    Writer,
    WriterConfig,
)

A, B = "hasta", "hastb"
COMPLETE_TIMEOUT = 45.0       # reconnect (<= 10 s) + resync of a few MiB, on a loaded 2-core VM
DRAIN_TIMEOUT = 20.0
CYCLE_LIMIT = 300.0           # hard bound of one cycle (SIGALRM in the main thread)
_SYNCED = re.compile(r"Synchronization complete\. ([0-9.]+)([KMGTPE]?)B synchronized")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50,
          "E": 1 << 60}


class CycleTimeout(Exception):
    pass


def _alarm(_signo: int, _frame: object) -> None:
    raise CycleTimeout(f"the cycle exceeded its {CYCLE_LIMIT:.0f} s bound")


@dataclass
class CycleResult:
    plan: faults.Plan
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    writes: int = 0
    acked: int = 0
    unknown: int = 0
    failed: int = 0
    serving: str = ""
    synced: int = 0               # bytes the resynchronizations copied (hastd's log lines)
    workdir: Path | None = None
    notes: list[str] = field(default_factory=list)


class Cycle:
    def __init__(self, plan: faults.Plan, root: Path, totals: Totals, keep: bool = False) -> None:
        self.plan = plan
        self.keep = keep
        self.totals = totals
        self.workdir = root / f"cycle-{plan.cycle}"
        self.result = CycleResult(plan)
        self.rng = random.Random(f"run/{plan.seed}/{plan.cycle}")
        self.history = History(plan.cycle_seed)
        self.pair: TorturePair | None = None
        self.writer: Writer | None = None
        self.t_load = 0.0

    # -- helpers ---------------------------------------------------------------------------
    def violation(self, text: str) -> None:
        self.result.violations.append(text)

    def count_fault(self, kind: str) -> None:
        self.totals.faults[kind] = self.totals.faults.get(kind, 0) + 1

    def sleep_until(self, t: float) -> None:
        left = self.t_load + t - time.monotonic()
        if left > 0:
            time.sleep(left)

    def connect(self, node: str, timeout: float = 30.0) -> NbdClient:
        """The node's NBD export, once it accepts (a stale socket file may precede it)."""
        assert self.pair is not None
        deadline = time.monotonic() + timeout
        while True:
            try:
                return NbdClient(str(self.pair.socket(node)), self.pair.resource)
            except (OSError, NbdError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the NBD export of {node} does not answer: {exc}") \
                        from None
                time.sleep(0.1)

    def start_writer(self, node: str) -> Writer:
        client = self.connect(node)
        size = client.size - client.size % BLOCK
        cfg = WriterConfig(qd=self.plan.qd)
        self.writer = Writer(self.history, random.Random(f"w/{self.plan.seed}/{self.plan.cycle}"
                                                         f"/{node}/{self.history.next_wid}"),
                             client, node, self.plan.mode, cfg, (0, size))
        self.writer.start()
        return self.writer

    def stop_writer(self, timeout: float = DRAIN_TIMEOUT) -> None:
        w = self.writer
        if w is None:
            return
        if not w.drain(timeout):
            self.violation(f"writes to {w.node} got no reply {timeout:.0f} s after the load "
                           f"stopped ({w.inflight} outstanding)")
        w.client.close()
        w.client.reader.join(timeout=10)
        self.writer = None

    def load_on(self, node: str, seconds: float) -> None:
        self.start_writer(node)
        time.sleep(seconds)
        self.stop_writer()

    def async_window(self, node: str, t_fault: float) -> float:
        """torture.checker's async bound for writes acknowledged by ``node`` until t_fault."""
        assert self.pair is not None
        n = self.pair.node(node)
        capacity = checker.MAX_REQUEST
        for name in ("tcp_wmem", "tcp_rmem"):
            text = n.run("cat", f"/proc/sys/net/ipv4/{name}", timeout=30).stdout.split()
            capacity += int(text[2])
        acked = [(r.t_ack, r.length) for r in self.history.writes.values()
                 if r.node == node and r.state == ACKED and r.t_ack is not None
                 and r.t_ack <= t_fault]
        return checker.async_loss_window(capacity, acked, t_fault)

    def wait_complete(self, node: str, what: str) -> bool:
        assert self.pair is not None
        try:
            self.pair.wait_complete(node, timeout=COMPLETE_TIMEOUT)
            return True
        except AssertionError:
            fields = self.pair.list_fields(node)
            self.violation(f"{what}: {node} not complete with dirty 0 after "
                           f"{COMPLETE_TIMEOUT:.0f} s (status {fields.get('status')}, dirty "
                           f"{fields.get('dirty')})")
            return False

    def wait_idle(self, node: str) -> None:
        assert self.pair is not None
        p = self.pair

        def idle() -> bool:
            q = p.queues(node)
            return q.get("idle") == 256 and q.get("local") == 0 and q.get("recv") == 0

        try:
            p.wait(f"{node} idle", idle, timeout=DRAIN_TIMEOUT)
        except AssertionError:
            self.violation(f"{node} still has requests in flight {DRAIN_TIMEOUT:.0f} s after "
                           f"the load stopped: {p.list_fields(node).get('queues')}")

    def snapshot_check(self, primary: str, other: str, when: str) -> None:
        """Property 3 on the primary's on-disk activemap, read now."""
        assert self.pair is not None
        p = self.pair
        image = p.activemap(primary)
        a, b = p.data_area(primary), p.data_area(other)
        md = p.md(primary)
        self.result.violations += dirty_map_check(self.history, image, md.extentsize, a, b,
                                                  (primary, other), when, self.totals)

    def final_checks(self, serving: str, other: str) -> None:
        assert self.pair is not None
        p = self.pair
        self.result.serving = serving
        h = self.history
        self.result.violations += h.read_violations
        if h.read_violation_count > len(h.read_violations):
            self.violation(f"... {h.read_violation_count} blocks in all read back wrong "
                           "during load")
        complete = self.wait_complete(serving, "after recovery")
        self.result.violations += verify_export(str(p.socket(serving)), p.resource,
                                                self.history, self.totals,
                                                f"export of {serving}")
        if complete:
            self.result.violations += compare_areas(self.history, p.data_area(serving),
                                                    p.data_area(other), (serving, other),
                                                    self.totals)
        else:
            # say how far apart they are all the same
            diff = compare_areas(self.history, p.data_area(serving), p.data_area(other),
                                 (serving, other), self.totals)
            self.result.violations += diff

    # -- the cycle ---------------------------------------------------------------------------
    def run(self) -> CycleResult:
        t0 = time.monotonic()
        alarm = threading.current_thread() is threading.main_thread()
        try:
            try:
                if alarm:
                    old = signal.signal(signal.SIGALRM, _alarm)
                    signal.setitimer(signal.ITIMER_REAL, CYCLE_LIMIT)
                self._run()
            finally:
                if alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    signal.signal(signal.SIGALRM, old)
        except Exception as exc:  # an engine hang or a harness bug: both fail the cycle
            self.violation(f"cycle aborted: {exc.__class__.__name__}: {exc}\n"
                           + "".join(traceback.format_exc(limit=6)))
        finally:
            if self.writer is not None:
                self.writer.stop()
                self.writer.client.close()
            h = self.history
            self.result.writes = len(h.writes)
            self.result.acked = h.count(ACKED)
            self.result.unknown = h.count(UNKNOWN)
            self.result.failed = h.count(FAILED)
            self.totals.writes_acked += self.result.acked
            self.totals.writes_unknown += self.result.unknown
            self.totals.writes_failed += self.result.failed
            self.totals.writes_checked += self.result.acked if self.result.serving else 0
            self.totals.reads_checked += h.reads_checked
            if self.result.violations and self.pair is not None:
                self.result.notes += self._log_tails()
            if self.pair is not None:
                for name in (A, B):
                    for m in _SYNCED.finditer(self.pair.log(name)):
                        self.result.synced += int(float(m.group(1)) * _UNITS[m.group(2)])
                self.totals.synced_bytes += self.result.synced
                self.pair.close()
            self.result.seconds = time.monotonic() - t0
            if self.result.violations or self.keep:
                self.result.workdir = self.workdir
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return self.result

    def _log_tails(self, lines: int = 30) -> list[str]:
        assert self.pair is not None
        out = []
        for name in (A, B):
            text = self.pair.log(name).splitlines()
            keep = [ln for ln in text if "[" in ln][-lines:]
            out.append(f"--- {name} hastd.log (last {len(keep)} lines) ---\n" + "\n".join(keep))
        return out

    def _run(self) -> None:
        plan = self.plan
        extra = (f"\treplication {plan.mode}\n\tcompression {plan.compression}\n"
                 f"\tchecksum {plan.checksum}\n\ttimeout {plan.timeout}\n")
        eio_nodes: tuple[str, ...] = ()
        if plan.fault == "eio":
            eio_nodes = (A,) if plan.variant["node"] == "primary" else (B,)
        self.pair = p = TorturePair(self.workdir, plan.size, extra, eio_nodes)
        for name in (A, B):
            p.create(name, "-e", str(plan.extentsize), "-k", str(plan.keepdirty))
            p.start(name)
        p.role(B, "secondary")
        p.role(A, "primary")
        p.wait_complete(A, timeout=30)
        self.t_load = time.monotonic()
        self.start_writer(A)
        getattr(self, f"_fault_{plan.fault}")()

    # -- faults ------------------------------------------------------------------------------
    def _kill(self, name: str) -> float:
        assert self.pair is not None
        t = time.monotonic()
        self.pair.stop(name, signal.SIGKILL)
        return t

    def _wait_no_worker(self, name: str) -> None:
        assert self.pair is not None
        p = self.pair
        p.wait(f"the worker of {name} to exit", lambda: not p.workers(name), timeout=40)

    def _fault_kill_primary(self) -> None:
        plan, p, v = self.plan, self.pair, self.plan.variant
        assert p is not None
        self.sleep_until(plan.fault_at)
        t_fault = self._kill(A)
        self.count_fault("kill_primary")
        self.stop_writer()
        if plan.mode == "async" and v["recovery"] == "failover":
            window = self.async_window(A, t_fault)
            self.totals.async_windows.append(window)
            self.result.notes.append(f"async loss window {window * 1000:.0f} ms")
            self.history.windows.append(LossWindow(A, t_fault - window, time.monotonic(),
                                                   t_fault))
        self._wait_no_worker(B)
        self.snapshot_check(A, B, "after the primary was killed")
        if v["recovery"] == "restart":
            p.start(A)
            p.role(A, "primary")
            self.load_on(A, plan.after_load)
            self.final_checks(A, B)
            return
        if v["rejoin"] == "before":
            p.start(A)
            p.role(A, "secondary")
        p.role(B, "primary")
        self.load_on(B, plan.after_load)
        if v["rejoin"] == "after":
            p.start(A)
            p.role(A, "secondary")
        self.final_checks(B, A)

    def _fault_kill_secondary(self) -> None:
        plan, p, v = self.plan, self.pair, self.plan.variant
        assert p is not None
        self.sleep_until(plan.fault_at)
        self._kill(B)
        self.count_fault("kill_secondary")
        if v["restart"] == "during":
            time.sleep(self.rng.uniform(0.1, 0.5))
            p.start(B)
            p.role(B, "secondary")
        self.sleep_until(plan.load)
        self.stop_writer()
        if v["restart"] == "after":
            self.wait_idle(A)
            self.snapshot_check(A, B, "with the secondary dead and the primary idle")
            p.start(B)
            p.role(B, "secondary")
        self.final_checks(A, B)

    def _fault_kill_both(self) -> None:
        plan, p, v = self.plan, self.pair, self.plan.variant
        assert p is not None
        self.sleep_until(plan.fault_at)
        first, second = (A, B) if v["first"] == "primary" else (B, A)
        self._kill(first)
        time.sleep(int(v["gap_ms"]) / 1000)  # type: ignore[call-overload]
        self._kill(second)
        self.count_fault("kill_both")
        self.stop_writer()
        self.snapshot_check(A, B, "after both nodes were killed")
        p.start(A)
        p.start(B)
        if v["recovery"] == "restart":
            p.role(B, "secondary")
            p.role(A, "primary")
            serving, other = A, B
        else:
            p.role(A, "secondary")
            p.role(B, "primary")
            serving, other = B, A
        self.load_on(serving, plan.after_load)
        self.final_checks(serving, other)

    def _lifted_fault(self, kind: str, on, off) -> None:  # noqa: ANN001
        plan, p = self.plan, self.pair
        assert p is not None
        self.sleep_until(plan.fault_at)
        on()
        self.count_fault(kind)
        try:
            self.sleep_until(plan.fault_at + plan.fault_len)
        finally:
            off()
        self.sleep_until(plan.load)
        self.stop_writer(DRAIN_TIMEOUT + plan.timeout)
        self.wait_idle(A)
        state = "cut off from" if p.status(A) == "degraded" else "connected to"
        self.snapshot_check(A, B, f"with the primary idle and {state} the secondary")
        self.final_checks(A, B)

    def _fault_partition(self) -> None:
        p, v = self.pair, self.plan.variant
        assert p is not None
        node, peer = (p.node(A), p.node(B)) if v["side"] == "primary" else (p.node(B), p.node(A))
        self._lifted_fault("partition", lambda: faults.partition(node, peer.addr, True),
                           lambda: faults.partition(node, peer.addr, False))

    def _fault_reset(self) -> None:
        p, v = self.pair, self.plan.variant
        assert p is not None
        side = v["side"] == "primary"
        node = p.node(A) if side else p.node(B)
        self._lifted_fault("reset", lambda: faults.reset(node, side, True),
                           lambda: faults.reset(node, side, False))

    def _fault_slow(self) -> None:
        p, v = self.pair, self.plan.variant
        assert p is not None
        rate = str(v["rate"])

        def on() -> None:
            for n in (A, B):
                faults.slow(p.node(n), rate, True)

        def off() -> None:
            for n in (A, B):
                faults.slow(p.node(n), rate, False)

        self._lifted_fault("slow", on, off)

    def _fault_eio(self) -> None:
        p, v, w = self.pair, self.plan.variant, self.writer
        assert p is not None and w is not None
        node = A if v["node"] == "primary" else B
        nbytes = int(v["blocks"]) * BLOCK  # type: ignore[call-overload]
        lo, hi = w.hot
        start = self.rng.randrange(lo, max(lo + BLOCK, hi - nbytes + 1), BLOCK)
        localoff = p.md(node).localoff
        rule = f"fail {v['ops']} {localoff + start} {nbytes}"
        self.result.notes.append(f"EIO rule on {node}: {rule} (data offset {start})")

        def off() -> None:
            status = p.eio_status(node)
            self.result.notes.append(f"eiofs on {node}: {status.splitlines()[-1]}")
            p.eio(node, "clear")

        self._lifted_fault("eio", lambda: p.eio(node, rule), off)
