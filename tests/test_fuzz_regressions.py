"""Regression tests for what fuzzing found (fuzz/, issue 6 item 2).

One test per finding, named after the parser and the input that broke it, each with the
smallest reproducer the fuzzer produced (or a hand-reduced one).  The fuzz target that found
it is named in the docstring: ``python fuzz/run.py --target <name> --reproduce <file>``
replays any saved input.
"""

from __future__ import annotations

import re

import pytest

from fuzz.common import frame, nv_record
from hast import config, nv

NODE = config.NodeIdentity(hostname="hasta", hostuuid="", hostid=0)


# -- nv: decoded strings must be encodable again (target nv, control) -------------------------

@pytest.mark.parametrize("blob", [
    nv_record(17, b"resource", b"\xff\xfe\0"),            # a string value that is not UTF-8
    nv_record(2, b"ver\x88ion", b"\2"),                    # a name that is not UTF-8
    nv_record(17, b"resource0", b"Vt\xff\x03\0") + nv_record(2, b"cmd", b"\2"),
])
def test_nv_non_utf8_round_trip(blob: bytes) -> None:
    """NV.unpack decodes non-UTF-8 bytes with surrogateescape; NV.pack raised
    UnicodeEncodeError on them, so the daemon could not echo a peer's resource name (its
    STATUS reply) -- hastd died on ``cmd=2 resource0="\\xfe"`` sent to the control socket."""
    msg = nv.NV.unpack(blob)
    assert msg.pack() == blob
    assert nv.NV.unpack(msg.pack()) == msg


# -- config: timeout with more digits than int() converts (target config) ---------------------

def test_config_timeout_with_5000_digits() -> None:
    """``timeout 111...1`` (5000 digits) raised ValueError from int() (Python's 4300-digit
    limit) instead of a ConfigError.  FreeBSD's atoi: strtol clamps to LONG_MAX, the cut to
    int gives -1, hence "Negative or zero timeout."."""
    text = "timeout " + "1" * 5000 + "\n"
    with pytest.raises(config.ConfigError, match="Negative or zero timeout."):
        config.parse(text, "fuzz.conf", NODE)


def test_config_timeout_with_leading_zeros_still_parses() -> None:
    text = ("timeout " + "0" * 5000 + "7\nresource r {\n on hasta {\n local /a\n"
            " remote 10.0.0.2\n }\n}\n")
    assert config.parse(text, "fuzz.conf", NODE).resources["r"].timeout == 7


def test_frame_helpers_are_nv_compatible() -> None:
    """The raw builders the regressions use produce what hast.nv produces."""
    assert nv_record(2, b"cmd", b"\2") == nv.NV().add_uint8("cmd", 2).pack()
    assert frame(b"") == b"\2\0\0\0\0"


# -- hastd echoes a non-UTF-8 resource name in its STATUS reply (target control) ---------------

@pytest.fixture
def hastd():
    from fuzz.hastd import Hastd

    daemon = Hastd(role="secondary")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.close()


def test_control_status_of_a_non_utf8_resource_name(hastd) -> None:
    """``cmd=2 resource0="\\xfe"`` on the control socket: hastd died packing the reply
    (UnicodeEncodeError in nv.pack, fixed in f922b0b).  It answers "no such resource"."""
    import socket

    from hast import proto

    request = frame(nv_record(2, b"cmd", b"\2") + nv_record(17, b"resource0", b"\xfe\0"))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(hastd.control))
        s.sendall(request)
        _v, reply = proto.recv_frame(s, proto.MAX_NV_CONTROL)
    assert reply.get_string("resource0") == "\udcfe"
    assert reply.get_int16("error0") == 1            # EHAST_NOENTRY
    hastd.check()


# -- peer-supplied text that is not UTF-8 reached syslog() (targets handshake, replies) -------
# hast/log.py passed the message to syslog.syslog(), which raises UnicodeEncodeError on the
# lone surrogates hast.nv decodes non-UTF-8 bytes to.  Daemonized (syslog mode), a peer's
# step 1 with resource "\xff" made hastd log "No resource '\udcff' ..." and fail; a
# secondary's answer with checksum "c\xff" made the primary worker's connect() raise.
# Fixed: hast.log escapes lone surrogates (``\xff``) before syslog() and stdout/stderr.

