"""daemon: hastd's main process (FreeBSD sbin/hastd/hastd.c).

This module owns everything the main process does (hast-userland.md §2, hast-internals.md §6.1-6.3,
§12): command line, start-up order, pidfile, daemonizing, the control socket, the listen
sockets and the first two steps of every replication handshake, the role of each resource, the
worker processes (started through :mod:`hast.worker`), worker events and hooks
(:mod:`hast.hooks`), signals and the SIGHUP reload.  The control protocol itself is
:mod:`hast.control`.

Shape of the process.  One thread and one ``selectors`` loop, as FreeBSD's select() loop: the
control socket, every listen socket, every pending connection, every worker's event socket and
a self-pipe fed by ``signal.set_wakeup_fd`` for SIGHUP/SIGINT/SIGTERM/SIGCHLD.  The signal
handlers only queue the signal; the loop handles them between events, which is what FreeBSD's
masked signals plus sigtimedwait() amount to.  The loop ticks every 5 s to report long-running
hooks.  No thread is ever started here: hooks are fork()ed (see hast.hooks).

Roles are never persisted: every resource starts in ``init``.  Role changes follow
control_set_role(): log ``Role changed to <new>.``, stop the worker (SIGTERM, wait), start a
primary worker for ``primary``, run the ``role`` hook.  A secondary worker exists only while a
primary is connected: it is started when handshake step 2 succeeds.  A primary worker that is
killed by a signal or exits with 75 is restarted after 1 s; any other exit puts the resource
back to ``init`` without a hook.

Incoming connections (§6.1-§6.3, §6.5): the peer's IP must match the ``remote`` of some
resource, else the connection is closed without a word; then its first frame is read without
blocking the loop (an incremental reader per connection, 20 s to complete, nv size bounded);
then steps 1 and 2 run exactly as listen_accept(), with FreeBSD's error frames (``errmsg``,
plus ``wait`` when we are primary), version negotiation min(received, 2) and a 16-byte random
token.

Deviations from FreeBSD, deliberate (README lists them):

* SIGTERM/SIGINT: FreeBSD signals its workers and exits at once, leaving the pidfile behind.
  We signal them, wait for them (30 s, then SIGKILL) so no worker outlives the daemon holding
  a device, and remove the control socket and the pidfile.
* A role change (SIGTERM) or a replacing primary connection (SIGINT) waits at most 30 s for
  the old worker before SIGKILL, where FreeBSD can block forever on a hung worker.  The
  worker's event channel is closed first, so a worker that reports an event while stopping
  cannot deadlock against the waiting daemon.
* The 1 s delay before restarting a primary worker is a timer, not a sleep in the loop.
* Control connections get the same non-blocking, 20 s-bounded frame reader as peer
  connections (FreeBSD reads the request with a blocking call and no timeout).
* Handshake tokens are single-use: a token is only valid for the half-open connection it was
  issued for and is forgotten once step 2 consumed it.  FreeBSD keeps it (and before the first
  step 1 a token of 16 zero bytes would match its zero-initialised buffer).
* A role change away from ``secondary`` also closes a half-open connection #1 (FreeBSD keeps
  it until the next step 1 replaces it).
* A failed fork of a worker is logged (a primary goes back to ``init``); FreeBSD exits.
* A ``remote`` that does not parse matches no peer (FreeBSD's hast.conf parser does not check
  addresses either; the first connection would meet it).
* An unexpected exception while serving one descriptor is logged at CRIT (traceback at debug
  1) and costs that connection only; FreeBSD would abort the daemon and every worker with it.
* At most 128 connections of each kind (control, peer) may be waiting for their first frame;
  the oldest is dropped to admit a new one.
* Configuration errors at start-up print FreeBSD's line, then ``<file>:<line>: <message>``.
* hastd does not load geom_gate at start-up: the primary worker's frontend loads what it needs
  (geom_gate on FreeBSD, nbd on Linux) when it creates /dev/hast/<name>.
* Accepted connections are handed to the secondary worker in blocking mode without socket
  timeouts; the worker sets its own (FreeBSD's parent sets 20 s SO_SNDTIMEO/SO_RCVTIMEO, which
  the worker replaces anyway).
* A listen address given twice is bound once (FreeBSD fails with "Address already in use").
"""

from __future__ import annotations

import errno
import fcntl
import hmac
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

from hast import config as configmod
from hast import control, hooks, log, proto, subr, worker
from hast import nv as nvmod
from hast.config import Config, ConfigError, Resource
from hast.sysexits import EX_CONFIG, EX_OK, EX_OSERR, EX_TEMPFAIL, EX_USAGE

HAST_TIMEOUT = 20           # seconds for a pending connection to deliver its first frame
HAST_TOKEN_SIZE = 16
REPORT_INTERVAL = 5         # main-loop tick: check long-running hooks
RESTART_DELAY = 1.0         # before restarting a primary worker that died
STOP_TIMEOUT = 30.0         # py-hast: wait this long for a stopping worker, then SIGKILL
MAX_PENDING = 128           # py-hast: connections of a kind waiting for their first frame
RECV_CHUNK = 64 * 1024      # py-hast: a pending connection's nv is read at most this at a time
_MAXPATHLEN = 1024
_OPTSTRING = "c:dFhP:"
_USAGE = "[-dFh] [-c config] [-P pidfile]"

# hast.h numbers sent to a primary worker in CONTROL_RELOAD
_REPLICATION = {"fullsync": 0, "memsync": 1, "async": 2}
_CHECKSUM = {"none": 0, "crc32": 1, "sha256": 2}
_COMPRESSION = {"none": 0, "hole": 1, "lzf": 2}

_ERPCMISMATCH = getattr(errno, "ERPCMISMATCH", errno.EPROTO)


# -- command line ------------------------------------------------------------------------------

