"""proto: hastd's transports and message framing (proto.c, proto_tcp.c, proto_uds.c, hast_proto.c).

Every hastd socket -- replication, control, parent<->worker -- carries frames of a 5-byte
header (version u8, nv size u32 LE), an nv blob, and, iff the nv has ``size``, a payload that
went through the compression/checksum pipeline.  The transports are plain stream sockets:
TCP with TCP_NODELAY (hastd sets it everywhere), UNIX sockets for the control channel.

Limits are ours, FreeBSD has none: an nv blob larger than ``max_nv`` or a payload larger than
the caller's bound is refused before anything is allocated, and the connection is dropped.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from hast import nv as nvmod
from hast.config import parse_address

Buffer = bytes | bytearray | memoryview

PROTO_VERSION = 2
HEADER = struct.Struct("<BI")
HEADER_SIZE = HEADER.size
DEFAULT_PORT = 8457
# Largest nv blob accepted on replication connections: the biggest legitimate message
# (handshake reply with every pipeline field) is a few hundred bytes.
MAX_NV_WIRE = 64 * 1024
# Control replies grow with the number of resources (~1.5 KiB each).
MAX_NV_CONTROL = 16 * 1024 * 1024
# Mode of a listening UNIX socket (the control socket): owner (root) only.
UDS_MODE = 0o600


class ProtoError(OSError):
    """A malformed frame or a broken connection; the caller drops the connection."""

    def __init__(self, err: int, text: str) -> None:
        super().__init__(err, text)


_MSG_WAITALL = getattr(socket, "MSG_WAITALL", 0)


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the stream; EOF is ENOTCONN as in FreeBSD's proto_common.c.

    MSG_WAITALL: a large payload arrives in one recv() call instead of one per segment.  A
    receive timeout (settimeout, or SO_RCVTIMEO: EAGAIN) is ETIMEDOUT."""
    got, total = 0, len(view)
    while got < total:
        try:
            n = sock.recv_into(view[got:] if got else view, total - got, _MSG_WAITALL)
        except (TimeoutError, BlockingIOError):
            raise ProtoError(errno.ETIMEDOUT, "Operation timed out") from None
        if n == 0:
            raise ProtoError(errno.ENOTCONN, "Connection closed by peer")
        got += n


def recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    if size:
        recv_exact_into(sock, memoryview(buf))
    return buf


def send_frame(sock: socket.socket, version: int, msg: nvmod.NV,
               payload: Buffer | None = None) -> None:
    """One frame in as few syscalls as possible (header+nv and payload in one sendmsg)."""
    blob = msg.pack()
    if not blob:
        # FreeBSD's receiver asserts on an empty nv (hast-internals §14.5): never send one.
        raise ValueError("refusing to send an empty nv blob")
    parts: list[Buffer] = [HEADER.pack(version, len(blob)) + blob]
    if payload is not None and len(memoryview(payload)):
        parts.append(payload)
    sendall_parts(sock, parts)


def sendall_parts(sock: socket.socket, parts: list[Buffer]) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        try:
            sent = sock.sendmsg(views)
        except TimeoutError:
            raise ProtoError(errno.ETIMEDOUT, "Operation timed out") from None
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
        while views and not len(views[0]):
            views.pop(0)


def recv_frame(sock: socket.socket, max_nv: int = MAX_NV_WIRE,
               max_version: int = PROTO_VERSION) -> tuple[int, nvmod.NV]:
    """Header and nv of the next frame; the payload (if any) is left for recv_payload()."""
    version, size = HEADER.unpack(recv_exact(sock, HEADER_SIZE))
    if version > max_version:
        raise ProtoError(errno.ERPCMISMATCH if hasattr(errno, "ERPCMISMATCH") else errno.EPROTO,
                         f"Unsupported protocol version {version}")
    if size == 0:
        # FreeBSD would assert here; an empty blob is an empty message for us.
        return version, nvmod.NV()
    if size > max_nv:
        raise ProtoError(errno.EMSGSIZE, f"nv blob of {size} bytes exceeds {max_nv}")
    blob = recv_exact(sock, size)
    try:
        return version, nvmod.NV.unpack(blob)
    except nvmod.NVError as exc:
        raise ProtoError(errno.EINVAL, f"Malformed nv: {exc}") from None


def payload_size(msg: nvmod.NV) -> int:
    return msg.get_uint32("size")


# -- transports -------------------------------------------------------------------------

def is_uds(addr: str) -> bool:
    low = addr.lower()
    return low.startswith(("uds://", "unix://")) or (addr.startswith("/") and "://" not in addr)


def uds_path(addr: str) -> str:
    low = addr.lower()
    for scheme in ("uds://", "unix://"):
        if low.startswith(scheme):
            return addr[len(scheme):]
    return addr


def resolve_tcp(addr: str, default_port: int = DEFAULT_PORT) -> tuple[int, tuple]:
    """(family, sockaddr) of the first getaddrinfo result, as proto_tcp.c uses it."""
    scheme, host, port = parse_address(addr, default_port)
    family = {"tcp4": socket.AF_INET, "tcp6": socket.AF_INET6}.get(scheme, socket.AF_UNSPEC)
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0,
                                   socket.AI_ADDRCONFIG | socket.AI_NUMERICSERV)
    except socket.gaierror as exc:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL)) from exc
    fam, _type, _proto, _canon, sockaddr = infos[0]
    return fam, sockaddr


def _tcp_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def listen(addr: str) -> socket.socket:
    if is_uds(addr):
        path = uds_path(addr)
        try:
            os.unlink(path)  # a stale socket is replaced, as proto_uds.c does
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The control socket is root-only: created without group/other bits whatever umask
        # hastd inherited, then 0600 (connect(2) needs write permission on Linux).
        old = os.umask(0o077)
        try:
            sock.bind(path)
            os.chmod(path, UDS_MODE)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(8)
        return sock
    family, sockaddr = resolve_tcp(addr)
    sock = _tcp_socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(sockaddr)
    sock.listen(8)
    return sock


def connect(addr: str, timeout: float, source: str = "") -> socket.socket:
    """Connect within ``timeout`` seconds; the socket keeps ``timeout`` for I/O (SO_*TIMEO)."""
    if is_uds(addr):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(uds_path(addr))
        except OSError:
            sock.close()
            raise
        return sock
    family, sockaddr = resolve_tcp(addr)
    sock = _tcp_socket(family)
    try:
        if source:
            _sfam, saddr = resolve_tcp(source, 0)
            sock.bind(saddr)
        sock.settimeout(timeout)
        sock.connect(sockaddr)
    except TimeoutError:
        sock.close()
        raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)) from None
    except OSError:
        sock.close()
        raise
    return sock


def address_matches(sock: socket.socket, configured: str) -> bool:
    """proto_address_match(): the peer's IP against ``remote`` (first result, port ignored)."""
    if configured == "none" or is_uds(configured):
        return False
    try:
        family, sockaddr = resolve_tcp(configured)
    except OSError:
        return False
    peer = sock.getpeername()
    if sock.family != family:
        return False
    return socket.inet_pton(family, peer[0]) == socket.inet_pton(family, sockaddr[0])


def format_peer(sock: socket.socket) -> str:
    """``tcp://A.B.C.D:PORT`` / ``tcp://[v6]:PORT`` as hastd prints socket addresses."""
    try:
        peer = sock.getpeername()
    except OSError:
        return "tcp://?"
    if sock.family == socket.AF_INET6:
        return f"tcp://[{peer[0]}]:{peer[1]}"
    if sock.family == socket.AF_INET:
        return f"tcp://{peer[0]}:{peer[1]}"
    return f"uds://{peer}"
