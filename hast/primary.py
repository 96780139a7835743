"""primary: the primary worker -- FreeBSD's primary.c.

The primary owns the local provider, the two connections to the secondary and the frontend
that exposes the data (NBD + /dev/hast/<name> on Linux).  Every WRITE, DELETE and FLUSH goes to
both components; READs are served locally, from the secondary while the local copy is stale
(synchronizing from the secondary) or when the local read fails.  The activemap records every
extent that may differ, and is on disk before a write is dispatched, so that after a crash of
either node at any instant the dirty map covers every extent that may differ.

When the frontend sees a WRITE complete (hast-internals §8.8):
  fullsync  both copies written (the secondary's final reply)          -- py-hast's default
  memsync   local copy written and the secondary has *received* the data
  async     local copy written
A FUA write is always completed as fullsync and flushed on both nodes.

Threads instead of FreeBSD's five per-request stages: the frontend's threads submit requests,
local I/O runs on a small pool (the GIL is released in hast._io), remote requests are sent by
the submitting thread and completed by one receiver thread per connection.  Nothing touches
data per byte in Python.  The receiver and the local AIO reaper complete requests in bursts
(every reply one recv() brought, every event one io_getevents() returned); around a burst
they call the frontend's ``defer_replies``/``send_replies`` hooks, so that the NBD frontend
answers the burst with one sendmsg instead of one per request.

Deliberate fixes of FreeBSD's defects (README lists them): every WRITE whose remote copy failed
-- not connected, failed in flight, or answered with an error -- is marked for synchronization
(FreeBSD marks only those issued while disconnected); DELETE takes the range lock and is
marked likewise; synchronization keeps several chunks in flight; sync requests use their own
sequence numbers; a FLUSH that finds a provider without cache flush support does not count an
error.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from hast import _aio, _io, _wire, log, metadata, pipeline, proto, settings
from hast import nv as nvmod
from hast._codec import is_zero
from hast.activemap import ActiveMap
from hast.rangelock import RangeLocks
from hast.sysexits import EX_CONFIG, EX_NOINPUT, EX_TEMPFAIL
from hast.worker import (
    CONTROL_RELOAD,
    EVENT_CONNECT,
    EVENT_DISCONNECT,
    EVENT_SPLITBRAIN,
    WorkerContext,
)

# HAST request commands (hast.h)
HIO_READ, HIO_WRITE, HIO_DELETE, HIO_FLUSH, HIO_KEEPALIVE = 1, 2, 3, 4, 5
SYNCSRC_UNDEF, SYNCSRC_PRIMARY, SYNCSRC_SECONDARY = 0, 1, 2
LOCAL, REMOTE = 0, 1
HAST_KEEPALIVE = 10
HAST_HIO_MAX = 256
SPLIT_BRAIN = "Split-brain condition!"
LOCAL_THREADS = 4
# Replies are read through a buffer of this size: at queue depth N one recv() brings many
# replies instead of two recv() calls each.  READ payloads bypass it.
READ_AHEAD = 256 * 1024
# The reply socket wakes its reader this often (SO_RCVTIMEO) to check for a stalled peer.
RECV_POLL = 1
# Flags of preadv2/pwritev2 (Linux); absent elsewhere, and the code then does without.
RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
RWF_DSYNC = getattr(os, "RWF_DSYNC", 0)
# With a buffered provider ('direct off'): how often (s) the map writer's syncer runs an
# fdatasync of the data so that the bits of extents written before it may leave the disk.
CLEAR_INTERVAL = 1.0



class HIO:
    """One request in flight (FreeBSD's struct hio)."""

    __slots__ = ("cmd", "offset", "length", "buf", "done", "mode", "countdown", "errors",
                 "acked", "local_done", "received", "lockkey", "sync", "fua", "event",
                 "mapgen")

    def __init__(self, cmd: int, offset: int, length: int, buf: memoryview | None,
                 done, mode: str = "fullsync", sync: bool = False) -> None:
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.buf = buf
        self.done = done              # callable(errno) completing towards the frontend
        self.mode = mode              # captured at submission: a reload does not change it
        self.countdown = 0
        self.errors: list[int | None] = [None, None]   # per component; None = not asked
        self.acked = False
        self.local_done = False
        self.received = False         # memsync: the secondary has the data
        self.lockkey: tuple[int, int] | None = None
        self.sync = sync
        self.fua = False
        self.event: threading.Event | None = None
        self.mapgen = 0               # the activemap image that must be on disk first


@dataclass
class Stats:
    read: int = 0
    write: int = 0
    delete: int = 0
    flush: int = 0
    activemap_update: int = 0
    read_error: int = 0
    write_error: int = 0
    delete_error: int = 0
    flush_error: int = 0


@dataclass
class Connection:
    """Both sockets of one session with the secondary."""

    out: socket.socket            # connection #1: requests
    inn: socket.socket            # connection #2: replies
    version: int
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[int, HIO] = field(default_factory=dict)
    up: bool = True
    last_send: float = field(default_factory=time.monotonic)


def _set_timeouts(sock: socket.socket, recv: float, send: float) -> None:
    """Kernel deadlines (SO_RCVTIMEO/SO_SNDTIMEO) on a blocking socket.

    A Python-level timeout would poll() before every send and recv; the kernel's deadline
    costs nothing per call.  A recv that times out raises BlockingIOError or TimeoutError.
    """
    sock.settimeout(None)
    try:
        for opt, secs in ((socket.SO_RCVTIMEO, recv), (socket.SO_SNDTIMEO, send)):
            whole = int(secs)
            sock.setsockopt(socket.SOL_SOCKET, opt,
                            struct.pack("@ll", whole, int((secs - whole) * 1e6)))
    except OSError:
        sock.settimeout(max(recv, send))


class MapWriter:
    """The activemap's on-disk image, written once for every write waiting on it.

    A WRITE may be dispatched only once the dirty bit of each extent it touches is on disk
    (the map is what the next synchronization trusts).  FreeBSD writes the map and flushes
    the disk cache in the request path, one write at a time.  Here a write whose bits are
    not yet on disk waits in ``waiting`` (tagged with the generation of the in-memory map
    that holds its bits) and the writer thread stores one image for all of them, then
    dispatches them: at queue depth N one map write covers up to N requests (group commit).

    Images are taken and written under ``lock``, so the disk only ever goes forward from
    one consistent in-memory state to a later one.  Only the sectors that changed are
    written, through an O_DIRECT descriptor with RWF_DSYNC when ``metaflush`` is on: a
    durable write of the map alone, where fdatasync() on the buffered provider would also
    write back every dirty data page.  Without O_DIRECT or RWF_DSYNC (FreeBSD, or a file
    system refusing O_DIRECT) it is FreeBSD's way: the whole image, then a cache flush.
    Clearing bits (write_complete) is never urgent -- a bit left set only costs a needless
    resync -- so it rides along with the next write of the image.

    A write whose bits are already set in memory is dispatched at once when they are set in
    the image on disk *and* in the image being written (``storing``): that one may clear a
    bit that is on disk now (taken before the bit was set again), and once it is stored the
    write would be in flight on a clean extent.

    With a buffered provider ('direct off') a completed write may still be in the page cache
    only, while the map goes to disk with RWF_DSYNC: clearing its bit on disk then would let
    a power cut leave that extent differing from the peer's with nothing marking it.  So
    there a bit leaves the disk only when it is in ``clearable``: extents clean in memory
    when an fdatasync() of the data started, and not dirtied since (every image taken
    removes its bits).  A syncer thread runs that fdatasync every CLEAR_INTERVAL seconds
    while bits wait to be cleared, outside ``lock``: stores never wait for it.
    """

    def __init__(self, primary: Primary) -> None:
        self.primary = primary
        self.amap = primary.amap
        self.shift = primary.extentsize.bit_length() - 1
        self.size = self.amap.ondisk_size()
        self.sector = primary.sectorsize
        self.lock = threading.Lock()            # snapshot + write, in order
        self.cv = threading.Condition(threading.Lock())   # the fields below
        self.dirty_gen = 0                      # bumped when the in-memory image gains bits
        self.written_gen = 0                    # the generation last written
        self.waiting: list[HIO] = []
        self.clean_pending = False
        self.storing: bytes | None = None       # the image being written, if any
        self.stopping = False
        self.defer_clears = not primary.direct
        self.clearable = 0                      # buffered: bits whose data is on disk
        self.candidates: int | None = None      # buffered: clearable once a sync succeeds
        self.sync_lock = threading.Lock()       # one data sync at a time
        self.sync_stop = threading.Event()      # the syncer waits on this, not on cv
        self.ondisk = bytes(self.size)          # the image last written
        self.image = _io.AlignedBuffer(max(self.size, 4096))
        self.fd = -1
        if RWF_DSYNC and _io.O_DIRECT_SUPPORTED and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(primary.res.local, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                self.fd = -1
        self.thread = threading.Thread(target=self._run, name="activemap", daemon=True)
        self.thread.start()
        self.syncer: threading.Thread | None = None
        if self.defer_clears:
            self.syncer = threading.Thread(target=self._sync_loop, name="activemap_sync",
                                           daemon=True)
            self.syncer.start()

    def loaded(self, image: bytes) -> None:
        """The image read from disk at start-up (what is on disk now)."""
        self.ondisk = bytes(image[:self.size]).ljust(self.size, b"\0")

    def covered(self, offset: int, length: int) -> bool:
        """Every extent of [offset, offset+length) is dirty in the image on disk and in the
        one being written (cv held)."""
        shift = self.shift
        for image in (self.ondisk, self.storing):
            if image is None:
                continue
            for ext in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
                if not (image[ext >> 3] >> (ext & 7)) & 1:
                    return False
        return True

    def write_start(self, hio: HIO) -> bool:
        """Mark hio's extents dirty; True: dispatch hio now, False: it waits and the writer
        thread dispatches it once its bits are on disk."""
        with self.cv:
            if self.amap.write_start(hio.offset, hio.length):
                self.dirty_gen += 1
            elif self.written_gen >= self.dirty_gen or self.covered(hio.offset, hio.length):
                return True
            hio.mapgen = self.dirty_gen
            self.waiting.append(hio)
            if len(self.waiting) == 1:
                self.cv.notify()
        # Not done here even at queue depth 1: the submitting thread is the frontend's
        # reader, and blocking it serializes whatever the client has queued behind.
        return False

    def write_complete(self, offset: int, length: int) -> None:
        # One C call under the GIL: atomic with respect to the images taken by flush().
        if self.amap.write_complete(offset, length):
            with self.cv:
                self.clean_pending = True
                self.cv.notify()

    def update_lazily(self, update) -> None:
        """Run update() (activemap calls; True: the image changed) atomically with respect
        to the images written, and have the writer thread store the result soon."""
        with self.cv:
            if update():
                self.clean_pending = True
                self.cv.notify()

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.waiting and not self.clean_pending and not self.stopping:
                    self.cv.wait()
                if self.stopping and not self.waiting:
                    return
            self.flush(update=True)

    def _sync_loop(self) -> None:
        """Buffered provider: make the data of clean extents durable, so their bits may go."""
        # Not on cv: write_start()'s notify() must wake the writer thread, not this one.
        while not self.sync_stop.wait(CLEAR_INTERVAL):
            with self.cv:
                ondisk = int.from_bytes(self.ondisk, "little")
                pending = ondisk & ~int.from_bytes(self.amap.bitmap(), "little")
            if pending & ~self.clearable and self.sync_data():
                with self.cv:
                    self.clean_pending = True
                    self.cv.notify()

    def sync_data(self) -> bool:
        """fdatasync() the provider; then every extent clean in memory when it started, and
        not dirtied since, may be cleared on disk."""
        with self.sync_lock:
            return self._sync_data()

    def _sync_data(self) -> bool:
        with self.cv:
            mask = (1 << (8 * self.size)) - 1
            self.candidates = mask & ~int.from_bytes(self.amap.bitmap(), "little")
        try:
            _io.flush(self.primary.mdfd)
        except OSError as exc:
            with self.cv:
                self.candidates = None
            log.warning(f"Unable to flush {self.primary.res.local} before clearing "
                        f"activemap bits: {os.strerror(exc.errno or errno.EIO)}")
            return False
        with self.cv:
            assert self.candidates is not None
            self.clearable |= self.candidates
            self.candidates = None
        return True

    def _buffered_image(self, image: bytes) -> bytes:
        """``image`` plus the bits on disk that may not be cleared yet (cv held)."""
        bits = int.from_bytes(image, "little")
        self.clearable &= ~bits
        if self.candidates is not None:
            self.candidates &= ~bits
        keep = int.from_bytes(self.ondisk[:len(image)], "little") & ~self.clearable
        return (bits | keep).to_bytes(len(image), "little")

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.sync_stop.set()
        self.thread.join(10)
        if self.syncer is not None:
            self.syncer.join(10)

    def flush(self, update: bool = False) -> None:
        """Write the current image; then dispatch every write it covers (in this thread)."""
        p = self.primary
        if self.defer_clears and not update:
            self.sync_data()            # an explicit flush (shutdown...) clears what it can
        with self.lock:
            with self.cv:
                gen = self.dirty_gen
                self.clean_pending = False
                image = self.amap.bitmap()
                if self.defer_clears:
                    image = self._buffered_image(image)
                self.storing = image
            if update:
                p.stats.activemap_update += 1
            try:
                self._store(image)
            finally:
                with self.cv:
                    self.storing = None
            with self.cv:
                self.written_gen = max(self.written_gen, gen)
                if not self.waiting:
                    return
                ready = [h for h in self.waiting if h.mapgen <= gen]
                if len(ready) == len(self.waiting):
                    self.waiting = []
                else:
                    self.waiting = [h for h in self.waiting if h.mapgen > gen]
        p.dispatch_writes(ready)

    def _store(self, image: bytes) -> None:
        p = self.primary
        if self.fd >= 0:
            try:
                self._store_direct(image)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    p.stats.write_error += 1
                    log.error("Unable to flush activemap to disk", err=exc.errno)
                    return
                # The file system wants another alignment: FreeBSD's way from now on.
                os.close(self.fd)
                self.fd = -1
        try:
            _io.pwrite(p.mdfd, image, metadata.METADATA_SIZE)
        except OSError as exc:
            p.stats.write_error += 1
            log.error("Unable to flush activemap to disk", err=exc.errno)
            return
        self.ondisk = image
        if p.res.metaflush:
            try:
                _io.flush(p.mdfd)
            except OSError as exc:
                if exc.errno == errno.EOPNOTSUPP:
                    log.warning(f"The {p.res.local} provider doesn't support flushing "
                                "write cache. Disabling it.")
                    p.res.metaflush = False
                else:
                    p.stats.flush_error += 1
                    log.error("Unable to flush disk cache on activemap update",
                              err=exc.errno)

    def _store_direct(self, image: bytes) -> None:
        old, sector = self.ondisk, self.sector
        view = memoryview(self.image)
        view[:self.size] = image
        flags = RWF_DSYNC if self.primary.res.metaflush else 0
        runs = _io.changed_runs(old, image, sector)
        for start, end in runs:
            n = os.pwritev(self.fd, [view[start:end]], metadata.METADATA_SIZE + start, flags)
            if n != end - start:
                raise OSError(errno.EIO, "short activemap write")
        self.ondisk = image

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalDisk:
    """The local component: a pool of threads doing provider I/O with the GIL released."""

    def __init__(self, primary: Primary, fd: int, localoff: int, nthreads: int,
                 buffered: bool = False) -> None:
        self.primary = primary
        self.fd = fd
        self.localoff = localoff
        self.flush_supported = True
        # On a buffered descriptor a WRITE is a copy into the page cache and a READ that
        # hits the cache (RWF_NOWAIT) is a copy out of it: both run in the submitting thread,
        # where a hand-off to the pool would cost more than the copy.  O_DIRECT I/O, FLUSH,
        # DELETE and reads that would wait for the disk go to the pool.
        self.inline_writes = buffered
        self.inline_reads = buffered and bool(RWF_NOWAIT)
        # On an O_DIRECT descriptor READ and WRITE go through Linux native AIO: submitted
        # from the requesting thread without blocking, completed in batches by one reaper.
        self.align = primary.sectorsize
        self.ring: _aio.Ring | None = None
        self.stopping = False
        if not buffered and _aio.AVAILABLE:
            try:
                self.ring = _aio.Ring(2 * HAST_HIO_MAX)
            except OSError as exc:
                log.debug(1, f"No native AIO ({exc}); using threads.")
        self.queue: deque[HIO | None] = deque()
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._run, name=f"local{i}", daemon=True)
                        for i in range(nthreads)]
        if self.ring is not None:
            self.threads.append(threading.Thread(target=self._reap, name="local_aio",
                                                 daemon=True))
        for thread in self.threads:
            thread.start()

    def submit(self, hio: HIO) -> None:
        cmd = hio.cmd
        if cmd == HIO_WRITE and self.inline_writes:
            self.primary.local_done(hio, self.execute(hio))
            return
        ring = self.ring
        if ring is not None and (cmd == HIO_WRITE or cmd == HIO_READ):
            try:
                if ring.submit(hio, _aio.WRITE if cmd == HIO_WRITE else _aio.READ, self.fd,
                               hio.buf, self.localoff + hio.offset, self.align):
                    return
            except OSError:
                pass                            # ring full or refused: the pool does it
        if cmd == HIO_READ and self.inline_reads:
            try:
                got = os.preadv(self.fd, [hio.buf], self.localoff + hio.offset, RWF_NOWAIT)
            except BlockingIOError:
                got = -1                        # not cached: the pool waits for the disk
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self.inline_reads = False
                got = -1
            if got == hio.length:
                self.primary.local_done(hio, 0)
                return
        with self.cond:
            self.queue.append(hio)
            self.cond.notify()

    def submit_many(self, hios: list[HIO]) -> None:
        """submit() of several: one io_submit for what goes through AIO."""
        ring = self.ring
        if ring is None or self.inline_writes:
            for hio in hios:
                self.submit(hio)
            return
        ops = []
        for hio in hios:
            if hio.cmd == HIO_WRITE or hio.cmd == HIO_READ:
                ops.append((hio, _aio.WRITE if hio.cmd == HIO_WRITE else _aio.READ, self.fd,
                            hio.buf, self.localoff + hio.offset))
            else:
                self._queue(hio)
        try:
            refused = ring.submit_many(ops, self.align)
        except OSError:
            refused = [op[0] for op in ops]
        for hio in refused:
            self._queue(hio)

    def _queue(self, hio: HIO) -> None:
        with self.cond:
            self.queue.append(hio)
            self.cond.notify()

    def stop(self) -> None:
        self.stopping = True
        with self.cond:
            for _ in self.threads:
                self.queue.append(None)
            self.cond.notify_all()
        if self.ring is not None:
            self.ring.wake()   # the reaper need not wait out its 1 s reap timeout

    def _reap(self) -> None:
        ring = self.ring
        assert ring is not None
        primary = self.primary
        while not (self.stopping and not len(ring)):
            try:
                done = ring.reap(1, 1.0)
            except OSError as exc:
                log.error("Unable to reap local I/O", err=exc.errno)
                return
            primary.defer_replies()
            try:
                for hio, res in done:
                    if res == hio.length:
                        err = 0
                    elif res < 0:
                        err = -res
                    else:
                        err = self._finish_short(hio, res)
                    primary.local_done(hio, err)
            finally:
                primary.send_replies(True)

    def _finish_short(self, hio: HIO, done: int) -> int:
        """An AIO transfer stopped after ``done`` bytes: the rest synchronously."""
        assert hio.buf is not None
        view = memoryview(hio.buf)[done:]
        try:
            if hio.cmd == HIO_WRITE:
                _io.pwrite(self.fd, view, self.localoff + hio.offset + done)
                return 0
            got = _io.pread(self.fd, view, self.localoff + hio.offset + done)
            return 0 if got == len(view) else errno.EIO
        except OSError as exc:
            return exc.errno or errno.EIO

    def __len__(self) -> int:
        return len(self.queue) + (len(self.ring) if self.ring is not None else 0)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                hio = self.queue.popleft()
            if hio is None:
                return
            self.primary.local_done(hio, self.execute(hio))

    def execute(self, hio: HIO) -> int:
        try:
            if hio.cmd == HIO_READ:
                assert hio.buf is not None
                got = _io.pread(self.fd, hio.buf, self.localoff + hio.offset)
                return 0 if got == hio.length else errno.EIO
            if hio.cmd == HIO_WRITE:
                assert hio.buf is not None
                put = _io.pwrite(self.fd, hio.buf, self.localoff + hio.offset)
                return 0 if put == hio.length else errno.EIO
            if hio.cmd == HIO_DELETE:
                _io.delete(self.fd, self.localoff + hio.offset, hio.length)
                return 0
            if hio.cmd == HIO_FLUSH:
                if not self.flush_supported:
                    return errno.EOPNOTSUPP
                _io.flush(self.fd)
                return 0
        except OSError as exc:
            err = exc.errno or errno.EIO
            if hio.cmd == HIO_FLUSH and err == errno.EOPNOTSUPP:
                self.flush_supported = False
            return err
        return errno.EINVAL


