"""The primary's frontend on FreeBSD: /dev/hast/<name> through GEOM_GATE, as base hastd.

This module owns the gate provider's life in a primary worker (hast-internals §11):
loading geom_gate.ko on demand, creating ``hast/<provname>`` (or taking over the one a dead
worker left), the START loop that turns kernel requests into the primary's submit_* calls,
the DONE that answers each of them from the primary's completion callback, direct reads, and
destruction when the primary stops.  hast._ggate does the ioctls; hast.frontends.linux is
the Linux counterpart (NBD), with the same start()/stop() contract towards hast.primary.

Requests longer than the primary's ``maxio`` (the kernel's maxphys is 1 MiB on FreeBSD 13+,
a resource's maxio may be 128K for an old peer) are split into maxio pieces and answered
once all pieces are done.  Commands the primary has no notion of (BIO_SPEEDUP, anything new)
are answered EOPNOTSUPP; hastd would abort on them.

Hooks the primary calls (hast.primary does not call them yet):

``ggate_direct_reads(True)``
    when the local copy is known to be current: after a handshake that returned
    ``syncsrc == SYNCSRC_PRIMARY``, and when a synchronization from the secondary has just
    completed.  The kernel then serves READs from the local provider itself.  Failure is a
    warning (e.g. the local component is a regular file).  hastd never disables them;
    ``ggate_direct_reads(False)`` exists for the case where the local copy becomes stale.

``primary.frontend_exit(code)`` (optional, on the primary)
    called when the device disappears under us (EX_OK, hastd: "Received cancel") or the
    START/DONE loop fails (EX_OSERR); hastd's worker exits with that code.  Without it the
    frontend sends SIGTERM to its own process, which stops the worker with exit code 0.
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from hast import log
from hast.frontends import Join
from hast.sysexits import EX_OK, EX_OSERR

if TYPE_CHECKING:
    from hast.primary import Primary

Done = Callable[[int], None]

# Synchronous signals must stay deliverable to the thread that causes them.
_SYNCHRONOUS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}


def load_module() -> None:
    """hastd's start-up check: modfind("g_gate"), else kldload("geom_gate") and look again.

    EEXIST (loaded meanwhile by someone else) is success; any other failure raises.
    """
    from hast._os import ffi, lib  # FreeBSD declarations of hast/_os_build.py

    if lib.modfind(b"g_gate") != -1:
        return
    if lib.kldload(b"geom_gate") == -1 or lib.modfind(b"g_gate") == -1:
        err = ffi.errno
        if err != errno.EEXIST:
            log.error("Unable to load geom_gate module", err=err)
            raise OSError(err, os.strerror(err), "geom_gate")


class _Once:
    """The completion of one request: the first call answers the kernel, later ones are
    ignored, so a request is never DONE twice nor its buffer pooled twice."""

    __slots__ = ("fn", "req", "lock")

    def __init__(self, fn: Callable[[object, int], None], req: object) -> None:
        self.fn = fn
        self.req = req
        self.lock = threading.Lock()

    def __call__(self, err: int) -> None:
        with self.lock:
            req, self.req = self.req, None
        if req is not None:
            self.fn(req, err)


def _block_signals() -> None:
    """Keep asynchronous signals away from the START thread.

    A signal caught while START sleeps in the kernel ends the sleep with gctl_error
    ECANCELED, the very answer that means "device destroyed"; hastd blocks signals in all
    its threads but one for the same reason.  Python handlers still run in the main thread.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.valid_signals()) - _SYNCHRONOUS)


