"""The activemap: Cython implementation against its pure-Python twin and against the spec.

Three layers: (a) hypothesis drives both implementations with the same random operation
sequences and requires identical answers and state at every step; (b) concrete cases from
hast-internals.md §1.3/§2 and the FreeBSD metadata vectors, run on (c) both
implementations; (d) the selector in hast.activemap honours HAST_PURE_PYTHON.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from hast import _bitmap
from hast.activemap import PyActiveMap, py_calc_ondisk_size
from tests.vectors import METADATA

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

IMPLS = [pytest.param((_bitmap.ActiveMap, _bitmap.calc_ondisk_size), id="cython"),
         pytest.param((PyActiveMap, py_calc_ondisk_size), id="python")]


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    return request.param


@pytest.fixture
def AM(impl: tuple[Any, Any]) -> Any:  # noqa: N802 - it is a class
    return impl[0]


@pytest.fixture
def calc(impl: tuple[Any, Any]) -> Any:
    return impl[1]


def _outcome(fn: Any, *args: Any) -> Any:
    """Return value, or the exception type: both implementations must fail alike."""
    try:
        return fn(*args)
    except (ValueError, OverflowError) as exc:
        return type(exc)


def _bits(data: bytes, nbits: int) -> list[int]:
    return [n for n in range(nbits) if data[n >> 3] >> (n & 7) & 1]


# ---- (a) differential: Cython vs pure Python -------------------------------------------------

class TwinMachine(RuleBasedStateMachine):
    """Every rule is applied to both maps; answers and visible state must agree."""

    def __init__(self) -> None:
        super().__init__()
        self.inflight: list[tuple[int, int]] = []
        self.finished: list[int] = []

    @initialize(shift=st.integers(9, 16), nextents=st.integers(1, 150),
                tail=st.integers(0, 65535), sectorsize=st.sampled_from([1, 8, 512, 4096]),
                keepdirty=st.integers(1, 6),
                maxphys=st.sampled_from([512, 3000, 4096, 16384, 65536, MiB]))
    def setup(self, shift: int, nextents: int, tail: int, sectorsize: int, keepdirty: int,
              maxphys: int) -> None:
        self.extentsize = 1 << shift
        # Last extent anywhere from 1 byte to full.
        self.mediasize = (nextents - 1) * self.extentsize + tail % self.extentsize + 1
        args = (self.mediasize, self.extentsize, sectorsize, keepdirty, maxphys)
        self.c = _bitmap.ActiveMap(*args)
        self.p = PyActiveMap(*args)
        assert self.c.nextents == self.p.nextents == nextents

    def both(self, name: str, *args: Any) -> Any:
        rc = _outcome(getattr(self.c, name), *args)
        rp = _outcome(getattr(self.p, name), *args)
        assert rc == rp, (name, args, rc, rp)
        return rc

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        off = data.draw(st.integers(0, self.mediasize - 1), label="off")
        length = data.draw(st.integers(1, min(self.mediasize - off, 4 * self.extentsize)),
                           label="length")
        return off, length

    def _map(self, data: st.DataObject) -> bytes:
        size = self.c.size() + data.draw(st.sampled_from([0, 0, 8, 512]), label="extra")
        density = data.draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]), label="density")
        rnd = random.Random(data.draw(st.integers(0, 2**32), label="seed"))
        return bytes(sum(1 << b for b in range(8) if rnd.random() < density)
                     for _ in range(size))

    @rule(data=st.data())
    def write_start(self, data: st.DataObject) -> None:
        off, length = self._range(data)
        if self.both("write_start", off, length) is not OverflowError:
            self.inflight.append((off, length))

    @precondition(lambda self: self.inflight)
    @rule(data=st.data())
    def write_complete(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.inflight) - 1), label="which")
        self.both("write_complete", *self.inflight.pop(i))

    @rule(data=st.data())
    def need_sync(self, data: st.DataObject) -> None:
        self.both("need_sync", *self._range(data))

    @rule(data=st.data())
    def merge(self, data: st.DataObject) -> None:
        self.both("merge", self._map(data))

    @rule(data=st.data())
    def copyin(self, data: st.DataObject) -> None:
        self.both("copyin", self._map(data))

    @rule()
    def sync_offset(self) -> None:
        off, length, ext = self.both("sync_offset")
        if ext >= 0:
            self.finished.append(ext)

    @precondition(lambda self: self.finished)
    @rule()
    def extent_complete(self) -> None:
        self.both("extent_complete", self.finished.pop(0))

    @rule()
    def sync_drain(self) -> None:
        """The sync thread's loop: chunks until nothing is left, completing each extent."""
        for _ in range(self.c.nextents * (self.mediasize // 512 + 2) + 2):
            off, length, ext = self.both("sync_offset")
            if ext >= 0:
                self.both("extent_complete", ext)
            if off < 0:
                break
        else:
            raise AssertionError("sync_offset never drained")

    @rule()
    def sync_rewind(self) -> None:
        self.both("sync_rewind")

    @rule()
    def bitmap(self) -> None:
        image = self.both("bitmap")
        assert len(image) == self.c.ondisk_size()

    @rule(data=st.data())
    def bad_call(self, data: st.DataObject) -> None:
        """Out-of-range or unbalanced calls fail the same way and change nothing."""
        name = data.draw(st.sampled_from(
            ["write_start", "write_complete", "need_sync", "extent_complete", "next_dirty",
             "pending"]), label="name")
        a = data.draw(st.integers(-2, self.mediasize + 2), label="a")
        if name in ("extent_complete", "next_dirty", "pending"):
            self.both(name, a // self.extentsize if a > 0 else a)
            return
        b = data.draw(st.integers(-1, 2 * self.extentsize), label="b")
        if name == "write_start":
            rc = self.both(name, a, b)
            if rc in (True, False):
                self.inflight.append((a, b))
        else:
            self.both(name, a, b)

    @invariant()
    def same_state(self) -> None:
        if not hasattr(self, "c"):
            return
        # differ() before anything that could refresh diskmap; dump() shows diskmap.
        assert self.c.differ() == self.p.differ()
        assert self.c.ndirty() == self.p.ndirty()
        assert self.c.memmap() == self.p.memmap()
        assert self.c.syncmap() == self.p.syncmap()
        assert self.c.dump() == self.p.dump()
        n = self.c.nextents
        pend = [self.c.pending(e) for e in range(n)]
        assert pend == [self.p.pending(e) for e in range(n)]
        # memmap bit <=> counter > 0, ndirty = number of bits (padding bits excluded).
        dirty = _bits(self.c.memmap(), n)
        assert dirty == [e for e in range(n) if pend[e] > 0]
        assert self.c.ndirty() == len(dirty)
        for start in {0, 1, n // 2, n - 1, n}:
            nxt = self.c.next_dirty(start)
            assert nxt == self.p.next_dirty(start)
            assert nxt == next((e for e in dirty if e >= start), -1)


TwinMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
test_twin_state_machine = TwinMachine.TestCase


@given(st.integers(-5, 2**50), st.integers(-3, 2**31), st.integers(-3, 2**16))
@settings(max_examples=300, deadline=None)
def test_calc_ondisk_size_twins_agree(mediasize: int, extentsize: int, sectorsize: int) -> None:
    assert (_outcome(_bitmap.calc_ondisk_size, mediasize, extentsize, sectorsize)
            == _outcome(py_calc_ondisk_size, mediasize, extentsize, sectorsize))


def test_lru_and_hash_under_churn() -> None:
    """Thousands of LRU touches/evictions with hash collisions: identical answers."""
    rnd = random.Random(1234)
    args = (10_000 * 4096, 4096, 512, 37, 8192)
    c, p = _bitmap.ActiveMap(*args), PyActiveMap(*args)
    inflight: list[tuple[int, int]] = []
    hot = [rnd.randrange(10_000) for _ in range(50)]
    for _ in range(30_000):
        if inflight and rnd.random() < 0.48:
            io = inflight.pop(rnd.randrange(len(inflight)))
            assert c.write_complete(*io) == p.write_complete(*io)
        else:
            ext = rnd.choice(hot) if rnd.random() < 0.7 else rnd.randrange(10_000)
            io = (ext * 4096 + rnd.randrange(8) * 512, rnd.choice([512, 4096, 8192]))
            if io[0] + io[1] > args[0]:
                continue
            assert c.write_start(*io) == p.write_start(*io)
            inflight.append(io)
        if rnd.random() < 0.01:
            assert c.bitmap() == p.bitmap()
    assert c.bitmap() == p.bitmap()
    assert c.ndirty() == p.ndirty()


# ---- (b)+(c) concrete cases from the spec, on both implementations ------------------------------

# hast-internals.md §1.3 worked examples: (mediasize, extent, sector, nextents, mapsize,
# datasize, localoff); the map covers mediasize - 4096.
WORKED = [
    (10 * GiB, 2 * MiB, 512, 5120, 1024, 10_737_413_120, 5120),
    (1 * GiB, 2 * MiB, 512, 512, 512, 1_073_737_216, 4608),
    (4_000_787_030_016, 2 * MiB, 4096, 1_907_724, 241_664, 4_000_786_784_256, 245_760),
    (1 * MiB, 64 * KiB, 512, 16, 512, 1_043_968, 4608),
]


@pytest.mark.parametrize("mediasize,extent,sector,nextents,mapsize,datasize,localoff", WORKED)
def test_create_worked_examples(AM: Any, calc: Any, mediasize: int, extent: int, sector: int,
                                nextents: int, mapsize: int, datasize: int,
                                localoff: int) -> None:
    assert calc(mediasize - 4096, extent, sector) == mapsize
    assert mediasize - 4096 - mapsize == datasize
    assert 4096 + mapsize == localoff
    m = AM(mediasize - 4096, extent, sector, 64)
    assert m.nextents == nextents
    assert m.ondisk_size() == mapsize
    assert m.size() == (nextents + 63) // 64 * 8


# README table of /work/shared/vectors/freebsd-hastd: (case, mediasize, extentsize, datasize,
# localoff); activemap bytes = localoff - 4096.
VECTOR_CASES = [
    ("default", 256 * MiB, 2 * MiB, 268_430_848, 4608),
    ("e4096", 256 * MiB, 4096, 268_423_168, 12_288),
    ("e512", 256 * MiB, 512, 268_365_824, 69_632),
    ("e65536", 256 * MiB, 65536, 268_430_848, 4608),
    ("e65536_k128_m192M", 192 * MiB, 65536, 201_321_984, 4608),
    ("k128", 256 * MiB, 2 * MiB, 268_430_848, 4608),
    ("m100000000", 100_000_000, 2 * MiB, 99_995_392, 4608),
    ("m128M", 128 * MiB, 2 * MiB, 134_213_120, 4608),
]


@pytest.mark.parametrize("case,mediasize,extent,datasize,localoff", VECTOR_CASES,
                         ids=[c[0] for c in VECTOR_CASES])
def test_vector_mapsizes(AM: Any, calc: Any, case: str, mediasize: int, extent: int,
                         datasize: int, localoff: int) -> None:
    mapsize = calc(mediasize - 4096, extent, 512)
    assert mapsize == localoff - 4096
    assert mediasize - 4096 - mapsize == datasize
    # At run time the primary sizes its map from datasize: same on-disk size.
    m = AM(datasize, extent, 512, 64)
    assert m.ondisk_size() == mapsize
    decoded = METADATA / f"{case}.decoded.json"
    if decoded.exists():
        meta = json.loads(decoded.read_text())
        assert meta["activemap_bytes"] == mapsize
        image = (METADATA / f"{case}.img-first1MiB.bin").read_bytes()
        m.copyin(image[4096:4096 + mapsize])
        assert m.ndirty() == 0 and m.sync_offset() == (-1, 0, -1)


def test_vector_e512_and_e4096_values(calc: Any) -> None:
    assert calc(256 * MiB - 4096, 512, 512) == 65536
    assert calc(256 * MiB - 4096, 4096, 512) == 8192


@pytest.mark.parametrize("extent", [0, -4096, 3000, 3 * MiB, 2 * MiB + 512])
def test_non_power_of_two_extent_rejected(AM: Any, calc: Any, extent: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        calc(GiB, extent, 512)
    with pytest.raises(ValueError, match="power of two"):
        AM(GiB, extent, 512, 64)


def test_bad_geometry_rejected(AM: Any, calc: Any) -> None:
    with pytest.raises(ValueError, match="sector size"):
        calc(GiB, 2 * MiB, 520)
    with pytest.raises(ValueError, match="media size"):
        calc(0, 2 * MiB, 512)
    with pytest.raises(ValueError, match="keepdirty"):
        AM(GiB, 2 * MiB, 512, 0)
    with pytest.raises(ValueError, match="maxphys"):
        AM(GiB, 2 * MiB, 512, 64, 0)


def test_bit_layout_lsb_first(AM: Any) -> None:
    m = AM(200 * 4096, 4096, 512, 64)
    for ext in (0, 9, 63, 64, 199):
        m.write_start(ext * 4096, 512)
    image = m.bitmap()
    assert len(image) == 512 and m.size() == 32
    assert image[0] == 0x01            # extent 0: byte 0, mask 1 << 0
    assert image[1] == 0x02            # extent 9: byte 1, mask 1 << 1
    assert image[7] == 0x80            # extent 63: byte 7, mask 1 << 7
    assert image[8] == 0x01            # extent 64
    assert image[24] == 0x80           # extent 199: byte 24, mask 1 << 7
    assert sum(1 for b in image if b) == 5
    assert m.dump().splitlines()[0] == "M: " + "".join(
        "1" if e in (0, 9, 63, 64, 199) else "0" for e in range(200))


def test_write_start_complete_flush_rules(AM: Any) -> None:
    m = AM(16 * MiB, MiB, 512, 64)
    assert m.write_start(0, 4096) is True          # new in LRU: flush before the write
    assert m.write_start(4096, 4096) is False      # same hot extent: no flush
    assert m.pending(0) == 2 and m.ndirty() == 1
    assert m.write_complete(0, 4096) is False
    assert m.write_complete(4096, 4096) is False   # clean again but kept dirty by the LRU
    assert m.ndirty() == 0 and m.next_dirty(0) == -1
    assert m.bitmap()[0] == 0x01                   # still set on disk
    # A write spanning extents 1..3 touches each.
    assert m.write_start(MiB - 512, 2 * MiB + 1024) is True
    assert [m.pending(e) for e in range(5)] == [1, 1, 1, 1, 0]
    assert m.write_complete(MiB - 512, 2 * MiB + 1024) is False


def test_keepdirty_eviction(AM: Any) -> None:
    m = AM(16 * MiB, MiB, 512, 2)
    assert m.write_start(0, 512) is True            # LRU: [0]
    assert m.write_start(MiB, 512) is True          # LRU: [1, 0]
    assert m.write_start(0, 512) is False           # hot re-touch: [0, 1]
    assert m.write_start(2 * MiB, 512) is True      # evicts 1: [2, 0]
    assert m.write_complete(MiB, 512) is True       # 1 is clean and not kept: flush
    assert m.write_complete(0, 512) is False        # 0 still kept dirty
    assert m.write_complete(0, 512) is False
    assert m.write_complete(2 * MiB, 512) is False
    assert _bits(m.bitmap(), 16) == [0, 2]
    assert m.ndirty() == 0


def test_keepdirty_one_just_works(AM: Any) -> None:
    # FreeBSD asserts on this path; we keep exactly one extent.
    m = AM(16 * MiB, MiB, 512, 1)
    assert m.write_start(0, 512) is True
    assert m.write_complete(0, 512) is False
    assert m.write_start(0, 512) is False
    assert m.write_complete(0, 512) is False
    assert m.write_start(MiB, 512) is True          # evicts 0
    assert m.write_complete(MiB, 512) is False
    assert _bits(m.bitmap(), 16) == [1]
    assert m.write_start(0, 512) is True


def test_differ(AM: Any) -> None:
    m = AM(16 * MiB, MiB, 512, 4)
    assert m.differ() is False
    m.write_start(0, 512)
    assert m.differ() is True
    m.bitmap()
    assert m.differ() is False
    m.write_complete(0, 512)
    assert m.differ() is True       # diskmap still holds the LRU bit, memmap is clean


def test_sync_offset_chunks_by_maxphys_and_partial_last_extent(AM: Any) -> None:
    m = AM(10 * MiB, 4 * MiB, 512, 64, MiB)   # extents 0, 1 and a 2 MiB tail extent 2
    assert m.sync_offset() == (-1, 0, -1)     # nothing to do
    assert m.need_sync(100, 1) is True
    assert m.need_sync(9 * MiB, 512) is True
    assert m.need_sync(9 * MiB + 512, 512) is False     # already marked
    assert [m.pending(e) for e in range(3)] == [4, 0, 2]
    assert m.ndirty() == 2
    assert m.sync_offset() == (-1, 0, -1)     # need_sync does not rewind
    m.sync_rewind()
    steps = []
    while True:
        step = m.sync_offset()
        steps.append(step)
        if step[0] < 0:
            break
    assert steps == [(0, MiB, -1), (MiB, MiB, -1), (2 * MiB, MiB, -1), (3 * MiB, MiB, -1),
                     (8 * MiB, MiB, 0), (9 * MiB, MiB, -1), (-1, 0, 2)]
    assert m.extent_complete(0) is True
    assert m.extent_complete(2) is True
    assert m.ndirty() == 0 and m.next_dirty(0) == -1


def test_sync_offset_maxphys_not_dividing_extent(AM: Any) -> None:
    m = AM(256 * KiB, 64 * KiB, 512, 64, 24 * KiB)
    m.need_sync(64 * KiB, 1)
    assert m.pending(1) == 3
    m.sync_rewind()
    assert m.sync_offset() == (64 * KiB, 24 * KiB, -1)
    assert m.sync_offset() == (88 * KiB, 24 * KiB, -1)
    assert m.sync_offset() == (112 * KiB, 16 * KiB, -1)
    assert m.sync_offset() == (-1, 0, 1)
    assert m.sync_offset() == (-1, 0, -1)


def test_sync_picks_lower_extent_after_current(AM: Any) -> None:
    m = AM(8 * MiB, MiB, 512, 64, 512 * KiB)
    m.need_sync(5 * MiB, 1)
    m.sync_rewind()
    assert m.sync_offset() == (5 * MiB, 512 * KiB, -1)
    m.need_sync(MiB, 1)                    # lower extent marked mid-pass
    assert m.sync_offset() == (5 * MiB + 512 * KiB, 512 * KiB, -1)
    assert m.sync_offset() == (MiB, 512 * KiB, 5)
    assert m.sync_offset() == (MiB + 512 * KiB, 512 * KiB, -1)
    assert m.sync_offset() == (-1, 0, 1)


def test_extent_complete_with_write_in_flight(AM: Any) -> None:
    m = AM(8 * MiB, MiB, 512, 64)
    m.write_start(0, 512)
    m.need_sync(0, 512)
    assert m.pending(0) == 2
    assert m.extent_complete(0) is False   # the write still holds the extent dirty
    assert m.write_complete(0, 512) is False
    assert m.ndirty() == 0


def test_copyin(AM: Any) -> None:
    m = AM(100 * MiB, MiB, 512, 64, 256 * KiB)   # 100 extents: bits 100..127 are padding
    buf = bytearray(512)
    buf[0] = 0b1000_0001        # extents 0 and 7
    buf[12] = 0xF0              # extents 100..103: padding, copied but ignored
    m.copyin(bytes(buf))
    assert m.ndirty() == 2
    assert m.pending(0) == m.pending(7) == 4 and m.pending(1) == 0
    assert m.next_dirty(0) == 0 and m.next_dirty(1) == 7 and m.next_dirty(8) == -1
    assert m.bitmap()[:16] == bytes(buf[:16])
    assert m.differ() is False
    assert m.sync_offset() == (0, 256 * KiB, -1)     # rewound
    with pytest.raises(ValueError):
        m.copyin(bytes(m.size() - 1))


def test_merge(AM: Any) -> None:
    m = AM(8 * MiB, MiB, 512, 64, 512 * KiB)
    m.write_start(3 * MiB, 512)
    m.need_sync(5 * MiB, 1)
    m.sync_rewind()
    assert m.sync_offset() == (5 * MiB, 512 * KiB, -1)
    m.merge(bytes(8))                                  # nothing set: not even a rewind
    assert m.sync_offset() == (5 * MiB + 512 * KiB, 512 * KiB, -1)
    m.merge(bytes([0b0010_0000]) + bytes(7))           # only extent 5, already marked
    assert m.sync_offset() == (5 * MiB, 512 * KiB, -1)     # ...but rewound
    m.merge(bytes([0b0000_1010]) + bytes(511))         # extents 1 and 3
    assert m.ndirty() == 3                             # 3 was already dirty (the write)
    assert m.pending(1) == 2 and m.pending(3) == 2     # overwritten, not added (quirk)
    assert m.differ() is True          # merge set 1 and 3 on disk, need_sync's 5 is not
    m.bitmap()
    assert m.differ() is False
    assert _bits(m.syncmap(), 8) == [1, 3, 5]
    with pytest.raises(ValueError):
        m.merge(bytes(4))


def test_errors_leave_state_unchanged(AM: Any) -> None:
    m = AM(8 * MiB, MiB, 512, 64)
    m.write_start(0, 512)
    before = (m.memmap(), m.ndirty(), m.pending(0), m.pending(1))
    with pytest.raises(ValueError):
        m.write_complete(MiB - 512, 1024)      # extent 1 has no write in flight
    with pytest.raises(ValueError):
        m.write_start(8 * MiB - 512, 1024)     # past the end
    with pytest.raises(ValueError):
        m.write_start(0, 0)
    with pytest.raises(ValueError):
        m.extent_complete(2)                   # not being synchronised
    with pytest.raises(ValueError):
        m.extent_complete(8)
    assert (m.memmap(), m.ndirty(), m.pending(0), m.pending(1)) == before


def test_counter_overflow(AM: Any) -> None:
    m = AM(MiB, MiB, 512, 64)
    m.need_sync(0, 1)                          # 1 reservation
    for _ in range(0xFFFF - 1):
        m.write_start(0, 512)
    with pytest.raises(OverflowError):
        m.write_start(0, 512)
    assert m.pending(0) == 0xFFFF


def test_next_dirty_large_map(AM: Any) -> None:
    # 64 TiB at 2 MiB extents: 32 Mi extents, a 4 MiB bitmap (the GIL-free scan path).
    m = AM(64 << 40, 2 * MiB, 4096, 64)
    n = m.nextents
    assert n == 32 << 20 and m.size() == 4 * MiB
    assert m.next_dirty(0) == -1
    for ext in (n - 1, n - 64, n - 65, 12345):
        m.write_start(ext * 2 * MiB, 4096)
    assert m.next_dirty(0) == 12345
    assert m.next_dirty(12346) == n - 65
    assert m.next_dirty(n - 64) == n - 64
    assert m.next_dirty(n - 63) == n - 1
    assert m.next_dirty(n) == -1
    assert m.next_dirty(10 * n) == -1
    with pytest.raises(ValueError):
        m.next_dirty(-1)


# ---- (d) the selector --------------------------------------------------------------------------

@pytest.mark.parametrize("pure,expected", [(True, "python"), (False, "cython")])
def test_selector(pure: bool, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HAST_PURE_PYTHON"}
    if pure:
        env["HAST_PURE_PYTHON"] = "1"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    code = ("import hast.activemap as a; "
            "print(a.IMPLEMENTATION, a.ActiveMap.__name__, a.calc_ondisk_size(2**30, 2**21, 512))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == [expected, "PyActiveMap" if pure else "ActiveMap", "512"]


def test_accessors_and_partial_last_extent(AM: Any) -> None:
    m = AM(5 * MiB + 512, MiB, 4096, 8, 256 * KiB)
    assert (m.nextents, m.extent_size(), m.size(), m.ondisk_size()) == (6, MiB, 8, 4096)
    assert (m.mediasize, m.keepdirty, m.maxphys) == (5 * MiB + 512, 8, 256 * KiB)
    m.need_sync(5 * MiB, 512)                   # last extent: 512 bytes, 1 request
    m.need_sync(0, 1)                           # full extent: 4 requests
    assert (m.pending(0), m.pending(5)) == (4, 1)
    m.sync_rewind()
    offs = [m.sync_offset() for _ in range(6)]
    assert offs[4] == (5 * MiB, 512, 0) and offs[5] == (-1, 0, 5)
    assert len(AM(MiB, 4096, 1, 8).bitmap()) == 32     # 256 extents, sector smaller than 8


def test_concurrent_callers_cython() -> None:
    """Several threads writing while another scans (GIL released): consistent at the end."""
    import threading

    m = _bitmap.ActiveMap(64 << 40, 2 * MiB, 4096, 64)
    n = m.nextents
    m.need_sync((n - 1) * 2 * MiB, 1)
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(20_000):
                off = rnd.randrange(1000) * 2 * MiB + 4096 * rnd.randrange(512)
                m.write_start(off, 4096)
                m.write_complete(off, 4096)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def scanner() -> None:
        for _ in range(200):
            if m.next_dirty(1000) != n - 1:
                errors.append(AssertionError("scan lost the last extent"))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=scanner))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert m.ndirty() == 1 and m.next_dirty(0) == n - 1
    assert all(m.pending(e) == 0 for e in range(1000))
