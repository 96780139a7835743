"""The control protocol from both ends: hastctl's client functions against a running hastd.

``client_role``/``client_list``/``client_status`` run in this process (their stdout/stderr is
what hastctl prints) against a real daemon; raw frames check the nv names and types a FreeBSD
hastctl or bsnmpd relies on, and that malformed requests only cost their own connection.
The byte-exact renderings of worker-bearing replies are checked on FreeBSD's documented
example (hast-userland.md §3.4/§3.5).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from hast import control, log, nv, proto
from tests.test_daemon import HastNode

CMD_SETROLE, CMD_STATUS = 1, 2


@pytest.fixture
def node(tmp_path: Path):
    n = HastNode(tmp_path)
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture(autouse=True)
def clean_log():
    log.init(log.MODE_STD)
    log.set_debug(0)
    log.set_prefix("")
    yield
    log.set_debug(0)
    log.set_prefix("")


def types(reply: nv.NV) -> list[tuple[str, str]]:
    return [(name, nv.TYPE_NAMES[t]) for name, t, _v in reply]


def raw(node: HastNode, data: bytes) -> bytes:
    """Send raw bytes to the control socket; whatever comes back before EOF."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(node.control))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
        except ConnectionResetError:
            pass  # closed with our bytes unread: a reset instead of EOF
        return out


# -- role ------------------------------------------------------------------------------------

def test_role_changes_are_silent(node: HastNode, capsys) -> None:
    node.start()
    cfg = node.config()
    assert control.client_role(cfg, "secondary", ["test"]) == 0
    assert node.status()["role"] == "secondary"
    assert control.client_role(cfg, "init", ["test"]) == 0
    assert node.status()["role"] == "init"
    assert capsys.readouterr() == ("", "")
    log_text = node.log()
    assert "[INFO] [test] (init) Role changed to secondary." in log_text
    assert "[INFO] [test] (secondary) Role changed to init." in log_text


def test_role_debug_texts(node: HastNode, capsys) -> None:
    node.start()
    cfg = node.config()
    assert control.client_role(cfg, "secondary", ["test"], debug=1) == 0
    assert capsys.readouterr() == (
        "[DEBUG][1] [test] Role changed from init to secondary.\n", "")
    assert control.client_role(cfg, "secondary", ["test"], debug=1) == 0
    assert capsys.readouterr() == ("", "")
    assert control.client_role(cfg, "secondary", ["test"], debug=2) == 0
    assert capsys.readouterr() == ("[DEBUG][2] [test] Role unchanged (secondary).\n", "")


def test_role_unknown_resource(node: HastNode, capsys) -> None:
    node.start()
    rc = control.client_role(node.config(), "secondary", ["x", "test"])
    assert rc == 1
    assert capsys.readouterr() == ("", "[WARNING] [x] Received error 1 from hastd.\n")
    # The other names are still processed.
    assert node.status()["role"] == "secondary"


def test_role_all_and_literal_all(node: HastNode, capsys) -> None:
    node.write_conf({"a": {}, "b": {}})
    node.start()
    cfg = node.config()
    assert control.client_role(cfg, "secondary", ["all", "ignored"]) == 0
    assert (node.status("a")["role"], node.status("b")["role"]) == ("secondary", "secondary")
    # "all" is only special in the first position.
    assert control.client_role(cfg, "init", ["a", "all"]) == 1
    assert capsys.readouterr().err == "[WARNING] [all] Received error 1 from hastd.\n"
    assert (node.status("a")["role"], node.status("b")["role"]) == ("init", "secondary")


def test_setrole_reply_carries_the_previous_role(node: HastNode) -> None:
    node.start()
    reply = node.role("secondary", "test", "nope")
    assert types(reply) == [("resource0", "string"), ("role0", "string"),
                            ("resource1", "string"), ("error1", "int16")]
    assert reply.to_dict() == {"resource0": "test", "role0": "init",
                               "resource1": "nope", "error1": 1}
    assert node.role("init").get_string("role0") == "secondary"


# -- status and list against the daemon ----------------------------------------------------

