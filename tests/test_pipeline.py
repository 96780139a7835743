"""The data pipeline and the LZF codec against every data-carrying message FreeBSD's hastd sent.

Deterministic stages (hole, crc32, sha256, the `size` field, and every hash over FreeBSD's own
lzf output) are reproduced byte for byte, whole messages included.  For lzf our compressor's
stream may differ from liblzf's, so there we check that our decoder turns FreeBSD's payloads
back into the pattern data, that FreeBSD's size rules hold for both, and that our own
encoding of the same data decodes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hast import _codec, pipeline
from hast.nv import NV
from hast.pipeline import PipelineError, decode, encode
from tests.vectors import wire_messages, wire_path

PIPELINE_FIELDS = ("compression", "checksum", "hash", "size")
BLOCK = 4096
# What each scenario's C secondary had in hast.conf (its replies follow it).
SECONDARY_CONFIG = {
    "pipeline-secondary-default": ("hole", "none"),
    "pipeline-secondary-lzf-sha256": ("lzf", "sha256"),
    "virgin": ("hole", "none"),
    "reconnect": ("hole", "none"),
    "error-bad-checksum": ("hole", "sha256"),
}
# Tag of the pattern() data inside each lzf payload.
LZF_TAGS = {
    "07-c2s-write-lzf": "HASTlzf",
    "13-c2s-write-lzf-sha256": "HASTlzsha",
    "18-s2c-read-off4096-reply": "HASTlzf",
    "20-s2c-read-off8192-reply": "HASTcrc",
    "22-s2c-read-off12288-reply": "HASTsha",
    "24-s2c-read-off16384-reply": "HASTlzsha",
}
BADHASH = "error-bad-checksum/05-c2s-write-sha256-BADHASH"

DATA_MESSAGES = [m for m in wire_messages() if m[1]["payload_len"] > 0]
IDS = [m[0] for m in DATA_MESSAGES]


def _nv_fields(entry: dict) -> dict[str, object]:
    return {f["name"]: f["value"] for f in entry["nv"]}


def _select(keep: object) -> dict[str, object]:
    chosen = [m for m in DATA_MESSAGES if keep(m[0], _nv_fields(m[1]))]
    return {"argvalues": chosen, "ids": [m[0] for m in chosen]}


LZF = _select(lambda ident, f: f.get("compression") == "lzf")
DETERMINISTIC = _select(lambda ident, f: f.get("compression") != "lzf" and ident != BADHASH)
CHECKSUMMED = _select(lambda ident, f: "checksum" in f)


def pattern(tag: str) -> bytes:
    """The vectors' data: 256 lines of 16 bytes, "<tag>-<3 hex digits>" padded with '.'."""
    return b"".join(f"{tag}-{i:03x}".ljust(15, ".").encode() + b"\n" for i in range(256))


def split(ident: str) -> tuple[int, bytes, NV, bytes]:
    raw = wire_path(ident, ".canonical.bin").read_bytes()
    version, nvsize = struct.unpack_from("<BI", raw)
    blob = raw[5:5 + nvsize]
    return version, blob, NV.unpack(blob), raw[5 + nvsize:]


def caller_fields(msg: NV) -> NV:
    return NV(item for item in msg if item[0] not in PIPELINE_FIELDS)


def sender_config(ident: str, msg: NV) -> tuple[str, str]:
    scenario, label = ident.split("/")
    if "-s2c-" in label:
        return SECONDARY_CONFIG[scenario]
    # The test primary was configured per message; its fields say how.
    return msg.get_string("compression") or "none", msg.get_string("checksum") or "none"


def original_data(ident: str, msg: NV, payload: bytes) -> bytes:
    algo = msg.get_string("compression")
    if algo == "hole":
        return bytes(struct.unpack("<I", payload)[0])
    if algo == "lzf":
        return pattern(LZF_TAGS[ident.split("/")[1]])
    return payload


# -- FreeBSD's messages ----------------------------------------------------------------------

@pytest.mark.parametrize("ident,entry", DATA_MESSAGES, ids=IDS)
def test_vector_data_is_the_pattern(ident: str, entry: dict) -> None:
    _, _, msg, payload = split(ident)
    data = original_data(ident, msg, payload)
    assert len(data) == msg.get_uint64("length") or "-s2c-" in ident
    if data.strip(b"\0"):
        assert data == pattern(data[:16].split(b"-")[0].decode())


