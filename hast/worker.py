"""worker: one process per active resource, as hastd forks one per resource.

The parent (hast.daemon) never touches data: a primary or secondary worker owns the provider,
the replication connections and, on a primary, the frontend.  We start workers as a fresh
interpreter (``python -m hast.worker``) rather than a bare fork(): the parent's state stays
out of the worker, and argv[0] becomes FreeBSD's process title ``hastd: <res> (<role>)``, which
failover scripts look for with ``pgrep -f``.

Parent and worker talk as in FreeBSD over two socketpairs carrying hast_proto frames:
``ctrl`` (parent -> worker: STATUS = 10, RELOAD = 11) and ``event`` (worker -> parent: one
``event`` per hook-worthy event; the parent answers ``error`` once the hook is started).

Privileges (hast.privsep, doc/security.md).  A worker process calls
:meth:`WorkerContext.drop_privileges` once it has opened everything it needs, as FreeBSD's
workers call drop_privs().  Where it drops:

* the **secondary** worker, on every OS: its last open is the provider (then it only uses
  descriptors it holds), and FreeBSD drops right before starting the ctrl thread, so
  :meth:`WorkerContext.serve_control` does it first for a secondary;
* the **primary** worker on FreeBSD, after /dev/hast/<name> exists (its ggate descriptor is
  all it needs to destroy it later) -- once hast.primary calls drop_privileges() there --
  to the ``hast`` user but without jail/chroot: unlike FreeBSD's, whose parent opens the
  replication connections for it, ours connects and resolves ``remote`` itself;
* never the primary on Linux: its frontend mounts nbdfuse, binds a loop device and makes the
  /dev/hast symlink when it starts *and* undoes all three when it is demoted, which needs
  root in the worker until that lifecycle moves to the parent.

Only a real worker process (``python -m hast.worker``) drops anything: a WorkerContext made
in-process (tests) leaves the caller's credentials alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from hast import log, privsep, proto
from hast import nv as nvmod
from hast.config import Config, Resource
from hast.sysexits import EX_CONFIG

# worker -> parent events (event.h); the names are the hook arguments
EVENT_NONE, EVENT_CONNECT, EVENT_DISCONNECT = 0, 1, 2
EVENT_SYNCSTART, EVENT_SYNCDONE, EVENT_SYNCINTR, EVENT_SPLITBRAIN = 3, 4, 5, 6
EVENT_NAMES = {
    EVENT_CONNECT: "connect", EVENT_DISCONNECT: "disconnect", EVENT_SYNCSTART: "syncstart",
    EVENT_SYNCDONE: "syncdone", EVENT_SYNCINTR: "syncintr", EVENT_SPLITBRAIN: "split-brain",
}

# parent -> worker control commands (control.h)
CONTROL_STATUS = 10
CONTROL_RELOAD = 11

_SPEC_ENV = "HAST_WORKER_SPEC"


@dataclass
class WorkerContext:
    """What a worker gets from its parent: the running configuration and its channels."""

    config: Config
    resource: Resource
    role: str                       # "primary" or "secondary"
    debug: int = 0
    foreground: bool = False
    ctrl: socket.socket | None = None
    event: socket.socket | None = None
    remotein: socket.socket | None = None    # secondary: connection #1 (requests)
    remoteout: socket.socket | None = None   # secondary: connection #2 (replies)
    handshake: nvmod.NV | None = None        # secondary: handshake step 2 as received
    version: int = proto.PROTO_VERSION       # negotiated protocol version
    sandbox: bool = False                    # a worker process: drop_privileges() acts
    privileges_dropped: bool = False         # drop_privileges() changed the credentials
    _event_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _sandbox_done: bool = False

    def drop_privileges(self) -> None:
        """FreeBSD's drop_privs() once the worker holds all it needs; idempotent.

        Exits with EX_CONFIG (78) when a required step fails, as FreeBSD's workers do.
        """
        if not self.sandbox or self._sandbox_done:
            return
        self._sandbox_done = True
        if not worker_drops_privileges(self.role):
            log.debug(1, "Privileges kept: the Linux primary creates and destroys "
                      "/dev/hast devices.")
            return
        stuck = privsep.proc_reopen_fds()
        if stuck:
            # hast._io would reopen these through /proc/self/fd; see privsep.needs_proc_reopen.
            log.warning(f"Privileges not dropped: direct I/O on descriptor {stuck[0]} needs "
                        "more than 512-byte alignment.")
            return
        # FreeBSD's primary gets its connections from the parent, so it can be jailed
        # without network; ours connects (and resolves ``remote``) itself: no jail/chroot.
        chroot_dir = "" if self.role == "primary" else None
        try:
            dropped = privsep.drop_privileges(
                chroot_dir=chroot_dir, hostname=title(self.resource.name, self.role))
        except privsep.PrivsepError:
            raise SystemExit(EX_CONFIG) from None
        if dropped is not None:
            self.privileges_dropped = True
            log.info("Privileges successfully dropped.")

    def emit(self, event: int) -> None:
        """Tell the parent (which runs the hook) and wait until it has, as FreeBSD does."""
        if self.event is None:
            return
        with self._event_lock:
            try:
                proto.send_frame(self.event, self.version, nvmod.NV().add_uint8("event", event))
                proto.recv_frame(self.event, proto.MAX_NV_CONTROL)
            except OSError as exc:
                log.warning(f"Unable to send event to the parent: {exc.strerror or exc}.")

    def serve_control(self, status: Callable[[], nvmod.NV],
                      reload: Callable[[nvmod.NV], int] | None = None) -> threading.Thread:
        """Answer the parent's STATUS/RELOAD on a daemon thread (FreeBSD's ctrl_thread).

        A secondary drops its privileges first, as FreeBSD's does right before this thread.
        """
        if self.role == "secondary":
            self.drop_privileges()

        def loop() -> None:
            assert self.ctrl is not None
            while True:
                try:
                    _version, req = proto.recv_frame(self.ctrl, proto.MAX_NV_CONTROL)
                except OSError:
                    # the parent is gone: nothing may run without it (FreeBSD SIGTERMs itself)
                    os.kill(os.getpid(), 15)
                    return
                cmd = req.get_uint8("cmd")
                if cmd == CONTROL_STATUS:
                    reply = status()
                    reply.add_int16("error", 0)
                elif cmd == CONTROL_RELOAD and reload is not None:
                    reply = nvmod.NV().add_int16("error", reload(req))
                else:
                    reply = nvmod.NV().add_int16("error", 22)  # EINVAL
                try:
                    proto.send_frame(self.ctrl, self.version, reply)
                except OSError:
                    os.kill(os.getpid(), 15)
                    return

        thread = threading.Thread(target=loop, name="ctrl", daemon=True)
        if self.ctrl is not None:
            thread.start()
        return thread


@dataclass
class WorkerHandle:
    """The parent's side of a running worker."""

    process: subprocess.Popen
    role: str
    ctrl: socket.socket
    event: socket.socket

    @property
    def pid(self) -> int:
        return self.process.pid

    def request(self, msg: nvmod.NV, timeout: float = 20.0) -> nvmod.NV:
        self.ctrl.settimeout(timeout)
        proto.send_frame(self.ctrl, proto.PROTO_VERSION, msg)
        return proto.recv_frame(self.ctrl, proto.MAX_NV_CONTROL)[1]

    def close(self) -> None:
        for sock in (self.ctrl, self.event):
            sock.close()


