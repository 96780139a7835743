"""sync: resynchronization of dirty extents from the sync source to the other node.

FreeBSD's sync_thread copies one MAXPHYS chunk at a time; py-hast keeps ``INFLIGHT`` chunks in
flight so a resync runs near the speed of the disks and the wire.  The activemap still hands
out chunks in FreeBSD's order (lowest dirty extent first, chunk by chunk); an extent is declared
clean (extent_complete) only once every chunk handed out for it has finished, and a chunk that
failed puts its extent back on the list instead of being skipped (FreeBSD skips it).

Direction: syncsrc PRIMARY copies local -> remote, SECONDARY remote -> local; an extent whose
local copy missed an acknowledged write (``Primary.stale``) is copied remote -> local whatever
the direction.  A regular write and a sync chunk of the same range exclude each other
(hast.rangelock).

FreeBSD synchronizes only after a (re)connect.  Here an extent that becomes dirty while the
pair is connected (a write the secondary failed, a write the local disk failed) starts a pass
at once (``dirtied``), and a pass that left extents behind (a chunk failed: a disk returning
EIO) is retried with an exponential backoff, so ``hastctl status`` never shows "complete"
over a dirty map for long.  A pass that left failures behind does not declare the copies
equal (the counters stay as they are, syncsrc SECONDARY keeps reads on the secondary).
"""

from __future__ import annotations

import errno
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

from hast import _io, log
from hast._codec import is_zero
from hast.primary import HIO, HIO_READ, HIO_WRITE, SYNCSRC_SECONDARY
from hast.subr import format_duration, humanize
from hast.worker import EVENT_SYNCDONE, EVENT_SYNCINTR, EVENT_SYNCSTART

if TYPE_CHECKING:
    from hast.primary import Primary

INFLIGHT = 8
BACKOFF_MIN = 0.5    # seconds before retrying a pass that left failed extents behind
BACKOFF_MAX = 30.0


