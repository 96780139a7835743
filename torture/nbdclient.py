"""nbdclient: the harness's own NBD client (fixed newstyle, OPT_GO, simple replies).

The writer must know exactly when each request was acknowledged, keep several requests in
flight, and survive the server dying under it; a small client of our own does all three
without libnbd (whose Python binding exists only for Debian's /usr/bin/python3).  It speaks
just what py-hast's NBD frontend serves: the fixed newstyle handshake with NO_ZEROES and
OPT_GO, then READ, WRITE (optionally FUA) and FLUSH with simple replies.

Requests are sent by the caller's thread; one reader thread matches replies to cookies and
calls each request's callback with ``(error, payload)``.  When the connection breaks, every
request still outstanding is completed with ``error = None`` ("no reply": its outcome is
unknown), which is what the crash-consistency checker needs to tell apart from an error
reply.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC_OPT = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
OPT_ABORT = 2
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
CMD_FLAG_FUA = 1
TFLAG_SEND_FUA = 1 << 3

Callback = Callable[[int | None, bytes | None], None]

_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


class NbdError(Exception):
    pass


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ConnectionError("NBD server closed the connection")
        got += r
    return bytes(buf)


class NbdClient:
    def __init__(self, path: str, export: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.size, self.flags = self._handshake(export.encode())
        self.sock.settimeout(None)
        self.lock = threading.Lock()          # send side and the pending table
        self.pending: dict[int, tuple[int, int, Callback]] = {}
        self.cookie = 0
        self.alive = True
        self.reader = threading.Thread(target=self._read_replies, name="nbd-replies",
                                       daemon=True)
        self.reader.start()

    # -- handshake -----------------------------------------------------------------------
    def _handshake(self, name: bytes) -> tuple[int, int]:
        s = self.sock
        magic, opt_magic, sflags = struct.unpack(">QQH", _recv_exact(s, 18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT or not sflags & FLAG_FIXED_NEWSTYLE:
            raise NbdError("not a fixed newstyle NBD server")
        s.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        size = flags = -1
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", _recv_exact(s, 20))
            payload = _recv_exact(s, length)
            if magic != REPLY_MAGIC_OPT or opt != OPT_GO:
                raise NbdError("bad option reply")
            if rtype == REP_ACK:
                break
            if rtype & (1 << 31):
                raise NbdError(f"OPT_GO refused ({rtype:#x}): {payload!r}")
            if rtype == REP_INFO and len(payload) >= 2:
                (info,) = struct.unpack_from(">H", payload)
                if info == INFO_EXPORT:
                    size, flags = struct.unpack_from(">QH", payload, 2)
        if size < 0:
            raise NbdError("no INFO_EXPORT in the OPT_GO reply")
        return size, flags

    # -- requests ----------------------------------------------------------------------------
    def submit(self, cmd: int, offset: int, length: int, callback: Callback,
               data: bytes | None = None, fua: bool = False) -> bool:
        """Send one request; False (callback not called) if the connection is gone."""
        flags = CMD_FLAG_FUA if fua else 0
        with self.lock:
            if not self.alive:
                return False
            self.cookie += 1
            cookie = self.cookie
            self.pending[cookie] = (cmd, length, callback)
            try:
                self.sock.sendall(_REQ.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)
                                  + (data or b""))
            except OSError:
                # the reader thread completes it as "no reply" when it sees the break
                self._broken_locked()
        return True

    def write(self, offset: int, data: bytes, callback: Callback, fua: bool = False) -> bool:
        return self.submit(CMD_WRITE, offset, len(data), callback, data, fua)

    def read(self, offset: int, length: int, callback: Callback) -> bool:
        return self.submit(CMD_READ, offset, length, callback)

    def flush(self, callback: Callback) -> bool:
        return self.submit(CMD_FLUSH, 0, 0, callback)

    def pread(self, offset: int, length: int, timeout: float = 60.0) -> bytes:
        """A synchronous READ (the checker's full-export scan)."""
        done = threading.Event()
        result: list = []

        def cb(err: int | None, payload: bytes | None) -> None:
            result.append((err, payload))
            done.set()

        if not self.read(offset, length, cb):
            raise NbdError("connection lost")
        if not done.wait(timeout):
            raise NbdError(f"READ({offset}, {length}) got no reply in {timeout} s")
        err, payload = result[0]
        if err is None:
            raise NbdError(f"READ({offset}, {length}): connection lost")
        if err:
            raise NbdError(f"READ({offset}, {length}) failed with NBD error {err}")
        assert payload is not None
        return payload

    def outstanding(self) -> int:
        with self.lock:
            return len(self.pending)

    # -- replies ---------------------------------------------------------------------------
    def _broken_locked(self) -> None:
        self.alive = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_replies(self) -> None:
        try:
            while True:
                magic, err, cookie = _REPLY.unpack(_recv_exact(self.sock, 16))
                if magic != SIMPLE_REPLY_MAGIC:
                    raise NbdError(f"bad reply magic {magic:#x}")
                with self.lock:
                    entry = self.pending.pop(cookie, None)
                if entry is None:
                    raise NbdError(f"reply for unknown cookie {cookie}")
                cmd, length, callback = entry
                payload = None
                if cmd == CMD_READ and err == 0:
                    payload = _recv_exact(self.sock, length)
                callback(err, payload)
        except (OSError, NbdError, struct.error):
            pass
        with self.lock:
            self._broken_locked()
            left = list(self.pending.values())
            self.pending.clear()
        for _cmd, _length, callback in left:
            callback(None, None)

    def close(self) -> None:
        with self.lock:
            if self.alive:
                try:
                    self.sock.sendall(_REQ.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
                except OSError:
                    pass
            self._broken_locked()
        self.reader.join(timeout=10)
        self.sock.close()
