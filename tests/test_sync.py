"""hast.sync's bookkeeping under failures, regular writes and kicks, in one process.

The Synchronizer runs against a stand-in for hast.primary.Primary whose components complete
at once and fail at random (a disk returning EIO), while other threads write (write_start /
write_complete around the range lock, as the primary does) and mark extents dirty the way a
failed remote or local copy does (dirtied).  Once the failures stop, every pass must end
with the map clean and nothing reserved: a reservation leaked by the sync's accounting shows
as an extent dirty forever ("complete" with dirty > 0, found by the torture harness), one
released twice as ValueError from extent_complete.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from types import SimpleNamespace

import pytest

from hast import sync as syncmod
from hast.activemap import ActiveMap
from hast.rangelock import RangeLocks

EXTENT = 64 * 1024
CHUNK = 16 * 1024
NEXTENTS = 24


class MapWriter:
    """The part of hast.primary.MapWriter the sync uses: cv and update_lazily."""

    def __init__(self, amap: ActiveMap) -> None:
        self.amap = amap
        self.cv = threading.Condition(threading.Lock())

    def update_lazily(self, update) -> None:  # noqa: ANN001
        with self.cv:
            update()


class Primary:
    def __init__(self, seed: int) -> None:
        self.extentsize = EXTENT
        self.datasize = NEXTENTS * EXTENT
        self.maxio = CHUNK
        self.amap = ActiveMap(self.datasize, EXTENT, 512, 4, CHUNK)
        self.mapw = MapWriter(self.amap)
        self.ranges = RangeLocks()
        self.stopping = threading.Event()
        self.lock = threading.RLock()
        self.stale: set[int] = set()
        self.syncsrc = 0
        self.localcnt = self.remotecnt = self.peer_localcnt = self.peer_remotecnt = 1
        self.connected = True
        self.ctx = SimpleNamespace(emit=lambda event: None)
        self.local = SimpleNamespace(submit=self._complete)
        self.rng = random.Random(seed)
        self.rng_lock = threading.Lock()
        self.fail_rate = 0.0

    def _complete(self, hio) -> None:  # noqa: ANN001
        with self.rng_lock:
            fail = self.rng.random() < self.fail_rate
        hio.done(errno.EIO if fail else 0)

    def remote_send(self, hio) -> None:  # noqa: ANN001
        self._complete(hio)

    def flush_map(self) -> None:
        pass

    def write_metadata(self) -> None:
        pass

    def direct_reads(self, enabled: bool) -> None:
        pass


def _writer(p: Primary, sync: syncmod.Synchronizer, seed: int, stop: threading.Event) -> None:
    """Regular writes; some of them 'fail' on one node and are marked dirty as the primary's
    completion path does (dirtied before write_complete, under the range lock)."""
    rng = random.Random(seed)
    while not stop.is_set():
        off = rng.randrange(0, p.datasize - CHUNK, 4096)
        length = rng.choice((4096, CHUNK, 3 * 4096))
        key = p.ranges.lock_regular(off, length)
        with p.mapw.cv:
            p.amap.write_start(off, length)
        if rng.random() < 0.2:
            sync.dirtied(off, length, stale=rng.random() < 0.5)
        time.sleep(rng.random() / 1000)
        p.amap.write_complete(off, length)
        p.ranges.unlock_regular(key)


def _wait_idle(sync: syncmod.Synchronizer, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sync.cond:
            if not sync.running and not sync.pending:
                return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("seed", range(8))
def test_sync_accounting_survives_failures_writes_and_kicks(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syncmod, "BACKOFF_MIN", 0.005)
    monkeypatch.setattr(syncmod, "BACKOFF_MAX", 0.02)
    p = Primary(seed)
    sync = syncmod.Synchronizer(p, inflight=4)
    rng = random.Random(seed)
    # Everything dirty to start with, as after a long outage.
    p.amap.merge(b"\xff" * p.amap.size())
    p.fail_rate = 0.3
    stop = threading.Event()
    writers = [threading.Thread(target=_writer, args=(p, sync, seed * 10 + i, stop))
               for i in range(3)]
    try:
        for w in writers:
            w.start()
        sync.start()
        for _ in range(40):
            time.sleep(rng.random() / 50)
            if rng.random() < 0.2:
                sync.stop()       # a disconnect ...
                sync.start()      # ... and a reconnect, mid-pass
            else:
                sync.kick()
        stop.set()
        for w in writers:
            w.join()
        p.fail_rate = 0.0
        sync.kick()
        assert _wait_idle(sync, 30), "the sync never went idle"
        leaked = {ext: p.amap.pending(ext) for ext in range(NEXTENTS) if p.amap.pending(ext)}
        assert not leaked, f"reservations left on clean-looking extents: {leaked}"
        assert p.amap.ndirty() == 0
        assert p.amap.syncmap() == bytes(p.amap.size())
        assert not p.stale
    finally:
        stop.set()
        p.stopping.set()
        sync.stop()
