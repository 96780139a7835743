"""Our primary on the wire, compared field by field and type by type with FreeBSD's.

A scripted secondary answers with the bytes FreeBSD's own hastd sent (the vectors), and
records what our primary (a real ``hastd`` worker, driven through its NBD export with
qemu-io) puts on the wire.  Each recorded message must carry the names and types, in order,
of the primary messages in ../shared/vectors/freebsd-hastd/wire, and the same values where
the value is deterministic (the resuid and the token are random; our LZF stream differs).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hast import nv, pipeline, proto
from tests.test_daemon import REPO, HastNode, daemon_env, poll
from tests.vectors import WIRE

SIZE = 256 * 1024 * 1024  # the vectors' provider


def vector(scenario: str, label: str) -> tuple[dict, bytes]:
    meta = json.loads((WIRE / scenario / f"{label}.json").read_text())
    return meta, (WIRE / scenario / f"{label}.canonical.bin").read_bytes()


def shape(msg: nv.NV) -> list[tuple[str, int]]:
    return [(name, nvtype) for name, nvtype, _value in msg]


def vector_shape(meta: dict) -> list[tuple[str, int]]:
    return [(f["name"], nv.TYPES_BY_NAME[f["type"]]) for f in meta["nv"]]


def vector_values(meta: dict) -> dict[str, object]:
    return nv.from_fields((f["name"], f["type"], f["value"]) for f in meta["nv"]).to_dict()


class ScriptedSecondary:
    """Handshake from the vectors, then answers every request like FreeBSD's secondary."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.handshake: list[tuple[int, nv.NV]] = []
        self.requests: list[tuple[nv.NV, bytes]] = []
        self.data = bytearray(SIZE)
        self.error: BaseException | None = None
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn1, _ = self.listener.accept()
            self.conns.append(conn1)
            self.handshake.append(proto.recv_frame(conn1))
            conn1.sendall(vector("virgin", "02-s2c-handshake1-reply")[1])
            conn2, _ = self.listener.accept()
            self.conns.append(conn2)
            self.handshake.append(proto.recv_frame(conn2))
            conn1.sendall(vector("virgin", "04-s2c-handshake2-reply")[1])
            while True:
                _v, msg = proto.recv_frame(conn1)
                payload = bytes(proto.recv_exact(conn1, proto.payload_size(msg)))
                self.requests.append((msg, payload))
                self._answer(conn2, msg, payload)
        except (OSError, ValueError) as exc:
            if not isinstance(exc, proto.ProtoError):
                self.error = exc

    def _answer(self, conn2: socket.socket, msg: nv.NV, payload: bytes) -> None:
        cmd, seq = msg.get_uint8("cmd"), msg.get_uint64("seq")
        off, length = msg.get_uint64("offset"), msg.get_uint64("length")
        if cmd == 5:
            return
        if cmd == 2:
            data = memoryview(pipeline.decode(msg, payload, length))
            self.data[off:off + length] = data
            if msg.exists("memsync"):
                proto.send_frame(conn2, 2, nv.NV().add_uint64("seq", seq).add_int8("received", 1))
        reply = nv.NV().add_uint64("seq", seq)
        data = None
        if cmd == 1:
            data = pipeline.encode(reply, bytes(self.data[off:off + length]), "hole", "none")
        proto.send_frame(conn2, 2, reply, data)

    def close(self) -> None:
        for sock in [self.listener, *self.conns]:
            sock.close()
        self.thread.join(10)


def qemu_io(node: HastNode, *cmds: str) -> None:
    qemu = shutil.which("qemu-io")
    assert qemu, "qemu-io is required (qemu-utils)"
    argv = [qemu, "-f", "raw", "-t", "writeback"]  # no FUA: the mode decides
    for c in cmds:
        argv += ["-c", c]
    uri = f"nbd+unix:///test?socket={node.root / 'test.sock'}"
    res = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "failed" not in res.stdout, res.stdout + res.stderr


@pytest.fixture
def session(tmp_path: Path):
    def start(extra: dict[str, str]) -> tuple[HastNode, ScriptedSecondary]:
        peer = ScriptedSecondary()
        node = HastNode(tmp_path)
        node.write_conf({"test": {"remote": f"127.0.0.1:{peer.port}", **extra}})
        with open(tmp_path / "test.img", "wb") as fh:
            fh.truncate(SIZE)
        subprocess.run([sys.executable, "-m", "hast.ctl", "create", "-c", str(node.conf),
                        "test"], cwd=REPO, env=daemon_env(), check=True, capture_output=True)
        node.start()
        node.role("primary")
        started.append((node, peer))
        poll(lambda: len(peer.handshake) == 2 and (tmp_path / "test.sock").exists(),
             "handshake and NBD export")
        return node, peer

    started: list[tuple[HastNode, ScriptedSecondary]] = []
    yield start
    for node, peer in started:
        node.stop()
        peer.close()


