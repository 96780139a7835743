"""NBDServer + FileBackend against real NBD clients and raw protocol exchanges.

Clients (Debian packages): nbdinfo and nbdcopy (libnbd-bin), qemu-io and qemu-img
(qemu-utils), fio (its nbd ioengine is libnbd).  They exercise what a HAST primary will see
in production; the raw-socket tests cover what no well-behaved client sends (violations,
errors, vanishing clients, shutdown).  Every server, backend and socket a test makes is
closed by its fixture, also when the test fails.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hast.frontends import nbd
from hast.frontends.nbd import FileBackend, NBDServer, Request

SIZE = 64 << 20
EXPORT = "test"
DESCRIPTION = "py-hast test export"
CLIENT_TIMEOUT = 120


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is required (see the Debian package list in tests/test_nbd.py)"
    return path


def _run(*argv: str, timeout: float = CLIENT_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool(argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


# ---- backends used by the tests (real FileBackends with extra observation points) --------

class RecordingBackend(FileBackend):
    """Records the largest READ/WRITE the server passed down (proves request splitting)."""

    def __init__(self, *args, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kw)
        self.largest = 0
        self.pieces = 0

    def submit(self, req: Request) -> None:
        if req.cmd in (nbd.CMD_READ, nbd.CMD_WRITE):
            self.largest = max(self.largest, req.length)
            self.pieces += 1
        super().submit(req)


class GatedBackend(FileBackend):
    """Holds requests at ``gate_offset`` until ``release()``: in-flight requests on demand."""

    gate_offset = 8 << 20

    def __init__(self, *args, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kw)
        self.held: list[Request] = []
        self.held_event = threading.Event()
        self._gate_lock = threading.Lock()
        self._open = False

    def submit(self, req: Request) -> None:
        if req.offset == self.gate_offset and req.cmd != nbd.CMD_FLUSH:
            with self._gate_lock:
                if not self._open:
                    self.held.append(req)
                    self.held_event.set()
                    return
        super().submit(req)

    def release(self) -> None:
        """Open the gate for good; held requests go to the worker threads (not inline in
        the caller, which may be the test thread that has to read the replies)."""
        with self._gate_lock:
            self._open = True
            held, self.held = self.held, []
        for req in held:
            self._queue.put(req)


class SubmitManyBackend(FileBackend):
    """Has submit_many(), as the HAST primary's backend: records the batch sizes."""

    def __init__(self, *args, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kw)
        self.batches: list[int] = []

    def submit_many(self, reqs: list[Request]) -> None:
        assert all(r.cmd in (nbd.CMD_READ, nbd.CMD_WRITE) for r in reqs)
        self.batches.append(len(reqs))
        for req in reqs:
            super().submit(req)


class BatchingBackend(FileBackend):
    """Executes requests in groups of ``group`` in one thread that defers its replies, as
    the HAST primary's completion threads do; records how many replies each group had
    queued before send_deferred_replies() (none may have gone out earlier)."""

    group = 8

    def __init__(self, *args, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kw)
        self.pending: list[Request] = []
        self.queued: list[int] = []
        self._lock = threading.Lock()

    def submit(self, req: Request) -> None:
        with self._lock:
            self.pending.append(req)
            if len(self.pending) < self.group:
                return
            batch, self.pending = self.pending, []
        threading.Thread(target=self._complete_batch, args=(batch,)).start()

    def _complete_batch(self, batch: list[Request]) -> None:
        nbd.defer_replies()
        try:
            for req in batch:
                self._execute(req)
                req.complete(0)
            self.queued.append(len(nbd._deferred.replies))
        finally:
            nbd.send_deferred_replies(stop=True)
        assert nbd._deferred.replies is None


# ---- fixtures ----------------------------------------------------------------------------

@dataclass
class Served:
    server: NBDServer
    backend: FileBackend
    image: Path
    sock_path: str
    tcp: tuple[str, int]
    transport: str = "unix"

    @property
    def uri(self) -> str:
        if self.transport == "tcp":
            return f"nbd://{self.tcp[0]}:{self.tcp[1]}/{EXPORT}"
        return f"nbd+unix:///{EXPORT}?socket={self.sock_path}"

    @property
    def addr(self) -> str | tuple[str, int]:
        return self.tcp if self.transport == "tcp" else self.sock_path


