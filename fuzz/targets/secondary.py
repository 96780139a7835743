"""secondary: the secondary worker's request path and handshake step 3 (hast-internals.md §6.4,
§7).

A primary -- or whoever reached the secondary's listen address and won a handshake -- sends
requests the secondary validates (requnpack, §7.4) and executes on its provider.  Each input
is one whole session of ``hast.secondary.Secondary``, in-process, over two socketpairs, on a
2 MiB provider laid out by ``hastctl create`` and already paired with the primary (resuid
set, counters equal: step 3 answers "in sync" and sends the on-disk bitmap).  Input layout:
one flags byte, then (flags bit 0) a 16-bit length and the step-2 nv the worker is started
with, then the byte stream of connection #1.  Flags bit 1 selects protocol version 1, bits 2-5
the secondary's compression/checksum (what its READ replies and bitmap go through).

Checked on every input:

* nothing but NVError (a step-2 nv the parent would have refused) escapes; the session ends
  by itself once connection #1 is at EOF -- no thread is left running, nothing hangs;
* the step-3 answer and every reply on connection #2 are well-formed frames whose payloads
  decode (the primary must be able to read them);
* **no byte of the provider changes except by a request the spec says must be executed**:
  every 512-byte sector of the data area that differs afterwards holds what a valid WRITE
  (valid per §7.4, payload decoding to exactly ``length`` bytes, before any frame that ends
  the session) put there, or zeros from a valid DELETE; the metadata block is unchanged
  (the provider is already paired, so the worker has nothing to record) and the bitmap area
  only ever gets cleared.  When the stream ends on a frame boundary, a FLUSH with a sentinel
  seq is appended and its reply awaited first, so every reply of the input is seen.
"""

from __future__ import annotations

import errno
import shutil
import socket
import struct
import tempfile
import threading
from pathlib import Path

from hypothesis import strategies as st

from fuzz import reference
from fuzz.common import Finding, Input, frame, load_seeds, nv_record
from fuzz.strategies import from_seeds, interesting_int, nv_blob
from hast import metadata, pipeline, proto, secondary, worker
from hast import nv as nvmod
from hast.config import Config, Resource

EXPECTED: tuple[type[BaseException], ...] = (nvmod.NVError,)
MAX_LEN = 256 * 1024
MEDIASIZE = 2 * 1024 * 1024
SECTOR = 512
RESUID = 0x0123456789ABCDEF
SENTINEL_SEQ = 0xFFFFFFFFFFFFFF01
SESSION_TIMEOUT = 20.0
COMPRESSIONS = ("none", "hole", "lzf", "hole")
CHECKSUMS = ("none", "crc32", "sha256", "none")
_U64 = struct.Struct("<Q")

_state: _Provider | None = None


class _Provider:
    """The provider file, its pristine image and the layout the worker will see."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hast-fuzz-secondary-"))
        self.path = self.root / "provider.img"
        self.mapsize, self.datasize, self.localoff = metadata.layout(
            MEDIASIZE, metadata.HAST_EXTENTSIZE, SECTOR)
        md = metadata.Metadata("test", self.datasize, metadata.HAST_EXTENTSIZE,
                               metadata.HAST_KEEPDIRTY, self.localoff, RESUID, 0, 0,
                               "secondary")
        image = bytearray(MEDIASIZE)
        image[:metadata.METADATA_SIZE] = md.pack()
        # Some extents marked dirty, and recognisable data everywhere.
        image[metadata.METADATA_SIZE:metadata.METADATA_SIZE + 1] = b"\x05"
        for off in range(self.localoff, MEDIASIZE, SECTOR):
            image[off:off + 8] = _U64.pack(off)
        self.pristine = bytes(image)
        self.path.write_bytes(self.pristine)
        self.config = Config(path=str(self.root / "hast.conf"), control="uds:///nonexistent",
                             pidfile=str(self.root / "pid"), listen=["tcp4://127.0.0.1:0"],
                             resources={})

    def resource(self, compression: str, checksum: str) -> Resource:
        return Resource(name="test", provname="test", local=str(self.path),
                        remote="tcp4://127.0.0.1", source="", replication="memsync",
                        checksum=checksum, compression=compression, timeout=5, exec="",
                        metaflush=True)

    def image(self) -> bytes:
        return self.path.read_bytes()

    def restore(self) -> None:
        with open(self.path, "r+b") as f:
            f.write(self.pristine)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def seeds() -> list[bytes]:
    return load_seeds("secondary")


@st.composite
def _requests(draw: st.DrawFn) -> bytes:
    """A stream of requests with hastd's fields, mostly in range, with or without data."""
    out = []
    for seq in range(1, draw(st.integers(1, 5)) + 1):
        cmd = draw(st.sampled_from([1, 2, 2, 3, 4, 5, 0, 9]))
        blob = nv_record(2, b"cmd", bytes([cmd])) + nv_record(8, b"seq", _U64.pack(seq))
        offset = draw(st.sampled_from([0, 512, 4096, 1 << 20, 2 << 20, 100])) \
            if draw(st.booleans()) else draw(interesting_int(8))
        length = draw(st.sampled_from([512, 4096, 0, 1 << 20, (1 << 20) + 512, 3]))
        blob += nv_record(8, b"offset", _U64.pack(offset))
        blob += nv_record(8, b"length", _U64.pack(length))
        if draw(st.booleans()):
            blob += nv_record(2, b"memsync", b"\1")
        payload = b""
        if cmd == 2 or draw(st.integers(0, 9)) == 0:
            data = draw(st.sampled_from([b"\0", b"\xab", b"ok"])) * min(length, 8192)
            msg = nvmod.NV()
            wire = pipeline.encode(msg, data, draw(st.sampled_from(pipeline.COMPRESSIONS)),
                                   draw(st.sampled_from(pipeline.CHECKSUMS)))
            blob += msg.pack()
            payload = bytes(wire or b"")
        if draw(st.integers(0, 5)) == 0:
            blob += draw(nv_blob(max_records=2))
        out.append(frame(blob, payload, draw(st.sampled_from([1, 2, 2]))))
    flags = draw(st.integers(0, 255)) & ~1
    return bytes([flags]) + b"".join(out)


