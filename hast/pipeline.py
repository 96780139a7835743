"""The data pipeline of every hastd message that carries data (FreeBSD's hast_proto.c).

This module owns what happens to a payload between the caller's buffer and the wire: the
compression stage (hast_compression.c: "hole" for all-zero blocks, "lzf" with hole tried
first), then the checksum stage (hast_checksum.c: "crc32" or "sha256", computed over the
*compressed* bytes), then the `size` field.  The order, the nv fields each stage appends and
the receiver's checks are FreeBSD's, because a FreeBSD peer decodes what we send and we decode
what it sends: compression and checksum are sender-side settings and the receiver follows
the fields present.

Where FreeBSD asserts on hostile input (lzf with an announced length <= 1024, or a stream that
decodes to another length) we raise PipelineError instead; a peer never sees a difference.
Nothing here loops over bytes in Python: zero detection and LZF are in hast._codec, crc32 and
sha256 are zlib's and hashlib's (both release the GIL on large buffers).
"""

from __future__ import annotations

import errno
import hashlib
import struct
import zlib

from hast._codec import LZFError, is_zero, lzf_compress, lzf_decompress
from hast.nv import NV

COMPRESSIONS = ("none", "hole", "lzf")
CHECKSUMS = ("none", "crc32", "sha256")
# hastd only tries LZF on blocks strictly larger than this, and only keeps the result when it
# saves at least this much (liblzf's output buffer is original length - 1024).
LZF_COMPRESS_MIN = 1024

_U32 = struct.Struct("<I")

# Anything exposing a C-contiguous byte buffer (collections.abc.Buffer needs Python 3.12).
Buffer = bytes | bytearray | memoryview


class PipelineError(ValueError):
    """A payload the FreeBSD receiver would refuse; ``errno`` as hast_proto_recv_data sets it."""

    def __init__(self, message: str, err: int = errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = err


def _crc32(data: Buffer) -> bytes:
    # hastd bcopy()s the uint32 in host order; every FreeBSD platform that runs it in
    # practice is little-endian, so emit LE.
    return _U32.pack(zlib.crc32(data))


def _sha256(data: Buffer) -> bytes:
    return hashlib.sha256(data).digest()


_HASHES = {"crc32": _crc32, "sha256": _sha256}


def encode(nvmsg: NV, data: Buffer | None, compression: str, checksum: str) -> Buffer | None:
    """Run the send pipeline on data; append its fields to nvmsg; return the wire payload.

    Fields appended in FreeBSD's order: `compression` (only if the payload was transformed),
    `checksum` + `hash` (only if checksum is not "none"), then `size`.  data None means the
    message carries no data: nothing is appended and None is returned.  When no compression
    applies the payload returned *is* data (no copy).
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}")
    if checksum not in CHECKSUMS:
        raise ValueError(f"unknown checksum {checksum!r}")
    if data is None:
        return None
    payload: Buffer = data
    size = memoryview(data).nbytes
    if size > 0xFFFFFFFF:
        raise ValueError("payload does not fit the u32 size field")
    # A hole payload is 4 bytes: on a shorter buffer (never a sector multiple, so never sent
    # by hastd) it would exceed what the receiver expects, which FreeBSD rejects (EINVAL).
    if compression != "none" and size >= _U32.size:
        if is_zero(data):
            payload = _U32.pack(size)
            nvmsg.add_string("compression", "hole")
        elif compression == "lzf" and size > LZF_COMPRESS_MIN:
            packed = lzf_compress(data, size - LZF_COMPRESS_MIN, size_prefix=True)
            if packed is not None:
                payload = packed
                nvmsg.add_string("compression", "lzf")
    if checksum != "none":
        nvmsg.add_string("checksum", checksum)
        nvmsg.add_uint8_array("hash", _HASHES[checksum](payload))
    nvmsg.add_uint32("size", memoryview(payload).nbytes)
    return payload


def payload_size(nvmsg: NV, maxsize: int) -> int:
    """Bytes of payload that follow this message's nv on the wire (its `size`, 0 if absent).

    Raises PipelineError (EINVAL) when it exceeds maxsize, before anything is read, as
    hast_proto_recv_data does.
    """
    dsize = nvmsg.get_uint32("size")
    if dsize > maxsize:
        raise PipelineError(f"Payload size ({dsize}) exceeds the expected maximum ({maxsize}).")
    return dsize


def _verify(nvmsg: NV, payload: memoryview) -> None:
    algo = nvmsg.get_string("checksum")
    if algo is None:
        return
    rhash = nvmsg.get_uint8_array("hash")
    if rhash is None:
        raise PipelineError("Hash is missing.")
    fn = _HASHES.get(algo)
    if fn is None:
        raise PipelineError(f"Unknown checksum algorithm '{algo}'.")
    chash = fn(payload)
    if len(rhash) != len(chash):
        raise PipelineError(
            f"Invalid hash size ({len(rhash)}) for {algo}, should be {len(chash)}.")
    if rhash != chash:
        # A big-endian FreeBSD host stores its crc32 in its own order (hast_checksum.c's
        # XXXPJD); accept that form too rather than drop a healthy peer.
        if algo != "crc32" or rhash != chash[::-1]:
            raise PipelineError("Hash mismatch.")


def _decompress(algo: str, payload: memoryview, maxsize: int) -> bytes:
    n = len(payload)
    if algo == "hole":
        if n != _U32.size:
            raise PipelineError(f"Unable to decompress (invalid size: {n}).")
        size = _U32.unpack(payload)[0]
        if size > maxsize:
            raise PipelineError(
                f"Decompressed size ({size}) exceeds the expected maximum ({maxsize}).")
        return bytes(size)
    if algo == "lzf":
        if n <= _U32.size:
            raise PipelineError(f"Unable to decompress (invalid size: {n}).")
        origsize = _U32.unpack_from(payload)[0]
        if origsize <= LZF_COMPRESS_MIN:
            raise PipelineError(
                f"Unable to decompress (lzf original size {origsize} <= {LZF_COMPRESS_MIN}).")
        if origsize > maxsize:
            raise PipelineError(
                f"Decompressed size ({origsize}) exceeds the expected maximum ({maxsize}).")
        try:
            out = lzf_decompress(payload[_U32.size:], origsize)
        except LZFError as exc:
            raise PipelineError("Unable to decompress.", exc.errno) from exc
        if len(out) != origsize:
            raise PipelineError(
                f"Unable to decompress (got {len(out)} bytes, announced {origsize}).")
        return out
    raise PipelineError(f"Unknown compression algorithm '{algo}'.")


def decode(nvmsg: NV, payload: Buffer, maxsize: int) -> Buffer:
    """Run the receive pipeline: verify the hash, then decompress; return the data.

    payload is exactly the `size` bytes that followed the nv.  maxsize is the length the
    receiver expects at most (request length, map size); more is EINVAL as in FreeBSD.  The
    data may be shorter than maxsize.  When neither stage applies, payload itself is
    returned (no copy).  Raises PipelineError on any check FreeBSD fails or asserts.
    """
    dsize = payload_size(nvmsg, maxsize)
    view = memoryview(payload)
    if view.nbytes != dsize:
        raise PipelineError(f"Payload length ({view.nbytes}) differs from size ({dsize}).")
    if dsize == 0:
        return b""
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    _verify(nvmsg, view)
    algo = nvmsg.get_string("compression")
    if algo is None:
        return payload
    return _decompress(algo, view, maxsize)
