"""The secondary worker against FreeBSD's own secondary (vectors/freebsd-hastd/wire).

Each session is real: a 256 MiB sparse provider laid out as `hastctl create` does, TCP
connections on 127.0.0.1, the worker spawned as hastd's parent would (hast.worker.spawn) after
this test played the parent for handshake steps 1-2 and the primary for everything else.  The
replies are compared with the C secondary's, field by field and type by type, with exactly
one documented difference: DELETE and FLUSH succeed on a regular file (punch hole, fdatasync)
where FreeBSD's disk ioctls answer ENOTTY (25).  LZF output is not liblzf's byte for byte, so
LZF-compressed READ replies are compared through decompression (and their hash recomputed).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hast import _aio, _io, metadata, pipeline, proto, secondary, worker
from hast import nv as nvmod
from hast.config import Config, Resource
from hast.metadata import Metadata
from hast.secondary import MAP_DISK, MAP_FULL, MAP_NONE, decide, wire_errno
from hast.sysexits import EX_CONFIG, EX_NOINPUT, EX_SOFTWARE, EX_TEMPFAIL
from tests import vectors

REPO = Path(__file__).resolve().parents[1]
MEDIASIZE = 256 * 1024 * 1024
EXTENTSIZE = 2 * 1024 * 1024
MAPSIZE, DATASIZE, LOCALOFF = 512, 268430848, 4608
RESUID = 0x0123456789ABCDEF
TOKEN = bytes(range(16))
MIB = 1024 * 1024
STATUS = nvmod.NV().add_uint8("cmd", worker.CONTROL_STATUS)
W, R = secondary.HIO_WRITE, secondary.HIO_READ

FrameT = tuple[int, nvmod.NV, bytes]


# -- provider ------------------------------------------------------------------------------

def make_provider(path: Path, resuid: int = 0, localcnt: int = 0, remotecnt: int = 0,
                  prevrole: str = "init", amap: bytes | None = None) -> Path:
    """A 256 MiB sparse file as `hastctl create` (defaults) leaves it, then our state."""
    with open(path, "wb") as f:
        f.truncate(MEDIASIZE)
    mapsize, datasize, localoff = metadata.layout(MEDIASIZE, EXTENTSIZE, 512)
    assert (mapsize, datasize, localoff) == (MAPSIZE, DATASIZE, LOCALOFF)
    fd = os.open(path, os.O_RDWR)
    try:
        metadata.write(fd, Metadata("test", datasize, EXTENTSIZE, 64, localoff, resuid,
                                    localcnt, remotecnt, prevrole))
        os.pwrite(fd, amap if amap is not None else bytes(MAPSIZE), metadata.METADATA_SIZE)
    finally:
        os.close(fd)
    return path


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def pattern(tag: str, size: int = 4096) -> bytes:
    """The vectors' data pattern: 16-byte lines "<tag>-<3 hex>" padded with '.'."""
    lines = [f"{tag}-{i:03x}".ljust(15, ".").encode() + b"\n" for i in range(size // 16)]
    return b"".join(lines)


def data_digest(path: Path) -> str:
    """Hash of the regions the bad-input tests could touch: the first 4 MiB and the tail."""
    h = hashlib.sha256()
    h.update(read_at(path, LOCALOFF, 4 * MIB))
    h.update(read_at(path, MEDIASIZE - 4 * MIB, 4 * MIB))
    return h.hexdigest()


# -- frames --------------------------------------------------------------------------------

def frame(msg: nvmod.NV, payload: bytes = b"", version: int = 2) -> bytes:
    blob = msg.pack()
    return proto.HEADER.pack(version, len(blob)) + blob + payload


def recv_frame(sock: socket.socket) -> FrameT:
    version, msg = proto.recv_frame(sock)
    return version, msg, bytes(proto.recv_exact(sock, proto.payload_size(msg)))


def fields(msg: nvmod.NV) -> list[tuple[str, str, object]]:
    out = []
    for name, t, v in msg:
        out.append((name, nvmod.TYPE_NAMES[t], list(v) if isinstance(v, bytes) else v))
    return out


def request(cmd: int, seq: int, offset: int = 0, length: int = 0, data: bytes | None = None,
            memsync: bool = False, compression: str = "none", checksum: str = "none") -> bytes:
    msg = nvmod.NV().add_uint8("cmd", cmd).add_uint64("seq", seq)
    msg.add_uint64("offset", offset).add_uint64("length", length)
    if memsync:
        msg.add_uint8("memsync", 1)
    payload = pipeline.encode(msg, data, compression, checksum) if data is not None else None
    return frame(msg, bytes(payload) if payload is not None else b"")


def is_closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the peer closed (EOF or reset) within timeout, skipping nothing."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def quiet(sock: socket.socket, seconds: float = 0.3) -> bool:
    """Nothing arrives on sock for the given time."""
    ready, _, _ = select.select([sock], [], [], seconds)
    return not ready


# -- a session: this test is the parent for steps 1-2 and the primary throughout -----------

class Session:
    def __init__(self, tmp: Path, provider: Path, compression: str = "hole",
                 checksum: str = "none", replication: str = "fullsync") -> None:
        self.provider = provider
        self.res = Resource(name="test", provname="test", local=str(provider),
                            remote="tcp4://127.0.0.1", source="", replication=replication,
                            checksum=checksum, compression=compression, timeout=20, exec="",
                            metaflush=True)
        self.config = Config(path=str(tmp / "hast.conf"), control=f"uds://{tmp}/ctl",
                             pidfile=str(tmp / "pid"), listen=["tcp4://127.0.0.1:0"],
                             resources={"test": self.res})
        lsock = socket.create_server(("127.0.0.1", 0))
        try:
            self.conn1 = socket.create_connection(lsock.getsockname())
            self.acc1, _ = lsock.accept()
            self.conn2 = socket.create_connection(lsock.getsockname())
            self.acc2, _ = lsock.accept()
        finally:
            lsock.close()
        for s in (self.conn1, self.conn2):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(20)
        self.handle: worker.WorkerHandle | None = None
        self.events: list[int] = []
        self._event_thread: threading.Thread | None = None

    # parent: steps 1-2 ----------------------------------------------------------------------
    def handshake(self, step1: bytes, step1_reply: bytes, step2: bytes) -> None:
        self.conn1.sendall(step1)
        self.acc1.settimeout(10)
        _v, first = proto.recv_frame(self.acc1)
        assert first.get_string("resource") == "test"
        self.acc1.sendall(step1_reply)
        assert recv_frame(self.conn1)[1].get_uint8_array("token") is not None
        self.conn2.sendall(step2)
        self.acc2.settimeout(10)
        _v, hs = proto.recv_frame(self.acc2)
        assert hs.get_uint8_array("token") == nvmod.NV.unpack(
            step1_reply[5:]).get_uint8_array("token")
        self.acc1.settimeout(None)
        self.acc2.settimeout(None)
        self.handle = worker.spawn(self.config, self.res, "secondary", remotein=self.acc1,
                                   remoteout=self.acc2, handshake=hs, version=2,
                                   foreground=True)
        # The parent keeps no copy: the worker's exit must close the connections.
        self.acc1.close()
        self.acc2.close()
        self._event_thread = threading.Thread(target=self._answer_events, daemon=True)
        self._event_thread.start()

    def handshake_nv(self, resuid: int, localcnt: int, remotecnt: int,
                     virgin: bool = False) -> None:
        step1 = frame(nvmod.NV().add_string("resource", "test").add_uint8("version", 2), b"", 1)
        reply = frame(nvmod.NV().add_uint8("version", 2).add_uint8_array("token", TOKEN))
        hs = nvmod.NV().add_string("resource", "test").add_uint8_array("token", TOKEN)
        if virgin:
            hs.add_int8("virgin", 1)
        hs.add_uint64("resuid", resuid).add_uint64("localcnt", localcnt)
        hs.add_uint64("remotecnt", remotecnt)
        self.handshake(step1, reply, frame(hs))

    def _answer_events(self) -> None:
        assert self.handle is not None
        sock = self.handle.event
        while True:
            try:
                _v, msg = proto.recv_frame(sock, proto.MAX_NV_CONTROL)
                self.events.append(msg.get_uint8("event"))
                proto.send_frame(sock, 2, nvmod.NV().add_int16("error", 0))
            except OSError:
                return

    # primary -----------------------------------------------------------------------------
    def answer(self) -> FrameT:
        """Step 3: the worker's answer on connection #1."""
        return recv_frame(self.conn1)

    def send(self, raw: bytes) -> None:
        self.conn1.sendall(raw)

    def reply(self) -> FrameT:
        return recv_frame(self.conn2)

    def wait(self, timeout: float = 30) -> int:
        assert self.handle is not None
        code = self.handle.process.wait(timeout)
        if self._event_thread is not None:
            self._event_thread.join(5)
        return code

    def finish(self) -> int:
        """Primary goes away: the worker must notice, emit disconnect and exit 75."""
        self.conn1.close()
        self.conn2.close()
        return self.wait()

    def status(self) -> nvmod.NV:
        assert self.handle is not None
        return self.handle.request(STATUS, timeout=10)

    def close(self) -> None:
        if self.handle is not None:
            if self.handle.process.poll() is None:
                self.handle.process.kill()
                self.handle.process.wait(10)
            self.handle.close()
        for s in (self.conn1, self.conn2, self.acc1, self.acc2):
            s.close()


@pytest.fixture
def session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Session]]:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    made: list[Session] = []

    def factory(provider: Path, **kw: str) -> Session:
        s = Session(tmp_path, provider, **kw)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.close()