class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def getprogname(argv0: str) -> str:
    """basename(argv[0]); ``hastd`` when run as ``python -m hast.daemon``."""
    return subr.getprogname(argv0, "hastd", "daemon.py")


def _usage(prog: str) -> _Exit:
    # errx(EX_USAGE, ...): program name, no "usage:" word.
    sys.stderr.write(f"{prog}: {_USAGE}\n")
    sys.stderr.flush()
    return _Exit(EX_USAGE)


def _getopt(args: list[str], prog: str) -> list[tuple[str, str]]:
    """BSD getopt(3) with hastd's "c:dFhP:"; operands after the options are ignored."""
    opts: list[tuple[str, str]] = []
    for opt, value in subr.bsd_getopt(args, _OPTSTRING, prog, []):
        if opt == "?":
            raise _usage(prog)
        opts.append((opt, value))
    return opts


class PidFileBusy(Exception):
    """Another process holds the pidfile's lock (pidfile_open()'s EEXIST)."""

    def __init__(self, path: str, pid: int) -> None:
        super().__init__(path, pid)
        self.path = path
        self.pid = pid


class PidFile:
    """FreeBSD's pidfile(3): mode 0600, an exclusive flock held for the daemon's lifetime.

    The lock, not the file's existence, says "running": a stale file left by a crash is
    simply taken over.  The descriptor is close-on-exec, so workers and hooks never hold it.
    """

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        # Removal happens after daemon() moved to /: remember where a relative path pointed.
        self._abspath = os.path.abspath(path)
        self.fd = fd

    @classmethod
    def open(cls, path: str) -> PidFile:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise PidFileBusy(path, pid) from None
        except OSError:
            os.close(fd)
            raise
        return cls(path, fd)

    def write(self) -> None:
        data = str(os.getpid()).encode()  # pidfile_write(): "%u", no newline
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def remove(self) -> None:
        try:
            os.unlink(self._abspath)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_pid(fd: int) -> int:
    # The holder may not have written its PID yet; pidfile(3) retries briefly too.
    for _ in range(5):
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return -1
        if text:
            try:
                return int(text)
            except ValueError:
                return -1
        time.sleep(0.05)
    return -1


# -- incremental frame reader --------------------------------------------------------------------

class FrameReader:
    """Reads one hast_proto frame header + nv from a non-blocking socket, piece by piece.

    Never reads past the nv: whatever follows belongs to whoever gets the connection next
    (a secondary worker).  The payload announced by ``size``, if any, is left unread.

    Memory follows what the peer actually sent, never what its header announced: the nv
    size is checked against ``max_nv`` before anything is read, and the body is received in
    chunks of at most RECV_CHUNK bytes (recv(n) allocates n bytes up front).
    """

    def __init__(self, max_nv: int) -> None:
        self.max_nv = max_nv
        self.head = bytearray()
        self.body = bytearray()
        self.size: int | None = None

    def feed(self, sock: socket.socket) -> nvmod.NV | None:
        """Read what is available; the nv once complete, None for "not yet".

        Raises OSError (ProtoError) when the peer closed, sent a bad header or a bad nv.
        """
        while True:
            if self.size is None:
                want = proto.HEADER_SIZE - len(self.head)
            else:
                want = min(self.size - len(self.body), RECV_CHUNK)
            try:
                chunk = sock.recv(want)
            except (BlockingIOError, InterruptedError):
                return None
            if not chunk:
                raise proto.ProtoError(errno.ENOTCONN, "Connection closed by peer")
            if self.size is None:
                self.head += chunk
                if len(self.head) < proto.HEADER_SIZE:
                    continue
                version, size = proto.HEADER.unpack(self.head)
                if version > proto.PROTO_VERSION:
                    raise proto.ProtoError(_ERPCMISMATCH,
                                           f"Unsupported protocol version {version}")
                if size > self.max_nv:
                    raise proto.ProtoError(errno.EMSGSIZE,
                                           f"nv blob of {size} bytes exceeds {self.max_nv}")
                self.size = size
                if size == 0:
                    return nvmod.NV()
                continue
            self.body += chunk
            if len(self.body) < self.size:
                continue
            try:
                return nvmod.NV.unpack(self.body)
            except nvmod.NVError as exc:
                raise proto.ProtoError(errno.EINVAL, f"Malformed nv: {exc}") from None


# -- state ---------------------------------------------------------------------------------------

@dataclass
class ResourceState:
    """One resource of the running daemon (FreeBSD's struct hast_resource, parent's part)."""

    res: Resource
    role: str = "init"
    worker: worker.WorkerHandle | None = None
    event_open: bool = False            # the worker's event socket is still registered
    remotein: socket.socket | None = None   # secondary: half-open connection #1
    token: bytes | None = None          # issued with remotein, consumed by step 2
    version: int = 1                    # negotiated protocol version (hr_version)
    restart_at: float | None = None     # primary worker restart due (monotonic)

    @property
    def name(self) -> str:
        return self.res.name


@dataclass
class Pending:
    """A connection whose first frame is still being read."""

    sock: socket.socket
    kind: str                 # "control" or "peer"
    reader: FrameReader
    deadline: float
    raddr: str = ""
    laddr: str = ""


def _sockaddr_text(family: int, addr: object) -> str:
    """proto_tcp's %S of a socket address: ``tcp://1.2.3.4:5`` / ``tcp://[::1]:5``."""
    if family == socket.AF_INET6 and isinstance(addr, tuple):
        return f"tcp://[{addr[0]}]:{addr[1]}"
    if family == socket.AF_INET and isinstance(addr, tuple):
        return f"tcp://{addr[0]}:{addr[1]}"
    return f"uds://{addr}" if addr else "uds://"


def local_text(sock: socket.socket) -> str:
    try:
        return _sockaddr_text(sock.family, sock.getsockname())
    except OSError:
        return "tcp://?"


def remote_text(sock: socket.socket) -> str:
    try:
        return _sockaddr_text(sock.family, sock.getpeername())
    except OSError:
        return "tcp://?"


