"""Frame layer: FreeBSD's exact frames, and bad frames refused before allocation."""

from __future__ import annotations

import socket
import struct

import pytest

from hast import nv, proto
from tests.vectors import wire_messages, wire_path

MESSAGES = wire_messages()


@pytest.mark.parametrize("ident,entry", MESSAGES, ids=[m[0] for m in MESSAGES])
def test_frames_match_freebsd(ident: str, entry: dict) -> None:
    canonical = wire_path(ident, ".canonical.bin").read_bytes()
    msg = nv.from_fields((f["name"], f["type"], f["value"]) for f in entry["nv"])
    nvsize = entry["header"]["nv_size"]
    payload = canonical[5 + nvsize:]
    a, b = socket.socketpair()
    with a, b:
        proto.send_frame(a, entry["header"]["version"], msg, payload or None)
        a.shutdown(socket.SHUT_WR)
        sent = b.recv(1 << 20)
        while chunk := b.recv(1 << 20):
            sent += chunk
    assert sent == canonical


def test_roundtrip_keeps_payload_for_the_caller() -> None:
    a, b = socket.socketpair()
    with a, b:
        proto.send_frame(a, 2, nv.NV().add_uint64("seq", 9).add_uint32("size", 3), b"abc")
        version, msg = proto.recv_frame(b)
        assert version == 2 and msg.get_uint64("seq") == 9
        assert bytes(proto.recv_exact(b, proto.payload_size(msg))) == b"abc"


@pytest.mark.parametrize("raw,err", [
    (struct.pack("<BI", 3, 22), "Unsupported protocol version"),
    (struct.pack("<BI", 2, 1 << 31), "exceeds"),
    (struct.pack("<BI", 2, 8) + b"\x99" * 8, "Malformed nv"),
    (struct.pack("<BI", 2, 40) + b"\x02\x04", "Connection closed"),
])
def test_bad_frames_raise_proto_error(raw: bytes, err: str) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(proto.ProtoError, match=err):
            proto.recv_frame(b)


def test_empty_nv_is_never_sent_but_accepted() -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ValueError):
            proto.send_frame(a, 2, nv.NV())
        a.sendall(struct.pack("<BI", 2, 0))
        assert proto.recv_frame(b) == (2, nv.NV())


def test_address_matching_ignores_the_port() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            assert proto.address_matches(conn, "127.0.0.1")
            assert proto.address_matches(conn, "tcp4://127.0.0.1:1")
            assert not proto.address_matches(conn, "127.0.0.2")
            assert not proto.address_matches(conn, "none")
            assert proto.format_peer(conn).startswith("tcp://127.0.0.1:")