def adopted(tmp: Path, **kw: int) -> Path:
    """A provider that already belongs to the primary's resuid (after a first handshake)."""
    return make_provider(tmp / "prov.img", resuid=RESUID, prevrole="secondary", **kw)


def in_sync_session(factory: Callable[..., Session], tmp: Path, **kw: str) -> Session:
    sess = factory(adopted(tmp), **kw)
    sess.handshake_nv(RESUID, 0, 0)
    _v, ans, _p = sess.answer()
    assert ans.get_uint8("syncsrc") == secondary.SYNCSRC_PRIMARY
    return sess


# -- pure functions --------------------------------------------------------------------------

def test_provider_matches_hastctl_create() -> None:
    """Our fixture provider is byte-identical to FreeBSD's `hastctl create` image."""
    ref = (vectors.METADATA / "default.img-first1MiB.canonical.bin").read_bytes()
    md = Metadata("test", DATASIZE, EXTENTSIZE, 64, LOCALOFF)
    assert md.pack() == ref[:4096]
    assert ref[4096:LOCALOFF] == bytes(MAPSIZE)


@pytest.mark.parametrize("p,row,syncsrc,amap", [
    ((2, 2), 7, 2, MAP_FULL), ((2, 3), 7, 1, MAP_FULL), ((2, 4), 7, 1, MAP_FULL),
    ((3, 2), 3, 2, MAP_DISK), ((3, 3), 4, 1, MAP_DISK), ((3, 4), 7, 1, MAP_FULL),
    ((4, 2), 6, 0, MAP_NONE), ((4, 3), 5, 1, MAP_DISK), ((4, 4), 7, 1, MAP_FULL),
])
def test_decide_worked_examples(p: tuple[int, int], row: int, syncsrc: int, amap: str) -> None:
    """§9.4's examples with S = (local 3, remote 3); P = (local, remote)."""
    dec = decide(7, 3, 3, 7, p[0], p[1], False)
    assert (dec.row, dec.syncsrc, dec.map) == (row, syncsrc, amap)
    assert (dec.errmsg == "Split-brain condition!") == (row == 6) == dec.splitbrain


def test_decide_first_pairing_and_mismatch() -> None:
    assert decide(0, 0, 0, 5, 0, 0, True) == secondary.Decision(1, 1, MAP_NONE, adopt=True)
    assert decide(0, 0, 0, 5, 1, 0, False) == secondary.Decision(1, 1, MAP_FULL, adopt=True)
    dec = decide(6, 0, 0, 5, 0, 0, False)
    assert dec.row == 2 and not dec.splitbrain
    assert dec.errmsg == "Resource unique ID mismatch (primary=5, secondary=6)."
    # row 7, syncing from the secondary: S.local > P.remote but P.local < S.remote
    assert decide(1, 3, 3, 1, 2, 2, False).syncsrc == secondary.SYNCSRC_SECONDARY