@pytest.fixture
def syslog_stub(monkeypatch: pytest.MonkeyPatch):
    """hast.log in syslog mode with a syslog() that encodes as CPython's does."""
    from fuzz.common import _SyslogStub
    from hast import log

    stub = _SyslogStub(log.syslog)
    monkeypatch.setattr(log, "syslog", stub)
    monkeypatch.setattr(log, "_mode", log.MODE_SYSLOG)
    return stub


def test_log_text_that_is_not_utf8(syslog_stub) -> None:
    from hast import log

    log.error("No resource '\udcff' as requested by tcp://127.0.0.1:1.")
    assert syslog_stub.messages == 1


def test_log_escapes_non_utf8_bytes_on_every_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    """The byte behind a surrogate escape is shown as ``\\xNN``, in syslog mode and on
    stdout/stderr (also when the stream is strict UTF-8 or not UTF-8 at all)."""
    import io
    import sys

    from hast import log

    sent: list[str] = []
    monkeypatch.setattr(log.syslog, "syslog", lambda _level, msg: sent.append(msg))
    monkeypatch.setattr(log, "_mode", log.MODE_SYSLOG)
    monkeypatch.setattr(log, "_prefix", "")
    log.error("No resource '\udcff\ud800' as requested.", 5)
    assert sent == ["No resource '\\xff\\ud800' as requested.: Input/output error."]

    monkeypatch.setattr(log, "_mode", log.MODE_STD)
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    ascii_err = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", ascii_err)
    log.info("checksum 'c\udcff' caf\u00e9")
    log.warning("checksum 'c\udcff' caf\u00e9")
    assert out.buffer.getvalue() == "[INFO] checksum 'c\\xff' caf\u00e9\n".encode()
    assert ascii_err.buffer.getvalue() == b"[WARNING] checksum 'c\\xff' caf\\xe9\n"


def test_hastd_answers_step1_for_a_non_utf8_resource_name(hastd) -> None:
    """Found by target handshake: ``[CRIT] Internal error while handling a pending
    descriptor: UnicodeEncodeError`` and no answer (before hastd's catch-all: hastd died)."""
    import socket

    from hast import proto

    step1 = frame(nv_record(17, b"resource", b"\xff\0") + nv_record(2, b"version", b"\2"),
                  version=1)
    with socket.create_connection(("127.0.0.1", hastd.port), timeout=10) as s:
        s.sendall(step1)
        _v, reply = proto.recv_frame(s)
    assert reply.get_string("errmsg") == "Resource not configured."
    hastd.check_log()


def _replies_input(answer: bytes) -> bytes:
    """Input of target replies: valid step-1 reply, then this step-3 answer."""
    import struct

    step1 = frame(nv.NV().add_uint8("version", 2).add_uint8_array("token", bytes(16)).pack())
    return (b"\0" + struct.pack("<H", len(step1)) + step1 + struct.pack("<H", len(answer))
            + answer)


def _answer(*records: bytes, payload: bytes = b"") -> bytes:
    from fuzz.hastd import MEDIASIZE
    from hast import metadata

    _mapsize, datasize, _localoff = metadata.layout(MEDIASIZE, metadata.HAST_EXTENTSIZE, 512)
    msg = nv.NV().add_int64("datasize", datasize).add_int32("extentsize", 2 << 20)
    msg.add_uint64("localcnt", 0).add_uint64("remotecnt", 0).add_uint8("syncsrc", 1)
    return frame(msg.pack() + b"".join(records), payload)


@pytest.fixture
def replies_target(syslog_stub):
    from fuzz.targets import replies

    replies.setup()
    try:
        yield replies
    finally:
        replies.teardown()


def test_primary_connect_with_a_non_utf8_checksum_name(replies_target) -> None:
    """Found by target replies: the answer's bitmap with ``checksum = "c\\xff"``; connect()
    logs "Unable to connect ...: Unknown checksum algorithm 'c\\udcff'." and raises
    UnicodeEncodeError instead of returning an errno (the worker dies)."""
    answer = _answer(nv_record(6, b"mapsize", b"\0\2\0\0"),
                     nv_record(17, b"checksum", b"c\xff\0"), nv_record(10, b"hash", bytes(4)),
                     nv_record(6, b"size", b"\0\2\0\0"), payload=bytes(512))
    replies_target.one_input(_replies_input(answer))