def strategy() -> st.SearchStrategy[bytes]:
    return from_seeds(seeds(), MAX_LEN, _requests())


def setup() -> None:
    global _state
    if _state is None:
        _state = _Provider()


def teardown() -> None:
    global _state
    if _state is not None:
        _state.close()
        _state = None


# -- the spec's view of the stream (§7.4) --------------------------------------------------------

def _allowed_writes(stream: bytes, datasize: int) -> list[tuple[int, bytes]]:
    """(offset, bytes) a correct secondary may write, in stream order, up to the first frame
    that must end the session."""
    frames, _why = reference.split_frames(stream, proto.MAX_NV_WIRE, secondary.DRAIN_MAX)
    out: list[tuple[int, bytes]] = []
    for f in frames:
        if f.records is None or not f.complete:
            break
        recs = f.records
        cmd = reference.nv_int(recs, b"cmd", 2)
        if cmd not in (1, 2, 3, 4, 5):
            break                       # missing/unknown cmd: the connection is dropped
        if cmd not in (2, 3):
            continue
        seq = reference.nv_int(recs, b"seq", 8)
        off = reference.nv_lookup(recs, b"offset", 8)
        length = reference.nv_lookup(recs, b"length", 8)
        if seq == 0 or off is None or length is None:
            continue
        o, n = int(off.value()), int(length.value())  # type: ignore[call-overload]
        if n == 0 or o % SECTOR or n % SECTOR or o + n > datasize:
            continue
        if cmd == 3:
            out.append((o, bytes(n)))   # DELETE: punched hole / discard reads as zeros
            continue
        if n > secondary.MAXPHYS:
            continue
        msg = nvmod.NV.unpack(f.blob)
        try:
            data = bytes(pipeline.decode(msg, f.payload, secondary.MAXPHYS))
        except pipeline.PipelineError:
            break                       # a corrupt payload ends the session
        if len(data) == n:
            out.append((o, data))
    return out


def _check_provider(before: bytes, after: bytes, stream: bytes, datasize: int,
                    localoff: int) -> None:
    if after[:metadata.METADATA_SIZE] != before[:metadata.METADATA_SIZE]:
        raise Finding("metadata block changed during a session")
    for i in range(metadata.METADATA_SIZE, localoff):
        if after[i] not in (before[i], 0):
            raise Finding(f"activemap byte {i} changed to {after[i]:#x}")
    if after[localoff:] == before[localoff:]:
        return
    writes = _allowed_writes(stream, datasize)
    for start in range(localoff, len(after), SECTOR):
        sector = after[start:start + SECTOR]
        if sector == before[start:start + SECTOR]:
            continue
        rel = start - localoff
        if not any(o <= rel < o + len(d) and d[rel - o:rel - o + SECTOR] == sector
                   for o, d in writes):
            raise Finding(f"provider data at offset {rel} changed, and no valid request "
                          f"wrote it")


# -- one session -----------------------------------------------------------------------------------