_RECEIVED_BIT = 128   # hast._wire's F_RECEIVED
_OK_BOTH = [0, 0]     # HIO.errors of a request both components completed
_IOV_BATCH = 512      # buffers per sendmsg (IOV_MAX is 1024)


def _send_rest(sock: socket.socket, parts: list, sent: int) -> None:
    """Send parts, of which a sendmsg() already sent ``sent`` bytes (any number of parts)."""
    views = []
    for part in parts:
        view = memoryview(part).cast("B")
        if sent >= view.nbytes:
            sent -= view.nbytes
            continue
        views.append(view[sent:])
        sent = 0
    for start in range(0, len(views), _IOV_BATCH):
        proto.sendall_parts(sock, views[start:start + _IOV_BATCH])


class _ReplyReader:
    """Connection #2 through a read-ahead buffer: frames are parsed in place (hast._wire),
    payloads are copied out of what was read ahead and the rest is received directly."""

    def __init__(self, sock: socket.socket, size: int = READ_AHEAD) -> None:
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def fill(self) -> None:
        """One recv() into the free space (after moving a partial frame to the front)."""
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf) or self.start > len(self.buf) // 2:
            n = self.end - self.start
            self.view[:n] = self.view[self.start:self.end]
            self.start, self.end = 0, n
        got = self.sock.recv_into(self.view[self.end:])
        if got == 0:
            raise proto.ProtoError(errno.ENOTCONN, "Connection closed by peer")
        self.end += got

    def into(self, dest: memoryview) -> None:
        n = min(len(dest), self.end - self.start)
        if n:
            dest[:n] = self.view[self.start:self.start + n]
            self.start += n
        if n < len(dest):
            proto.recv_exact_into(self.sock, dest[n:])

    def skip(self, size: int) -> None:
        n = min(size, self.end - self.start)
        self.start += n
        size -= n
        scratch = memoryview(bytearray(min(size, 1 << 20))) if size else None
        while size:
            chunk = min(size, len(scratch))
            self.into(scratch[:chunk])
            size -= chunk