def _serve(tmp_path: Path, backend_cls: type[FileBackend] = FileBackend,
           transport: str = "unix", **backend_kw: object) -> Iterator[Served]:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    backend = backend_cls(image, **backend_kw)  # type: ignore[arg-type]
    server = None
    try:
        server = NBDServer(backend, export_name=EXPORT, description=DESCRIPTION)
        sock_path = server.listen_unix(tmp_path / "nbd.sock")
        tcp = server.listen_tcp("127.0.0.1", 0)
        server.start()
        yield Served(server, backend, image, sock_path, tcp, transport)
    finally:
        if server is not None:
            server.stop()
        if isinstance(backend, GatedBackend):
            backend.release()
        backend.close()


@pytest.fixture(params=["unix", "tcp"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    yield from _serve(tmp_path, transport=request.param)


@pytest.fixture
def raw_served(tmp_path: Path) -> Iterator[Served]:
    yield from _serve(tmp_path, max_request=256 << 10)


@pytest.fixture(params=[FileBackend, SubmitManyBackend], ids=["submit", "submit_many"])
def pipe_served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    yield from _serve(tmp_path, request.param, max_request=256 << 10)


@pytest.fixture
def split_served(tmp_path: Path) -> Iterator[Served]:
    yield from _serve(tmp_path, RecordingBackend, max_request=64 << 10)


@pytest.fixture
def gated_served(tmp_path: Path) -> Iterator[Served]:
    yield from _serve(tmp_path, GatedBackend)


@pytest.fixture
def direct_served(tmp_path: Path) -> Iterator[Served]:
    yield from _serve(tmp_path, direct=True)


@pytest.fixture
def batch_served(tmp_path: Path) -> Iterator[Served]:
    yield from _serve(tmp_path, BatchingBackend)


@pytest.fixture
def ro_served(tmp_path: Path) -> Iterator[Served]:
    yield from _serve(tmp_path, read_only=True)


# ---- raw protocol client -----------------------------------------------------------------

class Raw:
    """A minimal NBD client that sends exactly what a test asks, valid or not."""

    def __init__(self, addr: str | tuple[str, int]) -> None:
        family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(addr)

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"EOF after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def at_eof(self) -> bool:
        """True once the server closed the connection (read until EOF, bounded by timeout)."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True

    def greeting(self) -> int:
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        return hflags

    def start(self, cflags: int = nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES) -> None:
        self.greeting()
        self.sock.sendall(struct.pack(">I", cflags))

    def option(self, opt: int, data: bytes = b"", magic: int = nbd.IHAVEOPT) -> None:
        self.sock.sendall(struct.pack(">QII", magic, opt, len(data)) + data)

    def opt_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == nbd.REPLY_MAGIC
        return opt, rtype, self.recv(length)

    def info(self, opt: int = nbd.OPT_GO, name: str = EXPORT,
             requests: tuple[int, ...] = ()) -> tuple[int, list[bytes]]:
        """GO/INFO; returns (final reply type, INFO payloads)."""
        raw = name.encode()
        self.option(opt, struct.pack(">I", len(raw)) + raw
                    + struct.pack(f">H{len(requests)}H", len(requests), *requests))
        infos = []
        while True:
            ropt, rtype, data = self.opt_reply()
            assert ropt == opt
            if rtype == nbd.REP_INFO:
                infos.append(data)
                continue
            return rtype, infos

    def go(self, name: str = EXPORT) -> tuple[int, int]:
        self.start()
        rtype, infos = self.info(nbd.OPT_GO, name)
        assert rtype == nbd.REP_ACK
        export = [i for i in infos if struct.unpack_from(">H", i)[0] == nbd.INFO_EXPORT][0]
        _, size, tflags = struct.unpack(">HQH", export)
        return size, tflags

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                cookie: int = 1, data: bytes = b"", magic: int = nbd.REQUEST_MAGIC) -> None:
        self.sock.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length)
                          + data)

    def reply(self, read_length: int = 0) -> tuple[int, int, bytes]:
        magic, err, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC
        return err, cookie, (self.recv(read_length) if err == 0 and read_length else b"")

    def read(self, offset: int, length: int, cookie: int = 7) -> bytes:
        self.request(nbd.CMD_READ, offset, length, cookie=cookie)
        err, rcookie, data = self.reply(length)
        assert (err, rcookie) == (0, cookie)
        return data

    def write(self, offset: int, data: bytes, flags: int = 0, cookie: int = 8) -> int:
        self.request(nbd.CMD_WRITE, offset, len(data), flags, cookie, data)
        err, rcookie, _ = self.reply()
        assert rcookie == cookie
        return err


@pytest.fixture
def raw_clients() -> Iterator[list[Raw]]:
    clients: list[Raw] = []
    try:
        yield clients
    finally:
        for c in clients:
            c.close()


def _connect(clients: list[Raw], served: Served) -> Raw:
    c = Raw(served.addr)
    clients.append(c)
    return c


# ---- real clients ------------------------------------------------------------------------

def test_nbdinfo(served: Served) -> None:
    r = _run("nbdinfo", "--json", served.uri)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["protocol"] == "newstyle-fixed"
    (exp,) = info["exports"]
    assert exp["export-name"] == EXPORT
    assert exp["description"] == DESCRIPTION
    assert exp["export-size"] == SIZE
    for key in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert exp[key] is True, key
    assert exp["is_read_only"] is False
    assert (exp["block_size_minimum"], exp["block_size_preferred"],
            exp["block_size_maximum"]) == (512, 4096, served.backend.max_request)


def test_nbdinfo_list(served: Served) -> None:
    r = _run("nbdinfo", "--list", "--json", served.uri)
    assert r.returncode == 0, r.stderr
    exports = json.loads(r.stdout)["exports"]
    assert [(e["export-name"], e["description"], e["export-size"]) for e in exports] == [
        (EXPORT, DESCRIPTION, SIZE)]


def test_qemu_io_patterns(served: Served) -> None:
    r = _run("qemu-io", "-f", "raw",
             "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M", "-c", "flush",
             "-c", "write -z 1M 1M", "-c", "read -P 0 1M 1M",
             "-c", "write -P 0x5c 3M 2M", "-c", "discard 3M 1M", "-c", "read -P 0x5c 4M 1M",
             "-c", "write -f -P 0x77 8M 64k", "-c", "read -P 0x77 8M 64k",
             served.uri)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pattern verification failed" not in r.stdout
    with open(served.image, "rb") as f:
        assert f.read(1 << 20) == b"\xab" * (1 << 20)
        f.seek(8 << 20)
        assert f.read(64 << 10) == b"\x77" * (64 << 10)
    # A wrong pattern must fail: this is what makes the checks above verification.
    r = _run("qemu-io", "-f", "raw", "-c", "read -P 0xac 0 4k", served.uri)
    assert r.returncode == 1
    assert "Pattern verification failed" in r.stdout


def test_qemu_img_compare(served: Served, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(SIZE))
    r = _run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", "-m", "8",
             str(src), served.uri)
    assert r.returncode == 0, r.stderr
    r = _run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), served.uri)
    assert r.returncode == 0, r.stdout + r.stderr
    assert served.image.read_bytes() == src.read_bytes()
    r = _run("qemu-io", "-f", "raw", "-c", "write -P 0x01 12288 4k", served.uri)
    assert r.returncode == 0, r.stderr
    r = _run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), served.uri)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Content mismatch at offset 12288" in r.stdout


def test_nbdcopy_roundtrip(served: Served, tmp_path: Path) -> None:
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    src.write_bytes(os.urandom(SIZE))
    r = _run("nbdcopy", "--flush", str(src), served.uri)
    assert r.returncode == 0, r.stderr
    r = _run("nbdcopy", served.uri, str(back))
    assert r.returncode == 0, r.stderr
    assert _run("cmp", str(src), str(back)).returncode == 0
    assert _run("cmp", str(src), str(served.image)).returncode == 0


def _fio_verify(uri: str, bs: str, size: str = "32M") -> dict:
    r = _run("fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
             f"--bs={bs}", "--iodepth=16", f"--size={size}", "--verify=crc32c",
             "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
             "--output-format=json")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    (job,) = json.loads(r.stdout[r.stdout.index("{"):])["jobs"]
    assert job["error"] == 0
    return job


@pytest.mark.parametrize("bs", ["4k", "1M"])
def test_fio_verify(served: Served, bs: str) -> None:
    job = _fio_verify(served.uri, bs)
    # do_verify read everything back: that is where crc32c was checked.
    assert job["write"]["io_bytes"] == 32 << 20
    assert job["read"]["io_bytes"] == 32 << 20


def test_fio_requests_larger_than_max_request_are_split(split_served: Served) -> None:
    job = _fio_verify(split_served.uri, "1M")
    assert job["read"]["io_bytes"] == 32 << 20
    backend = split_served.backend
    assert isinstance(backend, RecordingBackend)
    assert backend.largest == 64 << 10
    assert backend.pieces >= 2 * (32 << 20) // (64 << 10)


# ---- raw protocol: handshake -------------------------------------------------------------

def test_greeting_and_go_reply(raw_served: Served, raw_clients: list[Raw]) -> None:
    c = _connect(raw_clients, raw_served)
    assert c.greeting() == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
    c.sock.sendall(struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE))
    rtype, infos = c.info(nbd.OPT_GO, EXPORT, (nbd.INFO_BLOCK_SIZE,))
    assert rtype == nbd.REP_ACK
    by_type = {struct.unpack_from(">H", i)[0]: i for i in infos}
    assert struct.unpack(">HQH", by_type[nbd.INFO_EXPORT])[1:] == (
        SIZE, nbd.TFLAG_HAS_FLAGS | nbd.TFLAG_SEND_FLUSH | nbd.TFLAG_SEND_FUA
        | nbd.TFLAG_SEND_TRIM | nbd.TFLAG_SEND_WRITE_ZEROES | nbd.TFLAG_CAN_MULTI_CONN)
    assert struct.unpack(">HIII", by_type[nbd.INFO_BLOCK_SIZE])[1:] == (512, 4096, 256 << 10)
    assert c.read(0, 4096) == bytes(4096)


def test_info_does_not_end_haggling(raw_served: Served, raw_clients: list[Raw]) -> None:
    c = _connect(raw_clients, raw_served)
    c.start()
    rtype, infos = c.info(nbd.OPT_INFO, EXPORT, (nbd.INFO_NAME, nbd.INFO_DESCRIPTION))
    assert rtype == nbd.REP_ACK
    assert struct.pack(">H", nbd.INFO_NAME) + EXPORT.encode() in infos
    assert struct.pack(">H", nbd.INFO_DESCRIPTION) + DESCRIPTION.encode() in infos
    rtype, _ = c.info(nbd.OPT_GO, "")  # the default export is this one too
    assert rtype == nbd.REP_ACK
    assert c.read(512, 512) == bytes(512)


@pytest.mark.parametrize("opt,data", [
    (nbd.OPT_STRUCTURED_REPLY, b""),
    (nbd.OPT_STARTTLS, b""),
    (nbd.OPT_LIST_META_CONTEXT, struct.pack(">I", 4) + b"test" + struct.pack(">I", 0)),
    (nbd.OPT_SET_META_CONTEXT, struct.pack(">I", 4) + b"test" + struct.pack(">I", 1)
     + struct.pack(">I", 15) + b"base:allocation"),
    (4, b""),
    (99, b"x" * 1000),
])
def test_unknown_options_get_err_unsup(raw_served: Served, raw_clients: list[Raw],
                                       opt: int, data: bytes) -> None:
    c = _connect(raw_clients, raw_served)
    c.start()
    c.option(opt, data)
    ropt, rtype, _ = c.opt_reply()
    assert (ropt, rtype) == (opt, nbd.REP_ERR_UNSUP)
    c.option(opt, data)  # twice: parsing really went on after the first one
    assert c.opt_reply()[:2] == (opt, nbd.REP_ERR_UNSUP)
    rtype, _ = c.info(nbd.OPT_GO)
    assert rtype == nbd.REP_ACK
    assert c.read(0, 512) == bytes(512)


def test_go_errors_keep_haggling(raw_served: Served, raw_clients: list[Raw]) -> None:
    c = _connect(raw_clients, raw_served)
    c.start()
    assert c.info(nbd.OPT_GO, "nosuch")[0] == nbd.REP_ERR_UNKNOWN
    c.option(nbd.OPT_GO, struct.pack(">I", 100) + b"test")  # name overruns the data
    assert c.opt_reply()[1] == nbd.REP_ERR_INVALID
    c.option(nbd.OPT_GO, struct.pack(">I", 4) + b"test" + struct.pack(">H", 3))
    assert c.opt_reply()[1] == nbd.REP_ERR_INVALID
    assert c.info(nbd.OPT_GO)[0] == nbd.REP_ACK


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(raw_served: Served, raw_clients: list[Raw], no_zeroes: bool) -> None:
    c = _connect(raw_clients, raw_served)
    c.start(nbd.FLAG_C_FIXED_NEWSTYLE | (nbd.FLAG_C_NO_ZEROES if no_zeroes else 0))
    c.option(nbd.OPT_EXPORT_NAME, EXPORT.encode())
    size, tflags = struct.unpack(">QH", c.recv(10))
    assert size == SIZE and tflags & nbd.TFLAG_HAS_FLAGS
    if not no_zeroes:
        assert c.recv(124) == bytes(124)
    # The next bytes are a reply to this request, so the handshake reply had the right length.
    assert c.write(4096, b"\x42" * 512) == 0
    assert c.read(4096, 512) == b"\x42" * 512


def test_export_name_unknown_drops(raw_served: Served, raw_clients: list[Raw]) -> None:
    c = _connect(raw_clients, raw_served)
    c.start()
    c.option(nbd.OPT_EXPORT_NAME, b"nosuch")
    assert c.at_eof()


def test_list(raw_served: Served, raw_clients: list[Raw]) -> None:
    c = _connect(raw_clients, raw_served)
    c.start()
    c.option(nbd.OPT_LIST)
    opt, rtype, data = c.opt_reply()
    assert (opt, rtype) == (nbd.OPT_LIST, nbd.REP_SERVER)
    (namelen,) = struct.unpack_from(">I", data)
    assert data[4:4 + namelen] == EXPORT.encode()
    assert data[4 + namelen:] == DESCRIPTION.encode()
    assert c.opt_reply()[1] == nbd.REP_ACK
    c.option(nbd.OPT_LIST, b"junk")
    assert c.opt_reply()[1] == nbd.REP_ERR_INVALID
    assert c.info(nbd.OPT_GO)[0] == nbd.REP_ACK


def test_abort(raw_served: Served, raw_clients: list[Raw]) -> None:
    c = _connect(raw_clients, raw_served)
    c.start()
    c.option(nbd.OPT_ABORT)
    assert c.opt_reply()[:2] == (nbd.OPT_ABORT, nbd.REP_ACK)
    assert c.at_eof()


@pytest.mark.parametrize("violation", ["client-flags", "not-fixed", "option-magic",
                                       "option-length"])
def test_handshake_violations_drop_only_that_connection(
        raw_served: Served, raw_clients: list[Raw], violation: str) -> None:
    bystander = _connect(raw_clients, raw_served)
    bystander.go()
    c = _connect(raw_clients, raw_served)
    if violation == "client-flags":
        c.start(nbd.FLAG_C_FIXED_NEWSTYLE | 0x80)
    elif violation == "not-fixed":
        c.start(0)
    elif violation == "option-magic":
        c.start()
        c.option(nbd.OPT_GO, magic=0x1234)
    else:
        c.start()
        c.sock.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 1 << 30))
    assert c.at_eof()
    assert bystander.read(0, 512) == bytes(512)
    assert _connect(raw_clients, raw_served).go()[0] == SIZE


# ---- raw protocol: transmission ----------------------------------------------------------

def test_transmission_violations_drop_only_that_connection(
        raw_served: Served, raw_clients: list[Raw]) -> None:
    bystander = _connect(raw_clients, raw_served)
    bystander.go()
    bad_magic = _connect(raw_clients, raw_served)
    bad_magic.go()
    bad_magic.request(nbd.CMD_READ, 0, 512, magic=0xDEADBEEF)
    assert bad_magic.at_eof()
    oversize = _connect(raw_clients, raw_served)
    oversize.go()
    oversize.request(nbd.CMD_WRITE, 0, 64 << 20)  # header only: the server must not wait
    assert oversize.at_eof()
    assert bystander.write(0, b"\x01" * 4096) == 0
    assert bystander.read(0, 4096) == b"\x01" * 4096
    assert _connect(raw_clients, raw_served).go()[0] == SIZE


END = SIZE


@pytest.mark.parametrize("cmd,flags,offset,length,payload,expected", [
    (nbd.CMD_READ, 0, 1, 512, False, errno.EINVAL),
    (nbd.CMD_READ, 0, 0, 100, False, errno.EINVAL),
    (nbd.CMD_READ, 0, 0, 0, False, errno.EINVAL),
    (nbd.CMD_READ, 0, END - 512, 1024, False, errno.EINVAL),
    (nbd.CMD_READ, 0, END, 512, False, errno.EINVAL),
    (nbd.CMD_READ, 0, 0, 64 << 20 << 1, False, errno.EINVAL),
    (nbd.CMD_READ, nbd.CMD_FLAG_DF, 0, 512, False, errno.EINVAL),
    (nbd.CMD_READ, 1 << 15, 0, 512, False, errno.EINVAL),
    (nbd.CMD_WRITE, 0, END - 512, 1024, True, errno.ENOSPC),
    (nbd.CMD_WRITE, 0, 1, 512, True, errno.EINVAL),
    (nbd.CMD_WRITE, nbd.CMD_FLAG_NO_HOLE, 0, 512, True, errno.EINVAL),
    (nbd.CMD_TRIM, 0, END, 512, False, errno.EINVAL),
    (nbd.CMD_TRIM, 0, 100, 512, False, errno.EINVAL),
    (nbd.CMD_TRIM, nbd.CMD_FLAG_NO_HOLE, 0, 512, False, errno.EINVAL),
    (nbd.CMD_WRITE_ZEROES, 0, END - 512, 1024, False, errno.ENOSPC),
    (nbd.CMD_WRITE_ZEROES, nbd.CMD_FLAG_FAST_ZERO, 0, 512, False, errno.EINVAL),
    (nbd.CMD_CACHE, 0, 0, 512, False, errno.EINVAL),
    (nbd.CMD_BLOCK_STATUS, 0, 0, 512, False, errno.EINVAL),
    (42, 0, 0, 512, False, errno.EINVAL),
])
def test_request_errors(raw_served: Served, raw_clients: list[Raw], cmd: int, flags: int,
                        offset: int, length: int, payload: bool, expected: int) -> None:
    c = _connect(raw_clients, raw_served)
    c.go()
    c.request(cmd, offset, length, flags, cookie=0xC0FFEE,
              data=os.urandom(length) if payload else b"")
    assert c.reply() == (expected, 0xC0FFEE, b"")
    # Still in sync (a WRITE payload was consumed) and still served.
    assert c.read(0, 512) == bytes(512)


def test_read_only_export(ro_served: Served, raw_clients: list[Raw]) -> None:
    c = _connect(raw_clients, ro_served)
    _, tflags = c.go()
    assert tflags & nbd.TFLAG_READ_ONLY
    assert not tflags & (nbd.TFLAG_SEND_TRIM | nbd.TFLAG_SEND_WRITE_ZEROES)
    assert c.write(0, b"\xff" * 512) == errno.EPERM
    for cmd in (nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES):
        c.request(cmd, 0, 512, cookie=3)
        assert c.reply() == (errno.EPERM, 3, b"")
    c.request(nbd.CMD_FLUSH, cookie=4)
    assert c.reply() == (0, 4, b"")
    assert c.read(0, 512) == bytes(512)
    assert ro_served.image.read_bytes()[:512] == bytes(512)


def test_data_commands(raw_served: Served, raw_clients: list[Raw]) -> None:
    c = _connect(raw_clients, raw_served)
    c.go()
    data = os.urandom(1 << 20)
    assert c.write(1 << 20, data, nbd.CMD_FLAG_FUA) == 0
    assert c.read(1 << 20, 1 << 20) == data
    c.request(nbd.CMD_FLUSH, cookie=11)
    assert c.reply() == (0, 11, b"")
    c.request(nbd.CMD_WRITE_ZEROES, 1 << 20, 64 << 10, nbd.CMD_FLAG_NO_HOLE, cookie=12)
    assert c.reply() == (0, 12, b"")
    c.request(nbd.CMD_WRITE_ZEROES, (1 << 20) + (64 << 10), 64 << 10,
              nbd.CMD_FLAG_FUA, cookie=13)
    assert c.reply() == (0, 13, b"")
    c.request(nbd.CMD_TRIM, (1 << 20) + (512 << 10), 512 << 10, cookie=14)
    assert c.reply() == (0, 14, b"")
    expect = bytes(128 << 10) + data[128 << 10:512 << 10] + bytes(512 << 10)
    assert c.read(1 << 20, 1 << 20) == expect
    with open(raw_served.image, "rb") as f:
        f.seek(1 << 20)
        assert f.read(1 << 20) == expect
    # DISC gets no reply; the server closes once everything is answered.
    c.request(nbd.CMD_DISC, cookie=15)
    assert c.at_eof()


def test_large_requests_are_split(split_served: Served, raw_clients: list[Raw]) -> None:
    c = _connect(raw_clients, split_served)
    c.go()
    data = os.urandom(4 << 20)
    assert c.write(0, data) == 0
    assert c.read(0, 4 << 20) == data
    assert split_served.image.read_bytes()[:4 << 20] == data
    backend = split_served.backend
    assert isinstance(backend, RecordingBackend)
    assert backend.largest == 64 << 10
    assert backend.pieces == 2 * (4 << 20) // (64 << 10)


def test_replies_out_of_order(gated_served: Served, raw_clients: list[Raw]) -> None:
    backend = gated_served.backend
    assert isinstance(backend, GatedBackend)
    c = _connect(raw_clients, gated_served)
    c.go()
    assert c.write(GatedBackend.gate_offset + 4096, b"\x33" * 4096) == 0
    c.request(nbd.CMD_READ, GatedBackend.gate_offset, 8192, cookie=1)
    assert backend.held_event.wait(30)
    c.request(nbd.CMD_WRITE, 0, 512, cookie=2, data=b"\x44" * 512)
    assert c.reply() == (0, 2, b"")          # the later request is answered first
    backend.release()
    assert c.reply(8192) == (0, 1, bytes(4096) + b"\x33" * 4096)


def test_pipelined_requests_then_disc(pipe_served: Served, raw_clients: list[Raw]) -> None:
    raw_served = pipe_served
    c = _connect(raw_clients, raw_served)
    c.go()
    blocks = {i: os.urandom(4096) for i in range(64)}
    for i, block in blocks.items():
        c.request(nbd.CMD_WRITE, i * 8192, 4096, cookie=1000 + i, data=block)
    c.request(nbd.CMD_DISC)
    cookies = set()
    for _ in blocks:
        err, cookie, _ = c.reply()
        assert err == 0
        cookies.add(cookie)
    assert cookies == {1000 + i for i in blocks}
    assert c.at_eof()
    image = raw_served.image.read_bytes()
    for i, block in blocks.items():
        assert image[i * 8192:i * 8192 + 4096] == block


def test_pipelined_payloads_of_every_size(pipe_served: Served, raw_clients: list[Raw]) -> None:
    # One sendall of WRITEs whose payloads fall on every side of the reader's limits (read
    # ahead, copied out of it, received directly), then READs of all of them; with a
    # submit_many() backend they go down in batches.
    c = _connect(raw_clients, pipe_served)
    c.go()
    sizes = [512, 4096, 512, nbd.SMALL_PAYLOAD - 512, nbd.SMALL_PAYLOAD, 4096,
             nbd.SMALL_PAYLOAD + 512, nbd.RECV_CHUNK + 4096, 512, nbd.READ_AHEAD + 4096,
             1 << 20, 4096, 2 << 20, 512]
    offsets, pos = [], 0
    blocks = [os.urandom(n) for n in sizes]
    stream = bytearray()
    for i, block in enumerate(blocks):
        offsets.append(pos)
        stream += struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 100 + i, pos,
                              len(block)) + block
        pos += len(block) + 512
    for i, block in enumerate(blocks):
        stream += struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 500 + i,
                              offsets[i], len(block))
    sender = threading.Thread(target=c.sock.sendall, args=(bytes(stream),))
    sender.start()
    writes = set()
    for _ in blocks:
        err, cookie, _ = c.reply()
        assert err == 0
        writes.add(cookie)
    assert writes == {100 + i for i in range(len(blocks))}
    got = {}
    for _ in blocks:
        magic, err, cookie = struct.unpack(">IIQ", c.recv(16))
        assert (magic, err) == (nbd.SIMPLE_REPLY_MAGIC, 0)
        got[cookie] = c.recv(len(blocks[cookie - 500]))
    sender.join(30)
    assert got == {500 + i: block for i, block in enumerate(blocks)}
    backend = pipe_served.backend
    if isinstance(backend, SubmitManyBackend):
        assert max(backend.batches) > 1


def test_batches_respect_the_inflight_bound(raw_clients: list[Raw], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # More pipelined READs than the in-flight bound: the reader hands its batch over before
    # it waits for completions (else it would wait on requests the backend never got).
    monkeypatch.setattr(nbd, "MAX_INFLIGHT_REQUESTS", 8)
    for served in _serve(tmp_path, SubmitManyBackend, direct=True):   # completed by workers
        c = _connect(raw_clients, served)
        c.go()
        stream = b"".join(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, i,
                                      i * 4096, 4096) for i in range(100))
        sender = threading.Thread(target=c.sock.sendall, args=(stream,))
        sender.start()
        assert sorted(c.reply(4096)[1] for _ in range(100)) == list(range(100))
        sender.join(30)


def test_deferred_replies_go_out_together(batch_served: Served, raw_clients: list[Raw]) -> None:
    backend = batch_served.backend
    assert isinstance(backend, BatchingBackend)
    c = _connect(raw_clients, batch_served)
    c.go()
    blocks = {i: os.urandom(4096) for i in range(BatchingBackend.group)}
    for i, block in blocks.items():
        c.request(nbd.CMD_WRITE, i * 4096, 4096, cookie=10 + i, data=block)
    assert sorted(c.reply()[1] for _ in blocks) == [10 + i for i in blocks]
    for i in blocks:   # READ data stays valid until the deferred reply is sent
        c.request(nbd.CMD_READ, i * 4096, 4096, cookie=20 + i)
    got = {}
    for _ in blocks:
        err, cookie, data = c.reply(4096)
        assert err == 0
        got[cookie - 20] = data
    assert got == blocks
    assert backend.queued == [BatchingBackend.group] * 2
    c.request(nbd.CMD_DISC)
    assert c.at_eof()


def test_client_vanishing_mid_payload(raw_served: Served, raw_clients: list[Raw]) -> None:
    other = _connect(raw_clients, raw_served)
    other.go()
    gone = _connect(raw_clients, raw_served)
    gone.go()
    gone.request(nbd.CMD_WRITE, 0, 1 << 20, data=b"\x99" * 1000)
    gone.sock.shutdown(socket.SHUT_RDWR)
    gone.close()
    data = os.urandom(65536)
    assert other.write(65536, data) == 0
    assert other.read(65536, 65536) == data
    assert other.read(0, 1024) == bytes(1024)  # nothing of the partial WRITE landed
    fresh = _connect(raw_clients, raw_served)
    fresh.go()
    assert fresh.read(65536, 65536) == data


def test_stop_with_clients_connected(gated_served: Served, raw_clients: list[Raw]) -> None:
    backend = gated_served.backend
    assert isinstance(backend, GatedBackend)
    busy = _connect(raw_clients, gated_served)
    busy.go()
    busy.request(nbd.CMD_WRITE, GatedBackend.gate_offset, 4096, cookie=77,
                 data=b"\x12" * 4096)
    assert backend.held_event.wait(30)
    idle = _connect(raw_clients, gated_served)
    idle.go()
    haggling = _connect(raw_clients, gated_served)
    haggling.greeting()

    stopper = threading.Thread(target=gated_served.server.stop)
    stopper.start()
    stopper.join(60)  # a hang guard, not a timing check
    assert not stopper.is_alive()
    assert busy.reply() == (errno.ESHUTDOWN, 77, b"")
    for c in (busy, idle, haggling):
        assert c.at_eof()
    assert not os.path.exists(gated_served.sock_path)
    assert gated_served.server.connections == 0
    # The backend finishes the request after the connection is gone: nothing breaks.
    backend.release()
    gated_served.server.stop()  # idempotent
    with pytest.raises(OSError):
        Raw(gated_served.sock_path)


def test_inflight_requests_are_bounded(gated_served: Served, raw_clients: list[Raw]) -> None:
    backend = gated_served.backend
    assert isinstance(backend, GatedBackend)
    c = _connect(raw_clients, gated_served)
    c.go()
    total = nbd.MAX_INFLIGHT_REQUESTS + 100
    c.sock.sendall(b"".join(
        struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, i, GatedBackend.gate_offset,
                    4096) for i in range(total)))
    for _ in range(3000):
        if len(backend.held) >= nbd.MAX_INFLIGHT_REQUESTS:
            break
        threading.Event().wait(0.01)
    threading.Event().wait(0.2)  # room for a (wrong) 513th request to arrive
    assert len(backend.held) == nbd.MAX_INFLIGHT_REQUESTS
    backend.release()
    cookies = set()
    for _ in range(total):
        err, cookie, data = c.reply(4096)
        assert err == 0 and data == bytes(4096)
        cookies.add(cookie)
    assert cookies == set(range(total))


def test_direct_io_backend(direct_served: Served, raw_clients: list[Raw]) -> None:
    served = direct_served
    r = _run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 512 512",
             "-c", "read -P 0x3c 512 512", "-c", "write -P 0x3d 1M 3M", "-c", "flush",
             "-c", "write -z 1M 8k", "-c", "read -P 0 1M 8k",
             "-c", "read -P 0x3d 1056768 64k", served.uri)
    assert r.returncode == 0, r.stdout + r.stderr
    c = _connect(raw_clients, served)
    c.go()
    data = os.urandom(2 << 20)
    assert c.write(4 << 20, data, nbd.CMD_FLAG_FUA) == 0
    assert c.read(4 << 20, 2 << 20) == data
    with open(served.image, "rb") as f:
        f.seek(4 << 20)
        assert f.read(2 << 20) == data


def test_server_api_guards(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    with FileBackend(image, max_request=1000) as backend:
        with pytest.raises(ValueError):
            NBDServer(backend)
    with FileBackend(image) as backend:
        server = NBDServer(backend, "x")
        with pytest.raises(RuntimeError):
            server.start()  # no listeners
        server.listen_unix(tmp_path / "s.sock")
        server.start()
        try:
            with pytest.raises(RuntimeError):
                server.listen_tcp("127.0.0.1", 0)
        finally:
            server.stop()