@pytest.mark.parametrize("ident,entry", **DETERMINISTIC)
def test_encode_reproduces_freebsd_message(ident: str, entry: dict) -> None:
    version, blob, msg, payload = split(ident)
    data = original_data(ident, msg, payload)
    ours = caller_fields(msg)
    out = encode(ours, data, *sender_config(ident, msg))
    assert bytes(out) == payload
    assert ours.pack() == blob
    frame = struct.pack("<BI", version, len(blob)) + blob + bytes(out)
    assert frame == wire_path(ident, ".canonical.bin").read_bytes()


@pytest.mark.parametrize("ident,entry", DATA_MESSAGES, ids=IDS)
def test_decode_freebsd_payload(ident: str, entry: dict) -> None:
    _, _, msg, payload = split(ident)
    if ident == BADHASH:
        with pytest.raises(PipelineError, match=r"^Hash mismatch\.$"):
            decode(msg, payload, BLOCK)
        return
    maxsize = msg.get_uint32("mapsize") or BLOCK
    assert decode(msg, payload, maxsize) == original_data(ident, msg, payload)


@pytest.mark.parametrize("ident,entry", **CHECKSUMMED)
def test_hash_over_freebsd_wire_bytes(ident: str, entry: dict) -> None:
    """The hash covers the compressed bytes: recompute it over FreeBSD's own payload."""
    _, _, msg, payload = split(ident)
    algo = msg.get_string("checksum")
    check = NV()
    encode(check, payload, "none", algo)
    if ident == BADHASH:
        assert check.get_uint8_array("hash") != msg.get_uint8_array("hash")
    else:
        assert check.get_uint8_array("hash") == msg.get_uint8_array("hash")


@pytest.mark.parametrize("ident,entry", **LZF)
def test_lzf_messages(ident: str, entry: dict) -> None:
    _, _, msg, payload = split(ident)
    data = pattern(LZF_TAGS[ident.split("/")[1]])
    # FreeBSD's size rules: u32 LE original length, stream at most original - 1024 bytes.
    assert struct.unpack_from("<I", payload)[0] == len(data) == BLOCK
    assert len(payload) - 4 <= BLOCK - pipeline.LZF_COMPRESS_MIN
    assert _codec.lzf_decompress(payload[4:], BLOCK) == data
    # Our encoder: same fields in the same order and types, its own stream, same rules.
    ours = caller_fields(msg)
    out = encode(ours, data, *sender_config(ident, msg))
    assert [(n, t) for n, t, _ in ours] == [(n, t) for n, t, _ in msg]
    assert ours.get_string("compression") == "lzf"
    assert struct.unpack_from("<I", out)[0] == BLOCK
    assert len(out) - 4 <= BLOCK - pipeline.LZF_COMPRESS_MIN
    assert ours.get_uint32("size") == len(out)
    assert decode(NV.unpack(ours.pack()), out, BLOCK) == data


def test_badhash_fields_otherwise_reproduced() -> None:
    version, blob, msg, payload = split(BADHASH)
    ours = caller_fields(msg)
    encode(ours, payload, "none", "sha256")
    assert [(n, t) for n, t, _ in ours] == [(n, t) for n, t, _ in msg]
    assert ours.get_uint8_array("hash") == hashlib.sha256(payload).digest()
    assert decode(ours, payload, BLOCK) == payload


# -- encoder rules ---------------------------------------------------------------------------

def _fields(msg: NV) -> list[str]:
    return [n for n, _, _ in msg]


def test_none_is_zero_copy_and_only_size() -> None:
    data = memoryview(bytearray(os.urandom(BLOCK)))
    msg = NV()
    assert encode(msg, data, "none", "none") is data
    assert _fields(msg) == ["size"] and msg.get_uint32("size") == BLOCK
    assert decode(msg, data, BLOCK) is data


