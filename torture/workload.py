"""workload: the writer, the record of acknowledged writes, and what each block may hold.

The writer drives the primary's NBD export with a seeded mix of WRITEs (some with FUA),
FLUSHes and verifying READs, several in flight at once.  Every request is recorded when it is
submitted and its outcome when the reply arrives -- and only then is a write *acknowledged*.
A write whose reply never came (the connection died with the primary) is *unknown*: the
block may hold the old or the new content.  A write answered with an error is unknown too.

Content is a pure function of (cycle seed, write id, block number): every 4 KiB block starts
with a header naming its write, followed by filler derived from that header (pseudo-random,
or zeros for a quarter of the writes so compression has work).  A block read back therefore
says which write put it there, and a hash of the regenerated content proves the rest.

Ordering rule that keeps the checker exact: the writer never has two requests in flight that
touch the same block (a READ counts), so the writes to any block are totally ordered by their
ids and "the last acknowledged write to a block" is well defined.

``History.allowed(block)`` is the whole consistency model: walking back from the newest write
to the block, collect every write that is unknown, failed, or acknowledged but allowed to be
lost (async replication inside the documented loss window, see torture.checker), and stop at
the first acknowledged write that must have survived; if none stops the walk, the initial
content (zeros, id 0) is allowed as well.
"""

from __future__ import annotations

import hashlib
import random
import struct
import threading
import time
from dataclasses import dataclass, field

from torture.nbdclient import NbdClient

BLOCK = 4096
MAGIC = b"HASTTORT"
_HDR = struct.Struct("<8sQQQ")
INITIAL = 0          # "write id" of the content a fresh provider holds (zeros)
GARBAGE = -1         # a block that is neither zeros nor any write's content

ACKED, FAILED, UNKNOWN, INFLIGHT = "acked", "failed", "unknown", "inflight"


def block_content(seed: int, wid: int, blockno: int) -> bytes:
    hdr = _HDR.pack(MAGIC, seed, wid, blockno)
    if hashlib.blake2b(hdr, digest_size=1).digest()[0] < 64:
        return hdr + bytes(BLOCK - len(hdr))
    return hdr + hashlib.shake_128(hdr).digest(BLOCK - len(hdr))


