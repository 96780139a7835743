"""frame: the hast_proto frame header + nv readers on a real socket (hast-internals.md §5.1).

The input is the byte stream a peer sends; it is written into one end of a socketpair, the
write side is shut down, and every frame reader py-hast has reads the other end:

* ``hast.proto.recv_frame`` (+ ``recv_exact`` for the payload announced by ``size``) -- the
  primary's replies, the control socket client, worker channels;
* ``hast.daemon.FrameReader`` -- the parent's non-blocking reader of a connection's first
  frame (handshake steps 1-2, control requests), when hast.daemon is importable;
* ``hast.secondary._Reader`` -- the secondary worker's read-ahead reader of requests
  (which decodes the common request shapes with ``hast._wire.parse_frame``, in C, and the
  rest with hast.nv; both must match the spec).

Each must stop at exactly the frame where the spec's walk (:func:`fuzz.reference.
split_frames`) stops, for the same reason (EOF, version > 2, nv larger than the bound,
malformed nv), decode the same frames, and raise nothing but ProtoError (an OSError).  The
nv size bound is checked before anything is allocated (the stream is at most MAX_LEN bytes;
a reader that waited for a 4 GiB blob would see EOF, one that allocated it would hit the
runner's address-space limit).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import strategies as st

from fuzz import reference
from fuzz.common import Finding, load_seeds
from fuzz.strategies import frames, from_seeds
from hast import nv, proto

EXPECTED: tuple[type[BaseException], ...] = (proto.ProtoError,)
MAX_LEN = 96 * 1024
MAX_NV = proto.MAX_NV_WIRE
MAX_PAYLOAD = 1024 * 1024
_ERPCMISMATCH = getattr(errno, "ERPCMISMATCH", errno.EPROTO)
# How each reason of the spec's walk to stop shows in a reader (secondary._Reader says
# EPROTO for a version mismatch).
_STOP: dict[str, str | int] = {
    "end": errno.ENOTCONN, "truncated": errno.ENOTCONN, "version": _ERPCMISMATCH,
    "nvsize": errno.EMSGSIZE, "nv": errno.EINVAL, "payload": "payload",
}
_STOP_ALT = {"version": (errno.EPROTO,)}

Decoded = tuple[int, nv.NV, bytes]


@dataclass
class Result:
    """What a reader made of the stream."""

    frames: list[Decoded]              # read completely, payload included
    partial: tuple[int, nv.NV] | None  # header + nv read, payload too big or cut short
    stop: str | int                    # errno of the failure that ended it, or "payload"


def seeds() -> list[bytes]:
    return load_seeds("frame")


def strategy() -> st.SearchStrategy[bytes]:
    return from_seeds(seeds(), MAX_LEN, frames())


def _feed(data: bytes) -> socket.socket:
    """The read end of a socketpair that holds ``data`` followed by EOF."""
    a, b = socket.socketpair()
    b.settimeout(5)

    def write() -> None:
        try:
            a.sendall(data)
            a.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            a.close()

    if len(data) > 32768:
        threading.Thread(target=write, daemon=True).start()
    else:
        write()
    return b


def _same(msg: nv.NV | tuple, records: list[reference.Record] | None) -> bool:
    if isinstance(msg, tuple):
        from fuzz.targets.wire import fast_matches

        return records is not None and fast_matches(msg, records, request=True)
    if records is None or len(msg) != len(records):
        return False
    for (name, nvtype, value), rec in zip(msg, records, strict=True):
        if name.encode("utf-8", "surrogateescape") != rec.name or nvtype != rec.type:
            return False
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogateescape")
        if value != rec.value():
            return False
    return True


def _payload_size(msg: nv.NV | tuple) -> int:
    if isinstance(msg, tuple):          # hast._wire's FAST tuple
        from fuzz.targets.wire import F_SIZE

        return msg[8] if msg[3] & F_SIZE else 0
    return proto.payload_size(msg)


def _read_all(read_frame: Callable[[], tuple[int, nv.NV]],
              read_payload: Callable[[int], bytes]) -> Result:
    out = Result([], None, 0)
    while True:
        try:
            version, msg = read_frame()
        except proto.ProtoError as exc:
            out.stop = exc.errno or 0
            return out
        size = _payload_size(msg)
        if size > MAX_PAYLOAD:
            out.partial, out.stop = (version, msg), "payload"
            return out
        try:
            payload = read_payload(size)
        except proto.ProtoError as exc:
            out.partial, out.stop = (version, msg), exc.errno or 0
            return out
        out.frames.append((version, msg, payload))


def _compare(who: str, got: Result, ref: list[reference.Frame], why: str,
             versions: bool = True) -> None:
    """The reader must stop where and why the spec's walk stops, with the same frames."""
    if got.stop != _STOP[why] and got.stop not in _STOP_ALT.get(why, ()):
        raise Finding(f"{who}: stopped with {got.stop!r} after {len(got.frames)} frames; "
                      f"the spec stops for {why!r} after {len(ref)}")
    complete = [f for f in ref if f.complete]
    if len(got.frames) != len(complete):
        raise Finding(f"{who}: read {len(got.frames)} complete frames, the spec "
                      f"{len(complete)} ({why})")
    for i, (f, (version, msg, payload)) in enumerate(zip(complete, got.frames, strict=True)):
        if (versions and version != f.version) or not _same(msg, f.records):
            raise Finding(f"{who}: frame {i} decoded as v{version} {msg!r}, "
                          f"spec: v{f.version} {f.records!r}")
        if payload != f.payload:
            raise Finding(f"{who}: payload of frame {i} differs")
    tail = ref[-1] if ref and not ref[-1].complete and ref[-1].records is not None else None
    if (got.partial is None) != (tail is None):
        raise Finding(f"{who}: last, incomplete frame {got.partial!r}; spec: {tail!r}")
    if got.partial is not None and tail is not None and not _same(got.partial[1], tail.records):
        raise Finding(f"{who}: incomplete frame decoded as {got.partial!r}; spec: {tail!r}")


