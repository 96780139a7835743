"""nbd: the NBD server of the Linux frontend (``hast.frontends.nbd``), handshake and transmission.

Any local process that can open the NBD socket talks to this parser, and on a primary what it
writes is replicated.  One ``NBDServer`` (UNIX socket) serves a 1 MiB file through a
recording ``Backend`` for the whole run; each input is the byte stream of one client
connection (fixed-newstyle flags, options, then requests and their payloads), written while
the server's output is drained, then the write side is shut down.

Checked on every input:

* the server closes the connection within seconds once the client is at EOF, and still
  serves: ``check()`` connects, negotiates with OPT_GO and reads a sector back;
* **only validated requests reach the backend**: every ``submit`` has a known command,
  sector-aligned offset and length inside the export, a payload of exactly ``length`` bytes
  for WRITE (at most the backend's ``max_request``: longer ones are split) and flags the
  export advertised;
* **the file changes only by what was submitted**: the backend runs on one thread, so the
  file must equal a shadow copy with every submitted WRITE/TRIM/WRITE_ZEROES applied in
  submission order.

Nothing is an expected rejection: a bad client gets an error reply or a closed socket.
"""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

from hypothesis import strategies as st

from fuzz.common import Finding, load_seeds, recv_until_eof
from fuzz.strategies import from_seeds, interesting_int
from hast.frontends import nbd

EXPECTED: tuple[type[BaseException], ...] = ()
MAX_LEN = 256 * 1024
SIZE = 1024 * 1024
SECTOR = 512
MAX_REQUEST = 64 * 1024
CLOSE_TIMEOUT = 10.0

_state: _Server | None = None


class _Recorder:
    """A Backend over FileBackend(threads=1) that checks and logs every submit and executes
    them one by one in submission order."""

    def __init__(self, path: Path) -> None:
        self.inner = nbd.FileBackend(path, threads=1, max_request=MAX_REQUEST,
                                     sector_size=SECTOR)
        self.size = self.inner.size
        self.sector_size = SECTOR
        self.max_request = MAX_REQUEST
        self.read_only = False
        self.can_trim = True
        self.can_flush = True
        self.multi_conn = True
        self.lock = threading.Lock()
        self.log: list[tuple[int, int, int, bytes | None]] = []
        self.violations: list[str] = []
        self.inflight = 0        # submitted, not yet executed by the backend thread
        execute = self.inner._execute

        def counted(req: nbd.Request) -> None:
            try:
                execute(req)
            finally:
                with self.lock:
                    self.inflight -= 1

        self.inner._execute = counted  # type: ignore[method-assign]

    def submit(self, req: nbd.Request) -> None:
        problem = self._validate(req)
        with self.lock:
            if problem:
                self.violations.append(f"{problem}: {req!r}")
            data = bytes(req.buf) if req.cmd == nbd.CMD_WRITE and req.buf is not None else None
            self.log.append((req.cmd, req.offset, req.length, data))
            self.inflight += 1
        # Straight to FileBackend's single worker: its inline fast path would run writes in
        # this thread and TRIM/FUA on the worker, in an order the shadow copy cannot know.
        self.inner._queue.put(req)

    def _validate(self, req: nbd.Request) -> str:
        if req.cmd not in (nbd.CMD_READ, nbd.CMD_WRITE, nbd.CMD_FLUSH, nbd.CMD_TRIM,
                           nbd.CMD_WRITE_ZEROES):
            return f"command {req.cmd} submitted"
        allowed = nbd.CMD_FLAG_FUA | (nbd.CMD_FLAG_NO_HOLE
                                      if req.cmd == nbd.CMD_WRITE_ZEROES else 0)
        if req.flags & ~allowed:
            return f"flags {req.flags:#x} submitted"
        if req.cmd == nbd.CMD_FLUSH:
            return ""
        if req.length == 0 or req.offset % SECTOR or req.length % SECTOR:
            return "unaligned or empty request submitted"
        if req.offset + req.length > self.size:
            return "request beyond the end of the export submitted"
        if req.cmd in (nbd.CMD_READ, nbd.CMD_WRITE):
            if req.length > MAX_REQUEST:
                return f"{req.length}-byte I/O submitted, max_request is {MAX_REQUEST}"
            if req.buf is None or len(req.buf) != req.length:
                return "buffer length differs from the request length"
        return ""

    def idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.inflight == 0:
                    return True
            time.sleep(0.001)
        return False

    def take(self) -> tuple[list[tuple[int, int, int, bytes | None]], list[str]]:
        with self.lock:
            log, self.log = self.log, []
            bad, self.violations = self.violations, []
        return log, bad