def test_handshake_is_freebsds(session) -> None:
    _node, peer = session({})
    (v1, hs1), (v2, hs2) = peer.handshake
    meta1, _ = vector("virgin", "01-c2s-handshake1")
    meta3, _ = vector("virgin", "03-c2s-handshake2")
    assert v1 == meta1["header"]["version"] == 1   # the first frame says version 1
    assert shape(hs1) == vector_shape(meta1) and hs1 == nv.from_fields(
        (f["name"], f["type"], f["value"]) for f in meta1["nv"])
    assert v2 == meta3["header"]["version"] == 2
    assert shape(hs2) == vector_shape(meta3)        # resource, token, virgin, resuid, counters
    token = vector_values(vector("virgin", "02-s2c-handshake1-reply")[0])["token"]
    assert hs2.get_uint8_array("token") == token
    assert hs2.get_uint64("resuid") != 0 and hs2.get_int8("virgin") == 1


@pytest.mark.parametrize("mode,compression,checksum,scenario,label", [
    ("fullsync", "none", "none", "virgin", "05-c2s-write-off0-4k"),
    ("memsync", "none", "none", "virgin", "07-c2s-write-memsync-off4k"),
    ("fullsync", "hole", "none", "pipeline-secondary-default", "05-c2s-write-hole"),
    ("fullsync", "lzf", "none", "pipeline-secondary-default", "07-c2s-write-lzf"),
    ("fullsync", "none", "crc32", "pipeline-secondary-default", "09-c2s-write-crc32"),
    ("fullsync", "none", "sha256", "pipeline-secondary-default", "11-c2s-write-sha256"),
    ("fullsync", "lzf", "sha256", "pipeline-secondary-default", "13-c2s-write-lzf-sha256"),
])
def test_write_requests_are_freebsds(session, tmp_path: Path, mode: str, compression: str,
                                     checksum: str, scenario: str, label: str) -> None:
    meta, raw = vector(scenario, label)
    want = vector_values(meta)
    nvsize = meta["header"]["nv_size"]
    wire_msg = nv.NV.unpack(raw[5:5 + nvsize])
    data = bytes(pipeline.decode(wire_msg, raw[5 + nvsize:], want["length"]))
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    node, peer = session({"replication": mode, "compression": compression,
                          "checksum": checksum})
    qemu_io(node, f"write -s {src} {want['offset']} {want['length']}")
    poll(lambda: any(m.get_uint8("cmd") == 2 for m, _ in peer.requests), "the WRITE")
    msg, payload = next((m, p) for m, p in peer.requests if m.get_uint8("cmd") == 2)
    assert shape(msg) == vector_shape(meta)
    got = msg.to_dict()
    for key in ("cmd", "offset", "length", "memsync", "compression", "checksum"):
        assert got.get(key) == want.get(key), key
    if compression != "lzf":   # our LZF stream is valid but not liblzf's, byte for byte
        assert got["hash" if checksum != "none" else "size"] == want[
            "hash" if checksum != "none" else "size"]
        assert payload == raw[5 + nvsize:]
    assert peer.data[want["offset"]:want["offset"] + want["length"]] == data
    assert peer.error is None


def test_read_delete_flush_and_keepalive_are_freebsds(session) -> None:
    node, peer = session({})
    qemu_io(node, "write -P 0x61 0 4k", "discard 1M 4k", "flush")
    poll(lambda: {m.get_uint8("cmd") for m, _ in peer.requests} >= {2, 3, 4}, "the requests")
    by_cmd = {m.get_uint8("cmd"): m for m, _ in reversed(peer.requests)}
    for cmd, label in ((3, "12-c2s-delete-off1M-4k"), (4, "14-c2s-flush")):
        meta, _ = vector("virgin", label)
        assert shape(by_cmd[cmd]) == vector_shape(meta), label
        want, got = vector_values(meta), by_cmd[cmd].to_dict()
        assert (got["offset"], got["length"]) == (want["offset"], want["length"])
    # idle for one keepalive period: FreeBSD's primary sends {cmd=5} alone
    poll(lambda: any(m.get_uint8("cmd") == 5 for m, _ in peer.requests), "a keepalive",
         timeout=25)
    keep = next(m for m, _ in peer.requests if m.get_uint8("cmd") == 5)
    assert shape(keep) == vector_shape(vector("virgin", "16-c2s-keepalive")[0])
    assert peer.error is None
