"""control: hastctl <-> hastd over the control socket, both ends (FreeBSD control.c, hastctl.c).

The control protocol is part of py-hast's compatibility surface: FreeBSD's hastctl must be able
to drive our hastd and our hastctl FreeBSD's hastd, and bsnmpd's snmp_hast reads the same
reply.  So every name and nv type here is FreeBSD's (hast-internals.md §12.4):

* One request, one reply per connection, both hast_proto frames with version byte 2.
* Request: ``cmd`` (uint8: 1 SETROLE, 2 STATUS), ``role`` (uint8: 1 init, 2 primary,
  3 secondary; SETROLE only), ``resource0``, ``resource1``, ... (string); ``resource0 = "all"``
  selects every resource in the running configuration, in its order.
* Reply: per resource ``resource<i>`` and either ``error<i>`` (int16 EHAST_*) or the data:
  SETROLE answers the *previous* ``role<i>``; STATUS answers the configuration fields, the role,
  ``workerpid<i>`` (int32, 0 = no worker) and, when a worker runs, what it reports to the
  parent's CONTROL_STATUS (``status<i>``, ``dirty<i>``, ``extentsize<i>``, ``keepdirty<i>``,
  the ``stat_*<i>`` counters and ``*_queue_size<i>``).
* Global ``error`` (int16): EHAST_INVALID for a missing ``resource0`` or a bad role,
  EHAST_UNIMPLEMENTED for an unknown command, an errno when a worker did not answer.  A
  request without ``cmd`` is dropped without a reply.

Daemon side: :func:`handle` turns a request into a reply; the caller (hast.daemon) owns the
connection and passes itself as :class:`DaemonView`.  Client side: :func:`request` does the
exchange with hastctl's exact failure texts and exit codes (hast-userland.md §3.9/§3.10);
:func:`client_role`, :func:`client_list` and :func:`client_status` render replies exactly as
FreeBSD's hastctl prints them (``list``/``status`` byte for byte, tabs and padding included).

py-hast additions and deviations:

* ``--json`` (list/status): one JSON document on stdout, a list with one object per resource
  in reply order.  Keys are the reply's nv names without the index (``resource``, ``role``,
  ``provname``, ``localpath``, ``remoteaddr``, ``sourceaddr``, ``replication``, ``checksum``,
  ``compression``, ``workerpid``, ``status``, ``dirty``, ``extentsize``, ``keepdirty``,
  ``stat_*``, ``*_queue_size``, or ``error`` for a failed resource), each present exactly when
  hastd sent it; numbers are JSON numbers.  The exit status is the same as without ``--json``.
* A STATUS for zero resources (``all`` with no resource configured) would be an empty nv,
  which makes FreeBSD's receiver abort on an assertion (hast-internals.md §14.5); we answer
  ``error = 0`` instead, which every hastctl reads as success with nothing to print.
* A field FreeBSD's hastctl would print with ``%s`` from a NULL pointer prints ``(null)``, as
  FreeBSD's libc does, instead of crashing the client.
"""

from __future__ import annotations

import errno
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

from hast import log, proto
from hast import nv as nvmod
from hast.config import Config, Resource
from hast.subr import humanize
from hast.sysexits import EX_OK, EX_OSERR, EX_SOFTWARE, EX_UNAVAILABLE
from hast.worker import CONTROL_STATUS

# hast.h: hastctl -> hastd commands
HASTCTL_CMD_UNKNOWN = 0
HASTCTL_CMD_SETROLE = 1
HASTCTL_CMD_STATUS = 2

# hast.h: roles on the wire (SETROLE's uint8); replies carry the names
ROLE_UNDEF, ROLE_INIT, ROLE_PRIMARY, ROLE_SECONDARY = 0, 1, 2, 3
ROLE_NAMES = {ROLE_INIT: "init", ROLE_PRIMARY: "primary", ROLE_SECONDARY: "secondary"}
ROLE_NUMBERS = {name: number for number, name in ROLE_NAMES.items()}

# hast.h: control error codes (per resource ``error<i>`` and the global ``error``)
EHAST_OK = 0
EHAST_NOENTRY = 1
EHAST_INVALID = 2
EHAST_NOMEMORY = 3
EHAST_UNIMPLEMENTED = 4

# hast.h HAST_TIMEOUT: hastctl's connect timeout (the UNIX transport ignores it)
HAST_TIMEOUT = 20

