"""sync: resynchronization of dirty extents from the sync source to the other node.

FreeBSD's sync_thread copies one MAXPHYS chunk at a time; py-hast keeps ``INFLIGHT`` chunks in
flight so a resync runs near the speed of the disks and the wire.  The activemap still hands
out chunks in FreeBSD's order (lowest dirty extent first, chunk by chunk); an extent is declared
clean (extent_complete) only once every chunk handed out for it has finished, and a chunk that
failed puts its extent back on the list instead of being skipped (FreeBSD skips it).

Direction: syncsrc PRIMARY copies local -> remote, SECONDARY remote -> local.  A regular write
and a sync chunk of the same range exclude each other (hast.rangelock).
"""

from __future__ import annotations

import errno
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

from hast import _io, log
from hast.subr import format_duration, humanize
from hast.worker import EVENT_SYNCDONE, EVENT_SYNCINTR, EVENT_SYNCSTART

if TYPE_CHECKING:
    from hast.primary import Primary

INFLIGHT = 8


class Synchronizer:
    def __init__(self, primary: Primary, inflight: int = INFLIGHT) -> None:
        self.primary = primary
        self.inflight = inflight
        self.cond = threading.Condition()
        self.generation = 0          # bumped by every start and stop
        self.running = False
        self.cursor_lock = threading.Lock()
        self.outstanding: Counter[int] = Counter()
        self.handed_out: set[int] = set()
        self.failed: set[int] = set()
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
            if self.running:
                self.generation += 1
                self.running = False
                self.cond.notify_all()

    def _loop(self) -> None:
        p = self.primary
        while not p.stopping.is_set():
            with self.cond:
                while not self.running and not p.stopping.is_set():
                    self.cond.wait(1.0)
                gen = self.generation
            if p.stopping.is_set():
                return
            self._pass(gen)
            with self.cond:
                if self.generation == gen:
                    self.running = False

    def _alive(self, gen: int) -> bool:
        return self.generation == gen and self.running and not self.primary.stopping.is_set()

    def _pass(self, gen: int) -> None:
        p = self.primary
        with self.cursor_lock:
            p.amap.sync_rewind()
            ndirty = p.amap.ndirty()
        if ndirty == 0:
            log.info("Nothing to synchronize.")
            self._done(gen)
            return
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
        if not self._alive(gen):
            spent = format_duration(int(time.monotonic() - started))
            log.info(f"Synchronization interrupted after {spent}. "
                     f"{humanize(self.copied)}B synchronized so far.")
            p.ctx.emit(EVENT_SYNCINTR)
            return
        elapsed = time.monotonic() - started
        rate = int(self.copied / elapsed) if elapsed > 0 else self.copied
        log.info(f"Synchronization complete. {humanize(self.copied)}B synchronized in "
                 f"{format_duration(int(elapsed))} ({humanize(rate)}B/sec).")
        if self.copied:
            p.ctx.emit(EVENT_SYNCDONE)
        self._done(gen)

    def _done(self, gen: int) -> None:
        """Both copies agree: restore the counters' in-step relation (FreeBSD sync_thread)."""
        p = self.primary
        if not self._alive(gen) or not p.connected:
            return
        with p.lock:
            from_secondary = p.syncsrc == 2
            p.syncsrc = 0
            p.localcnt = p.peer_remotecnt
            p.remotecnt = p.peer_localcnt
        p.write_metadata()
        if from_secondary:
            p.direct_reads(True)  # the local copy is current again

    def _next(self) -> tuple[int, int, int] | None:
        p = self.primary
        with self.cursor_lock:
            offset, length, finished = p.amap.sync_offset()
            if finished >= 0:
                self.handed_out.add(finished)
                self._maybe_complete(finished)
            if offset < 0:
                return None
            ext = offset // p.extentsize
            self.outstanding[ext] += 1
            return offset, length, ext

    def _maybe_complete(self, ext: int) -> None:
        """extent_complete once every handed-out chunk of ``ext`` is back (cursor_lock held)."""
        p = self.primary
        if self.outstanding[ext] or ext not in self.handed_out:
            return
        self.handed_out.discard(ext)
        del self.outstanding[ext]
        failed = ext in self.failed
        self.failed.discard(ext)
        start = ext * p.extentsize

        def update() -> bool:
            flush = p.amap.extent_complete(ext)
            if failed:
                flush |= p.amap.need_sync(start, min(p.extentsize, p.datasize - start))
            return flush

        # Clearing a bit is never urgent (a bit left set costs a needless resync), and a
        # failed extent's bit is never seen cleared: the map writer stores it later.
        p.mapw.update_lazily(update)

    def _worker(self, gen: int) -> None:
        p = self.primary
        buf = _io.AlignedBuffer(p.maxio)
        view = memoryview(buf)
        while self._alive(gen):
            chunk = self._next()
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
                    self._maybe_complete(ext)

    def _copy(self, offset: int, length: int, buf: memoryview) -> bool:
        from hast.primary import HIO, HIO_READ, HIO_WRITE, SYNCSRC_SECONDARY

        p = self.primary
        from_remote = p.syncsrc == SYNCSRC_SECONDARY
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