@pytest.mark.parametrize("name,freebsd", [
    ("EIO", 5), ("EINVAL", 22), ("ENOSPC", 28), ("ENOTTY", 25), ("EROFS", 30),
    ("EOPNOTSUPP", 45), ("EDQUOT", 69), ("ETIMEDOUT", 60), ("ENODATA", 5),
    ("EREMOTEIO", 5), ("EAGAIN", 35),
])
def test_errnos_go_on_the_wire_in_freebsd_numbering(name: str, freebsd: int) -> None:
    if not hasattr(errno, name):
        pytest.skip(f"no {name} here")
    assert wire_errno(getattr(errno, name)) == freebsd
    assert wire_errno(100000) == 5


# -- the FreeBSD vectors, replayed ------------------------------------------------------------

SCENARIOS = {
    # scenario: (provider state, secondary compression, checksum, metadata image afterwards)
    "virgin": ("fresh", "hole", "none", "after-virgin"),
    "reconnect": ("adopted", "hole", "none", "after-reconnect"),
    "pipeline-secondary-default": ("adopted", "hole", "none", None),
    "pipeline-secondary-lzf-sha256": ("fresh", "lzf", "sha256", None),
    "error-bad-checksum": ("adopted", "hole", "sha256", None),
}


def _vector(scen: str, entry: dict) -> tuple[nvmod.NV, bytes]:
    raw = (vectors.WIRE / scen / entry["file"].replace(".bin", ".canonical.bin")).read_bytes()
    size = entry["header"]["nv_size"]
    return nvmod.NV.unpack(raw[5:5 + size]), raw[5 + size:]


def _compare_reply(ours: FrameT, entry: dict, exp_payload: bytes, req_cmd: int) -> None:
    version, msg, payload = ours
    assert version == entry["header"]["version"]
    expected = [(f["name"], f["type"], f["value"]) for f in entry["nv"]]
    if req_cmd in (secondary.HIO_DELETE, secondary.HIO_FLUSH):
        # The one documented difference: punch hole / fdatasync succeed on a regular file,
        # FreeBSD's DIOCGDELETE / DIOCGFLUSH ioctls answer ENOTTY there.
        assert ("error", "int16", 25) in expected
        expected.remove(("error", "int16", 25))
    got = fields(msg)
    exp_nv = nvmod.from_fields(expected)
    if exp_nv.get_string("compression") == "lzf":
        # Another valid LZF stream than liblzf's: same fields and types, the same data once
        # decompressed, a correct hash over our bytes; only size and hash values differ.
        assert [(n, t) for n, t, _v in got] == [(n, t) for n, t, _v in expected]
        for (name, _t, value), (_n, _t2, evalue) in zip(got, expected, strict=True):
            if name not in ("size", "hash"):
                assert value == evalue, name
        assert pipeline.decode(msg, payload, MIB) == pipeline.decode(exp_nv, exp_payload, MIB)
        return
    assert got == expected
    assert payload == exp_payload


def _replay(sess: Session, scen: str) -> dict[int, bytes]:
    """Run a scenario; returns {offset: data} of the WRITEs sent."""
    entries = json.loads((vectors.WIRE / scen / "index.json").read_text())
    raw = [(vectors.WIRE / scen / e["file"].replace(".bin", ".canonical.bin")).read_bytes()
           for e in entries]
    sess.handshake(raw[0], raw[1], raw[2])
    cmds: dict[int, int] = {}
    written: dict[int, bytes] = {}
    for entry, blob in zip(entries[3:], raw[3:], strict=True):
        msg, payload = _vector(scen, entry)
        if entry["direction"] == "primary->secondary":
            assert entry["connection"].startswith("conn1")
            cmd = msg.get_uint8("cmd")
            if cmd != secondary.HIO_KEEPALIVE:
                cmds[msg.get_uint64("seq")] = cmd
            if cmd == secondary.HIO_WRITE and "BADHASH" not in entry["file"]:
                written[msg.get_uint64("offset")] = bytes(pipeline.decode(msg, payload, MIB))
            sess.send(blob)
            continue
        if entry["connection"].startswith("conn1"):
            ours = sess.answer()
            _compare_reply(ours, entry, payload, 0)
            continue
        ours = sess.reply()
        _compare_reply(ours, entry, payload, cmds[msg.get_uint64("seq")])
    return written


@pytest.mark.parametrize("scen", sorted(SCENARIOS))
def test_replay_freebsd_vectors(scen: str, tmp_path: Path,
                                session: Callable[..., Session]) -> None:
    state, compression, checksum, image = SCENARIOS[scen]
    prov = (make_provider(tmp_path / "prov.img") if state == "fresh"
            else adopted(tmp_path))
    # Something the bad-checksum write must not overwrite.
    write_at(prov, LOCALOFF + 65536, pattern("KEEP"))
    sess = session(prov, compression=compression, checksum=checksum)
    written = _replay(sess, scen)
    if scen == "error-bad-checksum":
        # "Hash mismatch.": no reply, both connections closed, exit 75, nothing written.
        assert is_closed(sess.conn2) and is_closed(sess.conn1)
        assert sess.wait() == EX_TEMPFAIL
        assert sess.events == [worker.EVENT_CONNECT, worker.EVENT_DISCONNECT]
        assert read_at(prov, LOCALOFF + 65536, 4096) == pattern("KEEP")
        return
    assert quiet(sess.conn2)        # the final KEEPALIVE (if any) gets no reply
    assert sess.finish() == EX_TEMPFAIL
    assert sess.events == [worker.EVENT_CONNECT, worker.EVENT_DISCONNECT]
    for offset, data in written.items():
        assert read_at(prov, LOCALOFF + offset, len(data)) == data, offset
    if image is not None:
        ref = (vectors.METADATA / "secondary-written" /
               f"{image}.img-first1MiB.canonical.bin").read_bytes()
        assert read_at(prov, 0, 4096) == ref[:4096]
        # The DELETE at 1 MiB punched a hole: zeros, as FreeBSD's image shows (never written).
        assert read_at(prov, LOCALOFF + MIB, 4096) == bytes(4096)
    assert read_at(prov, 4096, MAPSIZE) == bytes(MAPSIZE)


