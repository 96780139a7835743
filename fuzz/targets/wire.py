"""wire: ``hast._wire``, the C fast path for request and reply frames (hast-internals.md §7).

Both workers parse every request (secondary) and every reply (primary) with
``parse_frame`` first and fall back to hast.nv only for shapes it does not handle, so this
Cython code with raw pointers sees every byte a peer sends on the data path.  Input layout:
one byte of options (bit 0: parse as a request, else as a reply; the next bits choose where
the frame starts and ends inside the buffer), then the buffer.

Checked, differentially against the spec's walk (:func:`fuzz.reference.nv_records`):

* INCOMPLETE exactly when fewer than 5 bytes, or fewer than 5 + the announced nv size, are
  there; nothing but ValueError (bad bounds, which the options never produce) escapes;
* FAST only for a blob the spec accepts, made only of the records it handles (request: cmd,
  seq, offset, length, memsync, size; reply: seq, error, received, size), each once and with
  hastd's type -- and every value in the tuple is the record's value;
* FALLBACK otherwise (the caller then decodes with hast.nv: target "frame");
* ``encode_request``/``encode_reply`` of the values parsed produce what hast.nv packs.
When hast._wire is not built (it is new), the target does nothing.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from fuzz import reference
from fuzz.common import Finding, Input, frame, load_seeds, nv_record
from fuzz.strategies import from_seeds, interesting_int

try:
    from hast import _wire
except ImportError:  # not built in this tree yet
    _wire = None

EXPECTED: tuple[type[BaseException], ...] = ()
MAX_LEN = 4096
F_CMD, F_SEQ, F_OFFSET, F_LENGTH, F_MEMSYNC, F_SIZE, F_ERROR, F_RECEIVED = (
    1, 2, 4, 8, 16, 32, 64, 128)
# name -> (bit, nv type, index in the FAST tuple or None)
_REQUEST = {b"cmd": (F_CMD, 2, 4), b"seq": (F_SEQ, 8, 5), b"offset": (F_OFFSET, 8, 6),
            b"length": (F_LENGTH, 8, 7), b"memsync": (F_MEMSYNC, 2, None),
            b"size": (F_SIZE, 6, 8)}
_REPLY = {b"seq": (F_SEQ, 8, 5), b"error": (F_ERROR, 3, 9), b"received": (F_RECEIVED, 1, None),
          b"size": (F_SIZE, 6, 8)}


def fast_matches(parsed: tuple, records: list[reference.Record], request: bool) -> bool:
    """Does a FAST tuple say what the records say?"""
    fields = _REQUEST if request else _REPLY
    found = 0
    for rec in records:
        spec = fields.get(rec.name)
        if spec is None or rec.type != spec[1] or found & spec[0]:
            return False
        found |= spec[0]
        if spec[2] is not None and parsed[spec[2]] != rec.value():
            return False
    return parsed[3] == found


def seeds() -> list[bytes]:
    return load_seeds("wire")


@st.composite
def _structured(draw: st.DrawFn) -> bytes:
    request = draw(st.booleans())
    fields = _REQUEST if request else _REPLY
    blob = b""
    for _ in range(draw(st.integers(0, 7))):
        name = draw(st.sampled_from(list(fields)))
        nvtype = fields[name][1] if draw(st.integers(0, 5)) else draw(st.integers(0, 18))
        size = {1: 1, 2: 1, 3: 2, 6: 4, 8: 8}.get(nvtype, draw(st.integers(1, 9)))
        blob += nv_record(nvtype, name, draw(interesting_int(min(size, 8)))
                          .to_bytes(min(size, 8), "little").ljust(size, b"\0"))
    raw = frame(blob, version=draw(st.integers(0, 3)))
    cut = draw(st.integers(0, 3))
    raw = raw[:len(raw) - cut] if draw(st.booleans()) else raw + b"\0" * cut
    return bytes([int(request) | draw(st.integers(0, 127)) << 1]) + raw


def strategy() -> st.SearchStrategy[bytes]:
    return from_seeds(seeds(), MAX_LEN, _structured())


def one_input(data: bytes) -> None:
    if _wire is None:
        return
    inp = Input(data)
    opts = inp.byte()
    request = bool(opts & 1)
    buf = inp.rest()
    # The frame may sit anywhere in the caller's read-ahead buffer.
    start = min((opts >> 1) & 7, len(buf))
    end = len(buf) - min((opts >> 4) & 7, len(buf) - start)
    parsed = _wire.parse_frame(buf, start, end, request)
    have = end - start
    if have < 5:
        if parsed[0] != _wire.INCOMPLETE:
            raise Finding(f"parse_frame: {parsed!r} from a {have}-byte header")
        return
    version, nvsize = struct.unpack_from("<BI", buf, start)
    if have - 5 < nvsize:
        if parsed[:3] != (_wire.INCOMPLETE, version, nvsize):
            raise Finding(f"parse_frame: {parsed[:3]!r} for a truncated frame "
                          f"(v{version}, nv {nvsize}, {have - 5} there)")
        return
    if parsed[1:3] != (version, nvsize):
        raise Finding(f"parse_frame: header {parsed[1:3]!r}, the bytes say "
                      f"{(version, nvsize)!r}")
    blob = buf[start + 5:start + 5 + nvsize]
    try:
        records: list[reference.Record] | None = reference.nv_records(blob)
    except reference.Reject:
        records = None
    if parsed[0] == _wire.FAST:
        if records is None:
            raise Finding(f"parse_frame: FAST for a blob the spec rejects: {blob!r}")
        if not fast_matches(parsed, records, request):
            raise Finding(f"parse_frame: FAST {parsed!r} disagrees with the records "
                          f"{records!r}")
        _check_encoders(parsed, blob, request, version)
    elif parsed[0] != _wire.FALLBACK:
        raise Finding(f"parse_frame: status {parsed[0]!r} for a complete frame")


def _check_encoders(parsed: tuple, blob: bytes, request: bool, version: int) -> None:
    """Re-encoding what was parsed gives what hast.nv packs for the same fields."""
    from hast import nv

    _s, _v, _n, found, cmd, seq, offset, length, size, error = parsed
    msg = nv.NV()
    if request:
        if found & (F_CMD | F_SEQ | F_OFFSET | F_LENGTH) != (F_CMD | F_SEQ | F_OFFSET |
                                                             F_LENGTH):
            return
        msg.add_uint8("cmd", cmd).add_uint64("seq", seq).add_uint64("offset", offset)
        msg.add_uint64("length", length)
        if found & F_MEMSYNC:
            msg.add_uint8("memsync", 1)
        if found & F_SIZE:
            msg.add_uint32("size", size)
        encoded = _wire.encode_request(version, cmd, seq, offset, length,
                                       bool(found & F_MEMSYNC), size if found & F_SIZE else -1)
    else:
        if not found & F_SEQ or bin(found & (F_ERROR | F_RECEIVED | F_SIZE)).count("1") > 1:
            return
        msg.add_uint64("seq", seq)
        if found & F_RECEIVED:
            msg.add_int8("received", 1)
        elif found & F_ERROR and error:
            msg.add_int16("error", error)
        elif found & F_SIZE:
            msg.add_uint32("size", size)
        encoded = _wire.encode_reply(version, seq, error if found & F_ERROR else 0,
                                     bool(found & F_RECEIVED), size if found & F_SIZE else -1)
    packed = msg.pack()
    if encoded != struct.pack("<BI", version, len(packed)) + packed:
        raise Finding(f"encode_{'request' if request else 'reply'} differs from hast.nv "
                      f"for {parsed!r}")