def test_status_table_init_and_secondary(node: HastNode, capsys) -> None:
    node.write_conf({"data": {}, "scratch": {"remote": "tcp4://127.0.0.1:9999"}})
    node.start()
    node.role("secondary", "data")
    assert control.client_status(node.config(), []) == 0
    root = node.root
    assert capsys.readouterr() == (
        "Name\tStatus\t Role\t\tComponents\n"
        f"data\t-        secondary      {root}/data.img\t127.0.0.1\n"
        f"scratch\t-        init           {root}/scratch.img\ttcp4://127.0.0.1:9999\n",
        "")


def test_status_unknown_resource_is_err1(node: HastNode, capsys) -> None:
    node.start()
    assert control.client_status(node.config(), ["nope", "test"]) == 1
    assert capsys.readouterr() == (
        "Name\tStatus\t Role\t\tComponents\n"
        "nope\tERR1\n"
        f"test\t-        init           {node.root}/test.img\t127.0.0.1\n", "")


def test_list_init_resource(node: HastNode, capsys) -> None:
    node.write_conf({"test": {"source": "127.0.0.1", "replication": "async"}})
    node.start()
    assert control.client_list(node.config(), ["test"]) == 0
    assert capsys.readouterr() == (
        "test:\n"
        "  role: init\n"
        "  provname: test\n"
        f"  localpath: {node.root}/test.img\n"
        "  extentsize: 0 (0B)\n"
        "  keepdirty: 0\n"
        "  remoteaddr: 127.0.0.1\n"
        "  sourceaddr: 127.0.0.1\n"
        "  replication: async\n"
        "  dirty: 0 (0B)\n"
        "  statistics:\n"
        "    reads: 0\n"
        "    writes: 0\n"
        "    deletes: 0\n"
        "    flushes: 0\n"
        "    activemap updates: 0\n"
        "    local errors: read: 0, write: 0, delete: 0, flush: 0\n"
        "    queues: local: 0, send: 0, recv: 0, done: 0, idle: 0\n", "")