# -- §9.4 on a live worker ---------------------------------------------------------------------

DISK_MAP = bytes([0x05, 0x80]) + bytes(MAPSIZE - 2)


@pytest.mark.parametrize("p,syncsrc,amap", [
    ((2, 2), 2, MAP_FULL), ((2, 3), 1, MAP_FULL), ((2, 4), 1, MAP_FULL),
    ((3, 2), 2, MAP_DISK), ((3, 3), 1, MAP_DISK), ((3, 4), 1, MAP_FULL),
    ((4, 3), 1, MAP_DISK), ((4, 4), 1, MAP_FULL),
])
def test_handshake_decisions(p: tuple[int, int], syncsrc: int, amap: str, tmp_path: Path,
                             session: Callable[..., Session]) -> None:
    prov = make_provider(tmp_path / "p.img", RESUID, 3, 3, "secondary", DISK_MAP)
    before = read_at(prov, 0, 4096)
    sess = session(prov)
    sess.handshake_nv(RESUID, *p)
    version, ans, payload = sess.answer()
    assert version == 2
    assert fields(ans)[:6] == [("datasize", "int64", DATASIZE), ("extentsize", "int32", EXTENTSIZE),
                               ("localcnt", "uint64", 3), ("remotecnt", "uint64", 3),
                               ("syncsrc", "uint8", syncsrc), ("mapsize", "uint32", MAPSIZE)]
    expected_map = DISK_MAP if amap == MAP_DISK else b"\xff" * MAPSIZE
    assert fields(ans)[6:] == [("size", "uint32", MAPSIZE)]   # neither hole nor checksum
    assert pipeline.decode(ans, payload, MAPSIZE) == expected_map
    # The map on disk stays until the first request proves the primary merged it.
    assert read_at(prov, 4096, MAPSIZE) == DISK_MAP
    assert sess.finish() == EX_TEMPFAIL
    assert read_at(prov, 0, 4096) == before      # a secondary never changes its counters
    assert sess.events == [worker.EVENT_CONNECT, worker.EVENT_DISCONNECT]


def test_split_brain(tmp_path: Path, session: Callable[..., Session]) -> None:
    prov = make_provider(tmp_path / "p.img", RESUID, 3, 3, "secondary", DISK_MAP)
    sess = session(prov)
    sess.handshake_nv(RESUID, 4, 2)
    _v, ans, payload = sess.answer()
    assert fields(ans) == [("datasize", "int64", DATASIZE), ("extentsize", "int32", EXTENTSIZE),
                           ("localcnt", "uint64", 3), ("remotecnt", "uint64", 3),
                           ("errmsg", "string", "Split-brain condition!")]
    assert payload == b""
    assert sess.wait() == EX_CONFIG
    assert sess.events == [worker.EVENT_SPLITBRAIN]
    assert is_closed(sess.conn1) and is_closed(sess.conn2)


def test_resuid_mismatch(tmp_path: Path, session: Callable[..., Session]) -> None:
    prov = make_provider(tmp_path / "p.img", RESUID, 3, 3, "secondary")
    before = read_at(prov, 0, LOCALOFF)
    sess = session(prov)
    sess.handshake_nv(42, 3, 3)
    _v, ans, _p = sess.answer()
    assert fields(ans)[-1] == (
        "errmsg", "string",
        f"Resource unique ID mismatch (primary=42, secondary={RESUID}).")
    assert [n for n, _t, _v in fields(ans)] == ["datasize", "extentsize", "localcnt",
                                               "remotecnt", "errmsg"]
    assert sess.wait() == EX_CONFIG
    assert sess.events == []
    assert read_at(prov, 0, LOCALOFF) == before


@pytest.mark.parametrize("virgin", [True, False])
def test_first_pairing_adopts_resuid(virgin: bool, tmp_path: Path,
                                     session: Callable[..., Session]) -> None:
    prov = make_provider(tmp_path / "p.img")
    sess = session(prov)
    sess.handshake_nv(RESUID, 0 if virgin else 5, 0, virgin=virgin)
    _v, ans, payload = sess.answer()
    head = [("datasize", "int64", DATASIZE), ("extentsize", "int32", EXTENTSIZE),
            ("localcnt", "uint64", 0), ("remotecnt", "uint64", 0), ("virgin", "int8", 1),
            ("syncsrc", "uint8", 1)]
    if virgin:
        assert fields(ans) == head + [("mapsize", "uint32", 0)] and payload == b""
    else:
        assert fields(ans) == head + [("mapsize", "uint32", MAPSIZE), ("size", "uint32", MAPSIZE)]
        assert payload == b"\xff" * MAPSIZE
    md = metadata.read(str(prov), "test")
    assert (md.resuid, md.localcnt, md.remotecnt, md.prevrole) == (RESUID, 0, 0, "secondary")
    assert sess.finish() == EX_TEMPFAIL


# -- requests ---------------------------------------------------------------------------------

def test_activemap_cleared_before_first_request(tmp_path: Path,
                                                session: Callable[..., Session]) -> None:
    prov = adopted(tmp_path, amap=DISK_MAP)
    sess = session(prov)
    sess.handshake_nv(RESUID, 0, 0)
    _v, ans, payload = sess.answer()
    assert pipeline.decode(ans, payload, MAPSIZE) == DISK_MAP
    sess.send(frame(nvmod.NV().add_uint8("cmd", secondary.HIO_KEEPALIVE)))
    assert quiet(sess.conn2)
    assert read_at(prov, 4096, MAPSIZE) == DISK_MAP    # a keepalive is no request
    sess.send(request(secondary.HIO_READ, 1, 0, 4096))
    _v, rep, data = sess.reply()
    assert fields(rep) == [("seq", "uint64", 1), ("compression", "string", "hole"),
                           ("size", "uint32", 4)]
    assert read_at(prov, 4096, MAPSIZE) == bytes(MAPSIZE)
    assert sess.finish() == EX_TEMPFAIL


