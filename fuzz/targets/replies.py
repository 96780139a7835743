"""replies: what the primary reads from the secondary -- handshake answers and I/O replies
(hast-internals.md §6.2, §6.4-§6.6, §7.2-§7.3).

The primary connects out to whatever answers at its ``remote`` address, so every byte it
reads there is untrusted.  One ``hast.primary.Primary`` (in-process, 2 MiB provider) is
reused for the whole run; for each input a fake secondary on 127.0.0.1 plays the other side
of ``Primary.connect()``.  Input layout: a flags byte, then three sections: the step-1
reply (16-bit length; flags bit 0 clear means "a valid one with a token" instead), the step-3
answer with its bitmap payload (16-bit length), and the rest -- the reply stream sent on
connection #2 once connected, after the primary sent a WRITE (every 8-byte placeholder
``a5 a5 ...`` is replaced by that WRITE's seq, so mutated replies can match it).

Checked: ``connect()`` returns an errno or 0 and raises nothing; no thread of the primary
dies with an exception; the WRITE completes exactly once, whatever the replies say; and no
length the peer declares (``mapsize``, ``size``) is allocated before it is checked against
what the primary expects -- ``proto.recv_exact`` is watched for requests above 64 MiB.
"""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
import threading
import traceback
from pathlib import Path

from hypothesis import strategies as st

from fuzz import reference
from fuzz.common import Finding, Input, frame, load_seeds, nv_record
from fuzz.hastd import make_provider
from fuzz.strategies import from_seeds, interesting_int, nv_blob
from hast import nv as nvmod
from hast import proto, worker
from hast.config import Config, Resource

EXPECTED: tuple[type[BaseException], ...] = ()
MAX_LEN = 64 * 1024
PLACEHOLDER = b"\xa5" * 8
ALLOC_BOUND = 64 * 1024 * 1024
IO_TIMEOUT = 5.0

_state: _Harness | None = None
_restore: list = []     # what setup() patched, put back by teardown()


class _Harness:
    def __init__(self) -> None:
        from hast.primary import Primary

        self.root = Path(tempfile.mkdtemp(prefix="hast-fuzz-primary-"))
        provider = self.root / "test.img"
        make_provider(provider, resuid=0x1122334455667788)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.02)
        port = self.listener.getsockname()[1]
        res = Resource(name="test", provname="test", local=str(provider),
                       remote=f"tcp4://127.0.0.1:{port}", source="", replication="memsync",
                       checksum="none", compression="none", timeout=3, exec="",
                       metaflush=False)
        cfg = Config(path=str(self.root / "hast.conf"), control="uds:///nonexistent",
                     pidfile=str(self.root / "pid"), listen=[], resources={"test": res})
        self.primary = Primary(worker.WorkerContext(config=cfg, resource=res, role="primary"))
        self.errors: list[str] = []
        self.largest = 0

    def close(self) -> None:
        conn = self.primary.conn
        if conn is not None:
            self.primary.disconnect(conn)
        self.primary.local.stop()
        self.listener.close()
        shutil.rmtree(self.root, ignore_errors=True)


def seeds() -> list[bytes]:
    return load_seeds("replies")


def _answer_blob(draw: st.DrawFn) -> bytes:
    blob = b""
    for name, nvtype, value in (("datasize", 7, None), ("extentsize", 5, 2 << 20),
                                ("localcnt", 8, 0), ("remotecnt", 8, 0), ("syncsrc", 2, 1)):
        if draw(st.integers(0, 7)):
            size = {2: 1, 5: 4, 7: 8, 8: 8}[nvtype]
            v = draw(interesting_int(size)) if value is None else value
            blob += nv_record(nvtype, name.encode(), v.to_bytes(size, "little"))
    return blob


@st.composite
def _structured(draw: st.DrawFn) -> bytes:
    step1 = frame(nvmod.NV().add_uint8("version", draw(st.integers(0, 3)))
                  .add_uint8_array("token", bytes(16)).pack())
    answer = _answer_blob(draw)
    payload = b""
    if draw(st.booleans()):
        mapsize = draw(st.sampled_from([512, 0, 4, 1 << 20, 0xFFFFFFFF]))
        answer += nv_record(6, b"mapsize", struct.pack("<I", mapsize))
        payload = draw(st.sampled_from([b"\0" * 512, b"\xff" * 512, b"\0\2\0\0"]))
        if payload == b"\0\2\0\0":
            answer += nv_record(17, b"compression", b"hole\0")
        answer += nv_record(6, b"size", struct.pack("<I", len(payload)))
    replies = b""
    for _ in range(draw(st.integers(0, 3))):
        blob = nv_record(8, b"seq", PLACEHOLDER)
        blob += draw(nv_blob((("received", 1), ("error", 3), ("size", 6)), 2))
        replies += frame(blob, draw(st.binary(max_size=16)))
    flags = draw(st.integers(0, 255))
    return (bytes([flags]) + struct.pack("<H", len(step1)) + step1
            + struct.pack("<H", len(answer + payload)) + answer + payload + replies)


