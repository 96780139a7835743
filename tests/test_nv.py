"""nv codec against every message FreeBSD's hastd put on the wire."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hast import nv
from tests.vectors import METADATA, metadata_cases, wire_messages, wire_path

MESSAGES = wire_messages()


def _fields(entry: dict) -> nv.NV:
    return nv.from_fields((f["name"], f["type"], f["value"]) for f in entry["nv"])


@pytest.mark.parametrize("ident,entry", MESSAGES, ids=[m[0] for m in MESSAGES])
def test_encoder_reproduces_canonical_nv(ident: str, entry: dict) -> None:
    canonical = wire_path(ident, ".canonical.bin").read_bytes()
    nvsize = entry["header"]["nv_size"]
    assert struct.unpack_from("<BI", canonical) == (entry["header"]["version"], nvsize)
    assert _fields(entry).pack() == canonical[5:5 + nvsize]


@pytest.mark.parametrize("ident,entry", MESSAGES, ids=[m[0] for m in MESSAGES])
def test_decoder_reads_freebsd_bytes_with_garbage_padding(ident: str, entry: dict) -> None:
    raw = wire_path(ident, ".bin").read_bytes()
    nvsize = entry["header"]["nv_size"]
    assert nv.NV.unpack(raw[5:5 + nvsize]) == _fields(entry)
    assert len(raw) == 5 + nvsize + entry["payload_len"]


@pytest.mark.parametrize("case", metadata_cases())
def test_metadata_blob_roundtrip(case: str) -> None:
    decoded = json.loads((METADATA / f"{case}.decoded.json").read_text())
    image = (METADATA / f"{case}.img-first1MiB.bin").read_bytes()
    canonical = (METADATA / f"{case}.img-first1MiB.canonical.bin").read_bytes()
    want = _fields(decoded)
    assert nv.NV.unpack(image[:4096]) == want  # trailing zeros end the blob
    blob = want.pack()
    assert len(blob) == decoded["nv_bytes"]
    assert canonical[:4096] == blob.ljust(4096, b"\0")


def test_lookup_needs_exact_type_and_first_match_wins() -> None:
    msg = nv.NV().add_int64("datasize", 7).add_uint64("datasize", 9).add_int8("virgin", 1)
    assert msg.get_int64("datasize") == 7
    assert msg.get_uint64("datasize") == 0  # first record is int64: a wrong type reads as 0
    assert msg.exists("virgin") and not msg.exists("wait")
    assert msg.get_uint8("seq") == 0


BAD_BLOBS = {
    "short header": b"\x02\x04\x01\x00",
    "name without NUL": b"\x02\x04\x01\x00\x00\x00cmdx\x00\x00\x00\x00\x05" + b"\0" * 7,
    "type 18": b"\x12\x04\x01\x00\x00\x00cmd\x00\x00\x00\x00\x00\x05" + b"\0" * 7,
    "dsize 0": b"\x02\x04\x00\x00\x00\x00cmd\x00\x00\x00\x00\x00",
    "uint8 of size 2": b"\x02\x04\x02\x00\x00\x00cmd\x00\x00\x00\x00\x00\x05\x05" + b"\0" * 6,
    "truncated data": b"\x08\x04\x08\x00\x00\x00seq\x00\x00\x00\x00\x00\x01",
    "string without NUL": b"\x11\x02\x02\x00\x00\x00s\x00" + b"\0" * 6 + b"ab" + b"\0" * 6,
    "uint32 array of 3 bytes": b"\x0e\x02\x03\x00\x00\x00a\x00" + b"\0" * 6 + b"abc" + b"\0" * 5,
}


@pytest.mark.parametrize("name", sorted(BAD_BLOBS))
def test_malformed_blobs_are_rejected(name: str) -> None:
    with pytest.raises(nv.NVError):
        nv.NV.unpack(BAD_BLOBS[name])


_names = st.text(st.characters(min_codepoint=1, max_codepoint=0x7F), min_size=1, max_size=40)
_record = st.one_of(
    st.tuples(_names, st.just(nv.UINT64), st.integers(0, 2**64 - 1)),
    st.tuples(_names, st.just(nv.INT16), st.integers(-(2**15), 2**15 - 1)),
    st.tuples(_names, st.just(nv.UINT8_ARRAY), st.binary(min_size=1, max_size=64)),
    st.tuples(_names, st.just(nv.STRING),
              st.text(st.characters(min_codepoint=1, max_codepoint=0x10FFFF,
                                    exclude_categories=("Cs",)), max_size=30)),
    st.tuples(_names, st.just(nv.UINT32_ARRAY),
              st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=5).map(tuple)),
)


@given(st.lists(_record, max_size=12))
def test_roundtrip_and_record_lengths(records: list) -> None:
    msg = nv.NV(records)
    blob = msg.pack()
    assert nv.NV.unpack(blob) == msg
    assert nv.NV.unpack(blob + b"\0" * 13) == msg
    # every record is 6 + roundup8(namesize) + roundup8(dsize) long
    assert len(blob) % 8 == (6 * len(records)) % 8


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    try:
        nv.NV.unpack(data)
    except nv.NVError:
        pass
