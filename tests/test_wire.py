"""hast._wire builds and parses exactly what hast.nv does; hast._aio moves the bytes it says.

_wire is the per-request fast path of both workers, so its bytes must be hast.nv's (which the
FreeBSD vectors pin down) for every value, and whatever it does not handle must be left to
hast.nv rather than misread.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hast import _aio, _io, _wire, proto
from hast import nv as nvmod

U64 = st.integers(0, 2**64 - 1)


def frame(msg: nvmod.NV, version: int = 2) -> bytes:
    blob = msg.pack()
    return proto.HEADER.pack(version, len(blob)) + blob


def request_nv(cmd: int, seq: int, offset: int, length: int, memsync: bool,
               size: int) -> nvmod.NV:
    msg = nvmod.NV().add_uint8("cmd", cmd).add_uint64("seq", seq)
    msg.add_uint64("offset", offset).add_uint64("length", length)
    if memsync:
        msg.add_uint8("memsync", 1)
    if size >= 0:
        msg.add_uint32("size", size)
    return msg


@given(st.integers(0, 255), U64, U64, U64, st.booleans(), st.integers(-1, 2**32 - 1),
       st.integers(0, 255))
def test_requests_are_hast_nv_bytes_and_parse_back(cmd: int, seq: int, offset: int,
                                                   length: int, memsync: bool, size: int,
                                                   version: int) -> None:
    wire = _wire.encode_request(version, cmd, seq, offset, length, memsync, size)
    assert wire == frame(request_nv(cmd, seq, offset, length, memsync, size), version)
    r = _wire.parse_frame(wire, 0, len(wire), True)
    assert r[0] == _wire.FAST and r[1] == version and r[2] == len(wire) - 5
    assert r[4:8] == (cmd, seq, offset, length)
    assert bool(r[3] & 16) == memsync and (r[8] == size if size >= 0 else not r[3] & 32)


@given(U64, st.integers(-32768, 32767), st.booleans(), st.integers(-1, 2**32 - 1))
def test_replies_are_hast_nv_bytes_and_parse_back(seq: int, error: int, received: bool,
                                                  size: int) -> None:
    wire = _wire.encode_reply(2, seq, error, received, size)
    msg = nvmod.NV().add_uint64("seq", seq)
    if received:
        msg.add_int8("received", 1)
    elif error:
        msg.add_int16("error", error)
    elif size >= 0:
        msg.add_uint32("size", size)
    assert wire == frame(msg)
    r = _wire.parse_frame(wire, 0, len(wire), False)
    assert r[0] == _wire.FAST and r[5] == seq
    assert r[9] == (0 if received else error)
    assert bool(r[3] & 128) == received


def test_incomplete_frames_wait_for_more_bytes() -> None:
    wire = _wire.encode_request(2, 2, 7, 4096, 4096, False, 4096)
    for cut in range(len(wire)):
        r = _wire.parse_frame(wire, 0, cut, True)
        assert r[0] == _wire.INCOMPLETE
        assert r[2] == (-1 if cut < 5 else len(wire) - 5)
    padded = b"xx" + wire + b"yy"
    assert _wire.parse_frame(padded, 2, 2 + len(wire), True)[5] == 7
    with pytest.raises(ValueError):
        _wire.parse_frame(wire, 0, len(wire) + 1, True)


@pytest.mark.parametrize("msg", [
    nvmod.NV().add_uint8("cmd", 2).add_uint64("seq", 1).add_string("compression", "lzf"),
    nvmod.NV().add_uint8("cmd", 2).add_uint64("seq", 1).add_uint64("seq", 2),    # duplicate
    nvmod.NV().add_uint32("cmd", 2).add_uint64("seq", 1),                          # type
    nvmod.NV().add_uint8("cmd", 2).add_uint64("seq", 1).add_string("checksum", "crc32")
    .add_uint8_array("hash", b"1234"),
    nvmod.NV(),
])
def test_other_shapes_are_left_to_hast_nv(msg: nvmod.NV) -> None:
    wire = frame(msg)
    assert _wire.parse_frame(wire, 0, len(wire), True)[0] == _wire.FALLBACK


def test_malformed_blobs_fall_back_so_hast_nv_reports_them() -> None:
    good = _wire.encode_request(2, 2, 1, 0, 512)
    for pos in range(5, len(good)):
        bad = bytearray(good)
        bad[pos] ^= 0xFF
        r = _wire.parse_frame(bytes(bad), 0, len(bad), True)
        if r[0] == _wire.FAST:       # a value byte: the record is still well formed
            assert nvmod.NV.unpack(bytes(bad[5:])).get_uint8("cmd") == r[4]
        else:
            assert r[0] == _wire.FALLBACK


@pytest.mark.skipif(not _aio.AVAILABLE, reason="Linux native AIO only")
def test_aio_ring_writes_reads_and_refuses_misalignment(tmp_path: Path) -> None:
    path = tmp_path / "aio.img"
    path.write_bytes(bytes(1 << 20))
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError:
        pytest.skip("no O_DIRECT on this file system")
    ring = _aio.Ring(64)
    try:
        buf = _io.AlignedBuffer(64 * 1024)
        view = memoryview(buf)
        view[:] = os.urandom(len(view))
        ops = [(i, _aio.WRITE, fd, view[i * 4096:(i + 1) * 4096], 8192 * i) for i in range(16)]
        assert ring.submit_many(ops, 4096) == []
        assert ring.submit("odd", _aio.WRITE, fd, view[1:4097], 0, 512) is False
        assert ring.submit_many([("odd", _aio.WRITE, fd, view[:4096], 100)], 512) == ["odd"]
        done: dict = {}
        while len(done) < 16:
            done.update(ring.reap(1, 5.0))
        assert done == {i: 4096 for i in range(16)} and len(ring) == 0
        back = _io.AlignedBuffer(4096)
        assert ring.submit("r", _aio.READ, fd, back, 8192 * 5, 4096)
        assert ring.reap(1, 5.0) == [("r", 4096)]
        assert bytes(back) == bytes(view[5 * 4096:6 * 4096])
        with pytest.raises(OSError):
            ring.submit("e", _aio.READ, -1, back, 0)    # EBADF from io_submit
        assert len(ring) == 0
    finally:
        ring.close()
        os.close(fd)
    with pytest.raises(OSError):
        ring.reap(1, 0.0)


@pytest.mark.skipif(not _aio.AVAILABLE, reason="Linux native AIO only")
def test_aio_ring_wake_ends_a_waiting_reap() -> None:
    """Ring.wake() makes a reap() waiting with nothing in flight return, empty, without its
    timeout (an hour here: a wake that does nothing leaves the reaper waiting and the test
    fails) -- how a worker stops its reaper at once."""
    import threading

    ring = _aio.Ring(8)

    def reap_in_a_thread(wake_first: bool) -> list[list]:
        got: list[list] = []
        if wake_first:                              # pending: the reap() returns at once
            assert ring.wake() is True
        reaper = threading.Thread(target=lambda: got.append(ring.reap(1, 3600.0)),
                                  daemon=True)
        reaper.start()
        if not wake_first:                          # the reap() waits, or is about to
            assert ring.wake() is True
        reaper.join(60)
        assert not reaper.is_alive()
        return got

    try:
        assert reap_in_a_thread(False) == [[]]
        assert reap_in_a_thread(True) == [[]]
        assert len(ring) == 0
    finally:
        ring.close()
    assert ring.wake() is False
