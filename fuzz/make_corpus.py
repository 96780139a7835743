#!/usr/bin/env python3
"""Regenerate the seed corpora in fuzz/corpus/<target>/ (committed; CI does not need this).

Sources: FreeBSD's own messages in the golden vectors (``HAST_VECTORS``, default
../shared/vectors/freebsd-hastd: every wire .bin, the metadata images), the valid example
configurations of hast-userland.md §1.10 and a few of its invalid cases (§1.11), and
hand-built NBD client sessions.  Each seed is a complete input in the target's own layout
(see the target's docstring).  Run: ``python fuzz/make_corpus.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fuzz.common import CORPUS, frame, nv_record  # noqa: E402
from hast import nv  # noqa: E402

VECTORS = Path(os.environ.get("HAST_VECTORS", HERE.parent.parent / "shared" / "vectors"
                              / "freebsd-hastd"))
WIRE = VECTORS / "wire"
METADATA = VECTORS / "metadata"
# The token the handshake targets substitute with the daemon's real one.
TOKEN_PLACEHOLDER = b"\xa5" * 16


def scenarios() -> list[tuple[str, list[tuple[dict, bytes]]]]:
    out = []
    for scen in sorted(p for p in WIRE.iterdir() if p.is_dir()):
        entries = json.loads((scen / "index.json").read_text())
        out.append((scen.name, [(e, (scen / e["file"]).read_bytes()) for e in entries]))
    return out


def blob_of(msg: bytes) -> bytes:
    size = struct.unpack_from("<I", msg, 1)[0]
    return msg[5:5 + size]


def with_placeholder(msg: bytes) -> bytes:
    """The frame with its 16-byte token replaced by TOKEN_PLACEHOLDER."""
    decoded = nv.NV.unpack(blob_of(msg))
    token = decoded.get_uint8_array("token")
    return msg.replace(token, TOKEN_PLACEHOLDER) if token else msg


def write(target: str, seeds: Iterable[bytes]) -> int:
    directory = CORPUS / target
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    seen = set()
    for data in seeds:
        digest = hashlib.sha1(data).hexdigest()[:16]
        if digest not in seen:
            seen.add(digest)
            (directory / digest).write_bytes(data)
    return len(seen)


# -- per target ----------------------------------------------------------------------------------

def nv_seeds() -> Iterable[bytes]:
    for _name, msgs in scenarios():
        for _e, msg in msgs:
            yield blob_of(msg)
    for img in sorted(METADATA.glob("*.img-first1MiB.bin")):
        yield img.read_bytes()[:4096].rstrip(b"\0")
    yield b""
    yield nv_record(17, b"resource", b"\xff\xfe\0")        # not UTF-8
    yield nv_record(0x82, b"cmd", b"\x01")                   # host-order flag
    yield nv_record(16, b"a", bytes(16)) + b"\0" * 10        # trailing zeros


def frame_seeds() -> Iterable[bytes]:
    for _name, msgs in scenarios():
        for _e, msg in msgs:
            yield msg
        yield b"".join(m for e, m in msgs if e["direction"] == "primary->secondary"
                       and e["connection"].startswith("conn1"))
        yield b"".join(m for e, m in msgs if e["connection"].startswith("conn2")
                       and e["direction"] == "secondary->primary")
    yield frame(b"")
    yield frame(b"", version=3)
    yield struct.pack("<BI", 2, 0xFFFFFFFF)


def wire_seeds() -> Iterable[bytes]:
    """Option byte (bit 0: request) + every request and reply header+nv of the vectors."""
    for _name, msgs in scenarios():
        for e, msg in msgs:
            if "handshake" in e["file"]:
                continue
            head = msg[:5 + len(blob_of(msg))]
            yield bytes([e["direction"] == "primary->secondary"]) + head


def pipeline_seeds() -> Iterable[bytes]:
    for _name, msgs in scenarios():
        for e, msg in msgs:
            if e["payload_len"]:
                expect = 512 if b"mapsize" in msg else 4096
                yield bytes([{512: 2, 4096: 6}[expect]]) + msg


def lzf_seeds() -> Iterable[bytes]:
    for _name, msgs in scenarios():
        for e, msg in msgs:
            names = {f["name"]: f["value"] for f in e["nv"]}
            if names.get("compression") == "lzf":
                payload = msg[-e["payload_len"]:]
                orig = struct.unpack_from("<I", payload)[0]
                yield orig.to_bytes(3, "little") + payload[4:]
    yield (100).to_bytes(3, "little") + b"\x00a\xe0\x10\x00"       # literal + long run
    yield (64).to_bytes(3, "little") + b"\x20\x00"                  # reference before start


def _userland_configs() -> list[str]:
    doc = (HERE.parent.parent / "shared" / "docs" / "hast-userland.md")
    configs: list[str] = []
    if doc.exists():
        text = doc.read_text()
        start = text.index("### 1.10")
        end = text.index("### 1.11")
        part = text[start:end].split("```")
        configs = [part[i].lstrip("\n") for i in range(1, len(part), 2)]
    # (c) with a node name the target's identity matches ((a) and (b) match as they are)
    return configs + [c.replace("alpha", "hasta") for c in configs if "alpha" in c]


def config_seeds() -> Iterable[bytes]:
    for text in _userland_configs():
        yield text.encode()
    yield b"replicaton fullsync\n"
    yield b"timeout 0\nresource r0 {\n on hasta {\n local /a\n remote 10.0.0.2\n }\n}\n"
    yield b"timeout 20s\n"
    yield b"resource r0 {\n on hasta {\n local /a\n remote 10.0.0.2\n }\n}\nresource r0 {\n"
    yield b"listen tcp://2001:db8::1/64\nresource r {\n on hasta {\n local /x\n remote none\n }}"
    yield b"listen 10.0.0.9:99999\ncontrol uds:///tmp/ctl\n"
    yield b"resource r0 {\n on hasta {\n local /a\n remote 10.0.0.2\n }\n"
    # py-hast.conf (the same input is fed to hast.settings.load)
    yield (b"maxio 1M\nmaxio shared 128K\ndirect off\ndevdir /dev/hast\n"
           b"sockdir /var/run/hast\nnbd shared 127.0.0.1:10809\n")
    yield b"maxio 3K   # not a power of two\n"


def metadata_seeds() -> Iterable[bytes]:
    for img in sorted(METADATA.rglob("*.img-first1MiB.bin")):
        yield img.read_bytes()[:4096]
    from hast.metadata import Metadata
    yield Metadata("test", 1 << 30, 2 << 20, 64, 4608, 7, 1, 2, "primary").pack()


def _control(cmd: int, names: Iterable[str], role: int | None = None) -> bytes:
    msg = nv.NV().add_uint8("cmd", cmd)
    if role is not None:
        msg.add_uint8("role", role)
    for i, name in enumerate(names):
        msg.add_string(f"resource{i}", name)
    return frame(msg.pack())


def control_seeds() -> Iterable[bytes]:
    yield _control(2, ["all"])
    yield _control(2, ["test"])
    yield _control(2, ["test", "other", "nosuch"])
    yield _control(1, ["test"], 3)
    yield _control(1, ["test"], 1)
    yield _control(1, ["all"], 1)
    yield _control(1, ["nosuch"], 2)
    yield _control(7, ["test"])
    yield _control(2, [])
    status = nv.NV().add_string("resource0", "test").add_string("role0", "secondary")
    status.add_int32("workerpid0", 42).add_string("status0", "complete")
    status.add_uint64("dirty0", 4096).add_uint32("extentsize0", 2 << 20)
    yield frame(status.pack())


def handshake_seeds() -> Iterable[bytes]:
    for _name, msgs in scenarios():
        for e, msg in msgs:
            if "handshake1" in e["file"] and e["direction"] == "primary->secondary":
                yield b"\0" + msg
            if "handshake2" in e["file"] and e["direction"] == "primary->secondary":
                yield b"\0" + msg
                yield b"\1" + with_placeholder(msg)
    step1 = nv.NV().add_string("resource", "other").add_uint8("version", 2)
    yield b"\0" + frame(step1.pack(), version=1)
    step1 = nv.NV().add_string("resource", "test").add_uint8("version", 9)
    yield b"\0" + frame(step1.pack(), version=1)


def secondary_seeds() -> Iterable[bytes]:
    for _name, msgs in scenarios():
        after = [(e, m) for e, m in msgs if e["direction"] == "primary->secondary"
                 and "handshake" not in e["file"]]
        if after:
            yield b"\0" + b"".join(m for _e, m in after)
            for _e, m in after:
                yield b"\0" + m
        for e, m in msgs:
            if "handshake2" in e["file"] and e["direction"] == "primary->secondary":
                blob = blob_of(m)
                yield b"\1" + struct.pack("<H", len(blob)) + blob


def replies_seeds() -> Iterable[bytes]:
    """flags, step-1 reply, step-3 answer + bitmap, then replies with the WRITE's seq.

    The vectors' answers describe FreeBSD's test provider; the target's primary has a
    2 MiB one, so the answers are rebuilt for it (same fields, same pipeline) to get past
    the size checks, next to the original ones.
    """
    from fuzz.hastd import MEDIASIZE
    from hast import metadata, pipeline

    placeholder = b"\xa5" * 8
    _mapsize, datasize, _localoff = metadata.layout(MEDIASIZE, metadata.HAST_EXTENTSIZE, 512)
    step1 = frame(nv.NV().add_uint8("version", 2).add_uint8_array("token", bytes(16)).pack())
    answers = []
    for mapdata, compression, checksum, extra in (
            (bytes(512), "hole", "none", None), (b"\xff" * 512, "none", "crc32", None),
            (None, "none", "none", None), (bytes(512), "lzf", "sha256", "virgin"),
            (None, "none", "none", "errmsg")):
        msg = nv.NV().add_int64("datasize", datasize).add_int32("extentsize", 2 << 20)
        msg.add_uint64("localcnt", 0).add_uint64("remotecnt", 0)
        if extra == "virgin":
            msg.add_int8("virgin", 1)
        if extra == "errmsg":
            msg.add_string("errmsg", "Split-brain condition!")
        else:
            msg.add_uint8("syncsrc", 1)
        msg.add_uint32("mapsize", 512 if mapdata is not None else 0)
        payload = pipeline.encode(msg, mapdata, compression, checksum)
        answers.append(frame(msg.pack(), bytes(payload or b"")))
    seq = nv.NV().add_uint64("seq", 0).pack()[:-8] + placeholder
    replies = [frame(seq), frame(seq + nv.NV().add_int8("received", 1).pack()) + frame(seq),
               frame(seq + nv.NV().add_int16("error", 5).pack()),
               frame(seq + nv.NV().add_uint32("size", 4).pack(), b"\0\0\0\0")]
    for answer in answers:
        for tail in replies:
            yield (b"\0" + struct.pack("<H", len(step1)) + step1
                   + struct.pack("<H", len(answer)) + answer + tail)
    for _name, msgs in scenarios():
        by_label = {e["file"]: m for e, m in msgs}
        first = next((m for f, m in by_label.items() if "handshake1-reply" in f), None)
        answer = next((m for f, m in by_label.items() if "handshake2-reply" in f), b"")
        if first is not None:
            yield (b"\1" + struct.pack("<H", len(first)) + first
                   + struct.pack("<H", len(answer)) + answer)


# NBD client sessions (fixed newstyle): see hast/frontends/nbd.py for the constants.
_IHAVEOPT = 0x49484156454F5054
_REQ = 0x25609513


def _opt(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", _IHAVEOPT, opt, len(data)) + data


def _go(name: bytes = b"", infos: tuple[int, ...] = (3,)) -> bytes:
    return _opt(7, struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))


def _req(cmd: int, offset: int, length: int, cookie: int = 1, flags: int = 0,
         data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", _REQ, flags, cmd, cookie, offset, length) + data


def nbd_seeds() -> Iterable[bytes]:
    hello = struct.pack(">I", 3)
    go = hello + _go()
    yield go + _req(0, 0, 4096) + _req(2, 0, 0)
    yield go + _req(1, 4096, 512, 2, data=b"\x11" * 512) + _req(0, 4096, 512, 3) + _req(2, 0, 0)
    yield go + _req(1, 0, 4096, 4, 1, b"\x22" * 4096) + _req(3, 0, 0, 5)
    yield go + _req(4, 8192, 4096, 6) + _req(6, 0, 1024, 7, 2) + _req(2, 0, 0)
    yield go + _req(1, 1 << 40, 512, 8, data=bytes(512)) + _req(0, 3, 5, 9)
    yield go + _req(7, 0, 512, 10) + _req(5, 0, 512, 11)
    yield hello + _opt(1, b"")
    yield hello + _opt(1, b"fuzz") + _req(0, 0, 512)
    yield hello + _opt(3) + _opt(6, struct.pack(">IH", 0, 2) + b"\0\1\0\2") + _opt(2)
    yield hello + _opt(8) + _opt(5) + _opt(10, b"x" * 12) + _go(b"fuzz") + _req(0, 0, 512)
    yield struct.pack(">I", 1) + _go()
    yield hello + _opt(7, b"\xff\xff\xff\xff\0\0")


def main() -> int:
    makers = {
        "nv": nv_seeds, "frame": frame_seeds, "wire": wire_seeds, "pipeline": pipeline_seeds,
        "lzf": lzf_seeds,
        "config": config_seeds, "metadata": metadata_seeds, "control": control_seeds,
        "handshake": handshake_seeds, "secondary": secondary_seeds, "nbd": nbd_seeds,
        "replies": replies_seeds,
    }
    if not WIRE.is_dir():
        print(f"no vectors at {VECTORS} (set HAST_VECTORS)", file=sys.stderr)
        return 1
    for name, maker in makers.items():
        print(f"{name}: {write(name, maker())} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
