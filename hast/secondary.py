"""secondary: the secondary worker, FreeBSD's sbin/hastd/secondary.c.

The parent forks (here: spawns) one secondary worker per primary session, once handshake steps
1-2 are done, and hands it both replication connections and the step-2 nv.  This module owns
everything from there to the end of the session:

* start-up (§6.7): socket timeouts (connection #1: 2 x HAST_KEEPALIVE = 20 s, so a silent
  primary is a dead primary; connection #2: the configured ``timeout``), the provider opened
  read/write under an exclusive flock, its metadata read;
* handshake step 3 (§6.4): the counters/resuid decision of §9.4 (``decide()``), the adopted
  resuid written to the metadata, the answer on connection #1 with the bitmap sent through the
  SECONDARY's own compression/checksum pipeline;
* the request path (§7): a receive loop (validation as FreeBSD's requnpack(), WRITE payloads
  into pooled aligned buffers, the early ``received`` reply of memsync writes), the disk
  stage, and the replies on connection #2;
* the one-time zeroing of the on-disk activemap before the first request (§2.7), the
  statistics of §10.3 and the STATUS answer to the parent.

The disk stage is an ordered pipeline rather than FreeBSD's single disk thread: requests
execute concurrently, but a request never starts while an earlier one it could observe
(overlapping range, unless both are READs; FLUSH against everything) is unfinished, and final
replies leave in arrival order.  What the primary sees is what FreeBSD's strictly FIFO
secondary produces (a READ sees every earlier WRITE, replies come in order); the provider
just gets more than one independent request at a time.  WRITEs go to an O_DIRECT provider
through Linux native AIO (hast._aio: the receive thread submits everything it read in one
io_submit, one reaper completes them in batches) and into a buffered provider at once; READ,
DELETE, FLUSH and whatever AIO refuses run on DISK_THREADS threads.  Whichever thread
finishes requests sends their replies, several in one sendmsg, and the receive thread sends
what it produced before it blocks for more input, so a request crosses as few threads as
possible.  Everything blocking runs with the GIL released (hast._io, hast._aio, socket calls)
and payloads are never touched byte by byte in Python; frames of the common shapes are parsed
and built in C (hast._wire).

The messages, fields, types and field order are FreeBSD's, checked against the C secondary's
own answers (vectors/freebsd-hastd/wire).  Deliberate deviations, all in the direction of
robustness (README lists them):

* DELETE punches a hole / discards and FLUSH is fdatasync on every provider type, so on a
  regular file they succeed where FreeBSD's disk ioctls answer ENOTTY (25).
* A request with a missing or unknown ``cmd`` drops the connection (exit 75); FreeBSD
  aborts on an assertion.  An invalid request that carries a payload has the payload read
  and discarded (up to DRAIN_MAX bytes, else the connection is dropped) before its EINVAL
  reply, so the stream stays in step; FreeBSD leaves it unread and desynchronises.
* A WRITE whose payload decodes to another length than ``length`` is refused with EINVAL
  (FreeBSD would write ``length`` bytes of whatever the buffer held).
* Errnos go on the wire in FreeBSD's numbering (``wire_errno()``): Linux's EOPNOTSUPP (95)
  is sent as 45, etc.; errnos without a FreeBSD counterpart are sent as EIO.
* When the link fails, requests already received are still executed on the disk before the
  worker exits (their replies are dropped); FreeBSD exits at once.  A local metadata or
  activemap read failure exits with EX_NOINPUT (FreeBSD exits with the syslog level 3).  An
  unexpected exception (a bug) is logged with its traceback and ends the session with
  EX_SOFTWARE instead of leaving a worker that no longer answers.
* The worker does not drop privileges itself (the daemon decides how workers run).
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import socket
import struct
import threading
import traceback
from dataclasses import dataclass

from hast import _aio, _io, _wire, log, pipeline, proto, settings
from hast import nv as nvmod
from hast._codec import is_zero
from hast.activemap import calc_ondisk_size
from hast.metadata import (
    METADATA_SIZE,
    ROLE_SECONDARY,
    InvalidMetadata,
    Metadata,
    WrongResource,
)
from hast.sysexits import EX_CONFIG, EX_NOINPUT, EX_SOFTWARE, EX_TEMPFAIL
from hast.worker import EVENT_CONNECT, EVENT_DISCONNECT, EVENT_SPLITBRAIN, WorkerContext

# Largest READ/WRITE length accepted (FreeBSD's MAXPHYS on 64-bit builds >= 13, §0.3).  Read
# when a session starts, so it can be changed before run().
MAXPHYS = 1024 * 1024
HAST_KEEPALIVE = 10
# Connection #1 must carry something (a request or a keepalive) at least this often.
REMOTEIN_TIMEOUT = 2 * HAST_KEEPALIVE
# Requests in flight per session, as FreeBSD's HAST_HIO_MAX.  FreeBSD gives each a MAXPHYS
# buffer up front; ours are aligned buffers of power-of-two size classes (4 KiB .. MAXPHYS)
# taken from per-class free lists, so memory follows the actual sizes and queue depth.  At most
# POOL_BYTES of idle buffers are kept per class (at least POOL_MIN buffers).
HIO_MAX = 256
POOL_BYTES = 32 * 1024 * 1024
POOL_MIN = 8
_MIN_CLASS = 4096
# Connection #1 is read through a buffer of this size: pipelined small requests then cost one
# recv() for many frames instead of two or three each.  Large payloads bypass it.
READ_AHEAD = 256 * 1024
RECV_CHUNK = 64 * 1024
# The disk stage's ordering index: buckets of 1 MiB; a request over more buckets than this
# (a large DELETE) is checked against every pending request instead.
_BUCKET_SHIFT = 20
_WIDE_BUCKETS = 8
# Payload of an invalid request we still read (and throw away) to stay in step with the
# primary; anything bigger is not a HAST peer and the connection is dropped.
DRAIN_MAX = 16 * 1024 * 1024
# Disk threads.  FreeBSD has one, so its provider sees one request at a time; on an SSD (or
# any O_DIRECT provider) that caps small-request rates at 1 / device latency.  Ours execute
# requests concurrently only when they cannot observe each other (see _blocks()), and final
# replies still leave in arrival order, so the primary sees FreeBSD's ordering.  1 = FreeBSD.
DISK_THREADS = 4
# The AIO reaper waits this long (s) for a completion before it looks at its stop flag again.
# A stop wakes it at once (Ring.wake()); the timeout only matters where that cannot work.
AIO_REAP_TIMEOUT = 1.0
# A lone WRITE at most this long is written by the receive thread itself (see _start()).  A
# bigger one goes through AIO even alone: its transfer outlasts a thread wake-up many times,
# and writing it inline would stop the receiving of the next request meanwhile (the primary's
# send stalls on a full window, so a sequential stream ran at disk-or-network, never both).
INLINE_WRITE_MAX = 64 * 1024

HIO_UNDEF, HIO_READ, HIO_WRITE, HIO_DELETE, HIO_FLUSH, HIO_KEEPALIVE = range(6)
_CMD_NAMES = {HIO_READ: "READ", HIO_WRITE: "WRITE", HIO_DELETE: "DELETE",
              HIO_FLUSH: "FLUSH", HIO_KEEPALIVE: "KEEPALIVE"}
SYNCSRC_UNDEF, SYNCSRC_PRIMARY, SYNCSRC_SECONDARY = 0, 1, 2

SPLIT_BRAIN_MSG = "Split-brain condition!"   # the primary matches this text literally
# hast._wire's F_* bits of the records a parsed request carried.
_F_CMD, _F_OFFSET, _F_LENGTH, _F_MEMSYNC = 1, 4, 8, 16

# -- errno numbers on the wire --------------------------------------------------------------

# FreeBSD's <sys/errno.h>.  The reply's ``error`` is read by a FreeBSD primary, so errnos are
# translated by name; 1-34 are the same everywhere, the rest differ between Linux and FreeBSD.
_FREEBSD_ERRNO: dict[str, int] = {
    "EPERM": 1, "ENOENT": 2, "ESRCH": 3, "EINTR": 4, "EIO": 5, "ENXIO": 6, "E2BIG": 7,
    "ENOEXEC": 8, "EBADF": 9, "ECHILD": 10, "EDEADLK": 11, "EDEADLOCK": 11, "ENOMEM": 12,
    "EACCES": 13, "EFAULT": 14, "ENOTBLK": 15, "EBUSY": 16, "EEXIST": 17, "EXDEV": 18,
    "ENODEV": 19, "ENOTDIR": 20, "EISDIR": 21, "EINVAL": 22, "ENFILE": 23, "EMFILE": 24,
    "ENOTTY": 25, "ETXTBSY": 26, "EFBIG": 27, "ENOSPC": 28, "ESPIPE": 29, "EROFS": 30,
    "EMLINK": 31, "EPIPE": 32, "EDOM": 33, "ERANGE": 34, "EAGAIN": 35, "EWOULDBLOCK": 35,
    "EINPROGRESS": 36, "EALREADY": 37, "ENOTSOCK": 38, "EDESTADDRREQ": 39, "EMSGSIZE": 40,
    "EPROTOTYPE": 41, "ENOPROTOOPT": 42, "EPROTONOSUPPORT": 43, "ESOCKTNOSUPPORT": 44,
    "EOPNOTSUPP": 45, "ENOTSUP": 45, "EPFNOSUPPORT": 46, "EAFNOSUPPORT": 47,
    "EADDRINUSE": 48, "EADDRNOTAVAIL": 49, "ENETDOWN": 50, "ENETUNREACH": 51,
    "ENETRESET": 52, "ECONNABORTED": 53, "ECONNRESET": 54, "ENOBUFS": 55, "EISCONN": 56,
    "ENOTCONN": 57, "ESHUTDOWN": 58, "ETOOMANYREFS": 59, "ETIMEDOUT": 60,
    "ECONNREFUSED": 61, "ELOOP": 62, "ENAMETOOLONG": 63, "EHOSTDOWN": 64,
    "EHOSTUNREACH": 65, "ENOTEMPTY": 66, "EUSERS": 68, "EDQUOT": 69, "ESTALE": 70,
    "EREMOTE": 71, "ENOLCK": 77, "ENOSYS": 78, "EIDRM": 82, "ENOMSG": 83, "EOVERFLOW": 84,
    "ECANCELED": 85, "EILSEQ": 86, "EBADMSG": 89, "EMULTIHOP": 90, "ENOLINK": 91,
    "EPROTO": 92, "ENOTRECOVERABLE": 95, "EOWNERDEAD": 96,
    # Linux block-layer statuses without a FreeBSD name, as a GEOM disk would report them:
    # medium/target errors are EIO, a corrupted filesystem is EINTEGRITY, no medium ENXIO.
    "ENODATA": 5, "EREMOTEIO": 5, "EBADE": 5, "EHWPOISON": 5, "EUCLEAN": 97,
    "ENOMEDIUM": 6, "EMEDIUMTYPE": 6,
}
_FREEBSD_EIO = 5
_FREEBSD_EINVAL = 22
_FREEBSD_EOPNOTSUPP = 45


def wire_errno(err: int) -> int:
    """The FreeBSD errno number for a local errno (EIO when FreeBSD has no such error)."""
    name = errno.errorcode.get(err)
    if name is None:
        return _FREEBSD_EIO
    return _FREEBSD_ERRNO.get(name, _FREEBSD_EIO)


# -- handshake decision (§9.4) ----------------------------------------------------------------

MAP_NONE, MAP_DISK, MAP_FULL = "none", "disk", "full"


@dataclass(frozen=True)
class Decision:
    """What init_remote() answers: the table row, sync source, which bitmap, or an error."""

    row: int
    syncsrc: int = SYNCSRC_UNDEF
    map: str = MAP_NONE
    adopt: bool = False          # row 1: take the primary's resuid and write metadata
    errmsg: str | None = None    # rows 2 and 6: answer this and exit EX_CONFIG
    splitbrain: bool = False


def decide(s_resuid: int, s_local: int, s_remote: int,
           p_resuid: int, p_local: int, p_remote: int, p_virgin: bool) -> Decision:
    """§9.4 decision table, rows evaluated in FreeBSD's order (S = ours, P = the primary's)."""
    if s_resuid == 0:
        # First pairing: no map when the primary never wrote either, else everything.
        return Decision(1, SYNCSRC_PRIMARY, MAP_NONE if p_virgin else MAP_FULL, adopt=True)
    if s_resuid != p_resuid:
        return Decision(2, errmsg=(f"Resource unique ID mismatch (primary={p_resuid}, "
                                   f"secondary={s_resuid})."))
    if s_local > p_remote and s_remote == p_local:
        return Decision(3, SYNCSRC_SECONDARY, MAP_DISK)      # primary is out of date
    if s_local == p_remote and s_remote == p_local:
        return Decision(4, SYNCSRC_PRIMARY, MAP_DISK)        # in sync, resync "just in case"
    if s_local == p_remote and s_remote < p_local:
        return Decision(5, SYNCSRC_PRIMARY, MAP_DISK)        # secondary is out of date
    if s_local > p_remote and p_local > s_remote:
        return Decision(6, errmsg=SPLIT_BRAIN_MSG, splitbrain=True)
    # "Should never happen": full synchronisation.
    return Decision(7, SYNCSRC_SECONDARY if s_local > p_remote else SYNCSRC_PRIMARY, MAP_FULL)


def _int32(v: int) -> int:
    return ((v + 0x80000000) & 0xFFFFFFFF) - 0x80000000   # FreeBSD's (int32_t) cast


def _int64(v: int) -> int:
    return ((v + (1 << 63)) & ((1 << 64) - 1)) - (1 << 63)


# -- replies ----------------------------------------------------------------------------------

# An nv blob is a plain concatenation of records, so a reply is assembled from prepacked
# records: the seq record's header and name, then its value, then the optional records.
_SEQ_HEAD = nvmod.NV().add_uint64("seq", 0).pack()[:-8]
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_RECEIVED = nvmod.NV().add_int8("received", 1).pack()
_ERROR_RECS: dict[int, bytes] = {}


def _error_record(err: int) -> bytes:
    rec = _ERROR_RECS.get(err)
    if rec is None:
        rec = _ERROR_RECS[err] = nvmod.NV().add_int16("error", _int16(err)).pack()
    return rec


def _int16(v: int) -> int:
    return ((v + 0x8000) & 0xFFFF) - 0x8000


class _Hio:
    """One request in flight (FreeBSD's struct hio)."""

    __slots__ = ("cmd", "seq", "offset", "length", "memsync", "error", "buf", "view",
                 "received", "order")

    def __init__(self, cmd: int, seq: int = 0) -> None:
        self.cmd = cmd
        self.seq = seq
        self.offset = 0
        self.length = 0
        self.memsync = False
        self.error = 0
        self.buf: _io.AlignedBuffer | None = None
        self.view: memoryview | None = None
        self.received = False    # the early reply of a memsync WRITE (holds no slot)
        self.order = -1          # arrival number of requests that go to the disk

    def describe(self) -> str:
        name = _CMD_NAMES.get(self.cmd)
        if name is None:
            return f"UNKNOWN({self.cmd})."
        if self.cmd in (HIO_FLUSH, HIO_KEEPALIVE):
            return f"{name}."
        return f"{name}({self.offset}, {self.length})."


class _Reader:
    """Frames from a stream socket through a read-ahead buffer (proto.recv_frame's rules).

    Same checks as proto.recv_frame: version above ours and nv blobs above max_nv are
    ProtoErrors, EOF is ENOTCONN, an empty blob is an empty nv.  Payloads are copied out of
    what was read ahead and the rest is received straight into the caller's buffer.
    """

    def __init__(self, sock: socket.socket, size: int = READ_AHEAD) -> None:
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes (need <= buffer size) available from start."""
        if self.end - self.start >= need:
            return
        if self.start + need > len(self.buf):
            # Move the partial frame to the front; it is at most one header + nv blob.
            n = self.end - self.start
            self.view[:n] = self.view[self.start:self.end]
            self.start, self.end = 0, n
        while self.end - self.start < need:
            try:
                # At most RECV_CHUNK: a large payload that follows is received straight
                # into its aligned buffer instead of being copied out of this one.
                free = self.view[self.end:]
                got = self.sock.recv_into(free, min(len(free), RECV_CHUNK))
            except TimeoutError:
                raise proto.ProtoError(errno.ETIMEDOUT, "Operation timed out") from None
            if got == 0:
                raise proto.ProtoError(errno.ENOTCONN, "Connection closed by peer")
            self.end += got

    def frame(self, max_nv: int) -> nvmod.NV | tuple:
        """The next request: hast._wire's FAST tuple for the common shapes, else an NV."""
        self._fill(proto.HEADER_SIZE)
        version, size = proto.HEADER.unpack_from(self.buf, self.start)
        if version > proto.PROTO_VERSION:
            raise proto.ProtoError(errno.EPROTO, f"Unsupported protocol version {version}")
        if size > max_nv or proto.HEADER_SIZE + size > len(self.buf):
            raise proto.ProtoError(errno.EMSGSIZE, f"nv blob of {size} bytes exceeds {max_nv}")
        self._fill(proto.HEADER_SIZE + size)
        begin = self.start + proto.HEADER_SIZE
        parsed = _wire.parse_frame(self.buf, self.start, self.end, True)
        self.start = begin + size
        if parsed[0] == _wire.FAST:
            return parsed
        if size == 0:
            return nvmod.NV()
        try:
            return nvmod.NV.unpack(self.view[begin:begin + size])
        except nvmod.NVError as exc:
            raise proto.ProtoError(errno.EINVAL, f"Malformed nv: {exc}") from None

    def ready(self) -> bool:
        """A whole header + nv blob is buffered: frame() will not block."""
        avail = self.end - self.start
        if avail < proto.HEADER_SIZE:
            return False
        return avail >= proto.HEADER_SIZE + _U32.unpack_from(self.buf, self.start + 1)[0]

    def into(self, dest: memoryview) -> None:
        """Fill dest: first from the read-ahead, then directly from the socket."""
        n = min(len(dest), self.end - self.start)
        if n:
            dest[:n] = self.view[self.start:self.start + n]
            self.start += n
        if n < len(dest):
            proto.recv_exact_into(self.sock, dest[n:])


class _Fatal(Exception):
    """Ends the session: exit code and, for link failures, the errno to log."""

    def __init__(self, code: int, text: str, err: int | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.err = err


def _set_timeout(sock: socket.socket, seconds: int) -> None:
    """SO_RCVTIMEO/SO_SNDTIMEO as FreeBSD sets them: blocking I/O with a kernel deadline
    (no poll() before every recv, unlike Python's socket timeouts)."""
    sock.settimeout(None)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not TCP (a socketpair in tests): nothing to disable
    tv = struct.pack("@ll", seconds, 0)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    except OSError:
        sock.settimeout(seconds)


class Secondary:
    """One session of the secondary worker; run() drives it."""

    def __init__(self, ctx: WorkerContext) -> None:
        if ctx.remotein is None or ctx.remoteout is None or ctx.handshake is None:
            raise ValueError("a secondary worker needs both connections and the handshake")
        self.ctx = ctx
        self.res = ctx.resource
        self.remotein: socket.socket = ctx.remotein
        self.remoteout: socket.socket = ctx.remoteout
        self.version = ctx.version
        self.maxphys = MAXPHYS
        self.fd = -1
        self.direct = True
        self._ring: _aio.Ring | None = None
        self._aio_thread: threading.Thread | None = None
        self._aio_stop = False
        self.mediasize = 0
        self.sectorsize = 512
        self.md: Metadata | None = None
        self.datasize = 0
        self.localoff = 0
        self.mapsize = 0
        # statistics (§10.3); each counter has one writing thread
        self.stat_read = self.stat_write = self.stat_delete = self.stat_flush = 0
        self.stat_read_error = self.stat_write_error = 0
        self.stat_delete_error = self.stat_flush_error = 0
        self.stat_activemap_write_error = 0
        self._taken = 0          # slots taken (receive thread)
        self._released = 0       # slots given back (under _send_lock)
        self._pools: dict[int, list[_io.AlignedBuffer]] = {}
        self._reader = _Reader(self.remotein)
        # The disk stage: requests started (queued for or in a disk thread) and requests
        # waiting for a conflicting earlier one, in arrival order; both under _disk_cv.
        self._disk_cv = threading.Condition()
        self._running: dict[int, _Hio] = {}      # arrival number -> request
        self._waiting: list[_Hio] = []
        # Pending (running or waiting) requests by 1 MiB bucket of their range, so that the
        # ordering check of a request looks at its neighbours only; FLUSHes and requests
        # over many buckets (large DELETEs) are kept apart and checked one by one.
        self._index: dict[int, list[_Hio]] = {}
        self._wide: list[_Hio] = []
        self._flushes: list[int] = []            # arrival numbers of pending FLUSHes
        self._ready: queue.SimpleQueue[_Hio | None] = queue.SimpleQueue()
        self._arrivals = 0       # next arrival number (receive thread)
        # Replies: whichever thread finishes requests sends their replies, under _send_lock,
        # final replies in arrival order (_held waits for the earlier ones).
        self._send_lock = threading.Lock()
        self._slot_cv = threading.Condition(self._send_lock)
        self._slot_waiting = False
        self._held: dict[int, _Hio] = {}
        self._next_order = 0
        # The receive thread batches what it does between two blocking reads: replies it
        # produced and native AIO submissions go out together before it blocks.
        self._recv_ident = 0
        self._early: list[_Hio] = []
        self._aio_batch: list[tuple] = []
        self._clear_map = True
        self._localflush = True
        self._stopping = threading.Event()
        self._fail_lock = threading.Lock()
        self._exitcode: int | None = None
        self._disk_threads: list[threading.Thread] = []

    # -- start-up -------------------------------------------------------------------------

    def open_local(self) -> None:
        """init_local(): provider read/write under flock, then its metadata (EX_NOINPUT)."""
        path = self.res.local
        direct = True
        try:
            direct = settings.load(self.ctx.config.path).direct
        except (settings.SettingsError, AttributeError) as exc:
            log.warning(f"{exc}; using O_DIRECT.")
        try:
            # O_DIRECT (py-hast.conf's `direct`, on by default): a GEOM provider has no cache
            # either; the page cache would only double-buffer and defer write errors to a
            # later flush.
            self.fd, self.direct = _io.open_provider(path, writable=True, direct=direct)
        except OSError as exc:
            raise _Fatal(EX_NOINPUT, f"Unable to open {path}", log.exc_errno(exc)) from None
        try:
            _io.lock_exclusive(self.fd)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise _Fatal(EX_NOINPUT, f"Unable to lock {path}", log.exc_errno(exc)) from None
            log.warning(f"Unable to lock {path} (operation not supported), but continuing.")
        try:
            self.mediasize, self.sectorsize = _io.provider_info(self.fd)
        except _io.NotAProvider:
            raise _Fatal(EX_NOINPUT, f"{path} is neither GEOM provider nor regular file.") \
                from None
        except OSError as exc:
            # FreeBSD's text, missing "to" included (scripts may match it).
            raise _Fatal(EX_NOINPUT, f"Unable obtain provider {path} mediasize",
                         log.exc_errno(exc)) from None
        block = _io.AlignedBuffer(METADATA_SIZE)
        try:
            got = _io.pread(self.fd, block, 0)
        except OSError as exc:
            raise _Fatal(EX_NOINPUT, "Unable to read metadata", log.exc_errno(exc)) from None
        if got != METADATA_SIZE:
            raise _Fatal(EX_NOINPUT, "Unable to read metadata", errno.EIO)
        try:
            md = Metadata.unpack(block, self.res.name)
        except InvalidMetadata as exc:
            bad = exc.with_path(path)
            raise _Fatal(EX_NOINPUT, bad.text, bad.errno) from None
        except WrongResource as exc:
            raise _Fatal(EX_NOINPUT, str(WrongResource(exc.found, exc.expected, path))) from None
        self.md = md
        self.datasize = md.datasize
        self.localoff = md.localoff
        try:
            self.mapsize = calc_ondisk_size(self.mediasize - METADATA_SIZE, md.extentsize,
                                            self.sectorsize)
        except ValueError as exc:
            raise _Fatal(EX_NOINPUT, f"Metadata read from {path} is invalid ({exc})") from None

    def _write_metadata(self) -> None:
        assert self.md is not None
        block = _io.AlignedBuffer(METADATA_SIZE)
        memoryview(block)[:] = self.md.pack()
        try:
            _io.pwrite(self.fd, block, 0)
        except OSError as exc:
            raise _Fatal(EX_NOINPUT, "Unable to write metadata", log.exc_errno(exc)) from None

    def handshake(self) -> None:
        """init_remote(): decide, answer on connection #1 (step 3), exit on errors."""
        md, hs = self.md, self.ctx.handshake
        assert md is not None and hs is not None
        p_resuid = hs.get_uint64("resuid")
        p_local = hs.get_uint64("localcnt")
        p_remote = hs.get_uint64("remotecnt")
        out = nvmod.NV()
        out.add_int64("datasize", _int64(md.datasize))
        out.add_int32("extentsize", _int32(md.extentsize))
        out.add_uint64("localcnt", md.localcnt)
        out.add_uint64("remotecnt", md.remotecnt)
        dec = decide(md.resuid, md.localcnt, md.remotecnt, p_resuid, p_local, p_remote,
                     hs.exists("virgin"))
        if dec.errmsg is not None:
            if dec.splitbrain:
                log.error("Split-brain detected, exiting.")
            else:
                log.error(dec.errmsg)
            out.add_string("errmsg", dec.errmsg)
            try:
                proto.send_frame(self.remotein, self.version, out)
            except OSError as exc:
                raise _Fatal(EX_CONFIG, f"Unable to send response to {self.res.remote}",
                             log.exc_errno(exc)) from None
            if dec.splitbrain:
                self.ctx.emit(EVENT_SPLITBRAIN)
            raise _Fatal(EX_CONFIG, "")
        mapdata: memoryview | bytes | None = None
        if dec.adopt:
            # A secondary never touches its counters; it only records whose it is now.
            md.resuid = p_resuid
            md.prevrole = ROLE_SECONDARY
            self._write_metadata()
            out.add_int8("virgin", 1)
        if dec.map == MAP_DISK:
            buf = _io.AlignedBuffer(self.mapsize)
            try:
                got = _io.pread(self.fd, buf, METADATA_SIZE)
            except OSError as exc:
                raise _Fatal(EX_NOINPUT, "Unable to read activemap",
                             log.exc_errno(exc)) from None
            if got != self.mapsize:
                raise _Fatal(EX_NOINPUT, "Unable to read activemap", errno.EIO)
            mapdata = memoryview(buf)
        elif dec.map == MAP_FULL:
            mapdata = b"\xff" * self.mapsize
        if dec.row == 7:
            log.warning("This should never happen, asking for full synchronization "
                        f"(primary(local={p_local}, remote={p_remote}), "
                        f"secondary(local={md.localcnt}, remote={md.remotecnt})).")
        out.add_uint8("syncsrc", dec.syncsrc)
        out.add_uint32("mapsize", self.mapsize if mapdata is not None else 0)
        payload = pipeline.encode(out, mapdata, self.res.compression, self.res.checksum)
        try:
            proto.send_frame(self.remotein, self.version, out, payload)
        except OSError as exc:
            raise _Fatal(EX_TEMPFAIL, f"Unable to send activemap to {self.res.remote}",
                         log.exc_errno(exc)) from None

    # -- status ---------------------------------------------------------------------------

    def status(self) -> nvmod.NV:
        """The worker's part of `hastctl status` (ctrl_thread + output_status_aux)."""
        out = nvmod.NV()
        out.add_string("status", "degraded" if self._stopping.is_set() else "complete")
        out.add_uint32("extentsize", self.md.extentsize if self.md else 0)
        out.add_uint32("keepdirty", 0)
        out.add_uint64("dirty", 0)
        out.add_uint64("stat_read", self.stat_read)
        out.add_uint64("stat_write", self.stat_write)
        out.add_uint64("stat_delete", self.stat_delete)
        out.add_uint64("stat_flush", self.stat_flush)
        out.add_uint64("stat_activemap_update", 0)
        out.add_uint64("stat_read_error", self.stat_read_error)
        out.add_uint64("stat_write_error",
                       self.stat_write_error + self.stat_activemap_write_error)
        out.add_uint64("stat_delete_error", self.stat_delete_error)
        out.add_uint64("stat_flush_error", self.stat_flush_error)
        out.add_uint64("idle_queue_size", max(0, HIO_MAX - (self._taken - self._released)))
        out.add_uint64("local_queue_size", len(self._running) + len(self._waiting))
        out.add_uint64("send_queue_size", len(self._held))
        return out

    # -- failure ----------------------------------------------------------------------------

    def fail(self, code: int, text: str, err: int | None = None) -> None:
        """First failure wins: log it, stop receiving and sending (both sockets shut down)."""
        with self._fail_lock:
            if self._exitcode is not None:
                return
            self._exitcode = code
        if text:
            log.error(text, err)
        self._stopping.set()
        for sock in (self.remotein, self.remoteout):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _bug(self, where: str, exc: BaseException) -> None:
        """An exception no code path expects: log it whole and end the session."""
        for line in traceback.format_exception(exc):
            for part in line.rstrip().splitlines():
                log.crit(part)
        self.fail(EX_SOFTWARE, f"Unexpected error in the {where} thread: {exc!r}")

    # -- receive (connection #1) ----------------------------------------------------------

    def _buffer(self, size: int) -> _io.AlignedBuffer:
        """An aligned buffer of at least size bytes (size <= maxphys) from the pools."""
        cls = _MIN_CLASS
        while cls < size:
            cls <<= 1
        cls = min(cls, max(self.maxphys, size))
        pool = self._pools.get(cls)
        if pool:
            try:
                return pool.pop()
            except IndexError:
                pass
        return _io.AlignedBuffer(cls)

    def _give_back(self, buf: _io.AlignedBuffer) -> None:
        # list.append/pop are atomic: the receive and send threads share the pools unlocked.
        cls = len(buf)
        pool = self._pools.setdefault(cls, [])
        if len(pool) < max(POOL_MIN, POOL_BYTES // cls):
            pool.append(buf)

    def _drain(self, size: int) -> None:
        """Read and discard an unusable payload so the next frame header is in step."""
        if size > DRAIN_MAX:
            raise _Fatal(EX_TEMPFAIL, f"Unable to skip request data of {size} bytes",
                         errno.EMSGSIZE)
        buf = self._buffer(min(size, self.maxphys))
        view = memoryview(buf)
        try:
            while size > 0:
                n = min(size, len(view))
                self._reader.into(view[:n])
                size -= n
        except OSError as exc:
            raise _Fatal(EX_TEMPFAIL, "Unable to receive request data",
                         log.exc_errno(exc)) from None
        finally:
            self._give_back(buf)

    def _unpack(self, msg: nvmod.NV) -> _Hio:
        """requnpack(): the request, with ``error`` EINVAL when it must not be executed.

        A missing or unknown ``cmd`` raises _Fatal: the reply would carry nothing the
        primary can match, and FreeBSD's secondary dies on it anyway.
        """
        cmd = msg.get_uint8("cmd")
        if cmd == HIO_UNDEF:
            raise _Fatal(EX_TEMPFAIL, "Header contains no 'cmd' field.")
        if cmd not in _CMD_NAMES:
            raise _Fatal(EX_TEMPFAIL, f"Header contains invalid 'cmd' ({cmd}).")
        hio = _Hio(cmd)
        if cmd == HIO_KEEPALIVE:
            return hio
        hio.seq = msg.get_uint64("seq")
        if hio.seq == 0:
            return self._invalid(hio, "Header contains no 'seq' field.")
        if cmd == HIO_FLUSH:
            return hio
        hio.memsync = cmd == HIO_WRITE and msg.exists("memsync")
        offset = msg.get("offset", nvmod.UINT64)
        if offset is None:
            return self._invalid(hio, "Header is missing 'offset' field.")
        hio.offset = int(offset)  # type: ignore[call-overload]
        length = msg.get("length", nvmod.UINT64)
        if length is None:
            return self._invalid(hio, "Header is missing 'length' field.")
        hio.length = int(length)  # type: ignore[call-overload]
        return self._check(hio)

    def _unpack_fast(self, r: tuple) -> _Hio:
        """_unpack() of a request hast._wire parsed (cmd, seq, offset, length, memsync)."""
        found = r[3]
        cmd = r[4] if found & _F_CMD else HIO_UNDEF
        if cmd == HIO_UNDEF:
            raise _Fatal(EX_TEMPFAIL, "Header contains no 'cmd' field.")
        if cmd not in _CMD_NAMES:
            raise _Fatal(EX_TEMPFAIL, f"Header contains invalid 'cmd' ({cmd}).")
        hio = _Hio(cmd)
        if cmd == HIO_KEEPALIVE:
            return hio
        hio.seq = r[5]
        if hio.seq == 0:
            return self._invalid(hio, "Header contains no 'seq' field.")
        if cmd == HIO_FLUSH:
            return hio
        hio.memsync = cmd == HIO_WRITE and bool(found & _F_MEMSYNC)
        if not found & _F_OFFSET:
            return self._invalid(hio, "Header is missing 'offset' field.")
        hio.offset = r[6]
        if not found & _F_LENGTH:
            return self._invalid(hio, "Header is missing 'length' field.")
        hio.length = r[7]
        return self._check(hio)

    def _check(self, hio: _Hio) -> _Hio:
        """The range checks of requnpack() (after offset and length are known)."""
        cmd = hio.cmd
        if hio.length == 0:
            return self._invalid(hio, "Data length is zero.")
        if cmd != HIO_DELETE and hio.length > self.maxphys:
            return self._invalid(
                hio, f"Data length is too large ({hio.length} > {self.maxphys}).")
        if hio.offset % self.sectorsize:
            return self._invalid(hio, f"Offset {hio.offset} is not multiple of sector size.")
        if hio.length % self.sectorsize:
            return self._invalid(hio, f"Length {hio.length} is not multiple of sector size.")
        if hio.offset + hio.length > self.datasize:
            return self._invalid(hio, f"Data offset is too large "
                                      f"({hio.offset + hio.length} > {self.datasize}).")
        return hio

    @staticmethod
    def _invalid(hio: _Hio, text: str) -> _Hio:
        log.error(text)
        hio.error = errno.EINVAL
        return hio

    def recv_loop(self) -> None:
        """recv_thread(): frames from connection #1 to the disk (or straight to send) queue."""
        reader = self._reader
        self._recv_ident = threading.get_ident()
        holding = False
        while not self._stopping.is_set():
            if not holding:
                self._take_slot()       # backpressure: at most HIO_MAX requests in flight
                holding = True
            if not reader.ready():
                self._flush_batch()     # about to block: what this batch produced goes out
            try:
                msg = reader.frame(proto.MAX_NV_WIRE)
            except OSError as exc:
                raise _Fatal(EX_TEMPFAIL, "Unable to receive request header",
                             log.exc_errno(exc)) from None
            if type(msg) is tuple:
                hio = self._unpack_fast(msg)
                size = msg[8]
            else:
                hio = self._unpack(msg)
                size = proto.payload_size(msg)
            if hio.error == 0:
                if hio.cmd == HIO_READ:
                    self.stat_read += 1
                elif hio.cmd == HIO_WRITE:
                    self.stat_write += 1
                elif hio.cmd == HIO_DELETE:
                    self.stat_delete += 1
                elif hio.cmd == HIO_FLUSH:
                    self.stat_flush += 1
            if hio.cmd == HIO_WRITE and hio.error == 0 and size <= self.maxphys:
                self._recv_write_data(hio, msg, size)
            elif size:
                # Data we cannot use (an invalid WRITE, or data on another command): read
                # and discard it so the next header is in step, and refuse the request.
                if hio.error == 0 and hio.cmd == HIO_WRITE:
                    log.error(f"Request data size is too large ({size} > {self.maxphys}).")
                    hio.error = errno.EINVAL
                elif hio.error == 0 and hio.cmd != HIO_KEEPALIVE:
                    log.error(f"Unexpected data of {size} bytes with {hio.describe()}")
                    hio.error = errno.EINVAL
                self._drain(size)
            if hio.cmd == HIO_KEEPALIVE:
                continue        # no reply; the slot is reused for the next frame
            if hio.error:
                if hio.buf is not None:
                    self._give_back(hio.buf)
                    hio.buf = hio.view = None
                self._early.append(hio)
            else:
                if hio.cmd == HIO_READ:
                    hio.buf = self._buffer(hio.length)
                    hio.view = memoryview(hio.buf)[:hio.length]
                self._submit(hio)
            holding = False

    def _recv_write_data(self, hio: _Hio, msg: nvmod.NV | tuple, size: int) -> None:
        buf = self._buffer(max(size, hio.length))
        hio.buf = buf
        view = memoryview(buf)
        wire = view[:size]
        try:
            if size:
                self._reader.into(wire)
        except OSError as exc:
            raise _Fatal(EX_TEMPFAIL, "Unable to receive request data",
                         log.exc_errno(exc)) from None
        try:
            # a request hast._wire parsed has no compression or checksum: the data is `wire`
            data = wire if type(msg) is tuple else pipeline.decode(msg, wire, self.maxphys)
        except pipeline.PipelineError as exc:
            # A corrupt payload means a corrupt link or peer: never write it, never answer.
            log.error(str(exc))
            raise _Fatal(EX_TEMPFAIL, "Unable to receive request data", exc.errno) from None
        n = memoryview(data).nbytes
        if n != hio.length:
            log.error(f"Data size ({n}) differs from request length ({hio.length}).")
            hio.error = errno.EINVAL
            return
        if data is not wire:
            view[:n] = data     # decompressed: into the aligned buffer the disk I/O uses
        hio.view = view[:n]
        if hio.memsync:
            # memsync: acknowledge receipt before the disk write starts, so this reply
            # precedes the final one whichever thread sends that.
            ack = _Hio(HIO_WRITE, hio.seq)
            ack.received = True
            self._early.append(ack)
            self._deliver(self._early)
            self._early = []

    def _take_slot(self) -> None:
        self._taken += 1
        if self._taken - self._released <= HIO_MAX:
            return
        self._flush_batch()
        with self._slot_cv:
            while self._taken - self._released > HIO_MAX and not self._stopping.is_set():
                self._slot_waiting = True
                self._slot_cv.wait(1.0)
            self._slot_waiting = False

    def _flush_batch(self) -> None:
        """Receive thread: send the replies and start the AIO writes gathered so far."""
        if self._early:
            early, self._early = self._early, []
            self._deliver(early)
        if self._aio_batch:
            batch, self._aio_batch = self._aio_batch, []
            ring = self._ring
            assert ring is not None
            try:
                refused = ring.submit_many(batch, self.sectorsize)
            except OSError:
                refused = [op[0] for op in batch]
            for hio in refused:
                self._ready.put(hio)    # misaligned or the ring is full: a disk thread

    # -- disk ----------------------------------------------------------------------------------

    def _clear_activemap(self) -> None:
        """Zero the on-disk activemap, once per session (retried until it works)."""
        try:
            _io.pwrite(self.fd, _io.AlignedBuffer(self.mapsize), METADATA_SIZE)
        except OSError as exc:
            # Tried again before the next request, as FreeBSD does.
            log.warning("Unable to store cleared activemap", log.exc_errno(exc))
            self.stat_activemap_write_error += 1
            return
        self._clear_map = False
        log.debug(1, "Local activemap cleared.")

    @staticmethod
    def _blocks(earlier: _Hio, later: _Hio) -> bool:
        """True when later must not start before earlier has completed.

        That is when one could see the other's effect: overlapping ranges unless both are
        READs.  FLUSH is a barrier both ways (everything before it is on disk when it is
        answered, nothing after it starts before), as with FreeBSD's single disk thread.
        """
        if earlier.cmd == HIO_FLUSH or later.cmd == HIO_FLUSH:
            return True
        if earlier.cmd == HIO_READ and later.cmd == HIO_READ:
            return False
        return (earlier.offset < later.offset + later.length
                and later.offset < earlier.offset + earlier.length)

    def _add(self, hio: _Hio) -> None:
        """Index a request that is now pending (_disk_cv held)."""
        if hio.cmd == HIO_FLUSH:
            self._flushes.append(hio.order)
            return
        first = hio.offset >> _BUCKET_SHIFT
        last = (hio.offset + hio.length - 1) >> _BUCKET_SHIFT
        if last - first >= _WIDE_BUCKETS:
            self._wide.append(hio)
            return
        index = self._index
        for b in range(first, last + 1):
            bucket = index.get(b)
            if bucket is None:
                index[b] = [hio]
            else:
                bucket.append(hio)

    def _remove(self, hio: _Hio) -> None:
        """Unindex a request that completed (_disk_cv held)."""
        if hio.cmd == HIO_FLUSH:
            self._flushes.remove(hio.order)
            return
        first = hio.offset >> _BUCKET_SHIFT
        last = (hio.offset + hio.length - 1) >> _BUCKET_SHIFT
        if last - first >= _WIDE_BUCKETS:
            self._wide.remove(hio)
            return
        index = self._index
        for b in range(first, last + 1):
            bucket = index[b]
            if len(bucket) == 1:
                del index[b]
            else:
                bucket.remove(hio)

    def _blocked(self, hio: _Hio) -> bool:
        """_blocks(e, hio) for some pending e that arrived before hio (_disk_cv held)."""
        order = hio.order
        for f in self._flushes:
            if f < order:
                return True
        if hio.cmd == HIO_FLUSH:
            return (any(o < order for o in self._running)
                    or any(w.order < order for w in self._waiting))
        start, end = hio.offset, hio.offset + hio.length
        read = hio.cmd == HIO_READ
        first, last = start >> _BUCKET_SHIFT, (end - 1) >> _BUCKET_SHIFT
        if last - first >= _WIDE_BUCKETS:
            candidates: list = [*self._running.values(), *self._waiting]
        else:
            candidates = self._wide[:]
            index = self._index
            for b in range(first, last + 1):
                bucket = index.get(b)
                if bucket:
                    candidates += bucket
        for e in candidates:
            if (e.order < order and e.offset < end and start < e.offset + e.length
                    and not (read and e.cmd == HIO_READ)):
                return True
        return False

    def _submit(self, hio: _Hio) -> None:
        """Hand a request to the disk stage (receive thread)."""
        if self._clear_map:
            # §2.7: the primary sent a request, so it merged and stored our map: clear ours
            # before the first request executes.
            self._clear_activemap()
        hio.order = self._arrivals
        self._arrivals += 1
        with self._disk_cv:
            self._add(hio)
            if self._blocked(hio):
                self._waiting.append(hio)
                return
            self._running[hio.order] = hio
        self._start(hio)

    def _start(self, hio: _Hio) -> None:
        """Execute a request that nothing earlier blocks: a WRITE through native AIO on an
        O_DIRECT provider or at once on a buffered one, everything else on a disk thread."""
        if hio.cmd == HIO_WRITE:
            ring = self._ring
            if ring is not None:
                if threading.get_ident() == self._recv_ident:
                    if (len(self._running) == 1 and not self._aio_batch
                            and hio.length <= INLINE_WRITE_MAX
                            and not self._reader.ready()):
                        # Nothing else to do (queue depth 1): writing here costs less than
                        # waking the reaper, and the reply leaves before the next recv.
                        self._run_one(self.fd, hio)
                        return
                    self._aio_batch.append((hio, _aio.WRITE, self.fd, hio.view,
                                            self.localoff + hio.offset))
                    return
                try:
                    if ring.submit(hio, _aio.WRITE, self.fd, hio.view,
                                   self.localoff + hio.offset, self.sectorsize):
                        return
                except OSError:
                    pass                        # ring full or refused: a disk thread
            elif not self.direct:
                self._run_one(self.fd, hio)     # a copy into the page cache
                return
        self._ready.put(hio)

    def _run_one(self, fd: int, hio: _Hio) -> None:
        try:
            self._execute(fd, hio)
        except Exception as exc:  # a bug: end the session, keep the queues moving
            hio.error = errno.EIO
            self._bug("disk", exc)
        self._complete(hio)

    def _complete(self, hio: _Hio) -> None:
        self._complete_many([hio])

    def _complete_many(self, done: list[_Hio]) -> None:
        """Requests done: reply, then start the waiting requests they no longer block."""
        start: list[_Hio] = []
        with self._disk_cv:
            running = self._running
            for hio in done:
                del running[hio.order]
                self._remove(hio)
            if self._waiting:
                still: list[_Hio] = []
                blocked = self._blocked
                for w in self._waiting:
                    if blocked(w):
                        still.append(w)
                    else:
                        running[w.order] = w
                        start.append(w)
                self._waiting = still
            if not self._running:
                self._disk_cv.notify_all()
        if threading.get_ident() == self._recv_ident:
            self._early.extend(done)
        else:
            self._deliver(done)
        for w in start:
            self._start(w)

    def disk_loop(self) -> None:
        """disk_thread(): execute requests; conflicting ones run in arrival order."""
        fd = self.fd
        while True:
            hio = self._ready.get()
            if hio is None:
                return
            self._run_one(fd, hio)

    def aio_loop(self) -> None:
        """Completions of the WRITEs submitted through native AIO, in batches."""
        ring = self._ring
        assert ring is not None
        timeout = AIO_REAP_TIMEOUT
        while not (self._aio_stop and not len(ring)):
            try:
                done = ring.reap(1, timeout)
            except OSError as exc:
                self.fail(EX_TEMPFAIL, "Unable to reap disk I/O", log.exc_errno(exc))
                return
            hios = []
            for hio, res in done:
                if res < 0:
                    hio.error = -res
                    log.error(f"Request failed: {hio.describe()}", hio.error)
                elif res != hio.length:
                    # stopped short (a device that ends early): the rest synchronously
                    try:
                        _io.pwrite(self.fd, hio.view[res:], self.localoff + hio.offset + res)
                    except OSError as exc:
                        hio.error = log.exc_errno(exc)
                        log.error(f"Request failed: {hio.describe()}", hio.error)
                hios.append(hio)
            if hios:
                self._complete_many(hios)

    def _execute(self, fd: int, hio: _Hio) -> None:
        off = self.localoff + hio.offset
        logerror = True
        try:
            if hio.cmd == HIO_READ:
                assert hio.view is not None
                if _io.pread(fd, hio.view, off) != hio.length:
                    hio.error = errno.EIO
            elif hio.cmd == HIO_WRITE:
                assert hio.view is not None
                _io.pwrite(fd, hio.view, off)
            elif hio.cmd == HIO_DELETE:
                _io.delete(fd, off, hio.length)
            elif hio.cmd == HIO_FLUSH:
                if not self._localflush:
                    hio.error = errno.EOPNOTSUPP
                    logerror = False
                else:
                    _io.flush(fd)
        except OSError as exc:
            hio.error = log.exc_errno(exc)
            if hio.cmd == HIO_FLUSH and hio.error == errno.EOPNOTSUPP:
                self._localflush = False
        if hio.error and logerror:
            log.error(f"Request failed: {hio.describe()}", hio.error)

    # -- send (connection #2) ---------------------------------------------------------------

    def _reply(self, hio: _Hio, parts: list[bytes | memoryview]) -> None:
        """Append the frame for hio's reply (header+nv, then data) to parts."""
        version = self.version
        if hio.received:
            parts.append(_wire.encode_reply(version, hio.seq, 0, True))
            return
        if hio.error:
            if hio.cmd == HIO_READ:
                self.stat_read_error += 1
            elif hio.cmd == HIO_WRITE:
                self.stat_write_error += 1
            elif hio.cmd == HIO_DELETE:
                self.stat_delete_error += 1
            elif hio.cmd == HIO_FLUSH:
                self.stat_flush_error += 1
            parts.append(_wire.encode_reply(version, hio.seq, _int16(wire_errno(hio.error))))
            return
        if hio.cmd != HIO_READ:
            parts.append(_wire.encode_reply(version, hio.seq))
            return
        view = hio.view
        comp, csum = self.res.compression, self.res.checksum
        if csum == "none" and (comp == "none" or (comp == "hole" and (
                len(view) < 4 or not is_zero(view)))):
            # the pipeline leaves this payload alone: only `size` is added
            parts.append(_wire.encode_reply(version, hio.seq, 0, False, len(view)))
            if len(view):
                parts.append(view)
            return
        blob = _SEQ_HEAD + _U64.pack(hio.seq)
        extra = nvmod.NV()
        payload = pipeline.encode(extra, view, comp, csum)
        blob += extra.pack()
        parts.append(proto.HEADER.pack(version, len(blob)) + blob)
        if payload is not None and len(payload):
            parts.append(memoryview(payload))

    def _done(self, hio: _Hio) -> None:
        """The reply went (or the session ended): the request's slot and buffer come back
        (_send_lock held)."""
        if hio.received:
            return
        if hio.buf is not None:
            self._give_back(hio.buf)
            hio.buf = hio.view = None
        self._released += 1

    def _deliver(self, hios: list[_Hio]) -> None:
        """send_thread(): replies on connection #2, several in one sendmsg.

        Early replies (memsync ``received``, refused requests) go out as they come, as in
        FreeBSD.  Final replies go out in the requests' arrival order: a request finished
        before an earlier one has its reply held until the earlier's is sent.
        """
        with self._send_lock:
            batch: list[_Hio] = []
            held = self._held
            for hio in hios:
                if hio.order < 0:
                    batch.append(hio)
                else:
                    held[hio.order] = hio
            nxt = self._next_order
            while nxt in held:
                batch.append(held.pop(nxt))
                nxt += 1
            self._next_order = nxt
            if batch:
                self._send_batch(self.remoteout, batch)
            if self._slot_waiting:
                self._slot_cv.notify()

    def _send_batch(self, sock: socket.socket, batch: list[_Hio]) -> None:
        parts: list[bytes | memoryview] = []
        try:
            for hio in batch:
                self._reply(hio, parts)
            if not self._stopping.is_set():
                proto.sendall_parts(sock, parts)
        except OSError as exc:
            self.fail(EX_TEMPFAIL, "Unable to send reply", log.exc_errno(exc))
        except Exception as exc:  # a bug: end the session, keep giving slots back
            self._bug("send", exc)
        parts.clear()
        for hio in batch:
            self._done(hio)

    # -- the session ------------------------------------------------------------------------

    def serve(self) -> int:
        """Run the request threads until the link fails; returns the exit code."""
        self._disk_threads = [
            threading.Thread(target=self.disk_loop, name=f"disk{i}", daemon=True)
            for i in range(max(1, DISK_THREADS))]
        if self.direct and _aio.AVAILABLE:
            try:
                self._ring = _aio.Ring(2 * HIO_MAX)
            except OSError as exc:
                log.debug(1, f"No native AIO ({exc}); using the disk threads only.")
        if self._ring is not None:
            self._aio_thread = threading.Thread(target=self.aio_loop, name="aio", daemon=True)
            self._disk_threads.append(self._aio_thread)
        for thread in self._disk_threads:
            thread.start()
        try:
            self.recv_loop()
        except _Fatal as exc:
            self.fail(exc.code, exc.text, exc.err)
        except Exception as exc:  # a bug must still end the session cleanly
            self._bug("receive", exc)
        finally:
            self.fail(EX_TEMPFAIL, "")
            # Requests already received still reach the disk; their replies are dropped.
            try:
                self._flush_batch()
            except Exception as exc:  # a bug must not keep the session alive
                self._bug("receive", exc)
            with self._disk_cv:
                self._disk_cv.wait_for(lambda: not self._running and not self._waiting, 60)
            self._aio_stop = True
            if self._ring is not None:
                self._ring.wake()       # the reaper need not wait out AIO_REAP_TIMEOUT
            for _thread in self._disk_threads:
                self._ready.put(None)
            for thread in self._disk_threads:
                thread.join(timeout=10)
            if self._ring is not None and not self._aio_thread.is_alive():
                self._ring.close()
            with self._send_lock:
                for hio in self._held.values():
                    self._done(hio)
                self._held.clear()
        return self._exitcode if self._exitcode is not None else EX_TEMPFAIL

    def close(self) -> None:
        # Never close under a disk thread still in a syscall: the number could be reused.
        if self.fd >= 0 and not any(t.is_alive() for t in self._disk_threads):
            os.close(self.fd)
            self.fd = -1


def run(ctx: WorkerContext) -> int:
    """The secondary worker: start-up, step-3 answer, then requests until the link fails."""
    if threading.current_thread() is threading.main_thread():
        # The parent stops a replaced session with SIGINT: die as the C worker does.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    sec = Secondary(ctx)
    try:
        _set_timeout(sec.remotein, REMOTEIN_TIMEOUT)
        _set_timeout(sec.remoteout, ctx.resource.timeout)
        sec.open_local()
        ctx.serve_control(sec.status)
        sec.handshake()
        ctx.emit(EVENT_CONNECT)
        code = sec.serve()
        ctx.emit(EVENT_DISCONNECT)
        return code
    except _Fatal as exc:
        if exc.text:
            log.error(exc.text, exc.err)
        return exc.code
    finally:
        sec.close()
        for sock in (sec.remotein, sec.remoteout):
            sock.close()
