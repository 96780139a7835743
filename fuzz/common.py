"""What every fuzz target shares: findings, seeds, wire builders and the input reader.

A target module (``fuzz/targets/<name>.py``) defines:

* ``one_input(data: bytes) -> None`` -- feed one input to the parser under test;
* ``EXPECTED`` -- the exception types that mean "the parser rejected the input", as the
  parser documents them; any other exception escaping ``one_input`` is a finding;
* ``seeds() -> list[bytes]`` -- the seed corpus (``fuzz/corpus/<name>/``);
* optionally ``MAX_LEN`` (longest useful input), ``setup()``/``teardown()`` (start and stop a
  server the inputs are sent to), ``check()`` (is the server still serving? raises Finding)
  and ``strategy()`` (a structure-aware hypothesis strategy producing input bytes).

:class:`Finding` marks a broken invariant that is not an exception of the parser itself: a
server that stopped answering, a provider written by a rejected message, a parser that
disagrees with the spec's reference decoder (:mod:`fuzz.reference`).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
REPO = FUZZ_DIR.parent
CORPUS = FUZZ_DIR / "corpus"
FRAME_HDR = struct.Struct("<BI")


class Finding(Exception):
    """A broken invariant found by a target (always a finding, never a rejection)."""


def load_seeds(name: str) -> list[bytes]:
    """The committed seed corpus of a target, in a stable order."""
    directory = CORPUS / name
    if not directory.is_dir():
        return []
    return [p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()]


# -- nv and frames, including malformed ones (hast.nv refuses to build those) -----------------

def nv_record(nvtype: int, name: bytes, data: bytes) -> bytes:
    """One nv record, byte for byte as nv.c lays it out; nothing is validated."""
    namez = name + b"\0"
    return (struct.pack("<BBI", nvtype & 0xFF, len(namez) & 0xFF, len(data))
            + namez.ljust((len(namez) + 7) & ~7, b"\0")
            + data.ljust((len(data) + 7) & ~7, b"\0"))


def frame(blob: bytes, payload: bytes = b"", version: int = 2) -> bytes:
    return FRAME_HDR.pack(version, len(blob)) + blob + payload


# -- reading structured choices out of raw fuzz bytes -------------------------------------------

class Input:
    """Consumes a fuzz input from the front, like libFuzzer's FuzzedDataProvider.

    Running out of bytes yields zeros, so every input is usable and short inputs mean
    "default choices" -- the mutator can still reach every branch.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk

    def byte(self) -> int:
        chunk = self.take(1)
        return chunk[0] if chunk else 0

    def u16(self) -> int:
        return int.from_bytes(self.take(2).ljust(2, b"\0"), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4).ljust(4, b"\0"), "little")

    def choice(self, options: tuple | list):
        return options[self.byte() % len(options)]

    def rest(self) -> bytes:
        return self.take(self.remaining())


# -- sockets -------------------------------------------------------------------------------------

def recv_until_eof(sock: socket.socket, timeout: float, limit: int = 64 << 20) -> bytes | None:
    """Everything the peer sends until it closes; None when it neither closes nor finishes
    within ``timeout`` seconds (a hang, or a connection kept open)."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    total = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise Finding(f"peer sent more than {limit} bytes")
    return b"".join(chunks)


def open_fds(pid: int | None = None) -> int:
    """Descriptors open in a process (Linux /proc; -1 where that is unavailable)."""
    path = f"/proc/{pid if pid is not None else 'self'}/fd"
    try:
        return len(os.listdir(path))
    except OSError:
        return -1


# -- logging --------------------------------------------------------------------------------------

class _SyslogStub:
    """Stands in for the syslog module inside hast.log: encodes like CPython's syslog()
    (strict UTF-8, so a peer-supplied string that cannot be logged fails as it would in the
    daemonized hastd) and discards the message."""

    def __init__(self, real: object) -> None:
        self._real = real
        self.messages = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def syslog(self, _level: int, message: str) -> None:
        message.encode("utf-8")
        self.messages += 1

    def openlog(self, *_args: object, **_kw: object) -> None:
        pass


def quiet_logs() -> Callable[[], None]:
    """Route hast.log to a syslog stub: no output, production's encoding rules.  Returns
    the function that puts hast.log back as it was (tests share the process)."""
    from hast import log

    saved = (log.syslog, log._mode)
    if not isinstance(log.syslog, _SyslogStub):
        log.syslog = _SyslogStub(log.syslog)  # type: ignore[assignment]
    log._mode = log.MODE_SYSLOG

    def restore() -> None:
        log.syslog, log._mode = saved  # type: ignore[assignment]

    return restore
