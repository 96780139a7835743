"""pipeline: the receive side of the data pipeline (hast-internals.md §5.2-§5.6).

What requests and replies carry after their nv -- WRITE data on the secondary, READ data and
the handshake's activemap on the primary -- goes through ``hast.pipeline.payload_size`` and
``hast.pipeline.decode`` (hash check, then "hole"/"lzf" decompression).  Input layout: one
byte choosing the receiver's expected maximum (a sector, MAXPHYS, an activemap size, ...),
then a hast_proto frame: 5-byte header, nv blob, payload.

Checked: only NVError (a blob the frame layer would have refused) and PipelineError escape;
``payload_size`` refuses a ``size`` above the maximum before anything is read, so the bytes
allocated never exceed what the receiver expects; decoded data is at most the maximum, is the
payload itself when nothing was compressed, is all zeros for "hole", and survives being
re-encoded with the sender's settings and decoded again.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from fuzz.common import Finding, Input, frame, load_seeds, nv_record
from fuzz.strategies import from_seeds, interesting_int, nv_blob
from hast import nv, pipeline

EXPECTED: tuple[type[BaseException], ...] = (nv.NVError, pipeline.PipelineError)
MAX_LEN = 1024 * 1024 + 4096
MAXSIZES = (0, 4, 512, 1024, 1025, 2048, 4096, 65536, 1024 * 1024, 512 * 3)
_FIELDS = (("size", 6), ("compression", 17), ("checksum", 17), ("hash", 10), ("length", 8))


def seeds() -> list[bytes]:
    return load_seeds("pipeline")


@st.composite
def _structured(draw: st.DrawFn) -> bytes:
    """A frame whose nv announces the payload, with hash/compression fields around it."""
    payload = draw(st.one_of(st.binary(max_size=2048), st.just(bytes(4096))))
    compression = draw(st.sampled_from(pipeline.COMPRESSIONS))
    checksum = draw(st.sampled_from(pipeline.CHECKSUMS))
    msg = nv.NV()
    wire = pipeline.encode(msg, payload, compression, checksum)
    blob = msg.pack()
    if draw(st.booleans()):
        blob += draw(nv_blob(_FIELDS, 2))
    if draw(st.booleans()):
        blob = nv_record(6, b"size", struct.pack("<I", draw(interesting_int(4)))) + blob
    sel = draw(st.integers(0, 255))
    return bytes([sel]) + frame(blob, bytes(wire or b""))


def strategy() -> st.SearchStrategy[bytes]:
    return from_seeds(seeds(), MAX_LEN, _structured())


def one_input(data: bytes) -> None:
    inp = Input(data)
    maxsize = MAXSIZES[inp.byte() % len(MAXSIZES)]
    head = inp.take(5).ljust(5, b"\0")
    blob = inp.take(min(int.from_bytes(head[1:], "little"), 65536))
    msg = nv.NV.unpack(blob)
    size = pipeline.payload_size(msg, maxsize)
    payload = inp.take(size)
    if len(payload) < size:
        return  # the stream ended: the transport reports ENOTCONN, nothing to decode
    out = pipeline.decode(msg, payload, maxsize)
    n = memoryview(out).nbytes
    if n > maxsize:
        raise Finding(f"decoded {n} bytes, more than the expected maximum {maxsize}")
    algo = msg.get_string("compression") if n else None   # no payload: no stage ran
    if algo is None and n and out is not payload:
        raise Finding("uncompressed payload was copied or altered")
    if algo == "hole" and any(bytes(out)):
        raise Finding("a hole decodes to non-zero bytes")
    if algo == "lzf" and n <= pipeline.LZF_COMPRESS_MIN:
        raise Finding(f"lzf accepted with an original size of {n} (FreeBSD asserts > 1024)")
    # What we decoded, we can send again, and it decodes to the same bytes.  (With no
    # payload the receiver looks at no other field, so they may hold anything.)
    checksum = msg.get_string("checksum") if n else None
    for compression in ("none", algo if n and algo else "none"):
        again = nv.NV()
        wire = pipeline.encode(again, out, compression, checksum or "none")
        if bytes(pipeline.decode(again, wire or b"", max(maxsize, n))) != bytes(out):
            raise Finding(f"re-encoding with {compression} changes the data")