# Worker fields copied into a STATUS reply, in FreeBSD's order: (name, nv type).
WORKER_FIELDS: tuple[tuple[str, int], ...] = (
    ("status", nvmod.STRING),
    ("dirty", nvmod.UINT64),
    ("extentsize", nvmod.UINT32),
    ("keepdirty", nvmod.UINT32),
    ("stat_read", nvmod.UINT64),
    ("stat_write", nvmod.UINT64),
    ("stat_delete", nvmod.UINT64),
    ("stat_flush", nvmod.UINT64),
    ("stat_activemap_update", nvmod.UINT64),
    ("stat_read_error", nvmod.UINT64),
    ("stat_write_error", nvmod.UINT64),
    ("stat_delete_error", nvmod.UINT64),
    ("stat_flush_error", nvmod.UINT64),
    ("idle_queue_size", nvmod.UINT64),
    ("local_queue_size", nvmod.UINT64),
    ("send_queue_size", nvmod.UINT64),
    ("recv_queue_size", nvmod.UINT64),
    ("done_queue_size", nvmod.UINT64),
)


# -- daemon side -----------------------------------------------------------------------------

class WorkerView(Protocol):
    pid: int

    def request(self, msg: nvmod.NV, timeout: float = ...) -> nvmod.NV: ...


class ResourceView(Protocol):
    """What the control code needs to know about one resource of the running daemon."""

    res: Resource             # the running configuration of the resource
    role: str                 # "init", "primary" or "secondary"

    @property
    def worker(self) -> WorkerView | None: ...


class DaemonView(Protocol):
    """The daemon as control requests see it (implemented by hast.daemon.Daemon)."""

    resources: Mapping[str, ResourceView]  # in configuration order

    def set_role(self, rs: ResourceView, role: str) -> None:
        """control_set_role(): stop/start workers, log, run the role hook."""


def handle(daemon: DaemonView, request: nvmod.NV) -> nvmod.NV | None:
    """control_handle(): the reply to one request, or None to drop the connection unanswered."""
    cmd = request.get_uint8("cmd")
    if cmd == 0:
        log.error("Control header is missing 'cmd' field.")
        return None
    reply = nvmod.NV()
    error = _handle(daemon, request, cmd, reply)
    if error:
        reply.add_int16("error", error)
    if not len(reply):
        # An empty nv would trip FreeBSD hastctl's assertion; see the module docstring.
        reply.add_int16("error", EHAST_OK)
    return reply


def _handle(daemon: DaemonView, request: nvmod.NV, cmd: int, reply: nvmod.NV) -> int:
    first = request.get_string("resource0")
    if first is None:
        log.error("Control header is missing 'resource0' field.")
        return EHAST_INVALID
    role = ROLE_UNDEF
    if cmd == HASTCTL_CMD_SETROLE:
        role = request.get_uint8("role")
        if role not in ROLE_NAMES:
            log.error(f"Invalid role received ({role}).")
            return EHAST_INVALID
    if cmd not in (HASTCTL_CMD_SETROLE, HASTCTL_CMD_STATUS):
        log.error(f"Invalid command received ({cmd}).")
        return EHAST_UNIMPLEMENTED
    if first == "all":
        names: Iterable[str] = list(daemon.resources)
    else:
        names = _requested_names(request)
    for ii, name in enumerate(names):
        if cmd == HASTCTL_CMD_SETROLE:
            _set_role(daemon, reply, ROLE_NAMES[role], name, ii)
        else:
            _status(daemon, reply, name, ii)
    return EHAST_OK


def _requested_names(request: nvmod.NV) -> Iterable[str]:
    ii = 0
    while (name := request.get_string(f"resource{ii}")) is not None:
        yield name
        ii += 1


def _set_role(daemon: DaemonView, reply: nvmod.NV, role: str, name: str, no: int) -> None:
    """control_set_role_common() for one name: answer the previous role, then switch."""
    reply.add_string(f"resource{no}", name)
    rs = daemon.resources.get(name)
    if rs is None:
        reply.add_int16(f"error{no}", EHAST_NOENTRY)
        return
    reply.add_string(f"role{no}", rs.role)
    daemon.set_role(rs, role)


