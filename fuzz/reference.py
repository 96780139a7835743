"""Reference decoders written from the specification alone, used as fuzzing oracles.

Nothing here imports hast: each function re-derives from hast-internals.md what the real
parser must accept and produce, so a target can compare the two on every input (differential
fuzzing).  A disagreement is a finding in one of them; the spec section is named on each.

* :func:`nv_records` -- §3.2-§3.4: the receiver's walk and validation of an nv blob, with
  the byte offset of every record (targets patch fields in place with it).
* :func:`nv_lookup` -- §3.5: first record by name, exact type or nothing.
* :func:`lzf_decode` -- §5.6: the LZF stream, liblzf's error order (E2BIG/EINVAL).
* :func:`split_frames` -- §5.1: a byte stream cut into frames (header, nv, payload).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

HDR = struct.Struct("<BBI")
FRAME_HDR = struct.Struct("<BI")
STRING = 17
# code -> (struct element, exact size or None for arrays)
_SCALARS = {1: "b", 2: "B", 3: "h", 4: "H", 5: "i", 6: "I", 7: "q", 8: "Q"}


class Reject(Exception):
    """The reference rejects the input (the reason is for humans only)."""


@dataclass(frozen=True)
class Record:
    offset: int          # of the record's first byte in the blob
    type: int            # masked type code 1..17
    name: bytes          # without the NUL
    data: bytes          # dsize bytes, padding excluded
    data_offset: int     # of data[0] in the blob

    def value(self) -> object:
        """The decoded value, in the shape hast.nv returns it (bytes for 8-bit arrays)."""
        if self.type == STRING:
            return self.data[:-1]
        if self.type in _SCALARS:
            return struct.unpack("<" + _SCALARS[self.type], self.data)[0]
        if self.type in (9, 10):
            return self.data
        elem = _SCALARS[self.type - 8]
        return struct.unpack(f"<{len(self.data) // struct.calcsize(elem)}{elem}", self.data)


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def nv_records(blob: bytes) -> list[Record]:
    """§3.4: every record of a valid blob, or Reject."""
    out: list[Record] = []
    pos, size = 0, len(blob)
    while pos < size:
        if blob[pos] == 0:
            break                                   # trailing zeros end the data
        if size - pos < HDR.size + 2:
            raise Reject("short header")
        rawtype, namesize, dsize = HDR.unpack_from(blob, pos)
        if namesize < 2:                            # §3.2: namesize is 2..255
            raise Reject("namesize")
        namearea = _pad8(namesize)
        if size - pos < HDR.size + namearea:
            raise Reject("short name area")
        name = blob[pos + 6:pos + 6 + namesize]
        if name[-1] != 0 or 0 in name[:-1]:
            raise Reject("name not NUL-terminated")
        nvtype = rawtype & 0x7F
        if not 1 <= nvtype <= STRING or dsize == 0:
            raise Reject("type or dsize")
        reclen = HDR.size + namearea + _pad8(dsize)
        if size - pos < reclen:
            raise Reject("short record")
        start = pos + 6 + namearea
        data = blob[start:start + dsize]
        if nvtype in _SCALARS:
            if dsize != struct.calcsize(_SCALARS[nvtype]):
                raise Reject("scalar size")
        elif nvtype == STRING:
            if data[-1] != 0 or 0 in data[:-1]:
                raise Reject("string")
        elif nvtype > 10 and dsize % struct.calcsize(_SCALARS[nvtype - 8]):
            raise Reject("array size")
        out.append(Record(pos, nvtype, name[:-1], data, start))
        pos += reclen
    return out


def nv_lookup(records: list[Record], name: bytes, nvtype: int | None = None) -> Record | None:
    """§3.5: the first record with this name; None when absent or (with nvtype) mistyped."""
    for rec in records:
        if rec.name == name:
            return rec if nvtype is None or rec.type == nvtype else None
    return None


def nv_int(records: list[Record], name: bytes, nvtype: int) -> int:
    """An integer field with FreeBSD's semantics: absent or mistyped reads as 0."""
    rec = nv_lookup(records, name, nvtype)
    return int(rec.value()) if rec is not None else 0  # type: ignore[call-overload]


def lzf_decode(src: bytes, out_len: int) -> bytes | int:
    """§5.6 with liblzf's checks in liblzf's order: the output, or E2BIG / EINVAL."""
    out = bytearray()
    ip, n = 0, len(src)
    while ip < n:
        ctrl = src[ip]
        ip += 1
        if ctrl < 32:
            length = ctrl + 1
            if len(out) + length > out_len:
                return errno.E2BIG
            if ip + length > n:
                return errno.EINVAL
            out += src[ip:ip + length]
            ip += length
            continue
        length = ctrl >> 5
        if ip >= n:
            return errno.EINVAL
        if length == 7:
            length += src[ip]
            ip += 1
            if ip >= n:
                return errno.EINVAL
        dist = ((ctrl & 0x1F) << 8 | src[ip]) + 1
        ip += 1
        if len(out) + length + 2 > out_len:
            return errno.E2BIG
        ref = len(out) - dist
        if ref < 0:
            return errno.EINVAL
        length += 2
        if dist >= length:
            out += out[ref:ref + length]
        else:       # overlapping: the last ``dist`` bytes repeat
            out += (out[ref:] * (length // dist + 1))[:length]
    return bytes(out)


@dataclass(frozen=True)
class Frame:
    offset: int
    version: int
    blob: bytes
    records: list[Record] | None     # None: the blob is malformed
    payload: bytes                   # may be short when the stream ends early
    complete: bool                   # header, blob and payload all present

    @property
    def end(self) -> int:
        return self.offset + FRAME_HDR.size + len(self.blob) + len(self.payload)


def split_frames(stream: bytes, max_nv: int, max_payload: int) -> tuple[list[Frame], str]:
    """§5.1: frames up to the first one a receiver must drop the connection for.

    Returns (frames, why the walk stopped): "end" (the stream ended on a frame boundary),
    "truncated", "version", "nvsize", "nv" (malformed blob) or "payload" (size above
    max_payload).  The last frame of a non-"end" walk is the offending one when it exists.
    """
    frames: list[Frame] = []
    pos = 0
    while True:
        if pos == len(stream):
            return frames, "end"
        if len(stream) - pos < FRAME_HDR.size:
            return frames, "truncated"
        version, size = FRAME_HDR.unpack_from(stream, pos)
        if version > 2:
            return frames, "version"
        if size > max_nv:
            return frames, "nvsize"
        begin = pos + FRAME_HDR.size
        blob = stream[begin:begin + size]
        if len(blob) < size:
            return frames, "truncated"
        try:
            records: list[Record] | None = nv_records(blob)
        except Reject:
            frames.append(Frame(pos, version, blob, None, b"", False))
            return frames, "nv"
        assert records is not None
        psize = nv_int(records, b"size", 6)
        if psize > max_payload:
            frames.append(Frame(pos, version, blob, records, b"", False))
            return frames, "payload"
        payload = stream[begin + size:begin + size + psize]
        frame = Frame(pos, version, blob, records, payload, len(payload) == psize)
        frames.append(frame)
        if not frame.complete:
            return frames, "truncated"
        pos = frame.end
