"""nv: FreeBSD hastd's name/value serialisation (sbin/hastd/nv.c), byte for byte.

Every hastd message (replication wire, control socket, on-disk metadata) is an nv blob: a
run of records ``type:u8 namesize:u8 dsize:u32le name\\0 pad8 data pad8`` with no header and no
terminator.  The reader's rules are reproduced exactly because a FreeBSD peer relies on them:
parsing stops at a zero type byte (trailing zeros are how the 4096-byte metadata block ends),
lookups need the exact name *and* type, and absent integers read as 0.  Our encoder writes
zero name padding (FreeBSD leaks heap bytes there); the decoder ignores padding.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

INT8, UINT8, INT16, UINT16, INT32, UINT32, INT64, UINT64 = range(1, 9)
INT8_ARRAY, UINT8_ARRAY, INT16_ARRAY, UINT16_ARRAY = range(9, 13)
INT32_ARRAY, UINT32_ARRAY, INT64_ARRAY, UINT64_ARRAY = range(13, 17)
STRING = 17

TYPE_NAMES = {
    INT8: "int8", UINT8: "uint8", INT16: "int16", UINT16: "uint16",
    INT32: "int32", UINT32: "uint32", INT64: "int64", UINT64: "uint64",
    INT8_ARRAY: "int8_array", UINT8_ARRAY: "uint8_array",
    INT16_ARRAY: "int16_array", UINT16_ARRAY: "uint16_array",
    INT32_ARRAY: "int32_array", UINT32_ARRAY: "uint32_array",
    INT64_ARRAY: "int64_array", UINT64_ARRAY: "uint64_array",
    STRING: "string",
}
TYPES_BY_NAME = {v: k for k, v in TYPE_NAMES.items()}

# struct format of one scalar element per type; arrays use the element of (type - 8).
_SCALAR = {INT8: "<b", UINT8: "<B", INT16: "<h", UINT16: "<H",
           INT32: "<i", UINT32: "<I", INT64: "<q", UINT64: "<Q"}
_ELEM = {t + 8: f for t, f in _SCALAR.items()}
_HDR = struct.Struct("<BBI")
HDR_SIZE = 6
NV_TYPE_MASK = 0x7F
NV_ORDER_HOST = 0x80
MAX_NAME = 254


class NVError(ValueError):
    """A blob the FreeBSD reader would reject (nv_validate fails with EINVAL)."""


def _pad8(n: int) -> int:
    return (n + 7) & ~7


class NV:
    """An ordered list of typed records; order is kept because FreeBSD's is reproduced."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, int, object]] = ()) -> None:
        self._items: list[tuple[str, int, object]] = list(items)

    # -- building -----------------------------------------------------------------
    def add(self, name: str, nvtype: int, value: object) -> NV:
        if nvtype not in TYPE_NAMES:
            raise NVError(f"invalid nv type {nvtype}")
        if not 1 <= len(_utf8(name)) <= MAX_NAME or "\0" in name:
            raise NVError(f"invalid nv name {name!r}")
        self._items.append((name, nvtype, value))
        return self

    def add_int8(self, name: str, v: int) -> NV:
        return self.add(name, INT8, v)

    def add_uint8(self, name: str, v: int) -> NV:
        return self.add(name, UINT8, v)

    def add_int16(self, name: str, v: int) -> NV:
        return self.add(name, INT16, v)

    def add_uint16(self, name: str, v: int) -> NV:
        return self.add(name, UINT16, v)

    def add_int32(self, name: str, v: int) -> NV:
        return self.add(name, INT32, v)

    def add_uint32(self, name: str, v: int) -> NV:
        return self.add(name, UINT32, v)

    def add_int64(self, name: str, v: int) -> NV:
        return self.add(name, INT64, v)

    def add_uint64(self, name: str, v: int) -> NV:
        return self.add(name, UINT64, v)

    def add_uint8_array(self, name: str, v: bytes) -> NV:
        return self.add(name, UINT8_ARRAY, bytes(v))

    def add_string(self, name: str, v: str) -> NV:
        return self.add(name, STRING, v)

    # -- lookups with FreeBSD's semantics --------------------------------------------
    def find(self, name: str) -> tuple[int, object] | None:
        """First record named ``name`` as (type, value), whatever its type."""
        for n, t, v in self._items:
            if n == name:
                return t, v
        return None

    def exists(self, name: str) -> bool:
        return self.find(name) is not None

    def get(self, name: str, nvtype: int, default: object = None) -> object:
        """Value of the first record with this name and exactly this type.

        FreeBSD's nv_get_<type>() finds the first record by name; a wrong type there is
        an error (reads as 0), not a reason to look further.
        """
        found = self.find(name)
        if found is None or found[0] != nvtype:
            return default
        return found[1]

    def get_int(self, name: str, nvtype: int) -> int:
        value = self.get(name, nvtype, 0)
        assert isinstance(value, int)
        return value

    def get_uint8(self, name: str) -> int:
        return self.get_int(name, UINT8)

    def get_int8(self, name: str) -> int:
        return self.get_int(name, INT8)

    def get_int16(self, name: str) -> int:
        return self.get_int(name, INT16)

    def get_uint32(self, name: str) -> int:
        return self.get_int(name, UINT32)

    def get_int32(self, name: str) -> int:
        return self.get_int(name, INT32)

    def get_int64(self, name: str) -> int:
        return self.get_int(name, INT64)

    def get_uint64(self, name: str) -> int:
        return self.get_int(name, UINT64)

    def get_string(self, name: str) -> str | None:
        value = self.get(name, STRING)
        return value if isinstance(value, str) else None

    def get_uint8_array(self, name: str) -> bytes | None:
        value = self.get(name, UINT8_ARRAY)
        return value if isinstance(value, bytes) else None

    def __iter__(self) -> Iterator[tuple[str, int, object]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NV) and self._items == other._items

    def __repr__(self) -> str:
        body = ", ".join(f"{n}:{TYPE_NAMES[t]}={v!r}" for n, t, v in self._items)
        return f"NV({body})"

    def to_dict(self) -> dict[str, object]:
        """First value per name; for logs, JSON output and tests."""
        out: dict[str, object] = {}
        for n, _t, v in self._items:
            out.setdefault(n, v)
        return out

    # -- wire form --------------------------------------------------------------------
    def pack(self) -> bytes:
        parts: list[bytes] = []
        for name, nvtype, value in self._items:
            bname = _utf8(name) + b"\0"
            data = _encode_value(nvtype, value)
            parts.append(_HDR.pack(nvtype, len(bname), len(data)))
            parts.append(bname.ljust(_pad8(len(bname)), b"\0"))
            parts.append(data.ljust(_pad8(len(data)), b"\0"))
        return b"".join(parts)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> NV:
        return cls(_decode(memoryview(buf).cast("B")))


