"""nv: ``hast.nv.NV.unpack`` on arbitrary blobs (hast-internals.md §3).

Every message hastd reads -- replication frames, control requests, worker events, the
on-disk metadata block -- is an nv blob, so this decoder sees the most hostile bytes of all.
Checked on every input:

* only NVError escapes (no IndexError/struct.error/UnicodeDecodeError from a bad record);
* accept/reject and every decoded (name, type, value) agree with the spec's own walk
  (:func:`fuzz.reference.nv_records`, §3.4);
* an accepted blob survives ``pack()`` -> ``unpack()`` unchanged (the daemon echoes decoded
  strings, e.g. resource names, into its replies), and the re-packed blob is canonical;
* the FreeBSD lookups (``get_*``, ``exists``, ``to_dict``, ``repr``) never raise.
"""

from __future__ import annotations

from hypothesis import strategies as st

from fuzz import reference
from fuzz.common import Finding, load_seeds
from fuzz.strategies import from_seeds, nv_blob
from hast import nv

EXPECTED: tuple[type[BaseException], ...] = (nv.NVError,)
MAX_LEN = 4096


def seeds() -> list[bytes]:
    return load_seeds("nv")


def strategy() -> st.SearchStrategy[bytes]:
    return from_seeds(seeds(), MAX_LEN, nv_blob())


def _name_bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def one_input(data: bytes) -> None:
    try:
        ref: list[reference.Record] | None = reference.nv_records(data)
    except reference.Reject:
        ref = None
    try:
        msg = nv.NV.unpack(data)
    except nv.NVError:
        if ref is not None:
            raise Finding(f"NV.unpack rejects a blob the spec accepts: {data!r}") from None
        raise
    if ref is None:
        raise Finding(f"NV.unpack accepts a blob the spec rejects: {data!r} -> {msg!r}")
    items = list(msg)
    if len(items) != len(ref):
        raise Finding(f"record count differs from the spec: {len(items)} vs {len(ref)}")
    for (name, nvtype, value), rec in zip(items, ref, strict=True):
        if _name_bytes(name) != rec.name or nvtype != rec.type:
            raise Finding(f"record decoded with another name or type: {rec.name!r}/{rec.type} "
                          f"as {name!r}/{nvtype}")
        expect = rec.value()
        if nvtype == nv.STRING:
            assert isinstance(value, str)
            got: object = value.encode("utf-8", "surrogateescape")
        else:
            got = value
        if got != expect:
            raise Finding(f"value differs from the spec: {rec.name!r} is {got!r}, "
                          f"spec says {expect!r}")

    # Lookups with FreeBSD's semantics must never raise, whatever the types.
    for name, _t, _v in items[:4]:
        msg.exists(name)
        for nvtype in (nv.UINT8, nv.UINT32, nv.UINT64, nv.INT16):
            msg.get_int(name, nvtype)
        msg.get_string(name)
        msg.get_uint8_array(name)
    msg.to_dict()
    repr(msg)

    # Round trip: what the daemon decoded it must be able to send back.
    try:
        packed = msg.pack()
    except Exception as exc:
        raise Finding(f"NV.pack() of a decoded blob fails: {exc!r} ({msg!r})") from exc
    again = nv.NV.unpack(packed)
    if again != msg:
        raise Finding(f"pack/unpack round trip changes the message: {msg!r} -> {again!r}")
    if again.pack() != packed:
        raise Finding("re-packing a packed blob is not byte-identical")
