"""metadata block and layout against the blocks FreeBSD's hastctl and hastd wrote."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from hast import metadata, nv
from hast.metadata import (
    InvalidMetadata,
    Metadata,
    MetadataError,
    MetadataIOError,
    ProviderError,
    WrongResource,
)
from tests.vectors import METADATA, metadata_cases

CASES = metadata_cases()
MiB = 1024 * 1024


def _decoded(case: str) -> dict:
    return json.loads((METADATA / f"{case}.decoded.json").read_text())


def _expected(case: str) -> Metadata:
    values = {f["name"]: f["value"] for f in _decoded(case)["nv"]}
    return Metadata(
        resource=values["resource"], datasize=values["datasize"],
        extentsize=values["extentsize"], keepdirty=values["keepdirty"],
        localoff=values["offset"], resuid=values["resuid"], localcnt=values["localcnt"],
        remotecnt=values["remotecnt"], prevrole=values["prevrole"])


def test_vectors_are_present() -> None:
    assert len(CASES) >= 10 and "default" in CASES
    assert any(c.startswith("secondary-written/") for c in CASES)


@pytest.mark.parametrize("case", CASES)
def test_unpack_freebsd_block_with_garbage_padding(case: str) -> None:
    raw = (METADATA / f"{case}.img-first1MiB.bin").read_bytes()
    padding = json.loads((METADATA / f"{case}.padding.json").read_text())
    assert padding["garbage_name_padding_offsets"]  # the block really has heap garbage
    assert Metadata.unpack(raw[:metadata.METADATA_SIZE]) == _expected(case)
    assert Metadata.unpack(raw[:metadata.METADATA_SIZE], "test") == _expected(case)


@pytest.mark.parametrize("case", CASES)
def test_pack_equals_canonical_block(case: str) -> None:
    canonical = (METADATA / f"{case}.img-first1MiB.canonical.bin").read_bytes()
    block = _expected(case).pack()
    assert len(block) == metadata.METADATA_SIZE
    assert block == canonical[:metadata.METADATA_SIZE]
    assert len(block.rstrip(b"\0")) <= _decoded(case)["nv_bytes"]


@pytest.mark.parametrize("case", CASES)
def test_layout_reproduces_vector(case: str) -> None:
    info = _decoded(case)
    md = _expected(case)
    dump = (METADATA / f"{case}.dump.txt").read_text()
    mediasize = 256 * MiB
    if "-m 192M" in dump:
        mediasize = 192 * MiB
    elif "-m 128M" in dump:
        mediasize = 128 * MiB
    elif "-m 100000000" in dump:
        mediasize = 100000000
    mapsize, datasize, localoff = metadata.layout(mediasize, md.extentsize, 512)
    assert (mapsize, datasize, localoff) == (info["activemap_bytes"], md.datasize, md.localoff)
    assert info["activemap_offset"] == metadata.METADATA_SIZE


@pytest.mark.parametrize("mediasize,extent,sector,mapsize,datasize,localoff", [
    (10 * 1024 * MiB, 2 * MiB, 512, 1024, 10737413120, 5120),
    (1024 * MiB, 2 * MiB, 512, 512, 1073737216, 4608),
    (4000787030016, 2 * MiB, 4096, 241664, 4000786784256, 245760),
    (MiB, 65536, 512, 512, 1043968, 4608),
])
def test_layout_worked_examples(mediasize: int, extent: int, sector: int, mapsize: int,
                                datasize: int, localoff: int) -> None:
    assert metadata.layout(mediasize, extent, sector) == (mapsize, datasize, localoff)


@pytest.mark.parametrize("mediasize,extent", [
    (4096, 512),       # no room after the metadata: FreeBSD asserts mediasize > 0
    (4097, 512),       # the activemap alone does not fit
    (MiB, 1536),       # extent size not a power of two
])
def test_layout_rejects_impossible_geometry(mediasize: int, extent: int) -> None:
    with pytest.raises(ValueError):
        metadata.layout(mediasize, extent, 512)


def test_field_order_and_types() -> None:
    md = Metadata("shared", 10737413120, 2 * MiB, 64, 5120, resuid=7, localcnt=3,
                  remotecnt=2, prevrole="primary")
    items = list(nv.NV.unpack(md.pack()))
    assert items == [
        ("resource", nv.STRING, "shared"), ("datasize", nv.UINT64, 10737413120),
        ("extentsize", nv.UINT32, 2 * MiB), ("keepdirty", nv.UINT32, 64),
        ("offset", nv.UINT64, 5120), ("resuid", nv.UINT64, 7), ("localcnt", nv.UINT64, 3),
        ("remotecnt", nv.UINT64, 2), ("prevrole", nv.STRING, "primary"),
    ]
    assert len(md.pack().rstrip(b"\0")) <= 254 + 8  # "the nv blob is 254 bytes long"


def test_pack_refuses_a_blob_that_fills_the_block() -> None:
    with pytest.raises(MetadataError, match="too large"):
        Metadata("r" * 4000, 1, 512, 64, 4608).pack()


def _block(fields: list[tuple[str, int, object]]) -> bytes:
    return nv.NV(fields).pack().ljust(metadata.METADATA_SIZE, b"\0")


GOOD = Metadata("test", 268430848, 2097152, 64, 4608)


def _good_fields() -> list[tuple[str, int, object]]:
    return list(GOOD.to_nv())


def test_zero_block_is_an_empty_nv_missing_resource() -> None:
    # FreeBSD's nv validator accepts zeros; nv_get_string("resource") then fails with ENOENT.
    with pytest.raises(InvalidMetadata) as info:
        Metadata.unpack(bytes(metadata.METADATA_SIZE), "test")
    assert not info.value.rejected and info.value.errno == errno.ENOENT
    assert "'resource' is missing" in (info.value.reason or "")


def test_garbage_block_is_rejected_by_the_nv_validator() -> None:
    garbage = bytes(range(1, 256)) * 17
    with pytest.raises(InvalidMetadata) as info:
        Metadata.unpack(garbage[:metadata.METADATA_SIZE])
    assert info.value.rejected and info.value.errno == errno.EINVAL


@pytest.mark.parametrize("drop", [name for name, _t, _v in GOOD.to_nv()])
def test_missing_field_is_enoent(drop: str) -> None:
    fields = [f for f in _good_fields() if f[0] != drop]
    with pytest.raises(InvalidMetadata) as info:
        Metadata.unpack(_block(fields), "test")
    assert info.value.errno == errno.ENOENT and not info.value.rejected
    assert f"'{drop}' is missing" in (info.value.reason or "")


@pytest.mark.parametrize("name,bad_type,value", [
    ("datasize", nv.INT64, 268430848),      # the wire uses int64 for datasize; disk must not
    ("extentsize", nv.INT32, 2097152),
    ("keepdirty", nv.UINT64, 64),
    ("offset", nv.UINT32, 4608),
    ("resource", nv.UINT64, 1),
    ("prevrole", nv.UINT8, 1),
])
def test_wrong_type_is_einval(name: str, bad_type: int, value: int) -> None:
    fields = [(n, bad_type, value) if n == name else (n, t, v) for n, t, v in _good_fields()]
    with pytest.raises(InvalidMetadata) as info:
        Metadata.unpack(_block(fields), "test")
    assert info.value.errno == errno.EINVAL
    assert f"'{name}' is {nv.TYPE_NAMES[bad_type]}" in (info.value.reason or "")


def test_first_offending_field_decides_the_errno() -> None:
    # datasize mistyped (EINVAL) comes before resuid missing (ENOENT) in the reader's order.
    fields = [(n, nv.INT64, v) if n == "datasize" else (n, t, v)
              for n, t, v in _good_fields() if n != "resuid"]
    with pytest.raises(InvalidMetadata) as info:
        Metadata.unpack(_block(fields))
    assert info.value.errno == errno.EINVAL


def test_first_record_of_a_name_counts() -> None:
    fields = _good_fields()
    fields.insert(1, ("datasize", nv.INT64, 5))  # nv_find stops at the first name match
    with pytest.raises(InvalidMetadata):
        Metadata.unpack(_block(fields))


def test_unknown_prevrole_is_kept_but_does_not_change_the_previous_role() -> None:
    fields = [(n, t, "bogus") if n == "prevrole" else (n, t, v) for n, t, v in _good_fields()]
    md = Metadata.unpack(_block(fields))
    assert md.prevrole == "bogus"
    assert metadata.previous_role(md, "init") == "init"
    assert metadata.previous_role(Metadata.unpack(GOOD.pack()), "primary") == "primary"
    secondary = Metadata("test", 1, 512, 64, 4608, prevrole="secondary")
    assert metadata.previous_role(secondary, "init") == "secondary"


def test_extra_fields_are_ignored() -> None:
    fields = _good_fields() + [("future", nv.UINT8, 1)]
    assert Metadata.unpack(_block(fields)) == GOOD


def test_wrong_resource_is_checked_before_other_fields() -> None:
    fields = [(n, t, "other") if n == "resource" else (n, t, v)
              for n, t, v in _good_fields() if n != "datasize"]
    with pytest.raises(WrongResource) as info:
        Metadata.unpack(_block(fields), "test")
    assert info.value.found == "other" and info.value.expected == "test"
    # Without a resource name to compare with, the block is merely incomplete.
    with pytest.raises(InvalidMetadata):
        Metadata.unpack(_block(fields))


def test_counter_helpers_follow_the_role() -> None:
    primary, secondary = (5, 4), (3, 2)
    assert metadata.persisted_counters("primary", primary, secondary) == primary
    assert metadata.persisted_counters("init", primary, secondary) == primary
    assert metadata.persisted_counters("secondary", primary, secondary) == secondary
    md = Metadata("test", 1, 512, 64, 4608, localcnt=9, remotecnt=8)
    assert metadata.loaded_counters("init", md) == ((9, 8), (9, 8))
    assert metadata.loaded_counters("primary", md) == ((9, 8), None)
    assert metadata.loaded_counters("secondary", md) == (None, (9, 8))


# -- file helpers ---------------------------------------------------------------------------

def _provider(tmp_path: Path, size: int = 4 * MiB, fill: bytes = b"\0") -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(fill * size)
    return path


def test_write_then_read_touches_only_the_block(tmp_path: Path) -> None:
    path = _provider(tmp_path, fill=b"\xaa")
    md = Metadata("test", 4 * MiB - 4608, 65536, 64, 4608, resuid=0x0123456789ABCDEF,
                  localcnt=2, remotecnt=1, prevrole="secondary")
    fd = os.open(path, os.O_RDWR)
    try:
        metadata.write(fd, md)
        assert metadata.read(fd, "test", path=str(path)) == md
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:4096] == md.pack()
    assert data[4096:] == b"\xaa" * (4 * MiB - 4096)
    assert metadata.read(str(path), "test") == md


def test_write_zeroed_activemap(tmp_path: Path) -> None:
    path = _provider(tmp_path, fill=b"\xff")
    fd = os.open(path, os.O_RDWR)
    try:
        metadata.write_zeroed_activemap(fd, 1024)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:4096] == b"\xff" * 4096
    assert data[4096:5120] == bytes(1024)
    assert data[5120:] == b"\xff" * (len(data) - 5120)


def test_read_messages_carry_the_path(tmp_path: Path) -> None:
    path = _provider(tmp_path)
    with pytest.raises(InvalidMetadata) as info:
        metadata.read(str(path), "test")
    assert str(info.value) == (
        f"Unable to read metadata from {path}: No such file or directory.")
    path.write_bytes(b"\x7f" * 8192)
    with pytest.raises(InvalidMetadata) as info:
        metadata.read(str(path), "test")
    assert str(info.value) == f"Metadata read from {path} is invalid: Invalid argument."
    path.write_bytes(Metadata("other", 1, 512, 64, 4608).pack())
    with pytest.raises(WrongResource) as wrong:
        metadata.read(str(path), "test")
    assert str(wrong.value) == f"Provider {path} is not part of resource test."


def test_read_short_provider_and_missing_provider(tmp_path: Path) -> None:
    path = _provider(tmp_path, size=100)
    with pytest.raises(MetadataIOError) as info:
        metadata.read(str(path), "test")
    assert str(info.value) == "Unable to read metadata: Input/output error."
    missing = tmp_path / "nope"
    with pytest.raises(ProviderError) as perr:
        metadata.read(str(missing), "test")
    assert str(perr.value) == f"Unable to open {missing}: No such file or directory."


def test_open_provider_geometry_and_file_types(tmp_path: Path) -> None:
    path = _provider(tmp_path, size=MiB)
    prov = metadata.open_provider(str(path), write=True)
    try:
        assert (prov.mediasize, prov.sectorsize, prov.path) == (MiB, 512, str(path))
    finally:
        os.close(prov.fd)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ProviderError) as info:
        metadata.open_provider(str(fifo), write=True)
    assert str(info.value) == f"{fifo} is neither GEOM provider nor regular file."
    with pytest.raises(ProviderError) as info:
        metadata.open_provider(str(tmp_path), write=True)
    assert str(info.value) == f"Unable to open {tmp_path}: Is a directory."