class _Server:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hast-fuzz-nbd-"))
        self.path = self.root / "export.img"
        self.pristine = bytes((i * 7) & 0xFF for i in range(256)) * (SIZE // 256)
        self.path.write_bytes(self.pristine)
        self.backend = _Recorder(self.path)
        self.server = nbd.NBDServer(self.backend, export_name="fuzz", description="fuzz")
        self.sock_path = self.server.listen_unix(self.root / "nbd.sock")
        self.server.start()
        self.shadow = bytearray(self.pristine)
        self.bystander: socket.socket | None = None

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(CLOSE_TIMEOUT)
        s.connect(self.sock_path)
        return s

    def apply(self, log: list[tuple[int, int, int, bytes | None]]) -> None:
        for cmd, offset, length, data in log:
            if cmd == nbd.CMD_WRITE and data is not None:
                self.shadow[offset:offset + length] = data
            elif cmd in (nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES):
                self.shadow[offset:offset + length] = bytes(length)

    def close(self) -> None:
        if self.bystander is not None:
            self.bystander.close()
        self.server.stop()
        self.backend.inner.close()
        shutil.rmtree(self.root, ignore_errors=True)


def seeds() -> list[bytes]:
    return load_seeds("nbd")


@st.composite
def _session(draw: st.DrawFn) -> bytes:
    """OPT_GO then requests with in-range and hostile offsets, lengths, flags, payloads."""
    out = [struct.pack(">I", draw(st.sampled_from([3, 3, 1, 2, 7])))]
    name = draw(st.sampled_from([b"", b"fuzz", b"other"]))
    out.append(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 6 + len(name))
               + struct.pack(">I", len(name)) + name + b"\0\0")
    for cookie in range(draw(st.integers(1, 6))):
        cmd = draw(st.sampled_from([0, 1, 1, 3, 4, 6, 2, 5, 7, 9]))
        offset = draw(st.sampled_from([0, 512, 4096, SIZE - 512, SIZE, 100])) \
            if draw(st.booleans()) else draw(interesting_int(8))
        length = draw(st.sampled_from([512, 4096, 0, MAX_REQUEST + 512, 3, 1 << 20])) \
            if draw(st.booleans()) else draw(interesting_int(4))
        flags = draw(st.sampled_from([0, 0, 1, 2, 4, 0xFFFF]))
        out.append(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, cookie, offset,
                               length))
        if cmd == nbd.CMD_WRITE:
            out.append(b"\xee" * min(length, 70000))
    return b"".join(out)


def strategy() -> st.SearchStrategy[bytes]:
    return from_seeds(seeds(), MAX_LEN, _session())


def setup() -> None:
    global _state
    if _state is None:
        _state = _Server()
        _state.bystander = _state.connect()
        _negotiate(_state.bystander)


def teardown() -> None:
    global _state
    if _state is not None:
        _state.close()
        _state = None


def _settle() -> None:
    """Wait for the backend, then hold the file against the shadow copy."""
    assert _state is not None
    if not _state.backend.idle(CLOSE_TIMEOUT):
        raise Finding("backend requests still running long after the client left")
    log, bad = _state.backend.take()
    if bad:
        raise Finding(f"the NBD server submitted an invalid request: {bad[0]}")
    _state.apply(log)
    if log:
        current = _state.path.read_bytes()
        if current != _state.shadow:
            diff = next(i for i in range(SIZE) if current[i] != _state.shadow[i])
            # Start the next input from a known state.
            with open(_state.path, "r+b") as f:
                f.write(_state.shadow)
            raise Finding(f"export byte {diff} differs from what the submitted requests wrote")


def one_input(data: bytes) -> None:
    setup()
    assert _state is not None
    try:
        sock = _state.connect()
    except OSError as exc:
        raise Finding(f"the NBD server refuses connections: {exc!r}") from None
    with sock:
        out: list[bytes | None] = []
        reader = threading.Thread(target=lambda: out.append(recv_until_eof(sock,
                                                                           CLOSE_TIMEOUT)),
                                  name="fuzz-nbd-reader", daemon=True)
        reader.start()
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass                # the server may hang up first (protocol violation)
        reader.join(CLOSE_TIMEOUT + 1)
        if reader.is_alive() or not out or out[0] is None:
            raise Finding("the NBD server did not close a connection at EOF")
    _settle()


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise Finding("the NBD server hung up on a well-behaved client")
        buf += chunk
    return buf


def _negotiate(s: socket.socket) -> None:
    """Fixed newstyle, OPT_GO for the default export: the socket is in transmission."""
    _recv(s, 18)                                        # NBDMAGIC, IHAVEOPT, flags
    s.sendall(struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES))
    s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 6) + b"\0" * 6)
    while True:
        _magic, _opt, rtype, length = struct.unpack(">QIII", _recv(s, 20))
        _recv(s, length)
        if rtype == nbd.REP_ACK:
            return
        if rtype != nbd.REP_INFO:
            raise Finding(f"a valid OPT_GO answered with reply type {rtype:#x}")


def _read_sector0(s: socket.socket, cookie: int) -> None:
    assert _state is not None
    s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, cookie, 0, SECTOR))
    magic, err, got = struct.unpack(">IIQ", _recv(s, 16))
    if (magic, err, got) != (nbd.SIMPLE_REPLY_MAGIC, 0, cookie):
        raise Finding(f"a valid READ answered with {magic:#x}/{err}/{got}")
    if _recv(s, SECTOR) != bytes(_state.shadow[:SECTOR]):
        raise Finding("READ of sector 0 returns other data than the export holds")


def check() -> None:
    """Still serving: a new client negotiates and reads; the bystander connected since
    setup() -- in transmission all along, while the fuzzed clients came and went -- reads."""
    if _state is None:
        return
    with _state.connect() as s:
        _negotiate(s)
        _read_sector0(s, 77)
        s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 78, 0, 0))
    if _state.bystander is None:
        _state.bystander = _state.connect()
        _negotiate(_state.bystander)
    _read_sector0(_state.bystander, 79)