def worker_drops_privileges(role: str) -> bool:
    """Whether a worker of ``role`` gives up root on this OS (see the module docstring)."""
    return role == "secondary" or not privsep.IS_LINUX


def title(resource: str, role: str) -> str:
    return f"hastd: {resource} ({role})"


def spawn(config: Config, resource: Resource, role: str, debug: int = 0,
          foreground: bool = False, remotein: socket.socket | None = None,
          remoteout: socket.socket | None = None, handshake: nvmod.NV | None = None,
          version: int = proto.PROTO_VERSION) -> WorkerHandle:
    ctrl_parent, ctrl_child = socket.socketpair()
    event_parent, event_child = socket.socketpair()
    fds = {"ctrl": ctrl_child.fileno(), "event": event_child.fileno()}
    if remotein is not None:
        fds["remotein"] = remotein.fileno()
    if remoteout is not None:
        fds["remoteout"] = remoteout.fileno()
    spec = {
        "config": dataclasses.asdict(config),
        "resource": resource.name,
        "role": role,
        "debug": debug,
        "foreground": foreground,
        "fds": fds,
        "handshake": handshake.pack().hex() if handshake is not None else None,
        "version": version,
    }
    # the worker imports hast from wherever the parent did (hastd may have chdir'ed to /)
    pkgroot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pythonpath = os.pathsep.join(p for p in (pkgroot, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, **{_SPEC_ENV: json.dumps(spec), "PYTHONPATH": pythonpath})
    try:
        process = subprocess.Popen(
            [title(resource.name, role), "-m", "hast.worker"], executable=sys.executable,
            pass_fds=list(fds.values()), env=env, close_fds=True,
            stdin=subprocess.DEVNULL,
            stdout=None if foreground else subprocess.DEVNULL,
            stderr=None if foreground else subprocess.DEVNULL)
    finally:
        ctrl_child.close()
        event_child.close()
    return WorkerHandle(process, role, ctrl_parent, event_parent)


def _context_from_env() -> WorkerContext:
    spec = json.loads(os.environ.pop(_SPEC_ENV))
    raw = spec["config"]
    resources = {name: Resource(**fields) for name, fields in raw.pop("resources").items()}
    config = Config(**raw, resources=resources)
    fds = spec["fds"]

    def sock(key: str) -> socket.socket | None:
        return socket.socket(fileno=fds[key]) if key in fds else None

    handshake = spec["handshake"]
    return WorkerContext(
        config=config, resource=resources[spec["resource"]], role=spec["role"],
        debug=spec["debug"], foreground=spec["foreground"], ctrl=sock("ctrl"),
        event=sock("event"), remotein=sock("remotein"), remoteout=sock("remoteout"),
        handshake=nvmod.NV.unpack(bytes.fromhex(handshake)) if handshake else None,
        version=spec["version"], sandbox=True)


def _set_comm(name: str) -> None:
    """Linux keeps a 15-byte task name apart from argv; make ``ps -o comm`` say hastd too."""
    try:
        from hast import _os  # type: ignore[attr-defined]
    except ImportError:
        return
    if hasattr(_os.lib, "prctl"):
        _os.lib.prctl(_os.lib.PR_SET_NAME, _os.ffi.cast("unsigned long",
                      _os.ffi.from_buffer(name.encode()[:15] + b"\0")), 0, 0, 0)


def main() -> int:
    ctx = _context_from_env()
    log.init(log.MODE_STD if ctx.foreground else log.MODE_SYSLOG, "hastd")
    log.set_debug(ctx.debug)
    log.set_prefix(f"[{ctx.resource.name}] ({ctx.role}) ")
    _set_comm("hastd")
    if ctx.role == "primary":
        from hast import primary
        return primary.run(ctx)
    from hast import secondary
    return secondary.run(ctx)


if __name__ == "__main__":
    sys.exit(main())
