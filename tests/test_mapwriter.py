"""hast.primary.MapWriter on a real file: a WRITE is dispatched only once the dirty bit of
each extent it touches is on disk and stays there.

The writer thread, the group commit and the image on disk are the real ones; the primary
around them is a stand-in that records what the map writer dispatches.  No timing: a store
is held in flight with an event, and every wait has a generous deadline.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import hast.primary
from hast import metadata
from hast.activemap import ActiveMap
from hast.primary import HIO, HIO_WRITE, MapWriter, Stats

EXTENT = 1 << 20
DATASIZE = 64 * EXTENT
SECTOR = 512


class StandInPrimary:
    """What MapWriter uses of hast.primary.Primary."""

    def __init__(self, path: Path, keepdirty: int) -> None:
        with open(path, "wb") as fh:
            fh.truncate(metadata.METADATA_SIZE + 1024 * 1024)
        self.extentsize = EXTENT
        self.sectorsize = SECTOR
        self.res = SimpleNamespace(local=str(path), metaflush=True)
        self.direct = True                      # O_DIRECT data (False: 'direct off')
        self.stats = Stats()
        self.mdfd = os.open(path, os.O_RDWR)
        self.amap = ActiveMap(DATASIZE, EXTENT, SECTOR, keepdirty)
        self.dispatched: list[HIO] = []
        self.cond = threading.Condition()

    def dispatch_writes(self, hios: list[HIO]) -> None:
        with self.cond:
            self.dispatched.extend(hios)
            self.cond.notify_all()

    def wait_dispatched(self, hio: HIO) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: hio in self.dispatched, 30), "not dispatched"

    def disk_image(self, size: int) -> bytes:
        return os.pread(self.mdfd, size, metadata.METADATA_SIZE)


@pytest.fixture(params=[True], ids=["direct"])
def mapw(tmp_path: Path, request):
    p = StandInPrimary(tmp_path / "provider", keepdirty=1)
    p.direct = request.param
    w = MapWriter(p)  # type: ignore[arg-type]
    p.mapw = w
    try:
        yield w
    finally:
        w.stop()
        w.close()
        os.close(p.mdfd)


def _write(ext: int) -> HIO:
    return HIO(HIO_WRITE, ext * EXTENT, 4096, None, lambda err: None)


def _bit(image: bytes, ext: int) -> int:
    return (image[ext >> 3] >> (ext & 7)) & 1


def _start(w: MapWriter, hio: HIO) -> None:
    """write_start() as Primary.submit_write does it."""
    if w.write_start(hio):
        w.primary.dispatch_writes([hio])


def test_write_waits_for_its_bit_on_disk(mapw: MapWriter) -> None:
    p = mapw.primary
    h = _write(3)
    assert mapw.write_start(h) is False           # its bit is not on disk yet
    p.wait_dispatched(h)
    assert _bit(p.disk_image(mapw.size), 3) == 1
    h2 = _write(3)
    assert mapw.write_start(h2) is True           # on disk already: dispatched at once


def test_no_dispatch_while_the_image_being_written_clears_the_bit(mapw: MapWriter) -> None:
    # keepdirty 1: a write to extent 1 evicts extent 0 from the map.  While the image
    # without extent 0 is being stored, extent 0 is written again (h2 waits for the next
    # image) and once more (h3): extent 0 is still set on disk, but not in the image
    # about to land there, so h3 must wait too.
    p = mapw.primary
    h0 = _write(0)
    _start(mapw, h0)
    p.wait_dispatched(h0)
    mapw.write_complete(h0.offset, h0.length)
    assert _bit(p.disk_image(mapw.size), 0) == 1

    entered, release = threading.Event(), threading.Event()
    real_store = mapw._store

    def held_store(image: bytes) -> None:
        entered.set()
        assert release.wait(30)
        real_store(image)

    mapw._store = held_store  # type: ignore[method-assign]
    h1 = _write(1)
    _start(mapw, h1)                               # evicts extent 0: the writer stores
    assert entered.wait(30)
    assert mapw.storing is not None and _bit(mapw.storing, 0) == 0
    h2 = _write(0)
    assert mapw.write_start(h2) is False
    h3 = _write(0)
    assert mapw.write_start(h3) is False, "dispatched while its bit is being cleared on disk"
    mapw._store = real_store  # type: ignore[method-assign]
    release.set()
    for h in (h1, h2, h3):
        p.wait_dispatched(h)
    assert _bit(p.disk_image(mapw.size), 0) == 1
    assert mapw.storing is None


@pytest.mark.parametrize("mapw", [False], ids=["buffered"], indirect=True)
def test_buffered_provider_clears_a_bit_only_after_the_data_is_synced(
        mapw: MapWriter, monkeypatch: pytest.MonkeyPatch) -> None:
    # 'direct off': a completed write may sit in the page cache, so extent 0's bit may leave
    # the disk only in an image taken before an fdatasync() of the provider that succeeded.
    p = mapw.primary
    events: list[tuple] = []
    real_flush, real_store = hast.primary._io.flush, mapw._store
    failing = threading.Event()
    failing.set()

    def record(event: tuple) -> None:
        with p.cond:
            events.append(event)
            p.cond.notify_all()

    def flush(fd: int) -> None:
        record(("sync", failing.is_set()))
        if failing.is_set():
            raise OSError(5, "Input/output error")
        real_flush(fd)

    def store(image: bytes) -> None:
        real_store(image)
        record(("store", _bit(image, 0)))

    monkeypatch.setattr(hast.primary._io, "flush", flush)
    monkeypatch.setattr(hast.primary, "CLEAR_INTERVAL", 0.05)
    mapw._store = store  # type: ignore[method-assign]

    h0 = _write(0)
    _start(mapw, h0)
    p.wait_dispatched(h0)
    mapw.write_complete(h0.offset, h0.length)
    h1 = _write(1)                                 # evicts extent 0 (keepdirty 1)
    _start(mapw, h1)
    p.wait_dispatched(h1)
    # h1 waited on the map: that store kept extent 0's bit; then the syncs fail: kept still.
    with p.cond:
        assert p.cond.wait_for(lambda: events.count(("sync", True)) >= 2, 30)
    assert ("store", 0) not in events
    assert _bit(p.disk_image(mapw.size), 0) == 1
    failing.clear()                                # the disk recovers
    with p.cond:
        assert p.cond.wait_for(lambda: ("store", 0) in events, 30), events
    first_clear = events.index(("store", 0))
    assert ("sync", False) in events[:first_clear]
    assert _bit(p.disk_image(mapw.size), 0) == 0
    assert _bit(p.disk_image(mapw.size), 1) == 1   # h1 never completed


@pytest.mark.parametrize("mapw", [False], ids=["buffered"], indirect=True)
def test_buffered_provider_stores_bits_while_the_data_sync_runs(
        mapw: MapWriter, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fdatasync() that lets bits go may take long (all the dirty pages): writes waiting
    # for their bits on disk must not wait for it.
    p = mapw.primary
    entered, release = threading.Event(), threading.Event()

    def slow_flush(fd: int) -> None:
        entered.set()
        assert release.wait(30)

    monkeypatch.setattr(hast.primary._io, "flush", slow_flush)
    monkeypatch.setattr(hast.primary, "CLEAR_INTERVAL", 0.01)
    for ext in (0, 1):                             # extent 1 evicts extent 0: a clear waits
        h = _write(ext)
        _start(mapw, h)
        p.wait_dispatched(h)
        mapw.write_complete(h.offset, h.length)
    assert entered.wait(30)                        # the syncer is in its fdatasync()
    try:
        for ext in range(2, 6):
            h = _write(ext)
            _start(mapw, h)
            p.wait_dispatched(h)
            assert _bit(p.disk_image(mapw.size), ext) == 1
            mapw.write_complete(h.offset, h.length)
        image = p.disk_image(mapw.size)
        assert [_bit(image, ext) for ext in range(6)] == [1] * 6   # nothing cleared yet
    finally:
        release.set()
    # Then the syncer's next rounds let every extent but the one kept dirty go.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        image = p.disk_image(mapw.size)
        if [_bit(image, ext) for ext in range(6)] == [0, 0, 0, 0, 0, 1]:
            break
        time.sleep(0.01)
    assert [_bit(image, ext) for ext in range(6)] == [0, 0, 0, 0, 0, 1]