def _check_recv_frame(data: bytes, ref: list[reference.Frame], why: str) -> None:
    sock = _feed(data)
    with sock:
        got = _read_all(lambda: proto.recv_frame(sock, MAX_NV),
                        lambda n: bytes(proto.recv_exact(sock, n)))
    _compare("proto.recv_frame", got, ref, why)
    if isinstance(got.stop, int) and got.stop != errno.ENOTCONN:
        # What every caller does with a bad frame: drop the connection with this error.
        raise proto.ProtoError(got.stop, os.strerror(got.stop))


def _check_secondary_reader(data: bytes, ref: list[reference.Frame], why: str) -> None:
    try:
        from hast.secondary import _Reader
    except ImportError:
        return
    sock = _feed(data)
    with sock:
        reader = _Reader(sock)

        def payload(n: int) -> bytes:
            buf = bytearray(n)
            if n:
                reader.into(memoryview(buf))
            return bytes(buf)

        got = _read_all(lambda: (0, reader.frame(MAX_NV)), payload)
    _compare("secondary._Reader", got, ref, why, versions=False)


def _check_frame_reader(data: bytes, ref: list[reference.Frame]) -> None:
    """The parent reads only the first header + nv, without blocking its loop."""
    try:
        from hast.daemon import FrameReader
    except ImportError:
        return
    sock = _feed(data)
    with sock:
        sock.setblocking(False)
        reader = FrameReader(MAX_NV)
        result: nv.NV | int | None = None
        for _ in range(MAX_LEN):
            try:
                result = reader.feed(sock)
            except proto.ProtoError as exc:
                result = exc.errno or 0
            if result is not None:
                break
            if not select.select([sock], [], [], 5.0)[0]:   # as the daemon's loop waits
                raise Finding("daemon.FrameReader: no progress on a stream that ends")
    first = ref[0].records if ref else None
    if isinstance(result, nv.NV):
        if not _same(result, first):
            raise Finding(f"daemon.FrameReader decoded {result!r}; spec: {first!r}")
    elif first is not None:
        raise Finding(f"daemon.FrameReader failed ({result!r}) on a valid first frame")


def one_input(data: bytes) -> None:
    ref, why = reference.split_frames(data, MAX_NV, MAX_PAYLOAD)
    _check_frame_reader(data, ref)
    _check_secondary_reader(data, ref, why)
    _check_recv_frame(data, ref, why)