class GgateFrontend:
    """/dev/hast/<provname> for one primary: start() creates it, stop() destroys it."""

    def __init__(self, primary: Primary, control_path: str | None = None) -> None:
        self.primary = primary
        self._gg = importlib.import_module("hast._ggate")
        self.control_path = control_path or self._gg.CTL_PATH
        self.name = f"hast/{primary.res.provname}"
        self.ctl = None
        self.pool = None
        self.unit = -1
        self.thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._exited = False
        self._exit_lock = threading.Lock()

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Load geom_gate, create (or take over) the device and start serving it."""
        p = self.primary
        self.load_module()
        try:
            ctl = self._gg.Control(self.control_path)
        except OSError as exc:
            log.error(f"Unable to open {self.control_path}", err=exc.errno)
            raise
        try:
            self.unit = self._create(ctl)
        except OSError:
            ctl.close()
            raise
        self.ctl = ctl
        self.pool = self._gg.RequestPool(p.maxio)
        self.thread = threading.Thread(target=self._recv_loop, name="ggate_recv", daemon=True)
        self.thread.start()

    def load_module(self) -> None:
        load_module()

    def _create(self, ctl) -> int:
        p = self.primary
        provname = p.res.provname
        try:
            # hastd's parameters: no flags, no queue limit, no kernel timeout (the primary
            # has its own), the full provider name given.
            unit = ctl.create(self.name, p.datasize, p.sectorsize, flags=0, timeout=0,
                              maxcount=0, unit=self._gg.NAME_GIVEN)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                log.error(f"Unable to create hast/{provname} device", err=exc.errno)
                raise
        else:
            log.info(f"Device hast/{provname} created.")
            return unit
        # The worker that created it died without destroying it: requests it had taken go
        # back to the kernel's queue and we serve them from the start.
        log.debug(1, f"Device hast/{provname} already exists, we will try to take it over.")
        try:
            unit = ctl.cancel(name=self.name, seq=0)
        except OSError as exc:
            log.error(f"Unable to take over hast/{provname} device", err=exc.errno)
            raise
        log.info(f"Device hast/{provname} recovered.")
        return unit

    def stop(self) -> None:
        """Destroy the device (forced, as hastd's cleanup) and stop the START thread.

        Requests still in the primary complete later; their DONE finds the device gone
        and is dropped (the kernel has already failed them with ENXIO).
        """
        self._stopping.set()
        if self.pool is not None:
            self.pool.close()
        ctl = self.ctl
        if ctl is not None and self.unit >= 0:
            try:
                ctl.destroy(force=True)
            except OSError as exc:
                log.warning(f"Unable to destroy hast/{self.primary.res.provname} device",
                            err=exc.errno)
            self.unit = -1
        if self.thread is not None:
            self.thread.join(timeout=30)
            self.thread = None
        if ctl is not None:
            ctl.close()

    # -- direct reads ------------------------------------------------------------------------
    def ggate_direct_reads(self, enabled: bool = True) -> bool:
        """Hook for the primary (see the module docstring); True when the kernel took it."""
        ctl = self.ctl
        if ctl is None or self._stopping.is_set():
            return False
        p = self.primary
        try:
            if enabled:
                # the configured path as hastd passes it; the kernel strips "/dev/"
                ctl.modify(readprov=p.res.local, readoffset=p.localoff)
            else:
                ctl.modify(readprov="")
        except OSError as exc:
            log.warning(f"Failed to {'enable' if enabled else 'disable'} direct reads",
                        err=exc.errno)
            return False
        log.debug(1, f"Direct reads {'enabled' if enabled else 'disabled'}.")
        return True

    # -- request loop ------------------------------------------------------------------------
    def _recv_loop(self) -> None:
        _block_signals()
        ctl, pool = self.ctl, self.pool
        while True:
            req = pool.acquire()
            if req is None:
                return
            try:
                err = ctl.start(req)
            except Exception as exc:  # OSError from the ioctl, MemoryError growing a buffer
                pool.release(req)
                if not self._stopping.is_set():
                    text = exc.strerror if isinstance(exc, OSError) else str(exc)
                    self._exit(EX_OSERR, f"G_GATE_CMD_START failed: {text}.")
                return
            if err:
                pool.release(req)
                if self._stopping.is_set():
                    return
                if err == errno.ECANCELED:
                    # someone destroyed the device (e.g. `hastctl role` elsewhere or ggatec)
                    self._exit(EX_OK, f"Received cancel on {self.control_path}.")
                else:
                    self._exit(EX_OSERR, f"G_GATE_CMD_START failed: {os.strerror(err)}.")
                return
            done = _Once(self._complete, req)
            try:
                self._dispatch(req, done)
            except Exception as exc:  # a bug, not a disk error: fail this request only
                log.error(f"Unable to dispatch {req!r}: {exc}")
                done(errno.EIO)

    def _dispatch(self, req, done: Done) -> None:
        gg, p = self._gg, self.primary
        cmd = req.cmd
        if cmd == gg.BIO_READ or cmd == gg.BIO_WRITE:
            submit = p.submit_read if cmd == gg.BIO_READ else p.submit_write
            offset, length, data = req.offset, req.length, req.data
            step = p.maxio
            if length <= step:
                submit(offset, length, data, done)
                return
            starts = range(0, length, step)
            join = Join(len(starts), done)
            for start in starts:
                n = min(step, length - start)
                submit(offset + start, n, data[start:start + n], join.part)
        elif cmd == gg.BIO_DELETE:
            p.submit_delete(req.offset, req.length, done)
        elif cmd == gg.BIO_FLUSH:
            p.submit_flush(done)
        else:
            log.debug(1, f"Unsupported GEOM Gate command {cmd}, answering EOPNOTSUPP.")
            done(errno.EOPNOTSUPP)

    def _complete(self, req, err: int) -> None:
        """The primary's completion callback: DONE, then the buffer is free again."""
        try:
            self.ctl.done(req, err)
        except OSError as exc:
            # after stop() the device is gone and so is this request
            if not self._stopping.is_set():
                self._exit(EX_OSERR, f"G_GATE_CMD_DONE failed: {exc.strerror}.")
        except Exception as exc:  # never into the primary's threads
            log.error(f"G_GATE_CMD_DONE failed: {exc}")
        finally:
            self.pool.release(req)

    def _exit(self, code: int, message: str) -> None:
        """End the worker as hastd's primary_exit() would: once, with ``code``."""
        with self._exit_lock:
            if self._exited:
                return
            self._exited = True
        if code == EX_OK:
            log.info(message)
        else:
            log.error(message)
        hook = getattr(self.primary, "frontend_exit", None)
        if callable(hook):
            hook(code)
        else:
            os.kill(os.getpid(), signal.SIGTERM)
