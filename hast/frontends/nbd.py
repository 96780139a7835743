"""NBD server: the Linux data-path frontend of a HAST primary.

This module owns the wire side of NBD (fixed newstyle handshake, simple replies) and the
contract between the wire and whatever stores the data (``Backend``/``Request``).  The HAST
primary implements ``Backend``; ``FileBackend`` is the reference implementation on a plain
file (tests, and the "degraded, local only" baseline).  decisions.md item 4 explains why
py-hast serves NBD on Linux: every userspace client (qemu, libnbd, fio) speaks it, and
``devnode`` turns it into ``/dev/hast/<name>``.

Protocol scope (doc/proto.md of NetworkBlockDevice/nbd):

* handshake: fixed newstyle only; OPT_GO, OPT_INFO (INFO_EXPORT, INFO_NAME,
  INFO_DESCRIPTION, INFO_BLOCK_SIZE), OPT_EXPORT_NAME (with NO_ZEROES), OPT_LIST,
  OPT_ABORT.  Everything else (STRUCTURED_REPLY, STARTTLS, META_CONTEXT, ...) gets
  ERR_UNSUP and haggling goes on, so clients fall back to simple replies.
* transmission: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (NO_HOLE accepted), DISC, the FUA
  flag; simple replies, sent in completion order (clients match on the cookie).

Request sizes: the server advertises ``max_request`` as the maximum payload, but clients
that ignore NBD_INFO_BLOCK_SIZE exist (qemu <= 2.x, the kernel client), so READ/WRITE up
to ``MAX_PAYLOAD`` (32 MiB, what every interoperable client stays under) are split into
``max_request`` pieces and answered once all pieces are done.  TRIM and WRITE_ZEROES carry
no payload and are passed to the backend whole, whatever their length: splitting them
would only multiply replication round trips.  A WRITE longer than ``MAX_PAYLOAD`` cannot be
skipped safely and drops the connection; a READ that long gets EINVAL.

Threads: one accept thread per server and one reader thread per connection.  The reader
receives through a read-ahead buffer (``_RequestReader``): at queue depth N one ``recv``
brings several request headers and small WRITE payloads, where reading each header and each
payload exactly would cost two system calls per request; payloads are copied into
page-aligned buffers from a pool (O_DIRECT-safe, no zero-filling per request), large ones
received into them directly.  The backend completes requests from any thread;
``Request.complete`` sends the reply with one ``sendmsg`` under a per-connection lock, or,
in a thread that called ``defer_replies()`` (the HAST primary's completion threads, which
complete requests in bursts), queues it until ``send_deferred_replies()``, which sends the
burst with one ``sendmsg`` per connection.  Each connection bounds its in-flight requests
(count and bytes), which bounds the memory a fast client can make the server hold.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import selectors
import socket
import stat
import struct
import threading
import urllib.parse
from typing import Protocol

from hast import log

# Handshake.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags.
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8

# Transmission.
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Error numbers on the wire are NBD's (Linux's values), not the host's errno values.
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

MAX_PAYLOAD = 32 << 20
# Option data is at most an export name (<= 4096 bytes) plus a few fields; anything much
# larger is a client bug or an attack, not worth skipping.
MAX_OPTION_LENGTH = 64 << 10
HANDSHAKE_TIMEOUT = 30.0
SHUTDOWN_SEND_TIMEOUT = 2
# Per connection: beyond these the reader stops reading until replies go out.
MAX_INFLIGHT_REQUESTS = 512
MAX_INFLIGHT_BYTES = 64 << 20
# The reader's read-ahead buffer and the most one recv() asks for: a 64 KiB chunk holds the
# headers and payloads of ~15 queued 4 KiB WRITEs.  A payload larger than SMALL_PAYLOAD is
# received straight into its buffer (only what was already read ahead is copied).
READ_AHEAD = 256 << 10
RECV_CHUNK = 64 << 10
SMALL_PAYLOAD = 64 << 10
# Most READs/WRITEs, and bytes, handed to a backend's submit_many() in one call.
BATCH_REQUESTS = 64
BATCH_BYTES = 1 << 20
# Send buffer asked for on UNIX connections (see NBDServer._adopt).
UNIX_SNDBUF = 4 << 20
# Deferred replies sent with one sendmsg: two buffers each, IOV_MAX is 1024.
_REPLY_BATCH = 256

_HOST_TO_NBD_ERRNO = {
    0: 0,
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}

_REQ_HDR = struct.Struct(">IHHQQI")
_REPLY_HDR = struct.Struct(">IIQ")
_OPT_HDR = struct.Struct(">QII")
_OPT_REPLY_HDR = struct.Struct(">QIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

_MSG_WAITALL = getattr(socket, "MSG_WAITALL", 0)


def nbd_errno(err: int) -> int:
    """The NBD wire error for a host errno (anything unknown is EIO, as the spec asks)."""
    return _HOST_TO_NBD_ERRNO.get(err, NBD_EIO)


class Request:
    """One NBD command as the backend sees it.

    Created by the server; the backend calls ``complete(errno)`` exactly once, from any
    thread (also from inside ``submit``), when the command is done (WRITE with FUA:
    durable).  ``buf`` is the WRITE
    payload, or where READ data goes (``len(buf) == length``); it belongs to the server
    again once ``complete`` was called.
    """

    __slots__ = ("cmd", "flags", "offset", "length", "buf",
                 "_conn", "_cookie", "_cost", "_pbuf", "_parent", "_pending", "_error")

    def __init__(self, cmd: int, flags: int, offset: int, length: int,
                 buf: memoryview | None, conn: _Connection | None = None,
                 cookie: int = 0) -> None:
        self.cmd = cmd
        self.flags = flags
        self.offset = offset
        self.length = length
        self.buf = buf
        self._conn = conn
        self._cookie = cookie
        self._cost = 0
        self._pbuf: mmap.mmap | None = None
        self._parent: Request | None = None
        self._pending = 0
        self._error = 0

    def complete(self, error: int = 0) -> None:
        parent = self._parent
        if parent is not None:
            parent._piece_done(error)
            return
        conn = self._conn
        if conn is not None:
            conn._finish(self, error)

    def _piece_done(self, error: int) -> None:
        with _split_lock:
            if error and not self._error:
                self._error = error
            self._pending -= 1
            last = self._pending == 0
        if last:
            self.complete(self._error)

    def __repr__(self) -> str:
        return (f"<nbd.Request cmd={self.cmd} flags={self.flags:#x} offset={self.offset} "
                f"length={self.length}>")


_split_lock = threading.Lock()


class Backend(Protocol):
    """What the server needs from the storage side (the HAST primary implements this).

    ``size``, ``sector_size`` and ``max_request`` are bytes.  ``submit`` must not block for
    long and must not raise once it has taken the request; completion comes later through
    ``req.complete``.  FUA: make that write durable before completing.  FLUSH: every write
    completed before the FLUSH was submitted is durable when the FLUSH completes.
    ``multi_conn`` promises that FLUSH/FUA effects are visible to all connections.
    """

    size: int
    sector_size: int
    max_request: int
    read_only: bool
    can_trim: bool
    can_flush: bool
    multi_conn: bool

    def submit(self, req: Request) -> None: ...

    # Optional: ``submit_many(reqs)``, submit() of several READs and WRITEs at once (the
    # server calls it with what one recv() brought); same contract as submit().


class _ProtocolError(Exception):
    """A hard protocol violation: the connection is dropped (logged), never the server."""


class _Disconnected(Exception):
    """The peer closed the connection (or stop() shut it down)."""


class _BufferPool:
    """Page-aligned buffers in power-of-two size classes, reused across requests.

    mmap'ed so that a backend may use O_DIRECT on them, and recycled so that a 1 MiB write
    costs neither an allocation nor page faults.  What the pool keeps is bounded in bytes
    for the whole server; beyond that, buffers go back to the kernel.
    """

    MIN_SHIFT = 12
    RETAIN_BYTES = 64 << 20

    def __init__(self) -> None:
        self._free: list[list[mmap.mmap]] = [[] for _ in range(MAX_PAYLOAD.bit_length() + 1)]
        self._lock = threading.Lock()
        self._retained = 0

    def get(self, length: int) -> mmap.mmap:
        shift = max(self.MIN_SHIFT, (length - 1).bit_length())
        free = self._free[shift]
        with self._lock:
            if free:
                self._retained -= 1 << shift
                return free.pop()
        return mmap.mmap(-1, 1 << shift)

    def put(self, buf: mmap.mmap) -> None:
        size = len(buf)
        with self._lock:
            if self._retained + size <= self.RETAIN_BYTES:
                self._retained += size
                self._free[size.bit_length() - 1].append(buf)


def _recv_exact(sock: socket.socket, view: memoryview, n: int) -> None:
    pos = 0
    while pos < n:
        got = sock.recv_into(view[pos:] if pos else view, n - pos, _MSG_WAITALL)
        if got == 0:
            raise _Disconnected("end of stream" if pos == 0 else
                                f"end of stream after {pos} of {n} bytes")
        pos += got


def _recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    if n:
        _recv_exact(sock, memoryview(buf), n)
    return bytes(buf)


class _RequestReader:
    """The transmission phase's input through a read-ahead buffer (see the module docstring).

    Only used after the handshake, which reads exactly what each option holds, so nothing a
    client pipelines behind NBD_OPT_GO is lost.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(READ_AHEAD)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def take(self, n: int) -> int:
        """Offset in ``buf`` of the next n bytes (n <= SMALL_PAYLOAD), consumed."""
        if self.end - self.start < n:
            self._fill(n)
        pos = self.start
        self.start = pos + n
        return pos

    def _fill(self, n: int) -> None:
        avail = self.end - self.start
        if avail == 0:
            self.start = self.end = 0
        elif self.start + n > len(self.buf) - RECV_CHUNK:
            self.view[:avail] = self.view[self.start:self.end]
            self.start, self.end = 0, avail
        while self.end - self.start < n:
            got = self.sock.recv_into(self.view[self.end:self.end + RECV_CHUNK])
            if got == 0:
                have = self.end - self.start
                raise _Disconnected("end of stream" if have == 0 else
                                    f"end of stream after {have} of {n} bytes")
            self.end += got

    def into(self, dest: memoryview, n: int) -> None:
        """The next n bytes into dest[:n]."""
        if n <= SMALL_PAYLOAD:
            pos = self.take(n)
            dest[:n] = self.view[pos:pos + n]
            return
        k = min(n, self.end - self.start)
        if k:
            dest[:k] = self.view[self.start:self.start + k]
            self.start += k
        if k < n:
            _recv_exact(self.sock, dest[k:], n - k)