def test_no_data_adds_nothing_empty_data_adds_size() -> None:
    msg = NV()
    assert encode(msg, None, "lzf", "sha256") is None
    assert len(msg) == 0
    assert encode(msg, b"", "lzf", "crc32") == b""
    assert _fields(msg) == ["checksum", "hash", "size"] and msg.get_uint32("size") == 0
    assert decode(msg, b"", BLOCK) == b""


@pytest.mark.parametrize("compression", ["hole", "lzf"])
def test_all_zero_is_hole(compression: str) -> None:
    for size in (8, 512, 1024, 1025, BLOCK, 1 << 20):
        msg = NV()
        assert encode(msg, bytes(size), compression, "none") == struct.pack("<I", size)
        assert msg.get_string("compression") == "hole"
        assert decode(msg, struct.pack("<I", size), size) == bytes(size)


def test_no_hole_below_its_own_size() -> None:
    # A 4-byte hole payload for a 1..3 byte buffer would exceed what the receiver expects.
    for size in (1, 2, 3):
        data = bytes(size)
        msg = NV()
        assert encode(msg, data, "lzf", "none") is data
        assert _fields(msg) == ["size"]


def test_hole_on_data_sends_it_uncompressed() -> None:
    data = pattern("HASTx")
    msg = NV()
    assert encode(msg, data, "hole", "none") is data
    assert _fields(msg) == ["size"]


def test_lzf_size_thresholds() -> None:
    # <= 1024 bytes: never lzf, however compressible.
    msg = NV()
    assert encode(msg, b"a" * 1024, "lzf", "none") == b"a" * 1024
    assert not msg.exists("compression")
    # 1025: LZF would have to fit in a 1-byte stream: never does.
    msg = NV()
    assert encode(msg, b"a" * 1025, "lzf", "none") == b"a" * 1025
    assert not msg.exists("compression")
    # Must save at least 1024 bytes: 2048 bytes of runs do, random data does not.
    msg = NV()
    out = encode(msg, b"ab" * 1024, "lzf", "none")
    assert msg.get_string("compression") == "lzf" and len(out) - 4 <= 1024
    noise = os.urandom(BLOCK)
    msg = NV()
    assert encode(msg, noise, "lzf", "crc32") is noise
    assert _fields(msg) == ["checksum", "hash", "size"]


def test_crc32_is_le_and_big_endian_peer_accepted() -> None:
    data = pattern("HASTcrc")
    msg = NV()
    encode(msg, data, "none", "crc32")
    assert msg.get_uint8_array("hash") == struct.pack("<I", zlib.crc32(data))
    be = NV([("checksum", 17, "crc32"), ("hash", 10, struct.pack(">I", zlib.crc32(data))),
             ("size", 6, len(data))])
    assert decode(be, data, BLOCK) == data


def test_unknown_configuration_rejected() -> None:
    with pytest.raises(ValueError):
        encode(NV(), b"x", "gzip", "none")
    with pytest.raises(ValueError):
        encode(NV(), b"x", "none", "md5")


# -- decoder checks --------------------------------------------------------------------------

def _msg(*fields: tuple[str, int, object]) -> NV:
    return NV(fields)


def _size(n: int) -> tuple[str, int, object]:
    return ("size", 6, n)


