"""control: the hastctl <-> hastd control protocol, both ends (hast-internals.md §12.4).

The input is what a client writes on the control socket.  It goes, each time, to:

* a real hastd (:class:`fuzz.hastd.Hastd`) over its UNIX control socket.  The daemon must
  answer with one well-formed frame or close the connection, within seconds, and stay alive;
  every ``check()`` also asks it for a STATUS and counts its descriptors.  A SETROLE to
  ``primary`` is turned into ``secondary`` before sending (one byte of the nv): a primary
  worker would start a block-device frontend, which is not what is being tested here, and
  the in-process half below takes that path;
* ``hast.control.handle`` in-process, against a fake daemon with a worker that answers
  STATUS: the reply must pack (the daemon sends it) and decode to itself;
* hastctl's side: ``format_list``/``format_status``/``reply_to_json`` render both that reply
  and the input's own nv read as a reply (a hostile or buggy hastd); they must not raise.

Nothing here is an expected rejection: the daemon answers or hangs up, it never raises.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from hypothesis import strategies as st

from fuzz import reference
from fuzz.common import Finding, load_seeds, recv_until_eof
from fuzz.hastd import Hastd
from fuzz.strategies import frames, from_seeds
from hast import control, proto
from hast import nv as nvmod
from hast.config import Resource

EXPECTED: tuple[type[BaseException], ...] = ()
MAX_LEN = 64 * 1024
_FIELDS = (("cmd", 2), ("role", 2), ("resource0", 17), ("resource1", 17), ("resource2", 17),
           ("error", 3))

_daemon: Hastd | None = None
_previous = b""


def seeds() -> list[bytes]:
    return load_seeds("control")


def strategy() -> st.SearchStrategy[bytes]:
    return from_seeds(seeds(), MAX_LEN, frames(_FIELDS, max_frames=1, payload_max=8))


def setup() -> None:
    global _daemon
    if _daemon is None:
        _daemon = Hastd()
        _daemon.start()


def teardown() -> None:
    global _daemon
    if _daemon is not None:
        _daemon.close()
        _daemon = None


def check() -> None:
    if _daemon is not None:
        _daemon.check()


# -- in-process: control.handle() against a fake daemon -----------------------------------------

def _resource(name: str) -> Resource:
    return Resource(name=name, provname=name, local=f"/dev/{name}", remote="tcp4://10.0.0.2",
                    source="", replication="fullsync", checksum="crc32", compression="hole",
                    timeout=20, exec="", metaflush=True)


class _Worker:
    def __init__(self, answer: nvmod.NV | None) -> None:
        self.pid = 4242
        self.answer = answer

    def request(self, msg: nvmod.NV, timeout: float = 20.0) -> nvmod.NV:
        if self.answer is None:
            raise TimeoutError("worker does not answer")
        return self.answer


@dataclass
class _Res:
    res: Resource
    role: str
    worker: _Worker | None


class _Daemon:
    def __init__(self) -> None:
        good = nvmod.NV().add_string("status", "complete").add_uint64("dirty", 1 << 63)
        good.add_uint32("extentsize", 2 << 20).add_int16("error", 0)
        odd = nvmod.NV().add_uint64("status", 1).add_string("dirty", "x")
        self.resources = {
            "test": _Res(_resource("test"), "secondary", _Worker(good)),
            "other": _Res(_resource("other"), "init", None),
            "odd": _Res(_resource("odd"), "primary", _Worker(odd)),
            "gone": _Res(_resource("gone"), "primary", _Worker(None)),
        }

    def set_role(self, rs: _Res, role: str) -> None:
        rs.role = role


def _render(reply: nvmod.NV) -> None:
    """hastctl list / status / --json on a reply."""
    control.format_list(reply)
    control.format_status(reply)
    control.reply_to_json(reply)


def _in_process(data: bytes) -> None:
    if len(data) < proto.HEADER_SIZE:
        return
    _version, size = proto.HEADER.unpack_from(data)
    try:
        request = nvmod.NV.unpack(data[proto.HEADER_SIZE:proto.HEADER_SIZE + size])
    except nvmod.NVError:
        return              # the frame layer drops it (target "frame")
    _render(request)
    reply = control.handle(_Daemon(), request)   # type: ignore[arg-type]
    if reply is None:
        return
    try:
        blob = reply.pack()
    except Exception as exc:
        raise Finding(f"control reply cannot be sent: {exc!r} for {request!r}") from exc
    if nvmod.NV.unpack(blob) != reply:
        raise Finding(f"control reply does not decode to itself: {reply!r}")
    _render(reply)


# -- the real daemon ------------------------------------------------------------------------------

def _harmless(data: bytes) -> bytes:
    """The same request with SETROLE primary turned into SETROLE secondary."""
    frames_, _why = reference.split_frames(data, proto.MAX_NV_CONTROL, 1 << 32)
    if not frames_ or frames_[0].records is None:
        return data
    records = frames_[0].records
    role = reference.nv_lookup(records, b"role", 2)
    if reference.nv_int(records, b"cmd", 2) != 1 or role is None or role.data != b"\x02":
        return data
    at = proto.HEADER_SIZE + role.data_offset
    return data[:at] + b"\x03" + data[at + 1:]


def _real(data: bytes) -> None:
    global _previous
    assert _daemon is not None
    if not _daemon.alive():
        # It died after answering the previous input (a crash closes the connection
        # before the process is gone): that input is the culprit.
        raise _daemon.restart_after_death(_previous)
    _previous = data
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(str(_daemon.control))
    except OSError as exc:
        sock.close()
        if not _daemon.alive():
            raise _daemon.restart_after_death() from None
        raise Finding(f"control socket refuses a connection: {exc!r}") from None
    with sock:
        try:
            sock.sendall(_harmless(data))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass            # the daemon may hang up before reading everything
        out = recv_until_eof(sock, 10.0)
    if not _daemon.alive():
        raise _daemon.restart_after_death(data)
    _daemon.check_log(data)
    if out is None:
        raise Finding("control connection neither answered nor closed within 10 s")
    if not out:
        return
    if len(out) < proto.HEADER_SIZE:
        raise Finding(f"truncated control reply: {out!r}")
    _version, size = proto.HEADER.unpack_from(out)
    if proto.HEADER_SIZE + size != len(out):
        raise Finding(f"control reply of {len(out)} bytes for an nv of {size}")
    try:
        reply = nvmod.NV.unpack(out[proto.HEADER_SIZE:])
    except nvmod.NVError as exc:
        raise Finding(f"control reply is malformed: {exc}") from None
    _render(reply)


def one_input(data: bytes) -> None:
    setup()
    _real(data)
    _in_process(data)