_deferred = threading.local()


def defer_replies() -> None:
    """From now on, replies to requests this thread completes wait for
    send_deferred_replies() (call it before this thread blocks)."""
    if getattr(_deferred, "replies", None) is None:
        _deferred.replies = []


def send_deferred_replies(stop: bool = False) -> None:
    """Send the replies this thread deferred, one sendmsg per connection; ``stop``: and
    send replies at once again."""
    replies = getattr(_deferred, "replies", None)
    if replies is None:
        return
    _deferred.replies = None if stop else []
    if not replies:
        return
    by_conn: dict[_Connection, list] = {}
    for item in replies:
        by_conn.setdefault(item[0], []).append(item)
    for conn, items in by_conn.items():
        for first in range(0, len(items), _REPLY_BATCH):
            chunk = items[first:first + _REPLY_BATCH]
            parts: list = []
            for item in chunk:
                parts.extend(item[1])
            conn._send(parts)
            conn._replied(len(chunk))
            pool = conn.server._pool
            for item in chunk:
                if item[2] is not None:
                    pool.put(item[2])


class _Connection:
    """One client: handshake, then the reader loop; replies come from backend threads."""

    def __init__(self, server: NBDServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.backend = server.backend
        self._send_lock = threading.Lock()
        self._closed = False        # under _send_lock: the socket is closed
        self._cv = threading.Condition(threading.Lock())
        self._inflight: set[Request] = set()
        self._inflight_bytes = 0
        self._replying = 0          # replies being sent (no longer in _inflight)
        self._reader_waiting = False
        self._closing = False       # under _cv: stop() or the reader is ending the session
        self.thread = threading.Thread(target=self._run, name=f"nbd-conn {peer}", daemon=True)

    # ---- sending -------------------------------------------------------------------------

    def _send(self, parts: list) -> bool:
        with self._send_lock:
            return self._send_locked(parts)

    def _send_locked(self, parts: list) -> bool:
        if self._closed:
            return False
        try:
            total = sum(map(len, parts))
            sent = self.sock.sendmsg(parts)
            while sent < total:
                # Only a signal or SO_SNDTIMEO can cut a blocking sendmsg short.
                rest: list = []
                skip = sent
                for p in parts:
                    if skip >= len(p):
                        skip -= len(p)
                        continue
                    rest.append(memoryview(p)[skip:])
                    skip = 0
                parts, total = rest, total - sent
                sent = self.sock.sendmsg(parts)
            return True
        except OSError as exc:
            log.debug(1, f"NBD {self.peer}: send failed", err=log.exc_errno(exc))
            self._closed = True
            self._shutdown_socket()
            return False

    def _shutdown_socket(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _reply(self, cookie: int, err: int, data: memoryview | None = None) -> None:
        hdr = _REPLY_HDR.pack(SIMPLE_REPLY_MAGIC, err, cookie)
        self._send([hdr, data] if data is not None else [hdr])

    def _finish(self, req: Request, err: int) -> None:
        cv = self._cv
        with cv:
            owned = req in self._inflight
            if owned:
                self._inflight.remove(req)
                self._inflight_bytes -= req._cost
                self._replying += 1
                if self._reader_waiting:
                    cv.notify_all()
        if owned:
            err = _HOST_TO_NBD_ERRNO.get(err, NBD_EIO) if err else 0
            if req.cmd == CMD_READ and not err:
                parts = [_REPLY_HDR.pack(SIMPLE_REPLY_MAGIC, 0, req._cookie), req.buf]
            else:
                parts = [_REPLY_HDR.pack(SIMPLE_REPLY_MAGIC, err, req._cookie)]
            deferred = getattr(_deferred, "replies", None)
            if deferred is not None:
                # sent (and the buffer recycled) by send_deferred_replies()
                deferred.append((self, parts, req._pbuf))
                req._pbuf = None
                return
            self._send(parts)
            self._replied(1)
        # Not owned: stop() already answered it with ESHUTDOWN; the backend is done with the
        # buffer only now.
        if req._pbuf is not None:
            self.server._pool.put(req._pbuf)
            req._pbuf = None

    def _replied(self, count: int) -> None:
        cv = self._cv
        with cv:
            self._replying -= count
            if self._reader_waiting:
                cv.notify_all()

    # ---- lifecycle -----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Fail in-flight requests with ESHUTDOWN and hard-disconnect (from stop())."""
        with self._cv:
            self._closing = True
            failed = list(self._inflight)
            self._inflight.clear()
            self._inflight_bytes = 0
            self._cv.notify_all()
        # A client that stopped reading must not hang stop(): bound the last sends, and if
        # a backend thread is stuck in a send, cut the connection under it.
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                 struct.pack("@ll", SHUTDOWN_SEND_TIMEOUT, 0))
        except OSError:
            pass
        if self._send_lock.acquire(timeout=SHUTDOWN_SEND_TIMEOUT):
            try:
                for req in failed:
                    self._send_locked([_REPLY_HDR.pack(SIMPLE_REPLY_MAGIC, NBD_ESHUTDOWN,
                                                       req._cookie)])
                self._shutdown_socket()
            finally:
                self._send_lock.release()
        else:
            self._shutdown_socket()

    def _run(self) -> None:
        try:
            try:
                if self._handshake():
                    self._transmission()
            except _ProtocolError as exc:
                log.warning(f"NBD {self.peer}: protocol violation: {exc}; "
                            "dropping the connection.")
            except _Disconnected as exc:
                log.debug(1, f"NBD {self.peer}: disconnected ({exc}).")
            except TimeoutError:
                log.warning(f"NBD {self.peer}: no handshake within {HANDSHAKE_TIMEOUT:g} s; "
                            "dropping the connection.")
            except OSError as exc:
                log.debug(1, f"NBD {self.peer}: connection error", err=log.exc_errno(exc))
            except Exception as exc:  # a bug must cost one connection, never the server
                log.error(f"NBD {self.peer}: unexpected {type(exc).__name__}: {exc}; "
                          "dropping the connection.")
        finally:
            with self._cv:
                self._closing = True
            with self._send_lock:
                self._closed = True
                self._shutdown_socket()
                self.sock.close()
            self.server._forget(self)

    # ---- handshake -----------------------------------------------------------------------

    def _opt_reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.sock.sendall(_OPT_REPLY_HDR.pack(REPLY_MAGIC, opt, rtype, len(data)) + data)

    def _tflags(self) -> int:
        b = self.backend
        flags = TFLAG_HAS_FLAGS
        if b.read_only:
            flags |= TFLAG_READ_ONLY
        else:
            flags |= TFLAG_SEND_WRITE_ZEROES
            if b.can_trim:
                flags |= TFLAG_SEND_TRIM
        if b.can_flush:
            flags |= TFLAG_SEND_FLUSH | TFLAG_SEND_FUA
        if b.multi_conn:
            flags |= TFLAG_CAN_MULTI_CONN
        return flags

    def _name_ok(self, name: bytes) -> bool:
        return name in (b"", self.server.export_name.encode())

    def _handshake(self) -> bool:
        """Option haggling; True when transmission starts, False on a clean abort."""
        sock = self.sock
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                 FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = _U32.unpack(_recv_bytes(sock, 4))
        if cflags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            raise _ProtocolError(f"unknown client flags {cflags:#x}")
        if not cflags & FLAG_C_FIXED_NEWSTYLE:
            raise _ProtocolError("client does not speak fixed newstyle")
        no_zeroes = bool(cflags & FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = _OPT_HDR.unpack(_recv_bytes(sock, 16))
            if magic != IHAVEOPT:
                raise _ProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise _ProtocolError(f"option {opt} with {length} bytes of data")
            data = _recv_bytes(sock, length)
            if opt == OPT_EXPORT_NAME:
                if not self._name_ok(data):
                    # The legacy option cannot fail politely: the spec says disconnect.
                    raise _ProtocolError(f"EXPORT_NAME for unknown export {data!r}")
                b = self.backend
                sock.sendall(struct.pack(">QH", b.size, self._tflags())
                             + (b"" if no_zeroes else bytes(124)))
                log.debug(1, f"NBD {self.peer}: EXPORT_NAME, transmission.")
                return True
            if opt in (OPT_GO, OPT_INFO):
                if self._opt_info(opt, data) and opt == OPT_GO:
                    log.debug(1, f"NBD {self.peer}: GO, transmission.")
                    return True
            elif opt == OPT_LIST:
                if length:
                    self._opt_reply(opt, REP_ERR_INVALID, b"LIST takes no data")
                    continue
                name = self.server.export_name.encode()
                desc = self.server.description.encode()
                self._opt_reply(opt, REP_SERVER, _U32.pack(len(name)) + name + desc)
                self._opt_reply(opt, REP_ACK)
            elif opt == OPT_ABORT:
                try:
                    self._opt_reply(opt, REP_ACK)
                except OSError:
                    pass  # the client may close without waiting for the ACK
                log.debug(1, f"NBD {self.peer}: ABORT.")
                return False
            else:
                self._opt_reply(opt, REP_ERR_UNSUP, f"option {opt} is not supported".encode())

    def _opt_info(self, opt: int, data: bytes) -> bool:
        """OPT_INFO / OPT_GO; True if the export was accepted."""
        if len(data) < 6:
            self._opt_reply(opt, REP_ERR_INVALID, b"short option data")
            return False
        (namelen,) = _U32.unpack_from(data, 0)
        if 4 + namelen + 2 > len(data):
            self._opt_reply(opt, REP_ERR_INVALID, b"export name overruns option data")
            return False
        name = data[4:4 + namelen]
        (nreq,) = _U16.unpack_from(data, 4 + namelen)
        if 4 + namelen + 2 + 2 * nreq != len(data):
            self._opt_reply(opt, REP_ERR_INVALID, b"bad information request count")
            return False
        requests = struct.unpack_from(f">{nreq}H", data, 4 + namelen + 2)
        if not self._name_ok(name):
            self._opt_reply(opt, REP_ERR_UNKNOWN,
                            f"no export named {name.decode(errors='replace')!r}".encode())
            return False
        b = self.backend
        self._opt_reply(opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, b.size, self._tflags()))
        if INFO_NAME in requests:
            self._opt_reply(opt, REP_INFO,
                            _U16.pack(INFO_NAME) + self.server.export_name.encode())
        if INFO_DESCRIPTION in requests and self.server.description:
            self._opt_reply(opt, REP_INFO,
                            _U16.pack(INFO_DESCRIPTION) + self.server.description.encode())
        # Sent even when not asked for: well-behaved clients then align and size their
        # requests; the others still work (split, or EINVAL when misaligned).
        s = self.server
        self._opt_reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, s.min_block,
                                                   s.preferred_block, s.max_payload))
        self._opt_reply(opt, REP_ACK)
        return True

    # ---- transmission --------------------------------------------------------------------

    def _transmission(self) -> None:
        batch: list[Request] = []
        try:
            self._transmit(batch)
        finally:
            if batch:
                self._submit_batch(batch)

    def _submit_batch(self, batch: list[Request]) -> None:
        """Hand the READs/WRITEs parsed from what was read ahead to the backend at once."""
        reqs = batch[:]
        batch.clear()
        try:
            self.backend.submit_many(reqs)  # type: ignore[attr-defined]
        except Exception as exc:
            log.error(f"NBD {self.peer}: backend submit failed: {exc!r}.")
            for req in reqs:
                req.complete(errno.EIO)

    def _transmit(self, batch: list[Request]) -> None:
        sock = self.sock
        sock.settimeout(None)
        server = self.server
        backend = self.backend
        pool = server._pool
        size = backend.size
        align_mask = server.min_block - 1
        max_request = backend.max_request
        tflags = self._tflags()
        read_only = bool(tflags & TFLAG_READ_ONLY)
        fua_ok = CMD_FLAG_FUA if tflags & TFLAG_SEND_FUA else 0
        flush_ok = bool(tflags & TFLAG_SEND_FLUSH)
        trim_ok = bool(tflags & TFLAG_SEND_TRIM)
        zero_ok = bool(tflags & TFLAG_SEND_WRITE_ZEROES)
        reader = _RequestReader(sock)
        rbuf = reader.buf
        take = reader.take
        unpack = _REQ_HDR.unpack_from
        cv = self._cv
        inflight = self._inflight
        submit = backend.submit
        # A backend with submit_many() gets the READs and WRITEs that one recv() brought in
        # one call (one io_submit, one sendmsg to the peer), handed over before the reader
        # may block, and at most BATCH_REQUESTS / BATCH_BYTES at a time.
        batching = hasattr(backend, "submit_many")
        batch_bytes = 0

        while True:
            if batch and reader.end - reader.start < 28:
                self._submit_batch(batch)   # the next header is not here yet
                batch_bytes = 0
            magic, flags, cmd, cookie, offset, length = unpack(rbuf, take(28))
            if magic != REQUEST_MAGIC:
                raise _ProtocolError(f"bad request magic {magic:#x}")

            pbuf = None
            buf = None
            if cmd == CMD_WRITE:
                if length > MAX_PAYLOAD:
                    raise _ProtocolError(f"WRITE of {length} bytes (limit {MAX_PAYLOAD})")
                if length:
                    pbuf = pool.get(length)
                    buf = memoryview(pbuf)[:length]
                    if batch and reader.end - reader.start < length:
                        self._submit_batch(batch)   # its payload is not all here yet
                        batch_bytes = 0
                    reader.into(buf, length)
            elif cmd == CMD_DISC:
                log.debug(1, f"NBD {self.peer}: DISC.")
                if batch:
                    self._submit_batch(batch)
                self._drain()
                return

            # Validation, in the spec's order of precedence for the errors.
            err = 0
            if cmd == CMD_READ or cmd == CMD_WRITE:
                if flags & ~fua_ok:
                    err = NBD_EINVAL
                elif cmd == CMD_WRITE and read_only:
                    err = NBD_EPERM
                elif length == 0 or (offset | length) & align_mask:
                    err = NBD_EINVAL
                elif offset + length > size:
                    err = NBD_ENOSPC if cmd == CMD_WRITE else NBD_EINVAL
                elif length > MAX_PAYLOAD:
                    err = NBD_EINVAL
            elif cmd == CMD_FLUSH:
                if not flush_ok or flags & ~fua_ok:
                    err = NBD_EINVAL
                offset = length = 0
            elif cmd == CMD_TRIM or cmd == CMD_WRITE_ZEROES:
                allowed = fua_ok | (CMD_FLAG_NO_HOLE if cmd == CMD_WRITE_ZEROES else 0)
                if read_only:
                    err = NBD_EPERM
                elif not (trim_ok if cmd == CMD_TRIM else zero_ok) or flags & ~allowed:
                    err = NBD_EINVAL
                elif length == 0 or (offset | length) & align_mask:
                    err = NBD_EINVAL
                elif offset + length > size:
                    err = NBD_EINVAL if cmd == CMD_TRIM else NBD_ENOSPC
            else:
                err = NBD_EINVAL

            if err:
                if pbuf is not None:
                    pool.put(pbuf)
                self._reply(cookie, err)
                continue

            if cmd == CMD_READ:
                pbuf = pool.get(length)
                buf = memoryview(pbuf)[:length]
            req = Request(cmd, flags, offset, length, buf, self, cookie)
            req._pbuf = pbuf
            cost = req._cost = length if buf is not None else 0

            if batch and (len(inflight) + 1 >= MAX_INFLIGHT_REQUESTS
                          or self._inflight_bytes + cost > MAX_INFLIGHT_BYTES):
                self._submit_batch(batch)   # the wait below needs them in the backend
                batch_bytes = 0
            with cv:
                while (not self._closing
                       and (len(inflight) >= MAX_INFLIGHT_REQUESTS
                            or (self._inflight_bytes + cost > MAX_INFLIGHT_BYTES
                                and inflight))):
                    self._reader_waiting = True
                    cv.wait()
                    self._reader_waiting = False
                closing = self._closing
                if not closing:
                    inflight.add(req)
                    self._inflight_bytes += cost
            if closing:
                self._reply(cookie, NBD_ESHUTDOWN)
                if pbuf is not None:
                    pool.put(pbuf)
                continue

            if batching and buf is not None and length <= max_request:
                batch.append(req)
                batch_bytes += length
                if len(batch) >= BATCH_REQUESTS or batch_bytes >= BATCH_BYTES:
                    self._submit_batch(batch)
                    batch_bytes = 0
                continue
            if batch:
                self._submit_batch(batch)   # in the order they came
                batch_bytes = 0
            try:
                if buf is not None and length > max_request:
                    self._submit_split(req, max_request)
                else:
                    submit(req)
            except Exception as exc:
                log.error(f"NBD {self.peer}: backend submit failed: {exc!r}.")
                req.complete(errno.EIO)

    def _submit_split(self, req: Request, max_request: int) -> None:
        pieces = []
        buf = req.buf
        assert buf is not None
        for start in range(0, req.length, max_request):
            n = min(max_request, req.length - start)
            piece = Request(req.cmd, req.flags, req.offset + start, n, buf[start:start + n])
            piece._parent = req
            pieces.append(piece)
        req._pending = len(pieces)
        submit = self.backend.submit
        for i, piece in enumerate(pieces):
            try:
                submit(piece)
            except Exception as exc:
                log.error(f"NBD {self.peer}: backend submit failed: {exc!r}.")
                for rest in pieces[i:]:
                    rest.complete(errno.EIO)
                return

    def _drain(self) -> None:
        """NBD_CMD_DISC: every outstanding request is answered before the close."""
        with self._cv:
            while (self._inflight or self._replying) and not self._closing:
                self._reader_waiting = True
                self._cv.wait()
            self._reader_waiting = False