class Synchronizer:
    def __init__(self, primary: Primary, inflight: int = INFLIGHT) -> None:
        self.primary = primary
        self.inflight = inflight
        self.cond = threading.Condition()
        self.generation = 0          # bumped by every start and stop
        self.running = False
        self.cursor_lock = threading.Lock()
        self.outstanding: Counter[int] = Counter()
        # Finished rounds of an extent awaiting their chunks (a write that fails while an
        # extent is copied marks it again, and the cursor can hand it out a second time
        # before the first round's chunks are back): one reservation each.
        self.handed_out: Counter[int] = Counter()
        self.failed: set[int] = set()
        # Failed rounds of an extent (a write can have it handed out twice in a pass), each
        # still holding its reservation: released and the extent marked again at pass end.
        self.retry: Counter[int] = Counter()
        self.pass_failed = False     # a chunk of the current pass failed
        self.pending = False         # something became dirty during the pass: run another
        self.copied = 0
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        with self.cond:
            self.generation += 1
            self.running = True
            self.cond.notify_all()
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="sync", daemon=True)
                self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.pending = False
            if self.running:
                self.generation += 1
                self.running = False
                self.cond.notify_all()

    def kick(self) -> None:
        """Extents became dirty while connected: have a pass (this one or the next) copy them."""
        with self.cond:
            self.pending = True
            if not self.running:
                self.start()

    def dirtied(self, offset: int, length: int, stale: bool = False) -> None:
        """A regular write left [offset, offset+length) different on the two nodes.

        The extents are marked for synchronization; one the current pass is copying (some
        of its chunks may already be done) is failed, so it is marked again when the pass
        completes it.  ``stale``: the local copy is the old one (the local WRITE failed, the
        secondary's succeeded): reads go to the secondary and the sync copies the extents
        back until they are repaired.  All under cursor_lock, which extent completion holds.
        """
        p = self.primary
        first, last = offset // p.extentsize, (offset + length - 1) // p.extentsize
        with self.cursor_lock:
            flush = p.amap.need_sync(offset, length)
            for ext in range(first, last + 1):
                if stale:
                    p.stale.add(ext)
                if ext in self.outstanding:
                    self.failed.add(ext)
        if flush:
            p.flush_map()
        if stale:
            p.direct_reads(False)
        if p.connected:
            self.kick()

    def _loop(self) -> None:
        p = self.primary
        backoff = 0.0
        while not p.stopping.is_set():
            with self.cond:
                while not self.running and not p.stopping.is_set():
                    self.cond.wait(1.0)
                gen = self.generation
                self.pending = False
            if p.stopping.is_set():
                return
            clean = self._pass(gen)
            with self.cond:
                if self.generation != gen:
                    backoff = 0.0
                    continue       # stopped, or restarted by a reconnect
                if not self.pending and clean and is_zero(p.amap.syncmap()):
                    self.running = False
                    backoff = 0.0
                    continue
                if clean:
                    backoff = 0.0
                    continue       # new dirt during the pass: go again at once
                # A disk keeps failing: retry, but not in a tight loop.
                backoff = min(max(2 * backoff, BACKOFF_MIN), BACKOFF_MAX)
                deadline = time.monotonic() + backoff
                while self.generation == gen and not p.stopping.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.cond.wait(left)

    def _alive(self, gen: int) -> bool:
        return self.generation == gen and self.running and not self.primary.stopping.is_set()

    def _pass(self, gen: int) -> bool:
        """One pass over the extents marked for synchronization; False: some failed."""
        p = self.primary
        with self.cursor_lock:
            # What an interrupted pass left (extents it never finished) is not this pass's.
            self.outstanding.clear()
            self.handed_out.clear()
            self.failed.clear()
            self.retry.clear()
            self.pass_failed = False
            p.amap.sync_rewind()
            ndirty = p.amap.ndirty()
        if ndirty == 0:
            log.info("Nothing to synchronize.")
            self._done(gen)
            return True
        todo = ndirty * p.extentsize
        log.info(f"Synchronization started. {humanize(todo)}B to go.")
        p.ctx.emit(EVENT_SYNCSTART)
        self.copied = 0
        started = time.monotonic()
        workers = [threading.Thread(target=self._worker, args=(gen,), name=f"sync{i}",
                                    daemon=True) for i in range(self.inflight)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        with self.cursor_lock:
            retry = sorted(self.retry.items())
            self.retry.clear()
        if retry:
            def remark_all() -> bool:
                for ext, rounds in retry:
                    self._remark(ext, rounds)
                return True

            p.mapw.update_lazily(remark_all)
        if not self._alive(gen):
            spent = format_duration(int(time.monotonic() - started))
            log.info(f"Synchronization interrupted after {spent}. "
                     f"{humanize(self.copied)}B synchronized so far.")
            p.ctx.emit(EVENT_SYNCINTR)
            return True
        elapsed = time.monotonic() - started
        rate = int(self.copied / elapsed) if elapsed > 0 else self.copied
        if self.pass_failed:
            log.warning(f"Synchronization incomplete: some extents could not be copied "
                        f"({humanize(self.copied)}B synchronized in "
                        f"{format_duration(int(elapsed))}); retrying.")
            return False
        log.info(f"Synchronization complete. {humanize(self.copied)}B synchronized in "
                 f"{format_duration(int(elapsed))} ({humanize(rate)}B/sec).")
        if self.copied:
            p.ctx.emit(EVENT_SYNCDONE)
        self._done(gen)
        return True

    def _done(self, gen: int) -> None:
        """Both copies agree: restore the counters' in-step relation (FreeBSD sync_thread)."""
        p = self.primary
        if not self._alive(gen) or not p.connected:
            return
        with p.lock:
            from_secondary = p.syncsrc == SYNCSRC_SECONDARY
            p.syncsrc = 0
            p.localcnt = p.peer_remotecnt
            p.remotecnt = p.peer_localcnt
        p.write_metadata()
        if from_secondary:
            p.direct_reads(True)  # the local copy is current again

    def _next(self, gen: int) -> tuple[int, int, int] | None:
        p = self.primary
        with self.cursor_lock:
            offset, length, finished = p.amap.sync_offset()
            if finished >= 0:
                self.handed_out[finished] += 1
                self._maybe_complete(finished, gen)
            if offset < 0:
                return None
            ext = offset // p.extentsize
            self.outstanding[ext] += 1
            return offset, length, ext

    def _maybe_complete(self, ext: int, gen: int) -> None:
        """extent_complete once every handed-out chunk of ``ext`` is back (cursor_lock held)."""
        p = self.primary
        if self.outstanding[ext] or not self.handed_out[ext]:
            return
        rounds = self.handed_out.pop(ext)
        del self.outstanding[ext]
        if ext in self.failed:
            # Its bit and reservations stay; it is marked again when the pass ends, so a
            # disk that keeps failing is retried after a backoff, not in a tight loop.
            self.failed.discard(ext)
            self.pass_failed = True
            self.retry[ext] += rounds
            return
        if ext in p.stale:
            p.stale.discard(ext)   # copied back from the secondary: the local copy is good
            if not p.stale and p.syncsrc != SYNCSRC_SECONDARY:
                p.direct_reads(True)

        def update() -> bool:
            if self.generation != gen:
                # A reconnect may have merged the peer's map since this pass reserved the
                # extent (merge() assigns the reservation, it does not add one): mark it
                # again rather than clear it, so the pass now running copies it once more.
                return self._remark(ext, rounds)
            cleared = False
            for _ in range(rounds):
                cleared = p.amap.extent_complete(ext)   # True once the last one clears it
            return cleared

        # Clearing a bit is never urgent (a bit left set costs a needless resync): the map
        # writer stores it later.
        p.mapw.update_lazily(update)

    def _remark(self, ext: int, rounds: int = 1) -> bool:
        """Release the reservations of ``rounds`` handed-out rounds of ``ext`` and mark it for
        synchronization again (MapWriter.cv held: the bit is never seen cleared between).
        A reconnect's merge() may have absorbed reservations (it assigns): never below 0."""
        p = self.primary
        start = ext * p.extentsize
        for _ in range(rounds):
            try:
                p.amap.extent_complete(ext)
            except ValueError:
                break
        p.amap.need_sync(start, min(p.extentsize, p.datasize - start))
        return True

    def _worker(self, gen: int) -> None:
        p = self.primary
        buf = _io.AlignedBuffer(p.maxio)
        view = memoryview(buf)
        while self._alive(gen):
            chunk = self._next(gen)
            if chunk is None:
                return
            offset, length, ext = chunk
            key = p.ranges.lock_sync(offset, length, p.stopping)
            ok = False
            try:
                if key is not None and self._alive(gen):
                    ok = self._copy(offset, length, view[:length])
            finally:
                if key is not None:
                    p.ranges.unlock_sync(key)
                with self.cursor_lock:
                    self.outstanding[ext] -= 1
                    if ok:
                        self.copied += length
                    else:
                        self.failed.add(ext)
                    self._maybe_complete(ext, gen)

    def _copy(self, offset: int, length: int, buf: memoryview) -> bool:
        p = self.primary
        from_remote = p.syncsrc == SYNCSRC_SECONDARY or offset // p.extentsize in p.stale
        for cmd, remote in ((HIO_READ, from_remote), (HIO_WRITE, not from_remote)):
            result: list[int] = []
            done = threading.Event()

            def complete(err: int, result: list[int] = result, done: threading.Event = done
                         ) -> None:
                result.append(err)
                done.set()

            hio = HIO(cmd, offset, length, buf, complete, sync=True)
            hio.countdown = 1
            if remote:
                p.remote_send(hio)
            else:
                p.local.submit(hio)
            done.wait()
            if result[0]:
                where = "remote" if remote else "local"
                if result[0] != errno.ENOTCONN:
                    log.error(f"Unable to synchronize {length} bytes at {offset} "
                              f"({'READ' if cmd == HIO_READ else 'WRITE'} on the {where} "
                              "component)", err=result[0])
                return False
        return True