def write_content(seed: int, wid: int, offset: int, length: int) -> bytes:
    first = offset // BLOCK
    return b"".join(block_content(seed, wid, first + i) for i in range(length // BLOCK))


_ZERO_BLOCK = bytes(BLOCK)


def identify(seed: int, blockno: int, data: bytes | memoryview) -> int:
    """Which write's content ``data`` (one block) is: its id, INITIAL, or GARBAGE."""
    head = bytes(data[:_HDR.size])
    if head[:8] == MAGIC:
        _magic, bseed, wid, bno = _HDR.unpack(head)
        if bseed == seed and bno == blockno and data == block_content(seed, wid, blockno):
            return wid
        return GARBAGE
    return INITIAL if data == _ZERO_BLOCK else GARBAGE


@dataclass
class WriteRecord:
    wid: int
    offset: int
    length: int
    fua: bool
    mode: str
    node: str
    digest: str
    t_submit: float
    t_ack: float | None = None
    state: str = INFLIGHT
    error: int = 0

    def describe(self, t0: float) -> str:
        ack = f"{self.t_ack - t0:.3f}" if self.t_ack is not None else "-"
        err = f" error={self.error}" if self.error else ""
        return (f"write #{self.wid} [{self.offset}+{self.length}] on {self.node} "
                f"{self.mode}{' FUA' if self.fua else ''} sent={self.t_submit - t0:.3f}s "
                f"ack={ack}s {self.state}{err} blake2b={self.digest}")


@dataclass
class FlushRecord:
    t_submit: float
    node: str
    t_ack: float | None = None
    ok: bool = False


@dataclass
class LossWindow:
    """Acknowledged writes of ``node`` with t_ack >= ``since`` may be missing (async)."""

    node: str
    since: float
    until: float
    fault: float = 0.0           # when the node died


@dataclass
class History:
    seed: int
    t0: float = field(default_factory=time.monotonic)
    writes: dict[int, WriteRecord] = field(default_factory=dict)
    blocks: dict[int, list[int]] = field(default_factory=dict)
    flushes: list[FlushRecord] = field(default_factory=list)
    windows: list[LossWindow] = field(default_factory=list)
    read_violations: list[str] = field(default_factory=list)
    read_violation_count: int = 0
    reads_checked: int = 0
    next_wid: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)

    def new_write(self, offset: int, length: int, fua: bool, mode: str, node: str) -> WriteRecord:
        with self.lock:
            wid = self.next_wid
            self.next_wid += 1
        data_digest = hashlib.blake2b(write_content(self.seed, wid, offset, length),
                                      digest_size=8).hexdigest()
        rec = WriteRecord(wid, offset, length, fua, mode, node, data_digest, time.monotonic())
        with self.lock:
            self.writes[wid] = rec
            for b in range(offset // BLOCK, (offset + length) // BLOCK):
                self.blocks.setdefault(b, []).append(wid)
        return rec

    def _flushed(self, rec: WriteRecord) -> bool:
        """An acknowledged FLUSH sent after ``rec`` was acknowledged covers it (NBD FLUSH)."""
        assert rec.t_ack is not None
        return any(f.ok and f.node == rec.node and f.t_submit > rec.t_ack
                   for f in self.flushes)

    def may_be_lost(self, rec: WriteRecord) -> bool:
        if rec.state != ACKED or rec.fua or rec.t_ack is None:
            return rec.state != ACKED
        for w in self.windows:
            if rec.node == w.node and w.since <= rec.t_ack <= w.until and not self._flushed(rec):
                return True
        return False

    def allowed(self, block: int) -> set[int]:
        out: set[int] = set()
        for wid in reversed(self.blocks.get(block, [])):
            rec = self.writes[wid]
            out.add(wid)
            if rec.state == ACKED and not self.may_be_lost(rec):
                return out
        out.add(INITIAL)
        return out

    def acked(self) -> int:
        return sum(1 for r in self.writes.values() if r.state == ACKED)

    def count(self, state: str) -> int:
        return sum(1 for r in self.writes.values() if r.state == state)

    def explain(self, block: int, seen: int, limit: int = 6) -> str:
        """The block's history, newest first, for a violation report."""
        lines = [f"block {block} (byte {block * BLOCK}) holds "
                 f"{'garbage' if seen == GARBAGE else f'write #{seen}' if seen else 'zeros'}"
                 f"; allowed {sorted(self.allowed(block))}"]
        for wid in list(reversed(self.blocks.get(block, [])))[:limit]:
            lines.append("    " + self.writes[wid].describe(self.t0))
        return "\n".join(lines)


@dataclass
class WriterConfig:
    qd: int = 8
    max_blocks: int = 16            # usual write size: 1..max_blocks blocks
    big_every: int = 200            # about one write in this many is 256 KiB - 2 MiB
    fua_pct: int = 8
    read_pct: int = 10
    flush_every: int = 60
    hot_bytes: int = 2 * 1024 * 1024


class Writer(threading.Thread):
    """Load on one node's NBD export until ``stop()`` or until the connection breaks."""

    def __init__(self, history: History, rng: random.Random, client: NbdClient, node: str,
                 mode: str, cfg: WriterConfig, region: tuple[int, int]) -> None:
        super().__init__(name=f"writer-{node}", daemon=True)
        self.h = history
        self.rng = rng
        self.client = client
        self.node = node
        self.mode = mode
        self.cfg = cfg
        self.region = region                    # [start, end) in bytes, block aligned
        self.busy: set[int] = set()
        self.cv = threading.Condition()
        self.inflight = 0
        self.stopping = threading.Event()
        self.ops = 0
        hot_len = min(cfg.hot_bytes, region[1] - region[0])
        start = rng.randrange(region[0], region[1] - hot_len + 1, BLOCK)
        self.hot = (start, start + hot_len)

    def stop(self) -> None:
        self.stopping.set()
        with self.cv:
            self.cv.notify_all()

    # -- choosing requests ---------------------------------------------------------------------
    def _pick_range(self, nblocks: int) -> tuple[int, int] | None:
        lo, hi = self.hot if self.rng.random() < 0.5 else self.region
        nblocks = min(nblocks, (hi - lo) // BLOCK)
        for _ in range(8):
            first = self.rng.randrange(lo // BLOCK, hi // BLOCK - nblocks + 1)
            blocks = range(first, first + nblocks)
            if not any(b in self.busy for b in blocks):
                return first * BLOCK, nblocks * BLOCK
        return None

    def _size(self) -> int:
        if self.rng.randrange(self.cfg.big_every) == 0:
            return self.rng.choice((64, 128, 256, 512))
        return self.rng.randint(1, self.cfg.max_blocks)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        while not self.stopping.is_set() and self.client.alive:
            with self.cv:
                while self.inflight >= cfg.qd and not self.stopping.is_set():
                    self.cv.wait(0.5)
                if self.stopping.is_set():
                    break
            self.ops += 1
            if self.ops % cfg.flush_every == 0:
                self._flush()
            elif self.rng.randrange(100) < cfg.read_pct:
                self._read()
            else:
                self._write()

    def _claim(self, offset: int, length: int) -> range:
        blocks = range(offset // BLOCK, (offset + length) // BLOCK)
        with self.cv:
            self.busy.update(blocks)
            self.inflight += 1
        return blocks

    def _release(self, blocks: range) -> None:
        with self.cv:
            self.busy.difference_update(blocks)
            self.inflight -= 1
            self.cv.notify_all()

    def _write(self) -> None:
        picked = self._pick_range(self._size())
        if picked is None:
            return
        offset, length = picked
        fua = self.rng.randrange(100) < self.cfg.fua_pct
        rec = self.h.new_write(offset, length, fua, self.mode, self.node)
        data = write_content(self.h.seed, rec.wid, offset, length)
        blocks = self._claim(offset, length)

        def done(err: int | None, _payload: bytes | None) -> None:
            now = time.monotonic()
            if err is None:
                rec.state = UNKNOWN
            elif err:
                rec.state, rec.error = FAILED, err
            else:
                rec.t_ack, rec.state = now, ACKED
            self._release(blocks)

        if not self.client.write(offset, data, done, fua=fua):
            rec.state = UNKNOWN
            self._release(blocks)

    def _read(self) -> None:
        picked = self._pick_range(self.rng.randint(1, self.cfg.max_blocks))
        if picked is None:
            return
        offset, length = picked
        blocks = self._claim(offset, length)

        def done(err: int | None, payload: bytes | None) -> None:
            if err == 0 and payload is not None:
                for i, b in enumerate(blocks):
                    seen = identify(self.h.seed, b, payload[i * BLOCK:(i + 1) * BLOCK])
                    with self.h.lock:
                        self.h.reads_checked += 1
                    if seen not in self.h.allowed(b) or seen == GARBAGE:
                        self.h.read_violation_count += 1
                        if len(self.h.read_violations) < 5:
                            self.h.read_violations.append(
                                f"READ on {self.node} during load: " + self.h.explain(b, seen))
            self._release(blocks)

        if not self.client.read(offset, length, done):
            self._release(blocks)

    def _flush(self) -> None:
        rec = FlushRecord(time.monotonic(), self.node)
        self.h.flushes.append(rec)
        with self.cv:
            self.inflight += 1

        def done(err: int | None, _payload: bytes | None) -> None:
            rec.t_ack = time.monotonic()
            rec.ok = err == 0
            with self.cv:
                self.inflight -= 1
                self.cv.notify_all()

        if not self.client.flush(done):
            with self.cv:
                self.inflight -= 1

    def drain(self, timeout: float) -> bool:
        """Stop submitting and wait for every reply; False if some never came in time."""
        self.stop()
        self.join(timeout)
        deadline = time.monotonic() + timeout
        with self.cv:
            while self.inflight > 0 and self.client.alive:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cv.wait(min(left, 0.2))
        return True