@pytest.mark.parametrize("msg,payload,maxsize,message", [
    (_msg(_size(8)), b"x" * 8, 4, r"exceeds"),
    (_msg(_size(8)), b"x" * 7, 8, r"differs"),
    (_msg(("compression", 17, "gzip"), _size(4)), b"abcd", 8,
     r"Unknown compression algorithm 'gzip'\."),
    (_msg(("checksum", 17, "md5"), ("hash", 10, b"1234"), _size(4)), b"abcd", 8,
     r"Unknown checksum algorithm 'md5'\."),
    (_msg(("checksum", 17, "crc32"), _size(4)), b"abcd", 8, r"Hash is missing\."),
    (_msg(("checksum", 17, "sha256"), ("hash", 10, b"1234"), _size(4)), b"abcd", 8,
     r"Invalid hash size \(4\) for sha256, should be 32\."),
    (_msg(("compression", 17, "hole"), _size(5)), b"\0" * 5, 8, r"invalid size: 5"),
    (_msg(("compression", 17, "hole"), _size(4)), struct.pack("<I", 9), 8, r"exceeds"),
    (_msg(("compression", 17, "lzf"), _size(4)), struct.pack("<I", 2048), BLOCK, r"invalid size"),
    (_msg(("compression", 17, "lzf"), _size(6)), struct.pack("<I", 1024) + b"\0a", BLOCK,
     r"<= 1024"),
    (_msg(("compression", 17, "lzf"), _size(6)), struct.pack("<I", 8192) + b"\0a", BLOCK,
     r"exceeds"),
    (_msg(("compression", 17, "lzf"), _size(6)), struct.pack("<I", 2048) + b"\0a", BLOCK,
     r"got 1 bytes, announced 2048"),
    (_msg(("compression", 17, "lzf"), _size(6)), struct.pack("<I", 2048) + b"\x05a", BLOCK,
     r"^Unable to decompress\.$"),
])
def test_decode_rejects(msg: NV, payload: bytes, maxsize: int, message: str) -> None:
    with pytest.raises(PipelineError, match=message) as exc:
        decode(msg, payload, maxsize)
    assert exc.value.errno in (errno.EINVAL, errno.E2BIG)


def test_decode_hash_checked_before_decompression() -> None:
    msg = NV()
    payload = encode(msg, pattern("HASTord"), "lzf", "crc32")
    bad = bytearray(payload)
    bad[-1] ^= 0xFF
    with pytest.raises(PipelineError, match=r"^Hash mismatch\.$"):
        decode(msg, bad, BLOCK)


def test_payload_size() -> None:
    assert pipeline.payload_size(NV(), BLOCK) == 0
    assert pipeline.payload_size(_msg(_size(BLOCK)), BLOCK) == BLOCK
    with pytest.raises(PipelineError) as exc:
        pipeline.payload_size(_msg(_size(BLOCK + 1)), BLOCK)
    assert exc.value.errno == errno.EINVAL


# -- properties ------------------------------------------------------------------------------

def _data_strategy() -> st.SearchStrategy[bytes]:
    text = st.builds(lambda tag, n: (pattern(tag) * 18)[:n],
                     st.text("ABCxyz-0", min_size=1, max_size=8), st.integers(0, 70000))
    runs = st.builds(lambda parts: b"".join(bytes([b]) * k for b, k in parts),
                     st.lists(st.tuples(st.integers(0, 255), st.integers(1, 600)), max_size=40))
    zeros = st.integers(0, 70000).map(bytes)
    return st.one_of(st.binary(max_size=9000), text, runs, zeros)


@pytest.mark.parametrize("compression", pipeline.COMPRESSIONS)
@pytest.mark.parametrize("checksum", pipeline.CHECKSUMS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_data_strategy())
def test_roundtrip(data: bytes, compression: str, checksum: str) -> None:
    msg = NV([("seq", 8, 7)])
    payload = encode(msg, data, compression, checksum)
    wire = NV.unpack(msg.pack())
    assert wire.get_uint32("size") == len(payload)
    assert bytes(decode(wire, payload, len(data))) == data
    algo = wire.get_string("compression")
    if algo == "hole":
        assert compression != "none" and data.count(0) == len(data) >= 4
    elif algo == "lzf":
        assert compression == "lzf" and len(data) > 1024
        assert len(payload) - 4 <= len(data) - 1024
    else:
        assert payload is data
    assert wire.exists("hash") == (checksum != "none")


@settings(max_examples=500, deadline=None)
@given(stream=st.binary(max_size=2000), out_len=st.integers(0, 5000))
def test_lzf_decoder_survives_garbage(stream: bytes, out_len: int) -> None:
    try:
        out = _codec.lzf_decompress(stream, out_len)
    except _codec.LZFError as exc:
        assert exc.errno in (errno.E2BIG, errno.EINVAL)
    else:
        assert len(out) <= out_len


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(min_size=1, max_size=3000))
def test_pipeline_decoder_survives_garbage(stream: bytes) -> None:
    msg = _msg(("compression", 17, "lzf"), _size(len(stream) + 4))
    try:
        out = decode(msg, struct.pack("<I", BLOCK) + stream, BLOCK)
    except PipelineError:
        return
    assert len(out) == BLOCK