def test_memsync_replies_in_order(tmp_path: Path, session: Callable[..., Session]) -> None:
    sess = in_sync_session(session, tmp_path)
    n = 40
    blob = b"".join(request(secondary.HIO_WRITE, seq, seq * 4096, 4096, pattern(f"M{seq}"),
                            memsync=seq % 3 != 0) for seq in range(1, n + 1))
    sess.send(blob)
    seen: list[tuple[int, bool]] = []
    expected_replies = n + sum(1 for s in range(1, n + 1) if s % 3 != 0)
    for _ in range(expected_replies):
        _v, rep, _p = sess.reply()
        f = fields(rep)
        seq = rep.get_uint64("seq")
        received = rep.exists("received")
        assert f == ([("seq", "uint64", seq), ("received", "int8", 1)] if received
                     else [("seq", "uint64", seq)])
        seen.append((seq, received))
    for seq in range(1, n + 1):
        final = seen.index((seq, False))
        if seq % 3:
            assert seen.index((seq, True)) < final
        else:
            assert (seq, True) not in seen
    # FIFO: the final replies come in request order
    assert [s for s, r in seen if not r] == list(range(1, n + 1))
    assert sess.finish() == EX_TEMPFAIL
    for seq in range(1, n + 1):
        assert read_at(tmp_path / "prov.img", LOCALOFF + seq * 4096, 4096) == pattern(f"M{seq}")


def test_read_after_write_sees_it_and_keepalive_gets_no_reply(
        tmp_path: Path, session: Callable[..., Session]) -> None:
    sess = in_sync_session(session, tmp_path, compression="none", checksum="crc32")
    data = os.urandom(MIB)
    sess.send(request(secondary.HIO_WRITE, 1, 8 * MIB, MIB, data, checksum="sha256")
              + frame(nvmod.NV().add_uint8("cmd", secondary.HIO_KEEPALIVE))
              + request(secondary.HIO_READ, 2, 8 * MIB, MIB))
    assert fields(sess.reply()[1]) == [("seq", "uint64", 1)]
    _v, rep, payload = sess.reply()
    assert [n for n, _t, _v in fields(rep)] == ["seq", "checksum", "hash", "size"]
    assert pipeline.decode(rep, payload, MIB) == data
    assert quiet(sess.conn2)
    assert sess.finish() == EX_TEMPFAIL


def _hio(cmd: int, offset: int = 0, length: int = 0) -> secondary._Hio:
    hio = secondary._Hio(cmd, 1)
    hio.offset, hio.length = offset, length
    return hio


@pytest.mark.parametrize("a,b,blocks", [
    ((W, 0, 4096), (R, 0, 512), True),           # a READ sees the earlier WRITE
    ((R, 0, 4096), (W, 4096 - 512, 512), True),  # a WRITE does not overtake an earlier READ
    ((W, 0, 4096), (W, 4096, 4096), False),      # adjacent, independent
    ((R, 0, 4096), (R, 0, 4096), False),         # READs never conflict
    ((secondary.HIO_DELETE, 0, 8192), (R, 4096, 512), True),
    ((secondary.HIO_FLUSH, 0, 0), (R, 1 << 30, 512), True),   # FLUSH is a barrier both ways
    ((W, 1 << 30, 512), (secondary.HIO_FLUSH, 0, 0), True),
])
def test_disk_ordering_rule(a: tuple[int, int, int], b: tuple[int, int, int],
                            blocks: bool) -> None:
    assert secondary.Secondary._blocks(_hio(*a), _hio(*b)) is blocks