def _status(daemon: DaemonView, reply: nvmod.NV, name: str, no: int) -> None:
    """control_status() for one name."""
    reply.add_string(f"resource{no}", name)
    rs = daemon.resources.get(name)
    if rs is None:
        reply.add_int16(f"error{no}", EHAST_NOENTRY)
        return
    res = rs.res
    reply.add_string(f"provname{no}", res.provname)
    reply.add_string(f"localpath{no}", res.local)
    reply.add_string(f"remoteaddr{no}", res.remote)
    if res.source:
        reply.add_string(f"sourceaddr{no}", res.source)
    replication = res.replication if res.replication in (
        "fullsync", "memsync", "async") else "unknown"
    reply.add_string(f"replication{no}", replication)
    reply.add_string(f"checksum{no}", res.checksum)
    reply.add_string(f"compression{no}", res.compression)
    reply.add_string(f"role{no}", rs.role)
    worker = rs.worker
    reply.add_int32(f"workerpid{no}", worker.pid if worker is not None else 0)
    # FreeBSD asks only primary and secondary workers; init never has one.
    if worker is None or rs.role not in ("primary", "secondary"):
        return
    error = _status_worker(worker, reply, no)
    if error:
        # Global, not per resource: hastctl then fails the whole command with exit 70.
        reply.add_int16("error", error)


def _status_worker(worker: WorkerView, reply: nvmod.NV, no: int) -> int:
    """control_status_worker(): ask the worker (CONTROL_STATUS) and copy its answer."""
    try:
        answer = worker.request(nvmod.NV().add_uint8("cmd", CONTROL_STATUS), HAST_TIMEOUT)
    except OSError as exc:
        err = log.exc_errno(exc)
        log.error("Unable to receive control header", err)
        return err
    except ValueError as exc:  # a frame the codec refuses
        log.error(f"Unable to receive control header: {exc}.")
        return errno.EINVAL
    error = answer.get_int16("error")
    if error:
        return error
    if answer.get_string("status") is None:
        log.error("Field 'status' is missing", errno.ENOENT)
        return errno.ENOENT
    for field, nvtype in WORKER_FIELDS:
        # Absent or mistyped numbers read as 0, as nv_get_<type>() does in FreeBSD.
        default: object = None if nvtype == nvmod.STRING else 0
        reply.add(f"{field}{no}", nvtype, answer.get(field, nvtype, default))
    return EHAST_OK


# -- client side (hastctl) ---------------------------------------------------------------------

class ControlError(Exception):
    """A failed exchange with hastd: ``message`` is hastctl's line, ``exitcode`` its status.

    The caller logs ``message`` at error level (``[ERROR] <message>``) and exits.
    """

    def __init__(self, exitcode: int, message: str) -> None:
        super().__init__(message)
        self.exitcode = exitcode
        self.message = message


def _with_errno(text: str, exc: BaseException) -> str:
    return f"{text}: {log.strerror(log.exc_errno(exc))}."


def request(control_addr: str, msg: nvmod.NV) -> nvmod.NV:
    """Send ``msg`` to hastd at ``control_addr`` and return its reply.

    Raises ControlError with FreeBSD hastctl's texts: 71 when the address is unusable or
    nobody answers, 69 when the request cannot be sent or no reply comes back, 70 when the
    reply carries a global ``error``.
    """
    if not proto.is_uds(control_addr):
        try:
            proto.resolve_tcp(control_addr)
        except (OSError, ValueError) as exc:
            err = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
            raise ControlError(EX_OSERR, f"Unable to setup control connection to "
                                         f"{control_addr}: {log.strerror(err)}.") from None
    try:
        sock = proto.connect(control_addr, HAST_TIMEOUT)
    except OSError as exc:
        raise ControlError(EX_OSERR, _with_errno(
            f"Unable to connect to hastd via {control_addr}", exc)) from None
    with sock:
        # FreeBSD hastctl has no reply timeout: a busy hastd (e.g. waiting for a worker to
        # stop) keeps it waiting, and so do we.
        sock.settimeout(None)
        try:
            proto.send_frame(sock, proto.PROTO_VERSION, msg)
        except OSError as exc:
            raise ControlError(EX_UNAVAILABLE, _with_errno(
                f"Unable to send command to hastd via {control_addr}", exc)) from None
        try:
            _version, reply = proto.recv_frame(sock, proto.MAX_NV_CONTROL)
        except OSError as exc:
            # FreeBSD's message really starts with a lower-case "cannot".
            raise ControlError(EX_UNAVAILABLE, _with_errno(
                f"cannot receive reply from hastd via {control_addr}", exc)) from None
    error = reply.get_int16("error")
    if error:
        raise ControlError(EX_SOFTWARE, f"Error {error} received from hastd.")
    return reply