def _utf8(text: str) -> bytes:
    """The bytes a decoded name or string came from: the decoder maps bytes that are not
    UTF-8 to lone surrogates (surrogateescape), so whatever we received we can send back."""
    return text.encode("utf-8", "surrogateescape")


def _encode_value(nvtype: int, value: object) -> bytes:
    if nvtype == STRING:
        assert isinstance(value, str)
        raw = _utf8(value)
        if b"\0" in raw:
            raise NVError("nv string with an embedded NUL")
        return raw + b"\0"
    if nvtype in _SCALAR:
        try:
            return struct.pack(_SCALAR[nvtype], value)
        except struct.error as exc:
            raise NVError(f"value {value!r} does not fit {TYPE_NAMES[nvtype]}") from exc
    if nvtype in (INT8_ARRAY, UINT8_ARRAY) and isinstance(value, bytes | bytearray):
        if not value:
            raise NVError("empty nv array")
        return bytes(value)
    seq = list(value)  # type: ignore[call-overload]
    if not seq:
        raise NVError("empty nv array")
    fmt = _ELEM[nvtype]
    return struct.pack(f"<{len(seq)}{fmt[1]}", *seq)


def _decode(buf: memoryview) -> list[tuple[str, int, object]]:
    items: list[tuple[str, int, object]] = []
    pos, size = 0, len(buf)
    while pos < size:
        if buf[pos] == 0:
            break  # trailing zeros: the rest is padding (metadata block)
        if size - pos < HDR_SIZE + 2:
            raise NVError("truncated nv record header")
        rawtype, namesize, dsize = _HDR.unpack_from(buf, pos)
        nvtype = rawtype & NV_TYPE_MASK
        namearea = _pad8(namesize)
        if namesize < 2 or size - pos < HDR_SIZE + namearea:
            raise NVError("truncated nv record name")
        bname = bytes(buf[pos + HDR_SIZE:pos + HDR_SIZE + namesize])
        if bname[-1] != 0 or 0 in bname[:-1]:
            raise NVError("nv name is not NUL-terminated")
        if not 1 <= nvtype <= STRING:
            raise NVError(f"invalid nv type {nvtype}")
        if dsize == 0:
            raise NVError("nv record with no data")
        reclen = HDR_SIZE + namearea + _pad8(dsize)
        if size - pos < reclen:
            raise NVError("truncated nv record data")
        start = pos + HDR_SIZE + namearea
        data = buf[start:start + dsize]
        # host-order records (0x80) are LE on every platform py-hast runs on
        items.append((bname[:-1].decode("utf-8", "surrogateescape"), nvtype,
                      _decode_value(nvtype, data)))
        pos += reclen
    return items


def _decode_value(nvtype: int, data: memoryview) -> object:
    dsize = len(data)
    if nvtype == STRING:
        raw = bytes(data)
        if raw[-1] != 0 or 0 in raw[:-1]:
            raise NVError("nv string is not NUL-terminated")
        return raw[:-1].decode("utf-8", "surrogateescape")
    if nvtype in _SCALAR:
        fmt = _SCALAR[nvtype]
        if dsize != struct.calcsize(fmt):
            raise NVError(f"bad size {dsize} for {TYPE_NAMES[nvtype]}")
        return struct.unpack(fmt, data)[0]
    if nvtype in (INT8_ARRAY, UINT8_ARRAY):
        return bytes(data)
    fmt = _ELEM[nvtype]
    elem = struct.calcsize(fmt)
    if dsize % elem:
        raise NVError(f"bad size {dsize} for {TYPE_NAMES[nvtype]}")
    return tuple(struct.unpack(f"<{dsize // elem}{fmt[1]}", data))


def from_fields(fields: Iterable[tuple[str, str, object]]) -> NV:
    """Build from (name, type name, value) triples, as the vectors' JSON spells them."""
    nv = NV()
    for name, tname, value in fields:
        nvtype = TYPES_BY_NAME[tname]
        if nvtype in (INT8_ARRAY, UINT8_ARRAY) and isinstance(value, str):
            value = bytes.fromhex(value.removeprefix("0x"))
        elif nvtype in (INT8_ARRAY, UINT8_ARRAY) and isinstance(value, list):
            value = bytes(b & 0xFF for b in value)
        nv.add(name, nvtype, value)
    return nv