def test_pipelined_overlapping_requests_match_a_sequential_model(
        tmp_path: Path, session: Callable[..., Session]) -> None:
    """Thousands of pipelined READ/WRITE/DELETE/FLUSH on a small region, many overlapping:
    every READ returns what a strictly sequential secondary would, replies come in order."""
    import random
    rnd = random.Random(1234)
    region = 64 * 1024
    model = bytearray(pattern("ORIG", region))
    prov = adopted(tmp_path)
    write_at(prov, LOCALOFF, bytes(model))
    sess = session(prov, compression="none")
    sess.handshake_nv(RESUID, 0, 0)
    sess.answer()
    blob, expect = [], []
    for seq in range(1, 3001):
        kind = rnd.random()
        off = rnd.randrange(0, region // 512) * 512
        length = min(rnd.choice((512, 1024, 4096, 16384)), region - off)
        if kind < 0.45:
            data = rnd.randbytes(length)
            blob.append(request(W, seq, off, length, data, memsync=kind < 0.1))
            model[off:off + length] = data
            expect.append((seq, None))
        elif kind < 0.9:
            blob.append(request(R, seq, off, length))
            expect.append((seq, bytes(model[off:off + length])))
        elif kind < 0.95:
            blob.append(request(secondary.HIO_DELETE, seq, off, length))
            model[off:off + length] = bytes(length)
            expect.append((seq, None))
        else:
            blob.append(request(secondary.HIO_FLUSH, seq))
            expect.append((seq, None))
    sender = threading.Thread(target=sess.conn1.sendall, args=(b"".join(blob),), daemon=True)
    sender.start()
    finals = []
    while len(finals) < len(expect):
        _v, rep, payload = sess.reply()
        assert not rep.exists("error")
        if rep.exists("received"):
            continue
        finals.append((rep.get_uint64("seq"), payload))
    sender.join()
    assert [s for s, _p in finals] == [s for s, _d in expect]      # arrival order
    for (seq, payload), (_s, data) in zip(finals, expect, strict=True):
        if data is not None:
            assert payload == data, seq
    assert sess.finish() == EX_TEMPFAIL
    assert read_at(prov, LOCALOFF, region) == bytes(model)


def test_delete_and_flush(tmp_path: Path, session: Callable[..., Session]) -> None:
    sess = in_sync_session(session, tmp_path)
    prov = tmp_path / "prov.img"
    sess.send(request(secondary.HIO_WRITE, 1, 0, 3 * MIB // 4, b"x" * (3 * MIB // 4)))
    assert fields(sess.reply()[1]) == [("seq", "uint64", 1)]
    sess.send(request(secondary.HIO_DELETE, 2, 0, 3 * MIB))    # DELETE may exceed MAXPHYS
    assert fields(sess.reply()[1]) == [("seq", "uint64", 2)]
    sess.send(request(secondary.HIO_FLUSH, 3))
    assert fields(sess.reply()[1]) == [("seq", "uint64", 3)]
    assert read_at(prov, LOCALOFF, 3 * MIB // 4) == bytes(3 * MIB // 4)
    st = sess.status()
    assert (st.get_uint64("stat_delete"), st.get_uint64("stat_flush")) == (1, 1)
    assert sess.finish() == EX_TEMPFAIL


def test_status_via_ctrl(tmp_path: Path, session: Callable[..., Session]) -> None:
    sess = in_sync_session(session, tmp_path)
    sess.send(request(secondary.HIO_WRITE, 1, 0, 4096, pattern("S")))
    sess.send(request(secondary.HIO_READ, 2, 0, 4096))
    sess.send(request(secondary.HIO_READ, 3, 100, 4096))           # EINVAL
    sess.send(request(secondary.HIO_WRITE, 4, 1, 512, bytes(512)))  # EINVAL, drained
    for _ in range(4):
        sess.reply()
    # The slot of a reply is given back just after its sendmsg: let the send thread get there.
    deadline = time.monotonic() + 5
    st = sess.status()
    while (st.get_uint64("idle_queue_size") != secondary.HIO_MAX - 1
           and time.monotonic() < deadline):
        time.sleep(0.01)
        st = sess.status()
    assert fields(st) == [
        ("status", "string", "complete"), ("extentsize", "uint32", EXTENTSIZE),
        ("keepdirty", "uint32", 0), ("dirty", "uint64", 0),
        ("stat_read", "uint64", 1), ("stat_write", "uint64", 1),
        ("stat_delete", "uint64", 0), ("stat_flush", "uint64", 0),
        ("stat_activemap_update", "uint64", 0),
        ("stat_read_error", "uint64", 1), ("stat_write_error", "uint64", 1),
        ("stat_delete_error", "uint64", 0), ("stat_flush_error", "uint64", 0),
        ("idle_queue_size", "uint64", secondary.HIO_MAX - 1),
        ("local_queue_size", "uint64", 0), ("send_queue_size", "uint64", 0),
        ("error", "int16", 0)]
    assert sess.finish() == EX_TEMPFAIL


# -- bad input: refused or dropped, never written ------------------------------------------------

BAD_DATA = b"\xee" * 4096


def _nv_frame(**items: tuple[int, object]) -> bytes:
    msg = nvmod.NV()
    for name, (t, v) in items.items():
        msg.add(name, t, v)
    return frame(msg)


REFUSED = {
    # name: request frame; the answer must be {seq, error=EINVAL} and the stream stays usable
    "seq-0": request(W, 0, 0, 4096, BAD_DATA),
    "misaligned-offset": request(W, 7, 100, 4096, BAD_DATA),
    "misaligned-length": request(W, 7, 0, 4000, BAD_DATA[:4000]),
    "past-datasize": request(W, 7, DATASIZE - 2048, 4096, BAD_DATA),
    "length-zero": request(W, 7, 0, 0, b""),
    "length-over-maxphys": request(W, 7, 0, 2 * MIB, b"\xee" * (2 * MIB)),
    "read-over-maxphys": request(R, 7, 0, 2 * MIB),
    "read-past-datasize": request(R, 7, DATASIZE - 512, 1024),
    "data-shorter-than-length": request(W, 7, 0, 8192, BAD_DATA),
    "write-without-data": request(W, 7, 0, 4096),
    "missing-offset": _nv_frame(cmd=(nvmod.UINT8, W), seq=(nvmod.UINT64, 7),
                                length=(nvmod.UINT64, 4096)),
    "offset-wrong-type": _nv_frame(cmd=(nvmod.UINT8, R), seq=(nvmod.UINT64, 7),
                                   offset=(nvmod.UINT32, 0), length=(nvmod.UINT64, 4096)),
    "data-on-read": frame(
        nvmod.NV().add_uint8("cmd", R).add_uint64("seq", 7).add_uint64("offset", 0)
        .add_uint64("length", 4096).add_uint32("size", 4096), BAD_DATA),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_invalid_request_refused(name: str, tmp_path: Path,
                                 session: Callable[..., Session]) -> None:
    prov = adopted(tmp_path)
    write_at(prov, LOCALOFF, pattern("ORIG", MIB))
    digest = data_digest(prov)
    sess = session(prov)
    sess.handshake_nv(RESUID, 0, 0)
    sess.answer()
    sess.send(REFUSED[name])
    _v, rep, payload = sess.reply()
    seq = 0 if name == "seq-0" else 7
    assert fields(rep) == [("seq", "uint64", seq), ("error", "int16", 22)] and payload == b""
    # The stream is still in step: a READ right behind gets the untouched data.
    sess.send(request(R, 8, 0, 4096))
    _v, rep, payload = sess.reply()
    assert rep.get_uint64("seq") == 8 and payload == pattern("ORIG", MIB)[:4096]
    assert sess.finish() == EX_TEMPFAIL
    assert data_digest(prov) == digest


def _bad_hash() -> bytes:
    msg = nvmod.NV().add_uint8("cmd", W).add_uint64("seq", 1).add_uint64("offset", 0)
    msg.add_uint64("length", 4096).add_string("checksum", "sha256")
    msg.add_uint8_array("hash", hashlib.sha256(b"other").digest()).add_uint32("size", 4096)
    return frame(msg, BAD_DATA)


DROPPED = {
    # name: (bytes the primary sends, what the worker logs); the connection must be dropped
    "missing-cmd": (_nv_frame(seq=(nvmod.UINT64, 1), offset=(nvmod.UINT64, 0),
                              length=(nvmod.UINT64, 4096)),
                    "Header contains no 'cmd' field."),
    "unknown-cmd": (request(9, 1, 0, 4096, BAD_DATA), "Header contains invalid 'cmd' (9)."),
    "cmd-wrong-type": (_nv_frame(cmd=(nvmod.UINT16, W), seq=(nvmod.UINT64, 1)),
                       "Header contains no 'cmd' field."),
    "empty-nv": (struct.pack("<BI", 2, 0), "Header contains no 'cmd' field."),
    "bad-hash": (_bad_hash(), "Hash mismatch."),
    "bad-lzf": (frame(nvmod.NV().add_uint8("cmd", W).add_uint64("seq", 1)
                      .add_uint64("offset", 0).add_uint64("length", 4096)
                      .add_string("compression", "lzf").add_uint32("size", 8),
                      struct.pack("<I", 4096) + b"\xff\xff\xff\xff"),
                "Unable to receive request data"),
    "absurd-size": (frame(nvmod.NV().add_uint8("cmd", W).add_uint64("seq", 1)
                          .add_uint64("offset", 0).add_uint64("length", 4 * MIB)
                          .add_uint32("size", 0xFFFF0000)),
                    "Unable to skip request data of 4294901760 bytes"),
    "future-version": (frame(nvmod.NV().add_uint8("cmd", secondary.HIO_KEEPALIVE), version=3),
                       "Unable to receive request header: "),
}


@pytest.mark.parametrize("name", sorted(DROPPED))
def test_malformed_request_drops_connection(name: str, tmp_path: Path,
                                            session: Callable[..., Session],
                                            capfd: pytest.CaptureFixture[str]) -> None:
    prov = adopted(tmp_path)
    write_at(prov, LOCALOFF, pattern("ORIG", MIB))
    digest = data_digest(prov)
    sess = session(prov)
    sess.handshake_nv(RESUID, 0, 0)
    sess.answer()
    raw, text = DROPPED[name]
    sess.send(raw)
    assert is_closed(sess.conn2)            # no reply, just the end of the connection
    assert sess.wait() == EX_TEMPFAIL
    assert sess.events == [worker.EVENT_CONNECT, worker.EVENT_DISCONNECT]
    assert data_digest(prov) == digest
    assert f"[ERROR] [test] (secondary) {text}" in capfd.readouterr().err


def test_primary_stops_mid_payload(tmp_path: Path, session: Callable[..., Session]) -> None:
    prov = adopted(tmp_path)
    write_at(prov, LOCALOFF, pattern("ORIG", MIB))
    digest = data_digest(prov)
    sess = session(prov)
    sess.handshake_nv(RESUID, 0, 0)
    sess.answer()
    whole = request(W, 1, 0, MIB, b"\xee" * MIB)
    sess.send(whole[:len(whole) // 2])
    time.sleep(0.2)
    assert sess.finish() == EX_TEMPFAIL
    assert sess.events == [worker.EVENT_CONNECT, worker.EVENT_DISCONNECT]
    assert data_digest(prov) == digest


def test_requests_received_before_a_failure_still_reach_the_disk(
        tmp_path: Path, session: Callable[..., Session]) -> None:
    sess = in_sync_session(session, tmp_path)
    prov = tmp_path / "prov.img"
    sess.send(b"".join(request(W, s, s * MIB, MIB, bytes([s]) * MIB) for s in range(1, 9))
              + DROPPED["unknown-cmd"][0])
    assert sess.wait() == EX_TEMPFAIL
    for s in range(1, 9):
        assert read_at(prov, LOCALOFF + s * MIB, MIB) == bytes([s]) * MIB


def test_disk_error_is_answered_with_freebsd_errno(tmp_path: Path,
                                                  session: Callable[..., Session]) -> None:
    """A provider shorter than its metadata says: a READ past its end is a short read (EIO)."""
    prov = adopted(tmp_path)
    with open(prov, "r+b") as f:
        f.truncate(MEDIASIZE // 2)
    sess = session(prov)
    sess.handshake_nv(RESUID, 0, 0)
    sess.answer()
    sess.send(request(R, 1, MEDIASIZE * 3 // 4, 4096))
    assert fields(sess.reply()[1]) == [("seq", "uint64", 1), ("error", "int16", 5)]
    assert sess.status().get_uint64("stat_read_error") == 1
    assert sess.finish() == EX_TEMPFAIL


def test_provider_locked_by_another_process(tmp_path: Path,
                                            session: Callable[..., Session],
                                            capfd: pytest.CaptureFixture[str]) -> None:
    prov = adopted(tmp_path)
    with open(prov, "rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        sess = session(prov)
        sess.handshake_nv(RESUID, 0, 0)
        assert sess.wait() == EX_NOINPUT
    assert f"Unable to lock {prov}: " in capfd.readouterr().err
    assert is_closed(sess.conn1)


@pytest.mark.parametrize("kind", ["missing", "fifo", "blank"])
def test_unusable_provider(kind: str, tmp_path: Path, session: Callable[..., Session],
                           capfd: pytest.CaptureFixture[str]) -> None:
    prov = tmp_path / "prov.img"
    if kind == "fifo":
        os.mkfifo(prov)
    elif kind == "blank":
        with open(prov, "wb") as f:    # never initialised: no metadata at all
            f.truncate(MEDIASIZE)
    sess = session(prov)
    sess.handshake_nv(RESUID, 0, 0)
    assert sess.wait() == EX_NOINPUT
    assert is_closed(sess.conn1)
    expected = {
        "missing": f"Unable to open {prov}: No such file or directory.",
        "fifo": f"{prov} is neither GEOM provider nor regular file.",
        "blank": f"Unable to read metadata from {prov}: No such file or directory.",
    }[kind]
    assert f"[ERROR] [test] (secondary) {expected}" in capfd.readouterr().err


def test_wrong_resource_metadata(tmp_path: Path, session: Callable[..., Session],
                                 capfd: pytest.CaptureFixture[str]) -> None:
    prov = adopted(tmp_path)
    fd = os.open(prov, os.O_RDWR)
    metadata.write(fd, Metadata("other", DATASIZE, EXTENTSIZE, 64, LOCALOFF, RESUID))
    os.close(fd)
    sess = session(prov)
    sess.handshake_nv(RESUID, 0, 0)
    assert sess.wait() == EX_NOINPUT
    assert f"Provider {prov} is not part of resource test." in capfd.readouterr().err


# -- in process: timeouts and a quick benchmark ---------------------------------------------------

def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        client = socket.create_connection(lsock.getsockname())
        server, _ = lsock.accept()
    return client, server


def _inprocess(tmp: Path, prov: Path, hs: nvmod.NV, **res: str
               ) -> tuple[socket.socket, socket.socket, threading.Thread, list[int]]:
    c1, s1 = _tcp_pair()
    c2, s2 = _tcp_pair()
    resource = Resource(name="test", provname="test", local=str(prov),
                        remote="tcp4://127.0.0.1", source="", replication="fullsync",
                        checksum=res.get("checksum", "none"),
                        compression=res.get("compression", "hole"), timeout=20, exec="",
                        metaflush=True)
    config = Config(path=str(tmp / "hast.conf"), control="", pidfile="", listen=[],
                    resources={"test": resource})
    ctx = worker.WorkerContext(config=config, resource=resource, role="secondary",
                               remotein=s1, remoteout=s2, handshake=hs, version=2)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(secondary.run(ctx)), daemon=True)
    thread.start()
    for c in (c1, c2):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.settimeout(30)
    return c1, c2, thread, result


def _hs() -> nvmod.NV:
    return (nvmod.NV().add_string("resource", "test").add_uint8_array("token", TOKEN)
            .add_uint64("resuid", RESUID).add_uint64("localcnt", 0).add_uint64("remotecnt", 0))


def test_silent_primary_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secondary, "REMOTEIN_TIMEOUT", 1)
    c1, c2, thread, result = _inprocess(tmp_path, adopted(tmp_path), _hs())
    with c1, c2:
        recv_frame(c1)
        start = time.monotonic()
        thread.join(15)
        assert result == [EX_TEMPFAIL]
        assert 0.5 < time.monotonic() - start < 10
        assert is_closed(c2)


@pytest.mark.skipif(not _aio.AVAILABLE, reason="Linux native AIO only")
def test_primary_gone_wakes_the_aio_reaper(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """When the primary goes away, the stop wakes the AIO reaper (Ring.wake()) instead of
    leaving it in io_getevents until its timeout: the worker took a second to exit.  With
    an hour's timeout here, a reaper that is not woken is still running when the session
    ends (serve() gives up joining it after 10 s), which fails the test; no timing decides."""
    monkeypatch.setattr(secondary, "AIO_REAP_TIMEOUT", 3600.0)
    reaper: list[str] = []
    aio_loop = secondary.Secondary.aio_loop

    def watched(self: secondary.Secondary) -> None:
        reaper.append("started")
        try:
            aio_loop(self)
        finally:
            reaper.append("returned")

    monkeypatch.setattr(secondary.Secondary, "aio_loop", watched)
    c1, c2, thread, result = _inprocess(tmp_path, adopted(tmp_path), _hs())
    with c1, c2:
        recv_frame(c1)
        c1.sendall(request(W, 1, 0, 4096, pattern("aio")))
        _v, rep, _p = recv_frame(c2)
        assert not rep.exists("error")
        c1.close()
        c2.close()
        thread.join(60)
    assert result == [EX_TEMPFAIL]
    if not reaper:
        pytest.skip("provider without O_DIRECT: no AIO reaper")
    assert reaper == ["started", "returned"]


def _cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def test_bench_throughput(tmp_path: Path, session: Callable[..., Session],
                          capsys: pytest.CaptureFixture[str]) -> None:
    """Not a timing assertion: what one worker sustains over loopback, requests pipelined
    (the test primary is Python too, so small-request rates are a lower bound)."""
    sess = in_sync_session(session, tmp_path)
    assert sess.handle is not None
    lines = []
    for size, count in ((MIB, 256), (4096, 5000)):
        data = os.urandom(size)
        for cmd in (W, R):
            blob = b"".join(request(cmd, i + 1, (i * size) % (64 * MIB), size,
                                    data if cmd == W else None) for i in range(count))
            cpu = _cpu_seconds(sess.handle.pid)
            start = time.perf_counter()
            sender = threading.Thread(target=sess.conn1.sendall, args=(blob,), daemon=True)
            sender.start()
            for _ in range(count):
                _v, rep, _p = sess.reply()
                assert not rep.exists("error")
            elapsed = time.perf_counter() - start
            sender.join()
            cpu = _cpu_seconds(sess.handle.pid) - cpu
            lines.append(f"secondary {'WRITE' if cmd == W else 'READ '} {size:7d} B x {count}: "
                         f"{count / elapsed:9,.0f} op/s {size * count / elapsed / MIB:8,.1f} MiB/s"
                         f"  worker CPU {cpu / count * 1e6:6.1f} us/op")
    assert sess.finish() == EX_TEMPFAIL
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def test_unexpected_exception_ends_the_session(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the disk path is logged with its traceback and ends the session (EX_SOFTWARE)
    instead of leaving a worker that silently stops answering."""
    def broken(self: secondary.Secondary, fd: int, hio: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(secondary.Secondary, "_execute", broken)
    c1, c2, thread, result = _inprocess(tmp_path, adopted(tmp_path), _hs())
    with c1, c2:
        recv_frame(c1)
        c1.sendall(request(R, 1, 0, 4096))
        assert is_closed(c2)
        thread.join(15)
        assert result == [EX_SOFTWARE]


def test_aligned_buffers_are_used_for_disk_io() -> None:
    """The data path hands _io aligned buffers (no bounce copy on O_DIRECT providers)."""
    buf = _io.AlignedBuffer(secondary.MAXPHYS)
    assert buf.address % 4096 == 0 and len(memoryview(buf)[:4096]) == 4096