def _close_listener(sock: socket.socket, addr: str) -> None:
    """proto_close() of a server socket: a UNIX socket's file goes with it."""
    sock.close()
    if proto.is_uds(addr):
        try:
            os.unlink(proto.uds_path(addr))
        except OSError:
            pass


def may_access(conn: socket.socket, remote: str) -> bool:
    """proto_address_match(); an address that does not even parse matches nobody."""
    try:
        return proto.address_matches(conn, remote)
    except (OSError, ValueError):
        return False


def _same_uds(a: str, b: str) -> bool:
    return (proto.is_uds(a) and proto.is_uds(b)
            and os.path.abspath(proto.uds_path(a)) == os.path.abspath(proto.uds_path(b)))


def _exit_text(pid: int, returncode: int) -> tuple[bool, str]:
    """child_exit_log() with a Popen-style returncode (negative = killed by that signal)."""
    if returncode == 0:
        return True, f"Worker process exited gracefully (pid={pid})."
    if returncode < 0:
        return False, f"Worker process killed (pid={pid}, signal={-returncode})."
    return False, f"Worker process exited ungracefully (pid={pid}, exitcode={returncode})."


def _log_exit(pid: int, returncode: int) -> None:
    graceful, text = _exit_text(pid, returncode)
    if graceful:
        log.debug(1, text)
    else:
        log.error(text)


def restart_needed(old: Resource, new: Resource, role: str) -> bool:
    """resource_needs_restart(): which changes need the resource stopped and started again."""
    if old.provname != new.provname or old.local != new.local:
        return True
    if role in ("init", "secondary"):
        return _tunables(old) != _tunables(new)
    return False


def reload_needed(old: Resource, new: Resource, role: str) -> bool:
    """resource_needs_reload(): changes a primary worker takes live (CONTROL_RELOAD)."""
    return role == "primary" and _tunables(old) != _tunables(new)


def _tunables(res: Resource) -> tuple:
    return (res.remote, res.source, res.replication, res.checksum, res.compression,
            res.timeout, res.exec, res.metaflush)


class _ReloadFailed(Exception):
    pass


# -- the daemon ----------------------------------------------------------------------------------