def strategy() -> st.SearchStrategy[bytes]:
    return from_seeds(seeds(), MAX_LEN, _structured())


def setup() -> None:
    global _state
    if _state is None:
        _state = _Harness()
        real_recv_exact = proto.recv_exact
        state = _state

        def watched(sock: socket.socket, size: int) -> bytearray:
            state.largest = max(state.largest, size)
            if size > ALLOC_BOUND:
                state.errors.append(f"recv_exact({size}): a declared length allocated "
                                    f"before it was checked")
                raise proto.ProtoError(proto.errno.EMSGSIZE, "fuzz: refused")
            return real_recv_exact(sock, size)

        _restore.append((proto, "recv_exact", real_recv_exact))
        proto.recv_exact = watched  # type: ignore[assignment]

        def hook(args: threading.ExceptHookArgs) -> None:
            where = "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                       args.exc_traceback))
            state.errors.append(f"thread {args.thread.name if args.thread else '?'} died: "
                                f"{args.exc_type.__name__}: {args.exc_value}\n{where}")

        _restore.append((threading, "excepthook", threading.excepthook))
        threading.excepthook = hook


def teardown() -> None:
    global _state
    if _state is not None:
        _state.close()
        _state = None
    while _restore:
        module, name, value = _restore.pop()
        setattr(module, name, value)


class _FakeSecondary(threading.Thread):
    def __init__(self, listener: socket.socket, step1: bytes | None, answer: bytes) -> None:
        super().__init__(name="fuzz-fake-secondary", daemon=True)
        self.listener = listener
        self.step1 = step1
        self.answer = answer
        self.conn1: socket.socket | None = None
        self.conn2: socket.socket | None = None
        self.stop = threading.Event()

    def _accept(self) -> socket.socket:
        """The primary's next connection; gives up once connect() has returned."""
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(IO_TIMEOUT)
            return sock
        raise OSError("the primary stopped connecting")

    def run(self) -> None:
        try:
            self.conn1 = self._accept()
            proto.recv_frame(self.conn1)
            reply = self.step1
            if reply is None:
                reply = frame(nvmod.NV().add_uint8("version", 2)
                              .add_uint8_array("token", bytes(range(16))).pack())
            self.conn1.sendall(reply)
            frames, why = reference.split_frames(reply, proto.MAX_NV_WIRE, 1 << 32)
            if why != "end" or not frames:
                # Not one whole frame: EOF now, or the primary waits for the rest until its
                # timeout (which is all it can do).
                self.conn1.shutdown(socket.SHUT_WR)
            self.conn2 = self._accept()
            proto.recv_frame(self.conn2)
            self.conn1.sendall(self.answer)
            # The primary reads connection #1 only during the handshake: EOF ends a short
            # answer at once instead of after its timeout.
            self.conn1.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        for s in (self.conn1, self.conn2):
            if s is not None:
                s.close()


def _write_seq(conn1: socket.socket) -> int:
    """The seq of the primary's WRITE(0, 4096) among what it sends on connection #1."""
    while True:
        _v, msg = proto.recv_frame(conn1)
        size = msg.get_uint32("size")
        if size:
            proto.recv_exact(conn1, size)
        if (msg.get_uint8("cmd"), msg.get_uint64("offset"), msg.get_uint64("length")) == \
                (2, 0, 4096):
            return msg.get_uint64("seq")


def one_input(data: bytes) -> None:
    setup()
    assert _state is not None
    primary = _state.primary
    inp = Input(data)
    flags = inp.byte()
    step1 = inp.take(inp.u16())
    answer = inp.take(inp.u16())
    replies = inp.rest()
    fake = _FakeSecondary(_state.listener, step1 if flags & 1 else None, answer)
    fake.start()
    try:
        code = primary.connect()
        fake.stop.set()
        fake.join(IO_TIMEOUT)
        if not isinstance(code, int):
            raise Finding(f"connect() returned {code!r}")
        if code == 0 and fake.conn1 is not None and fake.conn2 is not None:
            _exchange(primary, fake, replies)
    finally:
        conn = primary.conn
        if conn is not None:
            primary.disconnect(conn)
            primary.conn = None
        fake.close()
    if _state.errors:
        errors, _state.errors = _state.errors, []
        raise Finding(errors[0])


def _exchange(primary: object, fake: _FakeSecondary, replies: bytes) -> None:
    assert fake.conn1 is not None and fake.conn2 is not None
    done: list[int] = []
    finished = threading.Event()

    def complete(err: int) -> None:
        done.append(err)
        finished.set()

    buf = memoryview(bytearray(b"\x5a" * 4096))
    primary.submit_write(0, 4096, buf, complete)  # type: ignore[attr-defined]
    try:
        seq = _write_seq(fake.conn1)
    except OSError:
        seq = 0
    try:
        fake.conn2.sendall(replies.replace(PLACEHOLDER, struct.pack("<Q", seq)))
        fake.conn2.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    if not finished.wait(IO_TIMEOUT * 2):
        raise Finding("a WRITE never completed after the secondary's replies and EOF")
    if len(done) != 1:
        raise Finding(f"a WRITE completed {len(done)} times: {done}")