def _read_frames(data: bytes, maxsize: int) -> None:
    """What the worker sent must be readable by a primary (a stream cut short by the end of
    the session is a dropped connection, not a malformed one)."""
    frames, why = reference.split_frames(data, proto.MAX_NV_WIRE, maxsize)
    if why not in ("end", "truncated"):
        raise Finding(f"the secondary sent a stream the primary cannot read: {why}")
    for f in frames:
        if not f.complete:
            continue
        msg = nvmod.NV.unpack(f.blob)
        try:
            pipeline.decode(msg, f.payload, maxsize)
        except pipeline.PipelineError as exc:
            raise Finding(f"the secondary sent a payload that does not decode: {exc}") from None


class _Collector(threading.Thread):
    """Reads one socket to EOF in the background; ``event`` is set when ``marker`` shows."""

    def __init__(self, sock: socket.socket, marker: bytes | None, event: threading.Event,
                 name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.sock = sock
        self.marker = marker
        self.event = event
        self.data = bytearray()

    def run(self) -> None:
        self.sock.settimeout(SESSION_TIMEOUT)
        try:
            while chunk := self.sock.recv(262144):
                self.data += chunk
                if self.marker is not None and self.marker in self.data:
                    self.event.set()
        except OSError:
            pass


def one_input(data: bytes) -> None:
    setup()
    assert _state is not None
    inp = Input(data)
    flags = inp.byte()
    if flags & 1:
        handshake = nvmod.NV.unpack(inp.take(inp.u16()))
    else:
        handshake = nvmod.NV().add_string("resource", "test").add_uint8_array(
            "token", bytes(16)).add_uint64("resuid", RESUID).add_uint64("localcnt", 0) \
            .add_uint64("remotecnt", 0)
    version = 1 if flags & 2 else 2
    res = _state.resource(COMPRESSIONS[(flags >> 2) & 3], CHECKSUMS[(flags >> 4) & 3])
    stream = inp.rest()
    frames, why = reference.split_frames(stream, proto.MAX_NV_WIRE, secondary.DRAIN_MAX)
    if why == "end":
        # Every request is answered before the sentinel FLUSH: await it, then hang up.
        sentinel = nvmod.NV().add_uint8("cmd", secondary.HIO_FLUSH).add_uint64(
            "seq", SENTINEL_SEQ)
        stream += frame(sentinel.pack(), version=version)

    p1, s1 = socket.socketpair()
    p2, s2 = socket.socketpair()
    ctx = worker.WorkerContext(config=_state.config, resource=res, role="secondary",
                               remotein=s1, remoteout=s2, handshake=handshake, version=version)
    sec = secondary.Secondary(ctx)
    progress = threading.Event()     # the sentinel's reply arrived, or the session ended
    result: dict[str, BaseException] = {}

    def session() -> None:
        try:
            secondary._set_timeout(s1, int(SESSION_TIMEOUT))
            secondary._set_timeout(s2, int(SESSION_TIMEOUT))
            sec.open_local()
            sec.handshake()
            sec.serve()
        except secondary._Fatal:
            pass                     # a refused handshake ends the session, as designed
        except BaseException as exc:  # re-raised in the fuzzer's thread below
            result["exc"] = exc
        finally:
            sec.close()
            s1.close()
            s2.close()
            progress.set()

    thread = threading.Thread(target=session, name="fuzz-secondary", daemon=True)
    answer = _Collector(p1, None, progress, "fuzz-answer")
    replies = _Collector(p2, _U64.pack(SENTINEL_SEQ), progress, "fuzz-replies")
    try:
        thread.start()
        answer.start()
        replies.start()
        try:
            p1.sendall(stream)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise
        if why == "end" and not progress.wait(SESSION_TIMEOUT):
            raise Finding("no reply to the sentinel FLUSH, and the session goes on")
        try:
            p1.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        thread.join(SESSION_TIMEOUT)
        if thread.is_alive():
            raise Finding("the secondary session did not end after EOF on connection #1")
        for collector in (answer, replies):
            collector.join(SESSION_TIMEOUT)
            if collector.is_alive():
                raise Finding(f"{collector.name}: the worker did not close its connection")
        if "exc" in result:
            raise result["exc"]
        _read_frames(bytes(answer.data), _state.mapsize)
        _read_frames(bytes(replies.data), secondary.MAXPHYS)
        after = _state.image()
        if after != _state.pristine:
            try:
                _check_provider(_state.pristine, after, stream, _state.datasize,
                                _state.localoff)
            finally:
                _state.restore()
    finally:
        p1.close()
        p2.close()