class Daemon:
    """hastd's main process once started: state plus the select loop.

    Implements :class:`hast.control.DaemonView` (``resources``, ``set_role``).
    """

    def __init__(self, cfg: Config, cfgpath: str, *, foreground: bool, debug: int,
                 pidfile_override: str | None, pidfile: PidFile | None,
                 control_sock: socket.socket, listens: dict[str, socket.socket]) -> None:
        self.cfgpath = cfgpath
        self.foreground = foreground
        self.debug = debug
        self.pidfile_override = pidfile_override
        self.pidfile = pidfile
        self.control_addr = cfg.control
        self.pidfile_path = cfg.pidfile
        self.control_sock = control_sock
        self.listens = listens
        self.resources: dict[str, ResourceState] = {
            name: ResourceState(res) for name, res in cfg.resources.items()}
        self.pending: dict[int, Pending] = {}
        self.sel: selectors.BaseSelector | None = None
        self._signals: list[int] = []
        self._sigpipe: tuple[int, int] | None = None
        self._stopped = False

    # -- signals ----------------------------------------------------------------------------

    def install_signals(self) -> None:
        """Queue HUP/INT/TERM/CHLD for the loop (the handlers do nothing else)."""
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _check_signals(self) -> None:
        if self._sigpipe is not None:
            try:
                while os.read(self._sigpipe[0], 512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        while self._signals and not self._stopped:
            signum = self._signals.pop(0)
            if signum in (signal.SIGINT, signal.SIGTERM):
                self.terminate()
            elif signum == signal.SIGCHLD:
                self.child_exit()
            elif signum == signal.SIGHUP:
                self.reload()

    # -- loop -------------------------------------------------------------------------------

    def run(self) -> int:
        """main_loop(): returns the exit status once a termination signal was handled."""
        self.sel = selectors.DefaultSelector()
        rfd, wfd = os.pipe()
        for fd in (rfd, wfd):
            os.set_blocking(fd, False)
        self._sigpipe = (rfd, wfd)
        signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        self.sel.register(rfd, selectors.EVENT_READ, ("signal", None))
        self.sel.register(self.control_sock, selectors.EVENT_READ, ("control", None))
        for addr, sock in self.listens.items():
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, ("listen", addr))
        self.control_sock.setblocking(False)
        lastcheck = time.monotonic()
        while not self._stopped:
            self._check_signals()
            if self._stopped:
                break
            now = time.monotonic()
            timeout = max(0.0, lastcheck + REPORT_INTERVAL - now)
            for due in self._deadlines():
                timeout = min(timeout, max(0.0, due - now))
            events = self.sel.select(timeout)
            now = time.monotonic()
            if lastcheck + REPORT_INTERVAL <= now:
                hooks.check(now)
                lastcheck = now
            # Learn about exited workers before acting on anything they might be part of.
            self._check_signals()
            if self._stopped:
                break
            for key, _mask in events:
                if self._stopped:
                    break
                # An earlier handler may have closed or replaced this descriptor.
                if self.sel.get_map().get(key.fd) is not key:
                    continue
                try:
                    self._dispatch(key)
                except Exception as exc:  # see _internal_error()
                    self._internal_error(key, exc)
            self._expire_pending(time.monotonic())
            self._run_restarts(time.monotonic())
        return EX_OK

    def _internal_error(self, key: selectors.SelectorKey, exc: Exception) -> None:
        """A bug met while serving one descriptor costs that descriptor, not the daemon.

        FreeBSD would abort; an HA storage daemon whose workers keep serving I/O is better
        off dropping the one connection and going on.  The traceback goes to debug level 1.
        """
        log.set_prefix("")
        kind, data = key.data
        log.crit(f"Internal error while handling a {kind} descriptor: {exc!r}.")
        for line in traceback.format_exc().rstrip().splitlines():
            log.debug(1, line)
        if kind == "pending":
            self._drop_pending(data)

    def _deadlines(self) -> list[float]:
        dues = [p.deadline for p in self.pending.values()]
        dues += [rs.restart_at for rs in self.resources.values() if rs.restart_at is not None]
        return dues

    def _dispatch(self, key: selectors.SelectorKey) -> None:
        kind, data = key.data
        if kind == "signal":
            return  # drained by _check_signals
        if kind == "control":
            self._accept_control()
        elif kind == "listen":
            self._accept_peer(data, key.fileobj)  # type: ignore[arg-type]
        elif kind == "pending":
            self._read_pending(data)
        elif kind == "event":
            self._event(data)

    # -- control connections ----------------------------------------------------------------

    def _accept_control(self) -> None:
        try:
            conn, _ = self.control_sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("Unable to accept control connection", log.exc_errno(exc))
            return
        self._add_pending(Pending(conn, "control", FrameReader(proto.MAX_NV_CONTROL),
                                  time.monotonic() + HAST_TIMEOUT))

    def _control_request(self, conn: socket.socket, request: nvmod.NV) -> None:
        with conn:
            reply = control.handle(self, request)
            if reply is None:
                return
            try:
                conn.settimeout(HAST_TIMEOUT)
                proto.send_frame(conn, proto.PROTO_VERSION, reply)
            except OSError as exc:
                log.error("Unable to send control response", log.exc_errno(exc))

    # -- pending connections ----------------------------------------------------------------

    def _add_pending(self, pending: Pending) -> None:
        assert self.sel is not None
        same = [p for p in self.pending.values() if p.kind == pending.kind]
        if len(same) >= MAX_PENDING:
            # Per kind, so that a flood of peers cannot crowd out hastctl (or vice versa).
            oldest = min(same, key=lambda p: p.deadline)
            log.warning(f"Too many connections waiting for a header, dropping "
                        f"{oldest.raddr or oldest.kind + ' connection'}.")
            self._drop_pending(oldest)
        pending.sock.setblocking(False)
        self.pending[pending.sock.fileno()] = pending
        self.sel.register(pending.sock, selectors.EVENT_READ, ("pending", pending))

    def _drop_pending(self, pending: Pending, close: bool = True) -> None:
        assert self.sel is not None
        self.pending.pop(pending.sock.fileno(), None)
        try:
            self.sel.unregister(pending.sock)
        except (KeyError, ValueError):
            pass
        if close:
            pending.sock.close()

    def _pending_failed(self, pending: Pending, err: int) -> None:
        if pending.kind == "control":
            log.error("Unable to receive control header", err)
        else:
            log.error(f"Unable to receive header from {pending.raddr}", err)
        self._drop_pending(pending)

    def _read_pending(self, pending: Pending) -> None:
        try:
            msg = pending.reader.feed(pending.sock)
        except OSError as exc:
            self._pending_failed(pending, log.exc_errno(exc))
            return
        if msg is None:
            return
        self._drop_pending(pending, close=False)
        pending.sock.setblocking(True)
        if pending.kind == "control":
            self._control_request(pending.sock, msg)
        else:
            self._peer_header(pending.sock, pending.raddr, msg)

    def _expire_pending(self, now: float) -> None:
        for pending in [p for p in self.pending.values() if p.deadline <= now]:
            self._pending_failed(pending, errno.ETIMEDOUT)

    # -- replication connections: handshake steps 1 and 2 -----------------------------------

    def _accept_peer(self, addr: str, lsock: socket.socket) -> None:
        laddr = local_text(lsock)
        log.debug(1, f"Accepting connection to {laddr}.")
        try:
            conn, _ = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error(f"Unable to accept connection {laddr}", log.exc_errno(exc))
            return
        laddr, raddr = local_text(conn), remote_text(conn)
        log.info(f"Connection from {raddr} to {laddr}.")
        # Before reading a byte: may this host talk to us about any resource at all?
        if not any(may_access(conn, rs.res.remote) for rs in self.resources.values()):
            log.error(f"Client {raddr} isn't known.")
            conn.close()
            return
        self._add_pending(Pending(conn, "peer", FrameReader(proto.MAX_NV_WIRE),
                                  time.monotonic() + HAST_TIMEOUT, raddr, laddr))

    def _peer_header(self, conn: socket.socket, raddr: str, nvin: nvmod.NV) -> None:
        """listen_accept() once the first frame is in."""
        try:
            self._handshake(conn, raddr, nvin)
        finally:
            log.set_prefix("")

    def _handshake(self, conn: socket.socket, raddr: str, nvin: nvmod.NV) -> None:
        resname = nvin.get_string("resource")
        if resname is None:
            log.error(f"No 'resource' field in the header received from {raddr}.")
            conn.close()
            return
        log.debug(2, f"{raddr}: resource={resname}")
        version = nvin.get_uint8("version")
        log.debug(2, f"{raddr}: version={version}")
        if version == 0:
            version = 1  # no version means protocol version 1
        token = nvin.get_uint8_array("token")
        if token is None and nvin.exists("token"):
            token = b""  # present with another type: its size cannot be right either
        if token is not None and len(token) != HAST_TOKEN_SIZE:
            log.error(f"Received token of invalid size from {raddr} "
                      f"(expected {HAST_TOKEN_SIZE}, got {len(token)}).")
            conn.close()
            return

        # From here on errors are reported to the peer.
        rs = self.resources.get(resname)
        if rs is None:
            log.error(f"No resource '{resname}' as requested by {raddr}.")
            self._send_error(conn, raddr, "Resource not configured.")
            return
        log.set_prefix(f"[{rs.name}] ({rs.role}) ")
        if not may_access(conn, rs.res.remote):
            log.error(f"Client {raddr} has no access to the resource.")
            self._send_error(conn, raddr, "No access to the resource.")
            return
        if rs.role != "secondary":
            log.warning(f"We act as {rs.role} for the resource and not as secondary "
                        f"as requested by {raddr}.")
            # A primary asks the other side to wait a bit: it may be finishing cleanups.
            self._send_error(conn, raddr, f"Remote node acts as {rs.role} for the resource "
                             "and not as secondary.", wait=rs.role == "primary")
            return
        if token is not None and (rs.token is None or rs.remotein is None
                                  or not hmac.compare_digest(token, rs.token)):
            log.error(f"Token received from {raddr} doesn't match.")
            self._send_error(conn, raddr, "Token doesn't match.")
            return

        if token is None:
            self._step1(rs, conn, raddr, version)
        else:
            self._step2(rs, conn, raddr, nvin)

    def _step1(self, rs: ResourceState, conn: socket.socket, raddr: str, version: int) -> None:
        log.debug(1, f"Initial connection from {raddr}.")
        if rs.worker is not None:
            pid = rs.worker.pid
            log.debug(1, f"Worker process exists (pid={pid}), stopping it.")
            # A new primary session replaces the old one; SIGINT as FreeBSD (the secondary
            # worker leaves it at its default action: die at once).
            self._stop_worker(rs, signal.SIGINT, replacing=True)
        elif rs.remotein is not None:
            log.debug(1, f"Canceling half-open connection from {remote_text(rs.remotein)} "
                      f"on connection from {raddr}.")
            self._drop_half_open(rs)
        if version > proto.PROTO_VERSION:
            log.info(f"Remote protocol version {version} is not supported, falling back to "
                     f"version {proto.PROTO_VERSION}.")
            version = proto.PROTO_VERSION
        log.debug(1, f"Negotiated protocol version {version}.")
        rs.version = version
        rs.token = os.urandom(HAST_TOKEN_SIZE)
        reply = nvmod.NV().add_uint8("version", version).add_uint8_array("token", rs.token)
        try:
            conn.settimeout(HAST_TIMEOUT)
            proto.send_frame(conn, rs.version, reply)
        except OSError as exc:
            err = log.exc_errno(exc)
            log.error(f"Unable to send response to {raddr}", err)
            rs.token = None
            self._send_error(conn, raddr,
                             f"Remote node was unable to send response: {log.strerror(err)}.")
            return
        conn.setblocking(True)
        rs.remotein = conn
        log.debug(1, f"Incoming connection from {raddr} configured.")

    def _step2(self, rs: ResourceState, conn: socket.socket, raddr: str,
               nvin: nvmod.NV) -> None:
        log.debug(1, f"Outgoing connection to {raddr} configured.")
        remotein, rs.remotein, rs.token = rs.remotein, None, None
        assert remotein is not None
        try:
            handle = worker.spawn(self.running_config(), rs.res, "secondary", self.debug,
                                  self.foreground, remotein=remotein, remoteout=conn,
                                  handshake=nvin, version=rs.version)
        except OSError as exc:
            log.error("Unable to fork", log.exc_errno(exc))
            return
        finally:
            # The worker has its own copies now (or nobody needs them).
            remotein.close()
            conn.close()
        self._attach_worker(rs, handle)

    def _send_error(self, conn: socket.socket, raddr: str, errmsg: str,
                    wait: bool = False) -> None:
        """An error frame (§6.5): ``errmsg`` and maybe ``wait``, then the connection is closed."""
        msg = nvmod.NV().add_string("errmsg", errmsg)
        if wait:
            msg.add_uint8("wait", 1)
        with conn:
            try:
                conn.settimeout(HAST_TIMEOUT)
                proto.send_frame(conn, proto.PROTO_VERSION, msg)
            except OSError as exc:
                log.error(f"Unable to send error to {raddr}", log.exc_errno(exc))

    def _drop_half_open(self, rs: ResourceState) -> None:
        if rs.remotein is not None:
            rs.remotein.close()
        rs.remotein = None
        rs.token = None

    # -- workers ----------------------------------------------------------------------------

    def running_config(self) -> Config:
        """The running configuration in hast.config's shape, for a worker to start from."""
        return Config(path=self.cfgpath, control=self.control_addr, pidfile=self.pidfile_path,
                      listen=list(self.listens),
                      resources={name: rs.res for name, rs in self.resources.items()})

    def _attach_worker(self, rs: ResourceState, handle: worker.WorkerHandle) -> None:
        assert self.sel is not None
        rs.worker = handle
        handle.event.setblocking(False)
        self.sel.register(handle.event, selectors.EVENT_READ, ("event", rs))
        rs.event_open = True

    def _close_event(self, rs: ResourceState) -> None:
        if rs.worker is None or not rs.event_open:
            return
        if self.sel is not None:
            try:
                self.sel.unregister(rs.worker.event)
            except (KeyError, ValueError):
                pass
        rs.worker.event.close()
        rs.event_open = False

    def _child_cleanup(self, rs: ResourceState) -> None:
        self._close_event(rs)
        if rs.worker is not None:
            rs.worker.close()
        rs.worker = None

    def _start_primary(self, rs: ResourceState) -> None:
        """hastd_primary(): fork the primary worker for ``rs``."""
        rs.restart_at = None
        try:
            handle = worker.spawn(self.running_config(), rs.res, "primary", self.debug,
                                  self.foreground)
        except OSError as exc:
            log.error("Unable to fork", log.exc_errno(exc))
            rs.role = "init"
            log.info("Changing resource role back to init.")
            return
        self._attach_worker(rs, handle)

    def _wait_worker(self, handle: worker.WorkerHandle, timeout: float) -> int:
        """Popen-style returncode of a signalled worker; SIGKILL after ``timeout`` seconds."""
        try:
            return handle.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning(f"Worker process {handle.pid} did not exit within {int(timeout)} "
                        "seconds, killing it.")
            try:
                os.kill(handle.pid, signal.SIGKILL)
            except OSError:
                pass
            return handle.process.wait()

    def _stop_worker(self, rs: ResourceState, sig: int, replacing: bool = False) -> None:
        """Stop the worker of ``rs`` synchronously (FreeBSD blocks the whole daemon too)."""
        handle = rs.worker
        assert handle is not None
        pid = handle.pid
        self._close_event(rs)
        try:
            os.kill(pid, sig)
        except OSError as exc:
            if replacing:
                log.error(f"Unable to stop worker process (pid={pid})", log.exc_errno(exc))
            else:
                log.warning(f"Unable to kill worker process {pid}", log.exc_errno(exc))
        else:
            try:
                returncode = self._wait_worker(handle, STOP_TIMEOUT)
            except OSError as exc:
                if replacing:
                    log.error(f"Waiting for worker process (pid={pid}) failed",
                              log.exc_errno(exc))
                else:
                    log.warning(f"Error while waiting for worker process {pid}",
                                log.exc_errno(exc))
            else:
                if replacing:
                    _log_exit(pid, returncode)
                else:
                    log.debug(1, f"Worker process {pid} stopped.")
        self._child_cleanup(rs)

    def child_exit(self) -> None:
        """SIGCHLD: reap every exited child; workers get the restart/revert rules, hooks a log."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            rs = next((r for r in self.resources.values()
                       if r.worker is not None and r.worker.pid == pid), None)
            if rs is None:
                # A hook (or a worker we already stopped and waited for).
                hooks.reap(pid, status)
                continue
            assert rs.worker is not None
            returncode = os.waitstatus_to_exitcode(status)
            rs.worker.process.returncode = returncode  # keep Popen from waiting again
            log.set_prefix(f"[{rs.name}] ({rs.role}) ")
            try:
                _log_exit(pid, returncode)
                self._child_cleanup(rs)
                if rs.role == "primary":
                    # Killed by a signal or a temporary problem: try again.
                    if returncode < 0 or returncode == EX_TEMPFAIL:
                        rs.restart_at = time.monotonic() + RESTART_DELAY
                    else:
                        rs.role = "init"
                        log.info("Changing resource role back to init.")
            finally:
                log.set_prefix("")

    def _run_restarts(self, now: float) -> None:
        for rs in list(self.resources.values()):
            if rs.restart_at is None or rs.restart_at > now:
                continue
            rs.restart_at = None
            if rs.role != "primary" or rs.worker is not None:
                continue
            log.set_prefix(f"[{rs.name}] ({rs.role}) ")
            try:
                log.info("Restarting worker process.")
                self._start_primary(rs)
            finally:
                log.set_prefix("")

    def _event(self, rs: ResourceState) -> None:
        """event_recv(): run the hook for a worker's event, then let the worker go on."""
        handle = rs.worker
        if handle is None:
            return
        try:
            handle.event.settimeout(HAST_TIMEOUT)
            version, msg = proto.recv_frame(handle.event, proto.MAX_NV_CONTROL)
        except (OSError, ValueError) as exc:
            # Most likely the worker exited; SIGCHLD tells the rest.
            err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
            log.debug(1, "Unable to receive event header", err)
            self._close_event(rs)
            return
        event = msg.get_uint8("event")
        if event == worker.EVENT_NONE:
            log.error("Event header is missing 'event' field.")
            self._close_event(rs)
            return
        name = worker.EVENT_NAMES.get(event)
        if name is None:
            log.error(f"Event header contain invalid event number ({event}).")
            self._close_event(rs)
            return
        log.set_prefix(f"[{rs.name}] ({rs.role}) ")
        try:
            hooks.run(rs.res.exec, name, rs.name)
        finally:
            log.set_prefix("")
        try:
            proto.send_frame(handle.event, version, nvmod.NV().add_int16("error", 0))
        except OSError as exc:
            log.error("Unable to send event header", log.exc_errno(exc))
            self._close_event(rs)
            return
        handle.event.setblocking(False)

    # -- roles (control.DaemonView) -----------------------------------------------------------

    def set_role(self, rs: control.ResourceView, role: str) -> None:
        """control_set_role(): switch ``rs`` to ``role``; no-op when it already has it."""
        assert isinstance(rs, ResourceState)
        if role == rs.role:
            return
        log.set_prefix(f"[{rs.name}] ({rs.role}) ")
        log.info(f"Role changed to {role}.")
        oldrole, rs.role = rs.role, role
        log.set_prefix(f"[{rs.name}] ({rs.role}) ")
        try:
            if rs.worker is not None:
                self._stop_worker(rs, signal.SIGTERM)
            # A half-open connection belonged to the secondary we no longer are.
            self._drop_half_open(rs)
            rs.restart_at = None
            if role == "primary":
                self._start_primary(rs)
        finally:
            log.set_prefix("")
        hooks.run(rs.res.exec, "role", rs.name, oldrole, rs.role)

    # -- SIGHUP -------------------------------------------------------------------------------

    def reload(self) -> None:
        """hastd_reload(): apply a changed hast.conf, or keep everything if anything fails."""
        log.info("Reloading configuration...")
        try:
            newcfg = configmod.load(self.cfgpath)
        except ConfigError as exc:
            _log_config_error(exc)
            log.warning("Configuration not reloaded.")
            return
        new_control: socket.socket | None = None
        opened: dict[str, socket.socket] = {}
        new_listens: dict[str, socket.socket] = {}
        new_pidfile: PidFile | None = None
        try:
            if newcfg.control != self.control_addr:
                try:
                    new_control = proto.listen(newcfg.control)
                except (OSError, ValueError) as exc:
                    log.error(f"Unable to listen on control address {newcfg.control}",
                              _errno_of(exc))
                    raise _ReloadFailed from None
            for addr in newcfg.listen:
                if addr in new_listens:
                    continue
                if addr in self.listens:
                    log.info(f"Keep listening on address {addr}.")
                    new_listens[addr] = self.listens[addr]
                    continue
                try:
                    sock = proto.listen(addr)
                except (OSError, ValueError) as exc:
                    log.warning(f"Unable to listen on address {addr}", _errno_of(exc))
                    continue
                log.info(f"Listening on new address {addr}.")
                opened[addr] = new_listens[addr] = sock
            if not new_listens:
                log.error("No addresses to listen on.")
                raise _ReloadFailed
            if (not self.foreground and self.pidfile_override is None
                    and newcfg.pidfile != self.pidfile_path):
                try:
                    new_pidfile = PidFile.open(newcfg.pidfile)
                except PidFileBusy as exc:
                    log.warning(f"Another hastd is already running, pidfile: {exc.path}, "
                                f"pid: {exc.pid}.")
                except OSError as exc:
                    log.warning(f"Unable to open or create pidfile {newcfg.pidfile}",
                                log.exc_errno(exc))
                if new_pidfile is not None:
                    try:
                        new_pidfile.write()
                    except OSError as exc:
                        log.warning(f"Unable to write PID to file {newcfg.pidfile}",
                                    log.exc_errno(exc))
                    else:
                        log.debug(1, f"PID stored in {newcfg.pidfile}.")
        except _ReloadFailed:
            if new_control is not None:
                _close_listener(new_control, newcfg.control)
            for addr, sock in opened.items():
                _close_listener(sock, addr)
            if new_pidfile is not None:
                new_pidfile.remove()
            log.warning("Configuration not reloaded.")
            return
        self._commit_sockets(newcfg, new_control, new_listens, opened, new_pidfile)
        self._reload_resources(newcfg)
        log.info("Configuration reloaded successfully.")

    def _commit_sockets(self, newcfg: Config, new_control: socket.socket | None,
                        new_listens: dict[str, socket.socket], opened: dict[str, socket.socket],
                        new_pidfile: PidFile | None) -> None:
        assert self.sel is not None
        if new_control is not None:
            log.info(f"Control socket changed from {self.control_addr} to {newcfg.control}.")
            self.sel.unregister(self.control_sock)
            if _same_uds(self.control_addr, newcfg.control):
                # Same file spelled differently: it belongs to the new socket now.
                self.control_sock.close()
            else:
                _close_listener(self.control_sock, self.control_addr)
            self.control_sock, self.control_addr = new_control, newcfg.control
            new_control.setblocking(False)
            self.sel.register(new_control, selectors.EVENT_READ, ("control", None))
        if new_pidfile is not None:
            log.info(f"Pidfile changed from {self.pidfile_path} to {newcfg.pidfile}.")
            if self.pidfile is not None:
                self.pidfile.remove()
            self.pidfile, self.pidfile_path = new_pidfile, newcfg.pidfile
        for addr, sock in self.listens.items():
            if addr not in new_listens:
                self.sel.unregister(sock)
                _close_listener(sock, addr)
                log.info(f"No longer listening on address {addr}.")
        for addr, sock in opened.items():
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, ("listen", addr))
        self.listens = new_listens

    def _reload_resources(self, newcfg: Config) -> None:
        for name in [n for n in self.resources if n not in newcfg.resources]:
            self.set_role(self.resources[name], "init")
            del self.resources[name]
            log.info(f"Resource {name} removed.")
        for name, res in newcfg.resources.items():
            if name not in self.resources:
                self.resources[name] = ResourceState(res)
                log.info(f"Resource {name} added.")
        for name, res in newcfg.resources.items():
            rs = self.resources[name]
            if restart_needed(rs.res, res, rs.role):
                log.info(f"Resource {name} configuration was modified, restarting it.")
                role = rs.role
                self.set_role(rs, "init")
                # As FreeBSD, the restarted resource moves to the end of the list.
                del self.resources[name]
                fresh = ResourceState(res)
                self.resources[name] = fresh
                self.set_role(fresh, role)
            elif reload_needed(rs.res, res, rs.role):
                log.info(f"Resource {name} configuration was modified, reloading it.")
                rs.res = res
                if rs.worker is not None:
                    self._resource_reload(rs)
            else:
                rs.res = res

    def _resource_reload(self, rs: ResourceState) -> None:
        """resource_reload(): push the new settings to a primary worker (CONTROL_RELOAD)."""
        handle = rs.worker
        assert handle is not None
        res = rs.res
        msg = nvmod.NV().add_uint8("cmd", worker.CONTROL_RELOAD)
        msg.add_string("remoteaddr", res.remote)
        msg.add_string("sourceaddr", res.source)
        msg.add_int32("replication", _REPLICATION.get(res.replication, -1))
        msg.add_int32("checksum", _CHECKSUM.get(res.checksum, -1))
        msg.add_int32("compression", _COMPRESSION.get(res.compression, -1))
        msg.add_int32("timeout", res.timeout)
        msg.add_string("exec", res.exec)
        msg.add_int32("metaflush", int(res.metaflush))
        handle.ctrl.settimeout(HAST_TIMEOUT)
        try:
            proto.send_frame(handle.ctrl, proto.PROTO_VERSION, msg)
        except OSError as exc:
            log.error("Unable to send reload message", log.exc_errno(exc))
            return
        try:
            _version, reply = proto.recv_frame(handle.ctrl, proto.MAX_NV_CONTROL)
        except (OSError, ValueError) as exc:
            log.error("Unable to receive reload reply", _errno_of(exc))
            return
        error = reply.get_int16("error")
        if error:
            log.error("Reload failed", error)

    # -- SIGINT/SIGTERM ---------------------------------------------------------------------

    def terminate(self) -> None:
        """Stop every worker, close the sockets, remove the pidfile; run() then returns 0."""
        log.info("Termination signal received, exiting.")
        stopping: list[tuple[ResourceState, worker.WorkerHandle]] = []
        for rs in self.resources.values():
            if rs.worker is None:
                continue
            what = f"resource={rs.name}, role={rs.role}, pid={rs.worker.pid}"
            log.info(f"Terminating worker process ({what}).")
            self._close_event(rs)
            try:
                os.kill(rs.worker.pid, signal.SIGTERM)
            except OSError as exc:
                log.warning(f"Unable to send signal to worker process ({what})",
                            log.exc_errno(exc))
                continue
            stopping.append((rs, rs.worker))
        deadline = time.monotonic() + STOP_TIMEOUT
        for rs, handle in stopping:
            try:
                self._wait_worker(handle, max(0.0, deadline - time.monotonic()))
            except OSError:
                pass
            self._child_cleanup(rs)
        self.close()
        self._stopped = True

    def close(self) -> None:
        """Release every descriptor and file the daemon owns (control socket, pidfile...)."""
        for pending in list(self.pending.values()):
            self._drop_pending(pending)
        for rs in self.resources.values():
            self._drop_half_open(rs)
        for addr, sock in self.listens.items():
            _close_listener(sock, addr)
        _close_listener(self.control_sock, self.control_addr)
        if self.pidfile is not None:
            self.pidfile.remove()
            self.pidfile = None
        if self._sigpipe is not None:
            signal.set_wakeup_fd(-1)
            for fd in self._sigpipe:
                os.close(fd)
            self._sigpipe = None
        if self.sel is not None:
            self.sel.close()
        hooks.fini()