class NBDServer:
    """Serves one export (``export_name``; the empty default name also selects it).

    ``listen_unix``/``listen_tcp`` before ``start()``; ``stop()`` is idempotent.  TCP is
    only opened where asked, loopback by default.
    """

    def __init__(self, backend: Backend, export_name: str = "", description: str = "") -> None:
        sector = int(backend.sector_size)
        if sector <= 0 or sector & (sector - 1) or sector > 65536:
            raise ValueError(f"backend sector size {sector} is not a power of two <= 64 KiB")
        if backend.max_request < sector or backend.max_request % sector:
            raise ValueError(f"backend max_request {backend.max_request} is not a multiple "
                             f"of the sector size {sector}")
        if len(export_name.encode()) > 4096 or len(description.encode()) > 4096:
            raise ValueError("export name and description are limited to 4096 bytes")
        self.backend = backend
        self.export_name = export_name
        self.description = description
        self.min_block = sector
        self.preferred_block = max(4096, sector)
        self.max_payload = min(int(backend.max_request) // sector * sector,
                               MAX_PAYLOAD // sector * sector)
        self._pool = _BufferPool()
        self._listeners: list[tuple[socket.socket, str, str | None]] = []
        self._conns: set[_Connection] = set()
        self._lock = threading.Lock()
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._started = False
        self._stopped = False
        self._nconn = 0

    def __enter__(self) -> NBDServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- listeners -----------------------------------------------------------------------

    def _check_not_started(self) -> None:
        if self._started or self._stopped:
            raise RuntimeError("listeners must be added before start()")

    def listen_unix(self, path: str | os.PathLike[str]) -> str:
        """Listen on a UNIX socket (mode 0600: the data is the disk's); returns the path."""
        self._check_not_started()
        path = os.fspath(path)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier run
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self._listeners.append((sock, f"unix:{path}", path))
        log.info(f"NBD export {self.export_name!r} listening on {path}.")
        return path

    def listen_tcp(self, host: str = "127.0.0.1", port: int = 10809) -> tuple[str, int]:
        """Listen on TCP; returns the bound (host, port), useful with port 0."""
        self._check_not_started()
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, stype, proto, _, addr = infos[0]
        sock = socket.socket(family, stype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        bound = sock.getsockname()
        self._listeners.append((sock, f"tcp:{bound[0]}:{bound[1]}", None))
        log.info(f"NBD export {self.export_name!r} listening on {bound[0]}:{bound[1]}.")
        return bound[0], bound[1]

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    # ---- running -------------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        if self._stopped:
            raise RuntimeError("NBDServer cannot be restarted")
        if not self._listeners:
            raise RuntimeError("NBDServer.start() without listeners")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        for sock, label, _ in self._listeners:
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, label)
        self._started = True
        self._thread = threading.Thread(target=self._accept_loop, name="nbd-accept",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        assert self._selector is not None
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    return  # woken by stop()
                lsock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    sock, addr = lsock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    log.warning(f"NBD accept on {key.data} failed", err=log.exc_errno(exc))
                    continue
                self._adopt(sock, addr, key.data)

    def _adopt(self, sock: socket.socket, addr: object, label: str) -> None:
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            peer = f"{addr[0]}:{addr[1]}"  # type: ignore[index]
        else:
            self._nconn += 1
            peer = f"{label}#{self._nconn}"
            # A UNIX stream socket has no autotuning: with the default send buffer (~208 KiB)
            # a 1 MiB READ reply costs several sleeps until the client has read the rest.
            # Best effort: the kernel caps it at net.core.wmem_max.
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
            except OSError:
                pass
        conn = _Connection(self, sock, peer)
        with self._lock:
            if self._stopped:
                sock.close()
                return
            self._conns.add(conn)
        log.debug(1, f"NBD connection from {peer}.")
        conn.thread.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def stop(self, timeout: float = 10.0) -> None:
        """Close listeners, answer in-flight requests with ESHUTDOWN, disconnect, join."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self._thread is not None:
            assert self._wake_w is not None
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
            self._thread.join(timeout)
        for sock, _, path in self._listeners:
            sock.close()
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if self._selector is not None:
            self._selector.close()
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        # After the accept thread is gone: _adopt() refuses new connections once _stopped.
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.shutdown()
        for conn in conns:
            conn.thread.join(timeout)
            if conn.thread.is_alive():
                log.error(f"NBD {conn.peer}: connection thread did not stop within "
                          f"{timeout:g} s.")
        log.debug(1, f"NBD export {self.export_name!r} stopped.")


def export_uri(name: str, socket_path: str) -> str:
    """The NBD URI of export ``name`` on a UNIX socket (libnbd/qemu syntax)."""
    return (f"nbd+unix:///{urllib.parse.quote(name, safe='/')}"
            f"?socket={urllib.parse.quote(socket_path, safe='/')}")


# ---- reference backend ------------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)

_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2) with a mode (os.posix_fallocate has none)."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        if not hasattr(lib, "fallocate"):  # not Linux: callers fall back as for EOPNOTSUPP
            raise OSError(errno.EOPNOTSUPP, "fallocate with a mode is Linux-only")
        lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        lib.fallocate.restype = ctypes.c_int
        _libc = lib
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBackend:
    """A ``Backend`` on a regular file (or block device): pread/pwrite/fdatasync/fallocate,
    page-cache copies inline and everything that may wait for the disk on a few threads.

    One shared descriptor, so FLUSH on any connection covers every write: multi_conn is
    safe.  With ``direct`` (O_DIRECT) alignment is no problem: the server enforces
    ``sector_size`` alignment and its buffers are page-aligned.  TRIM punches a hole (a
    no-op where the filesystem cannot); WRITE_ZEROES zeroes the range (ZERO_RANGE with
    NO_HOLE, else PUNCH_HOLE; written zeroes where neither works).
    """

    def __init__(self, path: str | os.PathLike[str], direct: bool = False, *,
                 read_only: bool = False, threads: int = 4, max_request: int = 1 << 20,
                 sector_size: int = 512) -> None:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        self.path = os.fspath(path)
        self._fd = os.open(self.path, flags)
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        self.sector_size = sector_size
        self.max_request = max_request
        self.read_only = read_only
        self.can_trim = not read_only
        self.can_flush = True
        self.multi_conn = True
        self._zeroes: mmap.mmap | None = None
        self._direct = direct
        self._nowait = bool(_RWF_NOWAIT) and not direct
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._worker, name=f"filebackend-{i}",
                                          daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, req: Request) -> None:
        # What only copies to or from the page cache runs right here, in the connection's
        # reader thread: waking a worker and handing the GIL over costs more than the copy
        # (measured with fio 4 KiB QD1: about 15k IOPS through a worker, 30k inline).
        # Anything that may wait for the disk goes to the pool: reads that miss the cache
        # (RWF_NOWAIT says EAGAIN), FUA, FLUSH, TRIM, WRITE_ZEROES and all O_DIRECT I/O.
        cmd = req.cmd
        if cmd == CMD_WRITE and not self._direct and not req.flags & CMD_FLAG_FUA:
            try:
                self._write(req)
            except OSError as exc:
                req.complete(exc.errno or errno.EIO)
                return
            req.complete(0)
            return
        if cmd == CMD_READ and self._nowait:
            try:
                if os.preadv(self._fd, [req.buf], req.offset, _RWF_NOWAIT) == req.length:
                    req.complete(0)
                    return
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self._nowait = False  # not supported on this file: stop trying
        self._queue.put(req)

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _worker(self) -> None:
        get = self._queue.get
        while True:
            req = get()
            if req is None:
                return
            try:
                self._execute(req)
            except OSError as exc:
                req.complete(exc.errno or errno.EIO)
            except Exception as exc:
                log.error(f"FileBackend: {req!r} failed: {exc!r}.")
                req.complete(errno.EIO)
            else:
                req.complete(0)

    def _execute(self, req: Request) -> None:
        fd = self._fd
        cmd = req.cmd
        if cmd == CMD_WRITE:
            self._write(req)
            if req.flags & CMD_FLAG_FUA:
                os.fdatasync(fd)
        elif cmd == CMD_READ:
            buf = req.buf
            assert buf is not None
            done = os.preadv(fd, [buf], req.offset)
            while done < req.length:
                n = os.preadv(fd, [buf[done:]], req.offset + done)
                if n == 0:  # the file shrank under us: what is not there reads as zeroes
                    buf[done:] = bytes(req.length - done)
                    break
                done += n
        elif cmd == CMD_FLUSH:
            os.fdatasync(fd)
        elif cmd == CMD_TRIM:
            try:
                _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                           req.offset, req.length)
            except OSError as exc:
                # TRIM is advisory: a filesystem without hole punching just keeps the data.
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
                    raise
            if req.flags & CMD_FLAG_FUA:
                os.fdatasync(fd)
        elif cmd == CMD_WRITE_ZEROES:
            self._write_zeroes(fd, req)
            if req.flags & CMD_FLAG_FUA:
                os.fdatasync(fd)
        else:
            raise OSError(errno.EINVAL, "unsupported command")

    def _write(self, req: Request) -> None:
        buf = req.buf
        assert buf is not None
        done = os.pwrite(self._fd, buf, req.offset)
        while done < req.length:
            done += os.pwrite(self._fd, buf[done:], req.offset + done)

    def _write_zeroes(self, fd: int, req: Request) -> None:
        mode = (_FALLOC_FL_ZERO_RANGE if req.flags & CMD_FLAG_NO_HOLE
                else _FALLOC_FL_PUNCH_HOLE) | _FALLOC_FL_KEEP_SIZE
        try:
            _fallocate(fd, mode, req.offset, req.length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
                raise
        if self._zeroes is None:
            self._zeroes = mmap.mmap(-1, 1 << 20)  # page-aligned: fine for O_DIRECT too
        zview = memoryview(self._zeroes)
        off, end = req.offset, req.offset + req.length
        while off < end:
            off += os.pwrite(fd, zview[:min(len(zview), end - off)], off)