def role_request(role: str, names: Sequence[str]) -> nvmod.NV:
    """The SETROLE request hastctl sends for ``role <role> names...``."""
    msg = nvmod.NV().add_uint8("cmd", HASTCTL_CMD_SETROLE)
    msg.add_uint8("role", ROLE_NUMBERS[role])
    for ii, name in enumerate(names):
        msg.add_string(f"resource{ii}", name)
    return msg


def status_request(names: Sequence[str]) -> nvmod.NV:
    """The STATUS request of ``list``/``status``; no names means ``all``."""
    msg = nvmod.NV().add_uint8("cmd", HASTCTL_CMD_STATUS)
    for ii, name in enumerate(names or ["all"]):
        msg.add_string(f"resource{ii}", name)
    return msg


def _exchange(config: Config, msg: nvmod.NV) -> nvmod.NV | int:
    try:
        return request(config.control, msg)
    except ControlError as exc:
        log.error(exc.message)
        return exc.exitcode


def client_role(config: Config, role: str, names: Sequence[str], debug: int = 0) -> int:
    """``hastctl role <role> names...``: silent on success; the first per-resource error wins.

    ``role`` is ``init``, ``primary`` or ``secondary`` (hastctl rejected anything else with its
    usage); ``names`` are passed as given (a leading ``all`` is resolved by hastd).
    """
    log.set_debug(debug)
    reply = _exchange(config, role_request(role, names))
    if isinstance(reply, int):
        return reply
    ret = EX_OK
    try:
        for ii, name in _reply_names(reply):
            log.set_prefix(f"[{name}] ")
            error = reply.get_int16(f"error{ii}")
            if error:
                ret = ret or error
                log.warning(f"Received error {error} from hastd.")
                continue
            oldrole = _s(reply.get_string(f"role{ii}"))
            if oldrole == role:
                log.debug(2, f"Role unchanged ({oldrole}).")
            else:
                log.debug(1, f"Role changed from {oldrole} to {role}.")
    finally:
        log.set_prefix("")
    return ret


def client_list(config: Config, names: Sequence[str], json_out: bool = False) -> int:
    """``hastctl list [names...]``: the verbose block per resource (or ``--json``)."""
    return _client_status_reply(config, names, json_out, format_list)


def client_status(config: Config, names: Sequence[str], json_out: bool = False) -> int:
    """``hastctl status [names...]``: the terse table (or ``--json``)."""
    return _client_status_reply(config, names, json_out, format_status)


def _client_status_reply(config: Config, names: Sequence[str], json_out: bool,
                         render: Callable[[nvmod.NV], tuple[str, int]]) -> int:
    """One STATUS request, rendered by ``render`` (list and status differ only there)."""
    reply = _exchange(config, status_request(names))
    if isinstance(reply, int):
        return reply
    if json_out:
        return _print_json(reply)
    out, ret = render(reply)
    sys.stdout.write(out)
    sys.stdout.flush()
    return ret


def _reply_names(reply: nvmod.NV) -> Iterable[tuple[int, str]]:
    ii = 0
    while (name := reply.get_string(f"resource{ii}")) is not None:
        yield ii, name
        ii += 1


def _s(value: str | None) -> str:
    """printf("%s", NULL) as FreeBSD's libc prints it."""
    return "(null)" if value is None else value