# -- start-up ------------------------------------------------------------------------------------

def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return getattr(exc, "errno", None) or errno.EINVAL


def _log_config_error(exc: ConfigError) -> None:
    """FreeBSD's line, then py-hast's ``<file>:<line>: <message>`` when it tells more."""
    log.error(exc.message)
    detail = exc.detail
    if detail and detail != exc.message and (
            exc.lineno is not None or not exc.path or exc.path not in exc.message):
        log.error(detail)


def _daemonize() -> None:
    """daemon(0, 0), done as a double fork so the daemon can never regain a terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """hastd's main(): ``argv`` without the program name; returns the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    if prog is None:
        prog = getprogname(sys.argv[0] if sys.argv else "")
    try:
        return _main(list(argv), prog)
    except _Exit as exc:
        return exc.code
    finally:
        sys.stdout.flush()


def _main(argv: list[str], prog: str) -> int:
    cfgpath = configmod.DEFAULT_CONFIG
    debug = 0
    foreground = False
    pidfile_override: str | None = None
    for opt, value in _getopt(argv, prog):
        if opt == "c":
            cfgpath = value
        elif opt == "d":
            debug += 1
        elif opt == "F":
            foreground = True
        elif opt == "P":
            pidfile_override = value
        else:  # -h
            raise _usage(prog)

    log.init(log.MODE_STD)
    log.set_prefix("")
    log.set_debug(debug)

    # Relative paths would break after daemon() changes to /; resolve them now.
    if not cfgpath.startswith("/"):
        try:
            cfgpath = os.path.realpath(cfgpath, strict=True)
        except OSError as exc:
            log.error(f"Unable to obtain full path of {cfgpath}", log.exc_errno(exc))
            return EX_CONFIG
    try:
        cfg = configmod.load(cfgpath)
    except ConfigError as exc:
        _log_config_error(exc)
        return exc.exitcode

    if pidfile_override is not None:
        if len(pidfile_override.encode()) >= _MAXPATHLEN:
            log.error("Pidfile path is too long.")
            return EX_CONFIG
        cfg.pidfile = pidfile_override
    pidfile: PidFile | None = None
    if pidfile_override is not None or not foreground:
        try:
            pidfile = PidFile.open(cfg.pidfile)
        except PidFileBusy as exc:
            log.error(f"Another hastd is already running, pidfile: {exc.path}, "
                      f"pid: {exc.pid}.")
            return EX_TEMPFAIL
        except OSError as exc:
            # Only a warning: hastd runs without a pidfile then.
            log.warning(f"Unable to open or create pidfile {cfg.pidfile}", log.exc_errno(exc))

    def fail(text: str, exc: BaseException) -> int:
        if pidfile is not None:
            pidfile.remove()
        log.error(text, _errno_of(exc))
        return EX_OSERR

    try:
        control_sock = proto.listen(cfg.control)
    except (OSError, ValueError) as exc:
        return fail(f"Unable to listen on control address {cfg.control}", exc)
    listens: dict[str, socket.socket] = {}
    for addr in cfg.listen:
        if addr in listens:
            continue
        try:
            listens[addr] = proto.listen(addr)
        except (OSError, ValueError) as exc:
            for other, sock in listens.items():
                _close_listener(sock, other)
            _close_listener(control_sock, cfg.control)
            return fail(f"Unable to listen on address {addr}", exc)

    daemon = Daemon(cfg, cfgpath, foreground=foreground, debug=debug,
                    pidfile_override=pidfile_override, pidfile=pidfile,
                    control_sock=control_sock, listens=listens)
    # Signals that arrive from now on are queued for the loop, as FreeBSD masks them here.
    daemon.install_signals()

    if not foreground:
        try:
            _daemonize()
        except OSError as exc:
            return fail("Unable to daemonize", exc)
        log.init(log.MODE_SYSLOG, "hastd")
    if pidfile is not None:
        try:
            pidfile.write()
        except OSError as exc:
            log.warning(f"Unable to write PID to a file {cfg.pidfile}", log.exc_errno(exc))
        else:
            log.debug(1, f"PID stored in {cfg.pidfile}.")

    log.info(f"Started successfully, running protocol version {proto.PROTO_VERSION}.")
    log.debug(1, f"Listening on control address {cfg.control}.")
    for addr in listens:
        log.info(f"Listening on address {addr}.")

    hooks.init(foreground)
    return daemon.run()

if __name__ == "__main__":
    sys.exit(main())