def _no_batching(stop: bool = False) -> None:
    """Primary.defer_replies/send_replies of a frontend that sends every reply at once."""


class Primary:
    """Runtime state of one resource acting as primary."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.res = ctx.resource
        try:
            self.settings = settings.load(ctx.config.path)
        except settings.SettingsError as exc:
            log.error(str(exc))
            raise SystemExit(EX_CONFIG) from None
        self.maxio = self.settings.maxio_for(self.res.name)
        self.mode = self.res.replication
        self.stats = Stats()
        self.lock = threading.RLock()          # request state and counters
        self.map_lock = threading.Lock()       # on-disk bitmap image writes
        self.md_lock = threading.Lock()        # metadata writes
        self.ranges = RangeLocks()
        self.stopping = threading.Event()
        self.conn: Connection | None = None
        self.hr_version = 1                    # FreeBSD starts at 1 until the first handshake
        self.syncsrc = SYNCSRC_UNDEF
        self.peer_localcnt = 0
        self.peer_remotecnt = 0
        self._seq = itertools.count(1)
        self.inflight = 0
        self.last_attempt = 0.0
        # Extents whose local copy missed an acknowledged write (the local WRITE failed, the
        # secondary's succeeded): served by the secondary until the sync copies them back.
        self.stale: set[int] = set()
        self._open_local()
        from hast.sync import Synchronizer
        self.sync = Synchronizer(self)
        self.frontend = None
        self.exit_code = 0
        # The frontend's reply batching (see the module docstring); no-ops until it sets them.
        self.defer_replies = _no_batching
        self.send_replies = _no_batching

    # -- start-up -----------------------------------------------------------------------
    def _open_local(self) -> None:
        path = self.res.local
        try:
            fd, self.direct = _io.open_provider(path, writable=True, direct=self.settings.direct)
        except OSError as exc:
            log.error(f"Unable to open {path}", err=exc.errno)
            raise SystemExit(EX_NOINPUT) from None
        self.fd = fd
        # Metadata and the bitmap go through a buffered descriptor: their buffers are not
        # sector aligned, and FreeBSD flushes the cache after them anyway (metaflush).
        self.mdfd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            _io.lock_exclusive(fd)
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                log.warning(f"Unable to lock {path} (operation not supported), but continuing.")
            else:
                log.error(f"Unable to lock {path}", err=exc.errno)
                raise SystemExit(EX_NOINPUT) from None
        try:
            self.mediasize, self.sectorsize = _io.provider_info(fd)
            md = metadata.read(self.mdfd, self.res.name, path)
        except (OSError, metadata.MetadataError) as exc:
            log.error(str(exc))
            raise SystemExit(EX_NOINPUT) from None
        self.md = md
        self.datasize = md.datasize
        self.extentsize = md.extentsize
        self.keepdirty = md.keepdirty
        self.localoff = md.localoff
        self.resuid = md.resuid
        self.localcnt, self.remotecnt = md.localcnt, md.remotecnt
        self.amap = ActiveMap(self.datasize, self.extentsize, self.sectorsize, self.keepdirty,
                              self.maxio)
        image = os.pread(self.mdfd, self.amap.ondisk_size(), metadata.METADATA_SIZE)
        self.amap.copyin(image)
        self.mapw = MapWriter(self)
        self.mapw.loaded(image)
        if self.resuid == 0:
            # Used for the first time: counters start at zero; the resuid is chosen at the
            # first handshake so the secondary learns that nothing needs synchronizing.
            self.localcnt = self.remotecnt = 0
            self.write_metadata()
        self.local = LocalDisk(self, fd, self.localoff, LOCAL_THREADS,
                               buffered=not self.direct)

    def write_metadata(self) -> None:
        with self.md_lock:
            self.md.resuid = self.resuid
            self.md.localcnt, self.md.remotecnt = self.localcnt, self.remotecnt
            self.md.prevrole = metadata.ROLE_PRIMARY
            try:
                metadata.write(self.mdfd, self.md)
                _io.flush(self.mdfd)
            except (OSError, metadata.MetadataError) as exc:
                log.error(f"Unable to update metadata: {exc}")

    def flush_map(self, update: bool = False) -> None:
        """Write the bitmap image now (and flush the cache with metaflush), as FreeBSD does."""
        self.mapw.flush(update)

    # -- submission (frontend and sync) ------------------------------------------------
    def next_seq(self) -> int:
        return next(self._seq)   # atomic: itertools.count is one C call under the GIL

    @property
    def connected(self) -> bool:
        conn = self.conn
        return conn is not None and conn.up

    def submit_read(self, offset: int, length: int, buf: memoryview, done,
                    batch: list[HIO] | None = None) -> None:
        """``batch``: a local read is appended there, for dispatch_batch()."""
        self.stats.read += 1
        hio = HIO(HIO_READ, offset, length, buf, done)
        hio.countdown = 1
        self._track(1)
        if self.stale and self._stale(offset, length):
            if self.connected:
                self.remote_send(hio)
            else:
                self.remote_done(hio, errno.EIO)  # never serve a copy known to be old
        elif self.syncsrc == SYNCSRC_SECONDARY and self.connected:
            # the whole local copy is stale while synchronizing from the secondary
            self.remote_send(hio)
        elif batch is not None:
            batch.append(hio)
        else:
            self.local.submit(hio)

    def _stale(self, offset: int, length: int) -> bool:
        es = self.extentsize
        return any(e in self.stale for e in range(offset // es, (offset + length - 1) // es + 1))

    def submit_write(self, offset: int, length: int, buf: memoryview, done,
                     fua: bool = False, batch: list[HIO] | None = None) -> None:
        """``batch``: a write that may be dispatched at once is appended there instead, for
        dispatch_batch()."""
        self.stats.write += 1
        hio = HIO(HIO_WRITE, offset, length, buf, done, "fullsync" if fua else self.mode)
        hio.fua = fua
        if self.localcnt == 0:
            with self.lock:
                if self.resuid == 0 and self.localcnt == 0:
                    self.localcnt = 1  # first write ever (made persistent at the handshake)
        hio.lockkey = self.ranges.lock_regular(offset, length)
        self._track(1)
        if self.mapw.write_start(hio):
            if batch is not None:
                batch.append(hio)
            else:
                self.dispatch_write(hio)
        # else: dispatched by the map writer once its extents are dirty on disk

    def dispatch_write(self, hio: HIO) -> None:
        """Both components of a WRITE whose extents are dirty on disk: remote first, so the
        round trip overlaps the local write."""
        hio.countdown = 2
        self.remote_send(hio)
        self.local.submit(hio)

    def dispatch_writes(self, hios: list[HIO]) -> None:
        """dispatch_write() of several: one sendmsg to the peer, one io_submit locally."""
        if len(hios) == 1:
            self.dispatch_write(hios[0])
            return
        for hio in hios:
            hio.countdown = 2
        self.remote_send_many(hios)
        self.local.submit_many(hios)

    def dispatch_batch(self, reads: list[HIO], writes: list[HIO]) -> None:
        """What submit_read()/submit_write() put in their batches."""
        if writes:
            self.dispatch_writes(writes)
        if reads:
            self.local.submit_many(reads)

    def submit_delete(self, offset: int, length: int, done) -> None:
        self.stats.delete += 1
        hio = HIO(HIO_DELETE, offset, length, None, done)
        hio.lockkey = self.ranges.lock_regular(offset, length)
        self._dispatch_both(hio)

    def submit_flush(self, done) -> None:
        self.stats.flush += 1
        self._dispatch_both(HIO(HIO_FLUSH, 0, 0, None, done))

    def _dispatch_both(self, hio: HIO) -> None:
        hio.countdown = 2
        self._track(1)
        self.remote_send(hio)
        self.local.submit(hio)

    def _track(self, delta: int) -> None:
        with self.lock:
            self.inflight += delta

    # -- completion ---------------------------------------------------------------------
    def local_done(self, hio: HIO, err: int) -> None:
        if err and hio.cmd == HIO_READ and not hio.sync and self.connected:
            # transparent fallback: the secondary serves what the local disk cannot
            log.warning(f"Local READ({hio.offset}, {hio.length}) failed, reading from the "
                        "secondary", err=err)
            self.stats.read_error += 1
            hio.errors[LOCAL] = err
            self.remote_send(hio)
            return
        with self.lock:
            hio.errors[LOCAL] = err
            hio.local_done = True
            ack = self._early_ack(hio)
            hio.countdown -= 1
            final = hio.countdown == 0
        if ack:
            hio.done(0)
        if final:
            self._finish(hio)

    def remote_done(self, hio: HIO, err: int, received_only: bool = False) -> None:
        """A reply (or a failure) for the remote component; ``received_only``: memsync ack."""
        if err and hio.cmd in (HIO_WRITE, HIO_DELETE) and not hio.sync:
            self._remote_copy_failed(hio)
        with self.lock:
            hio.received = True  # a failed remote no longer holds a memsync ack back
            if not received_only:
                hio.errors[REMOTE] = err
                hio.countdown -= 1
            ack = self._early_ack(hio)
            final = not received_only and hio.countdown == 0
        if ack:
            hio.done(0)
        if final:
            self._finish(hio)

    def _early_ack(self, hio: HIO) -> bool:
        """memsync/async acknowledgements before the final completion (lock held)."""
        if hio.acked or hio.cmd != HIO_WRITE or hio.sync:
            return False
        local_ok = hio.local_done and hio.errors[LOCAL] == 0
        if (hio.mode == "async" and local_ok) or (hio.mode == "memsync" and local_ok
                                                  and hio.received):
            hio.acked = True
            return True
        return False

    def _remote_copy_failed(self, hio: HIO) -> None:
        """The secondary did not store this write: mark it, and bump the counter if alone."""
        self.sync.dirtied(hio.offset, hio.length)
        with self.lock:
            bump = not self.connected and self.localcnt == self.peer_remotecnt
            if bump:
                self.localcnt += 1
        if bump:
            # the first write acknowledged without the peer: split-brain detection needs it
            self.write_metadata()

    def _finish(self, hio: HIO) -> None:
        if hio.cmd == HIO_WRITE and hio.errors == _OK_BOTH and not hio.sync:
            # the common case: a WRITE stored on both nodes
            self.mapw.write_complete(hio.offset, hio.length)
            self.ranges.unlock_regular(hio.lockkey)
            with self.lock:
                self.inflight -= 1
            if hio.fua and not hio.acked:
                hio.acked = True
                self.submit_flush(hio.done)
            elif not hio.acked:
                hio.acked = True
                hio.done(0)
            return
        local_err, remote_err = hio.errors
        if hio.cmd == HIO_FLUSH and local_err == errno.EOPNOTSUPP:
            local_err = 0  # no write cache to flush
        elif hio.cmd == HIO_DELETE and local_err in (errno.EOPNOTSUPP, errno.ENOTTY):
            local_err = 0  # TRIM is advisory: keeping the data is a valid outcome
        if local_err == 0 or remote_err == 0:
            result = 0
        else:
            # the local error is what FreeBSD reports, unless only the remote was asked
            result = local_err if local_err is not None else (remote_err or errno.EIO)
        if hio.local_done and local_err and not hio.sync:
            counter = {HIO_READ: "read_error", HIO_WRITE: "write_error",
                       HIO_DELETE: "delete_error", HIO_FLUSH: "flush_error"}[hio.cmd]
            setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            if hio.cmd == HIO_WRITE and remote_err == 0:
                # Acknowledged (the secondary has it) while the local copy is old: FreeBSD
                # reads the old data back from then on.  Marked stale before the range lock
                # goes and before the acknowledgement, so no later read can see it.
                log.error(f"Local WRITE({hio.offset}, {hio.length}) failed; the secondary "
                          "serves this range until it is copied back", err=local_err)
                self.sync.dirtied(hio.offset, hio.length, stale=True)
        if hio.cmd == HIO_WRITE and not hio.sync:
            self.mapw.write_complete(hio.offset, hio.length)
        if hio.lockkey is not None:
            self.ranges.unlock_regular(hio.lockkey)
        if not hio.sync:
            self._track(-1)
        if hio.fua and result == 0 and not hio.acked:
            hio.acked = True
            self.submit_flush(hio.done)
            return
        if not hio.acked:
            hio.acked = True
            hio.done(result)

    # -- remote component -----------------------------------------------------------------
    def remote_send(self, hio: HIO) -> None:
        conn = self.conn
        if conn is None or not conn.up:
            self.remote_done(hio, errno.ENOTCONN)
            return
        seq = next(self._seq)
        frame, payload = self._frame(conn, hio, seq)
        with conn.lock:
            if not conn.up:
                failed = True
            else:
                conn.pending[seq] = hio
                failed = False
        if failed:
            self.remote_done(hio, errno.ENOTCONN)
            return
        try:
            with conn.send_lock:
                sock = conn.out
                if payload is None or not len(payload):
                    sock.sendall(frame)
                else:
                    total = len(frame) + memoryview(payload).nbytes
                    sent = sock.sendmsg([frame, payload])
                    if sent != total:
                        _send_rest(sock, [frame, payload], sent)
                conn.last_send = time.monotonic()
        except OSError as exc:
            log.error(f"Unable to send request (seq={seq})", err=exc.errno or errno.EIO)
            self.disconnect(conn)

    def remote_send_many(self, hios: list[HIO]) -> None:
        """remote_send() of several requests in one sendmsg."""
        conn = self.conn
        if conn is None or not conn.up:
            for hio in hios:
                self.remote_done(hio, errno.ENOTCONN)
            return
        parts: list = []
        seqs: list[int] = []
        total = 0
        with conn.lock:
            up = conn.up
            if up:
                for hio in hios:
                    seq = next(self._seq)
                    frame, payload = self._frame(conn, hio, seq)
                    conn.pending[seq] = hio
                    seqs.append(seq)
                    parts.append(frame)
                    total += len(frame)
                    if payload is not None and len(payload):
                        parts.append(payload)
                        total += memoryview(payload).nbytes
        if not up:
            for hio in hios:
                self.remote_done(hio, errno.ENOTCONN)
            return
        try:
            with conn.send_lock:
                sock = conn.out
                if len(parts) <= _IOV_BATCH:
                    sent = sock.sendmsg(parts)
                    if sent != total:
                        _send_rest(sock, parts, sent)
                else:
                    _send_rest(sock, parts, 0)
                conn.last_send = time.monotonic()
        except OSError as exc:
            log.error(f"Unable to send request (seq={seqs[0]}..{seqs[-1]})",
                      err=exc.errno or errno.EIO)
            self.disconnect(conn)

    def _frame(self, conn: Connection, hio: HIO, seq: int) -> tuple[bytes, object]:
        """Header + nv of hio's request with sequence number seq, and its payload."""
        cmd = hio.cmd
        payload = None
        if cmd == HIO_WRITE:
            memsync = hio.mode == "memsync" and conn.version >= 2 and not hio.sync
            payload = hio.buf
            comp = self.res.compression
            if self.res.checksum == "none" and (
                    comp == "none" or (comp == "hole" and (hio.length < 4
                                                           or not is_zero(payload)))):
                # the pipeline leaves this payload alone: only `size` is added
                frame = _wire.encode_request(conn.version, cmd, seq, hio.offset, hio.length,
                                             memsync, hio.length)
            else:
                msg = nvmod.NV().add_uint8("cmd", cmd).add_uint64("seq", seq)
                msg.add_uint64("offset", hio.offset).add_uint64("length", hio.length)
                if memsync:
                    msg.add_uint8("memsync", 1)
                payload = pipeline.encode(msg, payload, comp, self.res.checksum)
                blob = msg.pack()
                frame = proto.HEADER.pack(conn.version, len(blob)) + blob
        elif cmd == HIO_FLUSH:
            frame = _wire.encode_request(conn.version, cmd, seq, 0, 0)
        else:
            frame = _wire.encode_request(conn.version, cmd, seq, hio.offset, hio.length)
        return frame, payload

    def _receiver(self, conn: Connection) -> None:
        rd = _ReplyReader(conn.inn)
        timeout = self.res.timeout
        waiting_since: float | None = None
        parse = _wire.parse_frame
        incomplete, fast = _wire.INCOMPLETE, _wire.FAST
        try:
            self.defer_replies()
            while conn.up:
                r = parse(rd.buf, rd.start, rd.end, False)
                version, nvsize = r[1], r[2]
                if version > proto.PROTO_VERSION:
                    raise proto.ProtoError(errno.EPROTO,
                                           f"Unsupported protocol version {version}")
                if nvsize > proto.MAX_NV_WIRE:
                    raise proto.ProtoError(errno.EMSGSIZE,
                                           f"nv blob of {nvsize} bytes exceeds "
                                           f"{proto.MAX_NV_WIRE}")
                if r[0] == incomplete:
                    # the replies of what was read are sent before waiting for more
                    self.send_replies()
                    try:
                        rd.fill()
                    except (BlockingIOError, TimeoutError, InterruptedError):
                        # SO_RCVTIMEO: nothing for RECV_POLL seconds
                        with conn.lock:
                            busy = bool(conn.pending)
                        if not busy:
                            waiting_since = None
                            continue
                        now = time.monotonic()
                        waiting_since = waiting_since or now
                        if now - waiting_since >= timeout:
                            raise proto.ProtoError(errno.ETIMEDOUT,
                                                   "Operation timed out") from None
                        continue
                    waiting_since = None
                    self.defer_replies()   # (a frontend started since sets the hooks)
                    continue
                begin = rd.start + proto.HEADER_SIZE
                rd.start = begin + nvsize
                if r[0] == fast:
                    self._reply(conn, rd, None, r[5], r[9], bool(r[3] & _RECEIVED_BIT), r[8])
                    continue
                if nvsize == 0:
                    msg = nvmod.NV()
                else:
                    try:
                        msg = nvmod.NV.unpack(rd.view[begin:begin + nvsize])
                    except nvmod.NVError as exc:
                        raise proto.ProtoError(errno.EINVAL, f"Malformed nv: {exc}") from None
                self._reply(conn, rd, msg, msg.get_uint64("seq"), msg.get_int16("error"),
                            msg.exists("received"), msg.get_uint32("size"))
        except (OSError, pipeline.PipelineError, ValueError) as exc:
            if conn.up and not self.stopping.is_set():
                text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                log.error(f"Unable to receive reply header: {text}.")
            self.disconnect(conn)
        finally:
            self.send_replies(True)

    def _reply(self, conn: Connection, rd: _ReplyReader, msg: nvmod.NV | None, seq: int,
               err: int, received: bool, size: int) -> None:
        """One reply; msg is None when it carries only seq/error/received/size."""
        if size > rd.end - rd.start:
            self.send_replies()    # its payload is not all here: nothing waits on it
        hio = conn.pending.get(seq)
        if hio is None:
            if size:
                if size > self.maxio + 64:
                    raise proto.ProtoError(errno.EINVAL, f"Reply with absurd size {size}")
                rd.skip(size)
            log.debug(2, f"Reply for unknown seq {seq} ignored.")
            return
        if hio.cmd == HIO_READ and err == 0:
            self._read_payload(rd, msg, size, hio)
        elif size:
            limit = hio.length or 4
            if size > limit:
                raise pipeline.PipelineError(
                    f"Payload size ({size}) exceeds the expected maximum ({limit}).")
            rd.skip(size)
        if received and hio.cmd == HIO_WRITE:
            self.remote_done(hio, 0, received_only=True)
            return
        with conn.lock:
            conn.pending.pop(seq, None)
        self.remote_done(hio, err)

    def _read_payload(self, rd: _ReplyReader, msg: nvmod.NV | None, size: int,
                      hio: HIO) -> None:
        assert hio.buf is not None
        if size > hio.length:
            raise pipeline.PipelineError(
                f"Payload size ({size}) exceeds the expected maximum ({hio.length}).")
        if msg is None or (not msg.exists("compression") and not msg.exists("checksum")):
            if size != hio.length:
                rd.skip(size)
                raise pipeline.PipelineError(
                    f"READ reply of {size} bytes for {hio.length} requested")
            rd.into(hio.buf)  # straight into the frontend's buffer
            return
        payload = bytearray(size)
        rd.into(memoryview(payload))
        data = memoryview(pipeline.decode(msg, payload, hio.length))
        if data.nbytes != hio.length:
            raise pipeline.PipelineError(
                f"READ reply of {data.nbytes} bytes for {hio.length} requested")
        hio.buf[:] = data

    def disconnect(self, conn: Connection) -> None:
        with conn.lock:
            if not conn.up:
                return
            conn.up = False
            pending = list(conn.pending.values())
            conn.pending.clear()
        for sock in (conn.out, conn.inn):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.sync.stop()
        seen: set[int] = set()
        for hio in pending:
            if id(hio) in seen:
                continue
            seen.add(id(hio))
            self.remote_done(hio, errno.ENOTCONN)
        if not self.stopping.is_set():
            log.warning("Disconnected from the secondary.")
            self.ctx.emit(EVENT_DISCONNECT)

    def _keepalive(self, conn: Connection) -> None:
        if time.monotonic() - conn.last_send < HAST_KEEPALIVE:
            return
        msg = nvmod.NV().add_uint8("cmd", HIO_KEEPALIVE)
        try:
            with conn.send_lock:
                proto.send_frame(conn.out, conn.version, msg)
                conn.last_send = time.monotonic()
        except OSError as exc:
            log.error("Unable to send keepalive", err=exc.errno or errno.EIO)
            self.disconnect(conn)

    # -- handshake (init_remote) ----------------------------------------------------------------
    def connect(self) -> int:
        """One handshake attempt; 0, EBUSY (peer still primary) or another errno."""
        res = self.res
        out = inn = None
        try:
            out = proto.connect(res.remote, res.timeout, res.source)
            out.settimeout(res.timeout)
            proto.send_frame(out, self.hr_version, nvmod.NV().add_string("resource", res.name)
                             .add_uint8("version", proto.PROTO_VERSION))
            _v, reply = proto.recv_frame(out)
            errmsg = reply.get_string("errmsg")
            if errmsg is not None:
                log.warning(errmsg)
                return errno.EBUSY if reply.exists("wait") else errno.ECONNABORTED
            version = reply.get_uint8("version") or 1
            if version > proto.PROTO_VERSION:
                log.warning(f"Invalid version received ({version}).")
                return errno.ECONNABORTED
            token = reply.get_uint8_array("token")
            if token is None or len(token) != 16:
                log.warning("Handshake header from remote node has no valid token.")
                return errno.ECONNABORTED
            self.hr_version = version
            inn = proto.connect(res.remote, res.timeout, res.source)
            inn.settimeout(res.timeout)
            msg = nvmod.NV().add_string("resource", res.name).add_uint8_array("token", token)
            if self.resuid == 0:
                with self.lock:
                    self.resuid = secrets.randbits(64) or 1
                self.write_metadata()
                msg.add_int8("virgin", 1)
            with self.lock:
                msg.add_uint64("resuid", self.resuid).add_uint64("localcnt", self.localcnt)
                msg.add_uint64("remotecnt", self.remotecnt)
            proto.send_frame(inn, self.hr_version, msg)
            _v, ans = proto.recv_frame(out)
            return self._handshake_answer(out, inn, ans)
        except (OSError, pipeline.PipelineError, ValueError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning(f"Unable to connect to {res.remote}: {text}.")
            return getattr(exc, "errno", None) or errno.ECONNABORTED
        finally:
            installed = self.conn is not None and self.conn.out is out
            if not installed:
                for sock in (out, inn):
                    if sock is not None:
                        sock.close()

    def _handshake_answer(self, out: socket.socket, inn: socket.socket,
                          ans: nvmod.NV) -> int:
        errmsg = ans.get_string("errmsg")
        if errmsg is not None:
            log.error(errmsg)
            if errmsg == SPLIT_BRAIN:
                self.ctx.emit(EVENT_SPLITBRAIN)
            return errno.ECONNABORTED
        datasize = ans.get_int64("datasize")
        if datasize != self.datasize:
            log.error(f"Data size differs between nodes (local={self.datasize}, "
                      f"remote={datasize}).")
            return errno.ECONNABORTED
        extentsize = ans.get_int32("extentsize")
        if extentsize != self.extentsize:
            log.error(f"Extent size differs between nodes (local={self.extentsize}, "
                      f"remote={extentsize}).")
            return errno.ECONNABORTED
        with self.lock:
            self.peer_localcnt = ans.get_uint64("localcnt")
            self.peer_remotecnt = ans.get_uint64("remotecnt")
            self.syncsrc = ans.get_uint8("syncsrc")
            bump = ans.exists("virgin") and self.localcnt == 0
            if bump:
                self.localcnt = 1
        if bump:
            self.write_metadata()
        mapsize = ans.get_uint32("mapsize")
        if mapsize:
            # the peer's own field must not size our allocation: bound it by our map first
            limit = self.amap.ondisk_size()
            if mapsize > limit:
                log.error(f"Activemap from the secondary is too large ({mapsize} bytes, "
                          f"ours has {limit}).")
                return errno.ECONNABORTED
            size = pipeline.payload_size(ans, limit)
            image = pipeline.decode(ans, proto.recv_exact(out, size), limit)
            if memoryview(image).nbytes < self.amap.size():
                log.error("Activemap received from the secondary is too small.")
                return errno.ECONNABORTED
            with self.mapw.cv:   # atomic with the sync's extent completions (hast.sync)
                self.amap.merge(bytes(image))
            self.flush_map()
        if self.mode == "memsync" and self.hr_version < 2:
            log.warning("The 'memsync' replication mode is not supported by the remote node, "
                        "falling back to 'fullsync' mode.")
        _set_timeouts(out, self.res.timeout, self.res.timeout)
        _set_timeouts(inn, RECV_POLL, self.res.timeout)
        conn = Connection(out, inn, self.hr_version)
        self.conn = conn
        threading.Thread(target=self._receiver, args=(conn,), name="remote_recv",
                         daemon=True).start()
        log.info(f"Connected to {self.res.remote}.")
        if self.syncsrc == SYNCSRC_PRIMARY:
            self.direct_reads(True)
        self.ctx.emit(EVENT_CONNECT)
        self.sync.start()
        return 0

    def effective_mode(self) -> str:
        conn = self.conn
        if self.mode == "memsync" and conn is not None and conn.version < 2:
            return "fullsync"
        return self.mode

    # -- guard thread: keepalives and reconnects -----------------------------------------------
    def guard(self, first_attempt_done: threading.Event) -> None:
        if self.res.remote != "none":
            # the peer may still be primary (a role switch in progress): retry for `timeout` s
            deadline = time.monotonic() + self.res.timeout
            while (self.connect() == errno.EBUSY and time.monotonic() < deadline
                   and not self.stopping.wait(1.0)):
                pass
            self.last_attempt = time.monotonic()
        first_attempt_done.set()
        while not self.stopping.wait(1.0):
            conn = self.conn
            if conn is not None and conn.up:
                self._keepalive(conn)
                continue
            if self.res.remote == "none":
                continue
            if time.monotonic() - self.last_attempt >= HAST_KEEPALIVE:
                self.last_attempt = time.monotonic()
                self.connect()

    # -- control ------------------------------------------------------------------------------
    def status(self) -> nvmod.NV:
        out = nvmod.NV()
        out.add_string("status", "complete" if self.connected else "degraded")
        out.add_uint32("extentsize", self.extentsize)
        out.add_uint32("keepdirty", self.keepdirty)
        out.add_uint64("dirty", self.amap.ndirty() * self.extentsize)
        for name in ("read", "write", "delete", "flush", "activemap_update", "read_error",
                     "write_error", "delete_error", "flush_error"):
            out.add_uint64(f"stat_{name}", getattr(self.stats, name))
        conn = self.conn
        recv = len(conn.pending) if conn is not None else 0
        local = len(self.local)
        out.add_uint64("local_queue_size", local)
        out.add_uint64("send_queue_size", 0)
        out.add_uint64("recv_queue_size", recv)
        out.add_uint64("done_queue_size", 0)
        out.add_uint64("idle_queue_size", max(0, HAST_HIO_MAX - self.inflight))
        return out

    def reload(self, req: nvmod.NV) -> int:
        if req.get_uint8("cmd") != CONTROL_RELOAD:
            return errno.EINVAL
        names = {0: "fullsync", 1: "memsync", 2: "async"}
        comp = {0: "none", 1: "hole", 2: "lzf"}
        csum = {0: "none", 1: "crc32", 2: "sha256"}
        remote = req.get_string("remoteaddr") or self.res.remote
        source = req.get_string("sourceaddr") or ""
        reconnect = remote != self.res.remote or source != self.res.source
        self.res.remote, self.res.source = remote, source
        self.mode = self.res.replication = names.get(req.get_int32("replication"), self.mode)
        self.res.compression = comp.get(req.get_int32("compression"), self.res.compression)
        self.res.checksum = csum.get(req.get_int32("checksum"), self.res.checksum)
        self.res.timeout = req.get_int32("timeout") or self.res.timeout
        self.res.exec = req.get_string("exec") or ""
        self.res.metaflush = bool(req.get_int32("metaflush"))
        conn = self.conn
        if reconnect and conn is not None:
            log.info("Remote address changed, reconnecting.")
            self.disconnect(conn)
            self.last_attempt = 0.0
        elif conn is not None:
            _set_timeouts(conn.out, self.res.timeout, self.res.timeout)
            _set_timeouts(conn.inn, RECV_POLL, self.res.timeout)
        return 0

    # -- life cycle -----------------------------------------------------------------------
    def start_frontend(self) -> None:
        if sys.platform.startswith("freebsd"):
            from hast.frontends.ggate import GgateFrontend
            self.frontend = GgateFrontend(self)
        else:
            from hast.frontends.linux import LinuxFrontend
            self.frontend = LinuxFrontend(self)
        self.frontend.start()

    def direct_reads(self, enabled: bool) -> None:
        """GEOM_GATE may read the local provider itself once the local copy is current."""
        hook = getattr(self.frontend, "ggate_direct_reads", None)
        if hook is not None:
            hook(enabled)

    def frontend_exit(self, code: int) -> None:
        """The frontend lost its device (destroyed by someone else, or START/DONE failed)."""
        self.exit_code = code
        os.kill(os.getpid(), signal.SIGTERM)

    def shutdown(self) -> None:
        if self.frontend is not None:
            self.frontend.stop()  # no new requests from here on
        # Let what is in flight finish on both nodes (async and memsync writes already
        # acknowledged are still travelling) before the connection goes.
        deadline = time.monotonic() + self.res.timeout
        while self.inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stopping.set()
        self.sync.stop()
        conn = self.conn
        if conn is not None:
            self.disconnect(conn)
        self.local.stop()
        self.mapw.stop()
        self.flush_map()
        self.mapw.close()


def run(ctx: WorkerContext) -> int:
    stop = threading.Event()

    def on_signal(signo: int, _frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        primary = Primary(ctx)
    except SystemExit as exc:
        return int(exc.code or EX_CONFIG)
    ctx.serve_control(primary.status, primary.reload)
    # As hastd, try the peer once before serving any I/O: a primary whose copy is the stale
    # one learns it in the handshake (sync from the secondary) and must not serve reads
    # from its own disk before that.  The attempt runs on the guard thread so that SIGTERM
    # is still answered at once.
    first_attempt = threading.Event()
    threading.Thread(target=primary.guard, args=(first_attempt,), name="guard",
                     daemon=True).start()
    while not first_attempt.wait(0.1):
        if stop.is_set():
            primary.shutdown()
            return primary.exit_code
    try:
        primary.start_frontend()
    except (OSError, ImportError) as exc:
        log.error(f"Unable to start the frontend: {exc}")
        primary.shutdown()
        return EX_TEMPFAIL
    # FreeBSD: drop privileges once the device exists (on Linux the worker keeps root: it
    # must take its loop device and FUSE mount down at demotion; see doc/security.md)
    ctx.drop_privileges()
    while not stop.wait(1.0):
        pass
    primary.shutdown()
    return primary.exit_code