# -- the primary allocated the peer's mapsize before checking it (target replies) -------------

def test_primary_mapsize_is_checked_before_allocation(replies_target) -> None:
    """Step-3 answer with ``mapsize = size = 0xfffffff0``: _handshake_answer() passed
    mapsize as the bound to payload_size() and proto.recv_exact() allocated 4 GiB before
    reading a byte (then failed on EOF; with less memory, MemoryError killed the worker).
    Fixed in e88f2e6: the bound is the local activemap's on-disk size."""
    answer = _answer(nv_record(6, b"mapsize", b"\xf0\xff\xff\xff"),
                     nv_record(6, b"size", b"\xf0\xff\xff\xff"))
    replies_target.one_input(_replies_input(answer))


# -- py-hast.conf that is not UTF-8 (target config) -------------------------------------------

def test_settings_file_that_is_not_utf8(tmp_path) -> None:
    """hast.settings.load() opened py-hast.conf with encoding="utf-8": a latin-1 comment
    raised UnicodeDecodeError, not SettingsError, and the primary worker died with a
    traceback at start-up.  (hast.conf itself is read as latin-1 by hast.config.load.)
    A comment may be in any encoding; a directive that is not UTF-8 is a SettingsError
    naming the file and the line."""
    from hast import settings

    conf = tmp_path / settings.FILENAME
    conf.write_bytes(b"# caf\xe9\nmaxio 1M   # d\xe9faut\n")
    assert settings.load(str(tmp_path / "hast.conf")).maxio == 1 << 20

    conf.write_bytes(b"# caf\xe9\nmaxio 1M\ndevdir /dev/h\xe9st\n")
    with pytest.raises(settings.SettingsError,
                       match=rf"^{re.escape(str(conf))}:3: invalid UTF-8 byte 0xe9 "
                             r"in 'devdir /dev/h\\xe9st'$"):
        settings.load(str(tmp_path / "hast.conf"))


# -- fixed: resync bookkeeping across reconnects (target replies) -------------------------------

def test_sync_survives_reconnects_during_a_resync(replies_target) -> None:
    """Found by target replies (atheris, 25k inputs): the secondary answers step 3 with an
    all-dirty bitmap, so every connect() starts a resync, and the connection drops at once
    (after a memsync WRITE's replies).  Within a few hundred such sessions a ``sync<N>``
    thread dies: ``ValueError: extent_complete on extent 0 that is not being synchronised``
    from Synchronizer._maybe_complete() -- handed_out/outstanding of an interrupted pass
    survive into the next pass after sync_rewind().  Racy, hence up to 150 rounds."""
    import struct

    from fuzz.hastd import MEDIASIZE
    from hast import metadata, pipeline

    _mapsize, datasize, _localoff = metadata.layout(MEDIASIZE, metadata.HAST_EXTENTSIZE, 512)
    step1 = frame(nv.NV().add_uint8("version", 2).add_uint8_array("token", bytes(16)).pack())

    def session(replies: bytes) -> bytes:
        msg = nv.NV().add_int64("datasize", datasize).add_int32("extentsize", 2 << 20)
        msg.add_uint64("localcnt", 0).add_uint64("remotecnt", 0).add_uint8("syncsrc", 1)
        msg.add_uint32("mapsize", 512)
        payload = pipeline.encode(msg, b"\xff" * 512, "none", "none")   # appends `size`
        answer = frame(msg.pack(), bytes(payload or b""))
        return (b"\0" + struct.pack("<H", len(step1)) + step1
                + struct.pack("<H", len(answer)) + answer + replies)

    seq = nv.NV().add_uint64("seq", 0).pack()[:-8] + replies_target.PLACEHOLDER
    memsync = session(frame(seq + nv.NV().add_int8("received", 1).pack()) + frame(seq))
    plain = session(b"")
    for _ in range(150):
        replies_target.one_input(plain)
        replies_target.one_input(memsync)