def test_list_secondary_without_worker_and_error_block(node: HastNode, capsys) -> None:
    node.start()
    node.role("secondary")
    assert control.client_list(node.config(), ["test", "nope"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("test:\n  role: secondary\n")
    # No worker yet (no primary connected): no status/workerpid lines.
    assert "  status:" not in out and "workerpid" not in out
    assert out.endswith("nope:\n  error: 1\n")


def test_status_reply_types(node: HastNode) -> None:
    node.write_conf({"test": {"source": "127.0.0.1"}})
    node.start()
    reply = node.request(nv.NV().add_uint8("cmd", CMD_STATUS).add_string("resource0", "all"))
    assert types(reply) == [
        ("resource0", "string"), ("provname0", "string"), ("localpath0", "string"),
        ("remoteaddr0", "string"), ("sourceaddr0", "string"), ("replication0", "string"),
        ("checksum0", "string"), ("compression0", "string"), ("role0", "string"),
        ("workerpid0", "int32")]
    assert reply.get_string("checksum0") == "none"
    assert reply.get_string("compression0") == "hole"
    assert reply.get_string("replication0") == "fullsync"


def test_json_output(node: HastNode, capsys) -> None:
    node.start()
    node.role("secondary")
    assert control.client_list(node.config(), ["test", "nope"], json_out=True) == 1
    docs = json.loads(capsys.readouterr().out)
    assert docs == [
        {"resource": "test", "provname": "test", "localpath": f"{node.root}/test.img",
         "remoteaddr": "127.0.0.1", "replication": "fullsync", "checksum": "none",
         "compression": "hole", "role": "secondary", "workerpid": 0},
        {"resource": "nope", "error": 1},
    ]
    assert control.client_status(node.config(), [], json_out=True) == 0
    assert json.loads(capsys.readouterr().out)[0]["role"] == "secondary"


def test_no_resources_configured(node: HastNode, capsys) -> None:
    node.write_conf({})
    node.start()
    # An empty nv would crash FreeBSD's hastctl; the reply is error=0 instead.
    reply = node.request(nv.NV().add_uint8("cmd", CMD_STATUS).add_string("resource0", "all"))
    assert types(reply) == [("error", "int16")] and reply.get_int16("error") == 0
    assert control.client_status(node.config(), []) == 0
    assert control.client_list(node.config(), []) == 0
    assert control.client_status(node.config(), [], json_out=True) == 0
    assert capsys.readouterr() == ("[]\n", "")


# -- failures ------------------------------------------------------------------------------------

def test_no_daemon(node: HastNode, capsys) -> None:
    assert control.client_status(node.config(), []) == 71
    assert capsys.readouterr() == (
        "", f"[ERROR] Unable to connect to hastd via {node.control}: "
            "No such file or directory.\n")


def test_stale_control_socket(node: HastNode, capsys) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(node.control))
    assert control.client_role(node.config(), "init", ["test"]) == 71
    assert capsys.readouterr().err == (
        f"[ERROR] Unable to connect to hastd via {node.control}: Connection refused.\n")


def test_missing_cmd_drops_the_connection(node: HastNode) -> None:
    node.start()
    msg = nv.NV().add_string("resource0", "all")
    with pytest.raises(control.ControlError) as exc:
        control.request(str(node.control), msg)
    assert exc.value.exitcode == 69
    assert exc.value.message.startswith(f"cannot receive reply from hastd via {node.control}: ")
    # A cmd of the wrong type reads as 0 too.
    wrong = nv.NV().add_uint16("cmd", CMD_STATUS).add_string("resource0", "all")
    assert raw(node, proto.HEADER.pack(2, len(wrong.pack())) + wrong.pack()) == b""
    assert node.log().count("[ERROR] Control header is missing 'cmd' field.") == 2
    assert node.status()["role"] == "init"


@pytest.mark.parametrize("data", [
    b"garbage!",                                   # version byte 'g' > 2
    proto.HEADER.pack(2, 16) + b"\x02" * 16,       # malformed nv
    proto.HEADER.pack(2, 1 << 30),                 # absurd size
    proto.HEADER.pack(2, 64) + b"\x11",            # ends mid-frame
    b"",                                           # connects and hangs up
], ids=["version", "malformed", "oversized", "truncated", "empty"])
def test_malformed_request_costs_only_its_connection(node: HastNode, data: bytes) -> None:
    node.start()
    assert raw(node, data) == b""
    node.wait_log(r"\[ERROR\] Unable to receive control header: ")
    assert node.status()["role"] == "init"


def test_idle_control_client_does_not_block_others(node: HastNode, capsys) -> None:
    node.start()
    with socket.socket(socket.AF_UNIX) as idle:
        idle.connect(str(node.control))
        idle.sendall(b"\x02\x10")  # half a header, then nothing
        assert control.client_role(node.config(), "secondary", ["test"]) == 0
        assert control.client_status(node.config(), ["test"]) == 0
    assert "secondary" in capsys.readouterr().out


@pytest.mark.parametrize("msg,error,logged", [
    (nv.NV().add_uint8("cmd", CMD_STATUS), 2, "Control header is missing 'resource0' field."),
    (nv.NV().add_uint8("cmd", CMD_SETROLE).add_uint8("role", 9).add_string("resource0", "test"),
     2, "Invalid role received (9)."),
    (nv.NV().add_uint8("cmd", CMD_SETROLE).add_string("resource0", "test"),
     2, "Invalid role received (0)."),
    (nv.NV().add_uint8("cmd", 7).add_string("resource0", "test"),
     4, "Invalid command received (7)."),
], ids=["no-resource0", "bad-role", "no-role", "bad-cmd"])
def test_global_errors(node: HastNode, capsys, msg: nv.NV, error: int, logged: str) -> None:
    node.start()
    reply = node.request(msg)
    assert types(reply) == [("error", "int16")] and reply.get_int16("error") == error
    assert f"[ERROR] {logged}" in node.log()
    with pytest.raises(control.ControlError) as exc:
        control.request(str(node.control), msg)
    assert (exc.value.exitcode, exc.value.message) == (
        70, f"Error {error} received from hastd.")


def test_requests_are_what_freebsd_hastctl_sends() -> None:
    assert types(control.role_request("primary", ["a", "b"])) == [
        ("cmd", "uint8"), ("role", "uint8"), ("resource0", "string"), ("resource1", "string")]
    assert control.role_request("primary", ["a"]).to_dict() == {
        "cmd": 1, "role": 2, "resource0": "a"}
    assert control.status_request([]).to_dict() == {"cmd": 2, "resource0": "all"}


# -- renderings of a worker-bearing reply (FreeBSD's documented example) ---------------------------

def example_reply() -> nv.NV:
    """The STATUS reply hastd sends for hast-userland.md §3.4's primary, field for field."""
    r = nv.NV()
    r.add_string("resource0", "data")
    r.add_string("provname0", "hastdata").add_string("localpath0", "/dev/gpt/data")
    r.add_string("remoteaddr0", "tcp4://10.10.0.2").add_string("sourceaddr0", "10.10.0.1")
    r.add_string("replication0", "fullsync").add_string("checksum0", "none")
    r.add_string("compression0", "hole").add_string("role0", "primary")
    r.add_int32("workerpid0", 1507)
    r.add_string("status0", "complete").add_uint64("dirty0", 0)
    r.add_uint32("extentsize0", 2097152).add_uint32("keepdirty0", 64)
    for field, value in (("stat_read", 1843), ("stat_write", 9121), ("stat_delete", 0),
                         ("stat_flush", 311), ("stat_activemap_update", 402),
                         ("stat_read_error", 0), ("stat_write_error", 0),
                         ("stat_delete_error", 0), ("stat_flush_error", 0),
                         ("idle_queue_size", 255), ("local_queue_size", 0),
                         ("send_queue_size", 0), ("recv_queue_size", 0),
                         ("done_queue_size", 0)):
        r.add_uint64(f"{field}0", value)
    r.add_string("resource1", "logs").add_int16("error1", 1)
    return r


def test_list_rendering_matches_freebsd_example() -> None:
    text, rc = control.format_list(example_reply())
    assert rc == 1
    assert text == (
        "data:\n"
        "  role: primary\n"
        "  provname: hastdata\n"
        "  localpath: /dev/gpt/data\n"
        "  extentsize: 2097152 (2.0MB)\n"
        "  keepdirty: 64\n"
        "  remoteaddr: tcp4://10.10.0.2\n"
        "  sourceaddr: 10.10.0.1\n"
        "  replication: fullsync\n"
        "  status: complete\n"
        "  workerpid: 1507\n"
        "  dirty: 0 (0B)\n"
        "  statistics:\n"
        "    reads: 1843\n"
        "    writes: 9121\n"
        "    deletes: 0\n"
        "    flushes: 311\n"
        "    activemap updates: 402\n"
        "    local errors: read: 0, write: 0, delete: 0, flush: 0\n"
        "    queues: local: 0, send: 0, recv: 0, done: 0, idle: 255\n"
        "logs:\n"
        "  error: 1\n")


def test_status_rendering_matches_freebsd_example() -> None:
    text, rc = control.format_status(example_reply())
    assert rc == 1
    assert text == ("Name\tStatus\t Role\t\tComponents\n"
                    "data\tcomplete primary        /dev/gpt/data\ttcp4://10.10.0.2\n"
                    "logs\tERR1\n")


def test_json_rendering_keeps_types() -> None:
    docs, rc = control.reply_to_json(example_reply())
    assert rc == 1
    assert docs[0]["workerpid"] == 1507 and docs[0]["extentsize"] == 2097152
    assert docs[0]["status"] == "complete" and docs[0]["idle_queue_size"] == 255
    assert list(docs[0])[:2] == ["resource", "provname"]
    assert docs[1] == {"resource": "logs", "error": 1}


def test_missing_strings_print_as_null() -> None:
    reply = nv.NV().add_string("resource0", "odd")
    text, rc = control.format_status(reply)
    assert (text, rc) == ("Name\tStatus\t Role\t\tComponents\n"
                          "odd\t-        (null)         (null)\t(null)\n", 0)
    assert control.format_list(reply)[0].startswith("odd:\n  role: (null)\n")