def format_list(reply: nvmod.NV) -> tuple[str, int]:
    """control_list(): (text, exit status) for a STATUS reply, byte for byte FreeBSD's."""
    lines: list[str] = []
    ret = EX_OK
    for ii, name in _reply_names(reply):
        lines.append(f"{name}:")
        error = reply.get_int16(f"error{ii}")
        if error:
            ret = ret or error
            lines.append(f"  error: {error}")
            continue

        def u64(field: str, ii: int = ii) -> int:
            return reply.get_uint64(f"{field}{ii}")

        extentsize = reply.get_uint32(f"extentsize{ii}")
        lines.append(f"  role: {_s(reply.get_string(f'role{ii}'))}")
        lines.append(f"  provname: {_s(reply.get_string(f'provname{ii}'))}")
        lines.append(f"  localpath: {_s(reply.get_string(f'localpath{ii}'))}")
        lines.append(f"  extentsize: {extentsize} ({humanize(extentsize)}B)")
        lines.append(f"  keepdirty: {reply.get_uint32(f'keepdirty{ii}')}")
        lines.append(f"  remoteaddr: {_s(reply.get_string(f'remoteaddr{ii}'))}")
        source = reply.get_string(f"sourceaddr{ii}")
        if source is not None:
            lines.append(f"  sourceaddr: {source}")
        lines.append(f"  replication: {_s(reply.get_string(f'replication{ii}'))}")
        status = reply.get_string(f"status{ii}")
        if status is not None:
            lines.append(f"  status: {status}")
        pid = reply.get_int32(f"workerpid{ii}")
        if pid != 0:
            lines.append(f"  workerpid: {pid}")
        dirty = u64("dirty")
        # %NB takes an intmax_t: a dirty count above INT64_MAX would print negative.
        lines.append(f"  dirty: {dirty} ({_human_signed(dirty)}B)")
        lines.append("  statistics:")
        lines.append(f"    reads: {u64('stat_read')}")
        lines.append(f"    writes: {u64('stat_write')}")
        lines.append(f"    deletes: {u64('stat_delete')}")
        lines.append(f"    flushes: {u64('stat_flush')}")
        lines.append(f"    activemap updates: {u64('stat_activemap_update')}")
        lines.append(f"    local errors: read: {u64('stat_read_error')}, "
                     f"write: {u64('stat_write_error')}, "
                     f"delete: {u64('stat_delete_error')}, "
                     f"flush: {u64('stat_flush_error')}")
        lines.append(f"    queues: local: {u64('local_queue_size')}, "
                     f"send: {u64('send_queue_size')}, recv: {u64('recv_queue_size')}, "
                     f"done: {u64('done_queue_size')}, idle: {u64('idle_queue_size')}")
    return "".join(line + "\n" for line in lines), ret


def _human_signed(value: int) -> str:
    if value >= 1 << 63:
        return "-" + humanize((1 << 64) - value)
    return humanize(value)


def format_status(reply: nvmod.NV) -> tuple[str, int]:
    """control_status(): (text, exit status) of the terse table, byte for byte FreeBSD's."""
    out: list[str] = []
    ret = EX_OK
    for ii, name in _reply_names(reply):
        if not out:
            out.append("Name\tStatus\t Role\t\tComponents\n")
        error = reply.get_int16(f"error{ii}")
        if error:
            ret = ret or error
            out.append(f"{name}\tERR{error}\n")
            continue
        status = reply.get_string(f"status{ii}")
        out.append(f"{name}\t{status if status is not None else '-':<9}"
                   f"{_s(reply.get_string(f'role{ii}')):<15}"
                   f"{_s(reply.get_string(f'localpath{ii}'))}\t"
                   f"{_s(reply.get_string(f'remoteaddr{ii}'))}\n")
    return "".join(out), ret


_INDEXED = re.compile(r"^([A-Za-z_]+?)(0|[1-9][0-9]*)$")


def reply_to_json(reply: nvmod.NV) -> tuple[list[dict[str, object]], int]:
    """The ``--json`` document (one object per resource) and the exit status."""
    objects: dict[int, dict[str, object]] = {}
    count = sum(1 for _ in _reply_names(reply))
    for name, _nvtype, value in reply:
        match = _INDEXED.match(name)
        if match is None:
            continue  # the global error; non-zero ones never get here
        index = int(match.group(2))
        if index >= count:
            continue
        obj = objects.setdefault(index, {})
        key = match.group(1)
        if key not in obj:  # the first record of a name wins, as in nv lookups
            obj[key] = value.hex() if isinstance(value, bytes) else value
    docs = [objects.get(ii, {}) for ii in range(count)]
    ret = EX_OK
    for obj in docs:
        error = obj.get("error")
        if isinstance(error, int) and error and not ret:
            ret = error
    return docs, ret


def _print_json(reply: nvmod.NV) -> int:
    docs, ret = reply_to_json(reply)
    sys.stdout.write(json.dumps(docs, indent=2) + "\n")
    sys.stdout.flush()
    return ret
