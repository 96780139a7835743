"""metadata: the provider's 4096-byte metadata block (hast-internals.md §1.2, ``Metadata.unpack``).

The block is read from a disk that another host (the FreeBSD peer, a previous owner, a
corrupted write) may have filled, by hastctl dump, by both workers at start-up and by the
secondary before every session.  The input is the block (padded with zeros / cut to 4096
bytes).  Only InvalidMetadata and WrongResource (the two MetadataError cases of
metadata_read()) may escape.  A block that decodes re-packs into a block that decodes to the
same Metadata, and the activemap size derived from it (what the workers compute next) is
either computed or refused with ValueError, never anything else.  (The primary's ActiveMap
built from ``datasize``/``extentsize``/``keepdirty`` is not exercised here: hast/primary.py
is still being written.)
"""

from __future__ import annotations

from hypothesis import strategies as st

from fuzz.common import Finding, load_seeds
from fuzz.strategies import from_seeds, nv_blob
from hast import metadata
from hast.activemap import calc_ondisk_size

EXPECTED: tuple[type[BaseException], ...] = (metadata.InvalidMetadata, metadata.WrongResource)
MAX_LEN = metadata.METADATA_SIZE
MEDIASIZE = 10 * 1024 ** 3      # the provider of the spec's worked example A.1
_FIELDS = (("resource", 17), ("datasize", 8), ("extentsize", 6), ("keepdirty", 6),
           ("offset", 8), ("resuid", 8), ("localcnt", 8), ("remotecnt", 8), ("prevrole", 17))


def seeds() -> list[bytes]:
    return load_seeds("metadata")


def strategy() -> st.SearchStrategy[bytes]:
    return from_seeds(seeds(), MAX_LEN, nv_blob(_FIELDS, 12))


def one_input(data: bytes) -> None:
    block = data[:metadata.METADATA_SIZE].ljust(metadata.METADATA_SIZE, b"\0")
    md = metadata.Metadata.unpack(block, "test")
    try:
        again = metadata.Metadata.unpack(md.pack(), "test")
    except Exception as exc:
        raise Finding(f"re-packing decoded metadata fails: {exc!r} ({md!r})") from exc
    if again != md:
        raise Finding(f"metadata round trip changes {md!r} into {again!r}")
    # The secondary's next step (open_local): the bitmap size for its provider.
    for sectorsize in (512, 4096):
        try:
            calc_ondisk_size(MEDIASIZE - metadata.METADATA_SIZE, md.extentsize, sectorsize)
        except ValueError:
            pass