@settings(max_examples=300, deadline=None)
@given(data=_data_strategy())
def test_lzf_codec_roundtrip(data: bytes) -> None:
    bound = len(data) + len(data) // 32 + 16
    stream = _codec.lzf_compress(data, bound)
    assert stream is not None
    assert _codec.lzf_decompress(stream, len(data)) == data
    out = bytearray(len(data) + 10)
    assert _codec.lzf_decompress_into(stream, out) == len(data)
    assert out[: len(data)] == data
    if stream:
        tight = _codec.lzf_compress(data, len(stream) - 1)
        assert tight is None or len(tight) < len(stream)


# -- codec unit checks -----------------------------------------------------------------------

def test_lzf_decoder_errors() -> None:
    with pytest.raises(_codec.LZFError) as exc:
        _codec.lzf_decompress(b"\x03abcd", 3)          # literal longer than the output
    assert exc.value.errno == errno.E2BIG
    with pytest.raises(_codec.LZFError) as exc:
        _codec.lzf_decompress(b"\x03ab", 10)           # literal beyond the input
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(_codec.LZFError) as exc:
        _codec.lzf_decompress(b"\x00a\x20\x05", 10)    # reference before the output
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(_codec.LZFError):
        _codec.lzf_decompress(b"\x00a\xe0", 300)       # long match, missing length byte
    with pytest.raises(_codec.LZFError):
        _codec.lzf_decompress(b"\x00a\x20", 300)       # match, missing offset byte
    assert _codec.lzf_decompress(b"", 10) == b""


def test_lzf_decoder_overlapping_references() -> None:
    # one literal then a 264-byte run at distance 1, then distance-3 repeat
    stream = b"\x00a" + bytes([0xE0, 255, 0]) + b"\x02xyz" + bytes([0xE0, 10, 2])
    assert _codec.lzf_decompress(stream, 1000) == b"a" * 265 + b"xyz" * 7 + b"x"


def test_lzf_compress_limits() -> None:
    data = pattern("HASTlim")
    assert _codec.lzf_compress(data, 10) is None
    assert _codec.lzf_compress(b"", 0) == b""
    packed = _codec.lzf_compress(data, 3072, size_prefix=True)
    assert packed[:4] == struct.pack("<I", len(data))
    assert _codec.lzf_decompress(packed[4:], len(data)) == data
    with pytest.raises(ValueError):
        _codec.lzf_compress(data, -1)


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 255, 256, 257, 4096, 65535, 65536, 1 << 20])
def test_is_zero(size: int) -> None:
    buf = bytearray(size)
    assert _codec.is_zero(buf)
    assert _codec.is_zero(memoryview(buf))
    for pos in {0, size // 3, size // 2, size - 1} if size else ():
        buf[pos] = 1
        assert not _codec.is_zero(buf)
        buf[pos] = 0


# -- cross-check against liblzf itself (Debian liblzf1, installed by tools/sysdeps.sh) -------

def _liblzf() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("lzf") or "liblzf.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    for fn in (lib.lzf_compress, lib.lzf_decompress):
        fn.restype = ctypes.c_uint
        fn.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_char_p, ctypes.c_uint]
    return lib


LIBLZF = _liblzf()


def test_liblzf_is_installed() -> None:
    assert LIBLZF is not None, "liblzf (Debian liblzf1) is required for the cross-check"


@pytest.mark.skipif(LIBLZF is None, reason="see test_liblzf_is_installed, which fails")
@settings(max_examples=200, deadline=None)
@given(data=_data_strategy().filter(bool))
def test_liblzf_decodes_our_streams_and_we_decode_its(data: bytes) -> None:
    assert LIBLZF is not None
    ours = _codec.lzf_compress(data, len(data) + len(data) // 32 + 16)
    out = ctypes.create_string_buffer(len(data))
    assert LIBLZF.lzf_decompress(ours, len(ours), out, len(data)) == len(data)
    assert out.raw == data
    theirs = ctypes.create_string_buffer(len(data) + len(data) // 16 + 64)
    n = LIBLZF.lzf_compress(data, len(data), theirs, len(theirs))
    assert n > 0
    assert _codec.lzf_decompress(theirs.raw[:n], len(data)) == data
