"""handshake: steps 1 and 2 of the replication handshake in a real hastd (hast-internals.md §6).

hastd's listen socket is the one any host that can reach the replication network talks to,
and the parent process reads the first frame of every connection itself.  The daemon
(:class:`fuzz.hastd.Hastd`) has resource ``test`` in role secondary (remote 127.0.0.1, so
our connections pass the address check and reach the handshake) and ``other``, whose remote
we never match.  Input layout: one mode byte, then the bytes of one connection:

* even mode: the bytes are the first frame(s) of a fresh connection -- a step 1, a step 2
  with a guessed token, garbage;
* odd mode: a valid step 1 is made first on connection #1, then the bytes go on connection
  #2 with every occurrence of the 16-byte placeholder ``a5 a5 ...`` replaced by the real
  token, so mutated step-2 messages get past the token check and reach the spawn of the
  secondary worker (which then answers step 3 on connection #1, or refuses).

After sending, the write side is shut down.  The daemon must answer with one well-formed
frame (a token, or an error frame with ``errmsg``) or close the connection, within seconds
(a half-open step 1 is kept open by design; a step 2 is handed to the worker, which answers
on connection #1).  It must stay alive and keep answering others; ``check()`` runs a valid
step 1 and a STATUS and counts the daemon's descriptors.
"""

from __future__ import annotations

import select
import socket
import time

from hypothesis import strategies as st

from fuzz.common import Finding, Input, frame, load_seeds, nv_record
from fuzz.hastd import Hastd
from fuzz.strategies import from_seeds, interesting_int, mutate
from hast import nv as nvmod
from hast import proto

EXPECTED: tuple[type[BaseException], ...] = ()
MAX_LEN = 4096
PLACEHOLDER = b"\xa5" * 16
REPLY_TIMEOUT = 10.0

_daemon: Hastd | None = None
_previous = b""


def seeds() -> list[bytes]:
    return load_seeds("handshake")


@st.composite
def _structured(draw: st.DrawFn) -> bytes:
    """Step 1 or step 2 with hastd's fields, typed right or wrong, then mutated."""
    step2 = draw(st.booleans())
    blob = nv_record(17, b"resource", draw(st.sampled_from([b"test", b"other", b"x", b""]))
                     + b"\0")
    if step2:
        blob += nv_record(10, b"token", PLACEHOLDER if draw(st.booleans()) else bytes(16))
        for name in (b"resuid", b"localcnt", b"remotecnt"):
            blob += nv_record(8, name, draw(interesting_int(8)).to_bytes(8, "little"))
        if draw(st.booleans()):
            blob += nv_record(1, b"virgin", b"\1")
    else:
        blob += nv_record(2, b"version", bytes([draw(st.integers(0, 255))]))
    raw = frame(blob, version=draw(st.sampled_from([0, 1, 2, 3])))
    return bytes([int(step2)]) + draw(mutate(raw, max_ops=2))


def strategy() -> st.SearchStrategy[bytes]:
    return from_seeds(seeds(), MAX_LEN, _structured())


def setup() -> None:
    global _daemon
    if _daemon is None:
        _daemon = Hastd(role="secondary")
        _daemon.start()


def teardown() -> None:
    global _daemon
    if _daemon is not None:
        _daemon.close()
        _daemon = None


def check() -> None:
    if _daemon is not None:
        _daemon.check()


def _answer(sock: socket.socket, timeout: float) -> tuple[int, nvmod.NV] | None:
    """The daemon's one frame on ``sock``; None if it closed without a word.  Raises
    TimeoutError when it neither answers nor closes."""
    sock.settimeout(timeout)
    try:
        return proto.recv_frame(sock)
    except proto.ProtoError as exc:
        if exc.errno in (proto.errno.ENOTCONN, proto.errno.ECONNRESET):
            return None
        if exc.errno == proto.errno.ETIMEDOUT:
            raise TimeoutError from None
        raise Finding(f"malformed answer from hastd: {exc}") from None
    except ConnectionResetError:
        return None


def _judge(reply: tuple[int, nvmod.NV] | None, what: str) -> None:
    if reply is None:
        return
    _version, msg = reply
    if msg.get_string("errmsg") is not None:
        return
    token = msg.get_uint8_array("token")
    if token is None or len(token) != 16 or msg.get_uint8("version") not in (1, 2):
        raise Finding(f"{what} answered with neither an error nor a token: {msg!r}")


def _second_connection(sock: socket.socket, conn1: socket.socket) -> None:
    """After a step 1: the daemon answers on this connection (an error, or a token when it
    was another step 1, which also closes connection #1), or hands it to a secondary
    worker, which answers step 3 on connection #1."""
    watch = [sock, conn1]
    deadline = time.monotonic() + REPLY_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        ready = select.select(watch, [], [], left)[0] if left > 0 else []
        if not ready:
            raise Finding("neither an answer on the second connection nor a step 3 answer")
        if sock in ready:
            try:
                _judge(_answer(sock, 5.0), "second connection")
            except TimeoutError:
                raise Finding("hastd started an answer it did not finish") from None
            return
        try:
            step3 = _answer(conn1, 5.0)
        except TimeoutError:
            raise Finding("step 3 answer started, not finished") from None
        if step3 is None:
            watch.remove(conn1)     # replaced by a new step 1: wait for its token
            continue
        msg = step3[1]
        if msg.get_string("errmsg") is None and msg.get_int32("extentsize") == 0:
            raise Finding(f"step 3 answer without extentsize: {msg!r}")
        return


def one_input(data: bytes) -> None:
    global _previous
    setup()
    assert _daemon is not None
    if not _daemon.alive():
        raise _daemon.restart_after_death(_previous)
    _previous = data
    inp = Input(data)
    mode = inp.byte()
    payload = inp.rest()
    conn1 = None
    if mode & 1:
        conn1, token = _daemon.step1()
        payload = payload.replace(PLACEHOLDER, token)
    try:
        sock = _daemon.peer()
    except OSError as exc:
        if conn1 is not None:
            conn1.close()
        if not _daemon.alive():
            raise _daemon.restart_after_death(data) from None
        raise Finding(f"hastd refuses a connection: {exc!r}") from None
    try:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass            # it may hang up before reading everything
        if conn1 is None:
            try:
                _judge(_answer(sock, REPLY_TIMEOUT), "first frame")
            except TimeoutError:
                raise Finding("hastd kept a connection open without answering") from None
        else:
            _second_connection(sock, conn1)
    finally:
        sock.close()
        if conn1 is not None:
            conn1.close()
    if not _daemon.alive():
        raise _daemon.restart_after_death(data)
    _daemon.check_log(data)
