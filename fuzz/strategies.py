"""Hypothesis strategies for the fuzz targets: seed mutation and structure-aware nv frames.

Plain ``st.binary()`` almost never gets past a length field or the nv validator, so the
default strategy of every target mixes three sources: random bytes, seeds from the target's
corpus put through libFuzzer-like byte mutations (bit flips, interesting integers, inserted
dictionary tokens, cut and duplicated ranges, splices of two seeds), and -- for targets that
read hast_proto frames -- frames built from well-formed nv records with field names and types
hastd uses, then mutated.  Everything is drawn from hypothesis, so a failing example shrinks.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from hypothesis import strategies as st

from fuzz.common import frame, nv_record

INTERESTING = (0, 1, 2, 3, 4, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x1FF, 0x200, 0x3FF, 0x400, 0x401,
               0xFFF, 0x1000, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0xFFFFF, 0x100000, 0x100001,
               0x1000000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x100000000, 2**63 - 1, 2**63,
               2**64 - 1)

# Field names, type names and magic words of every protocol the targets read.
TOKENS: tuple[bytes, ...] = tuple(t.encode() for t in (
    "cmd", "seq", "offset", "length", "size", "memsync", "received", "error", "compression",
    "checksum", "hash", "resource", "token", "version", "virgin", "resuid", "localcnt",
    "remotecnt", "datasize", "extentsize", "syncsrc", "errmsg", "mapsize", "wait", "role",
    "resource0", "resource1", "all", "status", "event", "hole", "lzf", "crc32", "sha256",
    "none", "test", "keepdirty", "prevrole", "primary", "secondary", "init",
))

# (name, nv type) pairs hastd reads, with the type it expects; other types are drawn too.
FIELDS: tuple[tuple[str, int], ...] = (
    ("cmd", 2), ("seq", 8), ("offset", 8), ("length", 8), ("size", 6), ("memsync", 2),
    ("received", 1), ("error", 3), ("compression", 17), ("checksum", 17), ("hash", 10),
    ("resource", 17), ("token", 10), ("version", 2), ("virgin", 1), ("resuid", 8),
    ("localcnt", 8), ("remotecnt", 8), ("datasize", 7), ("extentsize", 5), ("syncsrc", 2),
    ("errmsg", 17), ("mapsize", 6), ("wait", 2), ("role", 2), ("resource0", 17),
    ("resource1", 17),
)
_SIZES = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 8, 8: 8}


@st.composite
def interesting_int(draw: st.DrawFn, nbytes: int) -> int:
    value = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1)))
    return value & ((1 << (8 * nbytes)) - 1)


@st.composite
def nv_value(draw: st.DrawFn, nvtype: int) -> bytes:
    """The data bytes of one record of this type (mostly valid for the type)."""
    if nvtype in _SIZES:
        n = _SIZES[nvtype]
        return draw(interesting_int(n)).to_bytes(n, "little")
    if nvtype == 17:
        raw = draw(st.one_of(st.sampled_from(TOKENS), st.text(max_size=24).map(str.encode),
                             st.binary(max_size=24)))          # not always UTF-8
        return raw.replace(b"\0", b"") + b"\0"
    elem = _SIZES.get(nvtype - 8, 1)
    count = draw(st.integers(1, 40 // elem))
    return draw(st.binary(min_size=count * elem, max_size=count * elem))


@st.composite
def nv_blob(draw: st.DrawFn, fields: Sequence[tuple[str, int]] = FIELDS,
            max_records: int = 8) -> bytes:
    """A valid nv blob of hastd's fields, some with another type than hastd expects."""
    out = []
    for _ in range(draw(st.integers(0, max_records))):
        name, nvtype = draw(st.sampled_from(fields))
        if draw(st.integers(0, 7)) == 0:
            nvtype = draw(st.integers(1, 17))
        out.append(nv_record(nvtype, name.encode(), draw(nv_value(nvtype))))
    return b"".join(out)


@st.composite
def mutate(draw: st.DrawFn, data: bytes, others: Sequence[bytes] = (),
           tokens: Sequence[bytes] = TOKENS, max_ops: int = 6) -> bytes:
    """libFuzzer-style byte mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.integers(0, 10))
        pos = draw(st.integers(0, len(buf)))
        if op == 0 and buf:
            pos = min(pos, len(buf) - 1)
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and buf:
            pos = min(pos, len(buf) - 1)
            buf[pos] = draw(interesting_int(1))
        elif op in (2, 3):
            width = 4 if op == 2 else 8
            buf[pos:pos + width] = draw(interesting_int(width)).to_bytes(width, "little")
        elif op == 4:
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == 5:
            end = draw(st.integers(pos, min(len(buf), pos + 64)))
            del buf[pos:end]
        elif op == 6:
            end = draw(st.integers(pos, min(len(buf), pos + 64)))
            buf[pos:pos] = buf[pos:end] * draw(st.integers(1, 4))
        elif op == 7 and others:
            other = draw(st.sampled_from(list(others)))
            start = draw(st.integers(0, len(other)))
            buf[pos:] = other[start:]
        elif op == 8 and tokens:
            buf[pos:pos] = draw(st.sampled_from(list(tokens)))
        elif op == 9:
            del buf[pos:]
        elif op == 10:
            # a u32 length field made consistent or inconsistent with what follows
            value = draw(st.sampled_from([len(buf) - pos, len(buf) - pos - 4, 0, 0xFFFFFFFF]))
            buf[pos:pos + 4] = struct.pack("<I", value & 0xFFFFFFFF)
    return bytes(buf)


def from_seeds(seeds: Sequence[bytes], max_len: int,
               extra: st.SearchStrategy[bytes] | None = None) -> st.SearchStrategy[bytes]:
    """Random bytes, mutated seeds and, if given, a target's own structured inputs."""
    options: list[st.SearchStrategy[bytes]] = [st.binary(max_size=min(max_len, 512))]
    if seeds:
        seed_list = list(seeds)
        options.append(st.sampled_from(seed_list).flatmap(
            lambda s: mutate(s, seed_list)))
        options.append(st.sampled_from(seed_list))
    if extra is not None:
        options.append(extra)
        options.append(extra.flatmap(lambda s: mutate(s)))
    return st.one_of(options).map(lambda b: b[:max_len])


@st.composite
def frames(draw: st.DrawFn, fields: Sequence[tuple[str, int]] = FIELDS,
           max_frames: int = 4, payload_max: int = 64) -> bytes:
    """A stream of hast_proto frames with hastd's fields, payloads sized by ``size``."""
    out = []
    for _ in range(draw(st.integers(1, max_frames))):
        blob = draw(nv_blob(fields))
        payload = b""
        if draw(st.booleans()):
            payload = draw(st.binary(max_size=payload_max))
            blob += nv_record(6, b"size", struct.pack("<I", len(payload)))
        out.append(frame(blob, payload, draw(st.sampled_from([0, 1, 2, 2, 2, 3]))))
    return b"".join(out)
