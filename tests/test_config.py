"""hast.conf parser: hast-userland.md §1's examples and error cases, plus the grammar's edges."""

from __future__ import annotations

import errno
import hashlib
import socket
import sys

import pytest

from hast import config
from hast.config import (
    DEFAULT_CONFIG,
    AddressError,
    ConfigError,
    NodeIdentity,
    load,
    parse,
    parse_address,
)

UUID2 = "6e1d2b84-0f3a-11ef-9b8e-3cecef0a1b2c"
STORAGE1 = NodeIdentity("storage1.example.net", "11111111-2222-3333-4444-555555555555", 1)
STORAGE2 = NodeIdentity("storage2.example.net", UUID2, 2)
UUID_A = "0b0e6f3c-1d2a-4c5b-8e9f-a0b1c2d3e4f5"
A = NodeIdentity("a.example.com", UUID_A, 3735928559)

# A complete resource for node `a`, to append where a test needs one.
# The real probe, saved before the autouse fixture replaces it.
REAL_FAMILY_SUPPORTED = config._family_supported

R0 = "resource r0 {\n\ton a {\n\t\tlocal /dev/ada1\n\t\tremote 10.0.0.2\n\t}\n}\n"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    # Default listens must not depend on the test host's IPv6 setup, nor matching on its env.
    monkeypatch.setattr(config, "_family_supported", lambda family: True)
    monkeypatch.delenv("HAST_NODE_NAME", raising=False)


def fails(text: str, node: NodeIdentity = A, path: str = "<string>") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, path, node)
    return info.value


def syntax(line: int, near: str) -> str:
    return f"Unable to parse configuration file at line {line} near '{near}': syntax error"


# --- §1.10 valid examples ----------------------------------------------------------------------

EXAMPLE_A = """\
resource test {
	on hasta {
		local /dev/ada1
		remote 172.16.0.2
	}
	on hastb {
		local /dev/ada1
		remote 172.16.0.1
	}
}
"""

EXAMPLE_B = """\
# global defaults
replication fullsync
compression lzf
checksum crc32
timeout 10
exec /usr/local/sbin/hast-event

on storage1.example.net {
	listen tcp4://10.10.0.1:8457
	control uds:///var/run/hastctl
}
on 6e1d2b84-0f3a-11ef-9b8e-3cecef0a1b2c {   # storage2, matched by kern.hostuuid
	listen 10.10.0.2
}

resource data {
	local /dev/gpt/data            # same partition label on both nodes
	name hastdata                  # -> /dev/hast/hastdata
	on storage1 {                  # short hostname form
		remote tcp4://10.10.0.2
		source 10.10.0.1
	}
	on 6e1d2b84-0f3a-11ef-9b8e-3cecef0a1b2c {
		remote 10.10.0.1:8457
	}
}

resource logs {
	replication async              # overrides the global fullsync
	metaflush off
	on storage1 {
		local /dev/gpt/logsA
		remote 10.10.0.2
	}
	on 6e1d2b84-0f3a-11ef-9b8e-3cecef0a1b2c {
		local /dev/gpt/logsB
		remote 10.10.0.1
	}
}
"""

EXAMPLE_C = """\
listen tcp6://[2001:db8::10]:8457
resource scratch {
	local /var/hast/scratch.img
	on alpha { remote none }
	on beta  { remote tcp6://[2001:db8::10]:8457 }
}
"""


@pytest.mark.parametrize("host,remote", [("hasta", "172.16.0.2"), ("hastb", "172.16.0.1")])
def test_example_a_minimal_two_nodes(host: str, remote: str) -> None:
    cfg = parse(EXAMPLE_A, "hast.conf", NodeIdentity(host, UUID_A, 5))
    assert cfg.path == "hast.conf"
    assert cfg.control == "/var/run/hastctl"
    assert cfg.pidfile == "/var/run/hastd.pid"
    assert cfg.listen == ["tcp4://0.0.0.0:8457", "tcp6://[::]:8457"]
    assert list(cfg.resources) == ["test"]
    res = cfg.resources["test"]
    assert res == config.Resource(
        name="test",
        provname="test",
        local="/dev/ada1",
        remote=remote,
        source="",
        replication="fullsync",  # py-hast's default, not base hastd's memsync
        checksum="none",
        compression="hole",
        timeout=20,
        exec="",
        metaflush=True,
    )


def test_example_b_on_storage1() -> None:
    cfg = parse(EXAMPLE_B, node=STORAGE1)
    assert cfg.listen == ["tcp4://10.10.0.1:8457"]
    assert cfg.control == "uds:///var/run/hastctl"
    assert cfg.pidfile == "/var/run/hastd.pid"
    assert list(cfg.resources) == ["data", "logs"]
    data, logs = cfg.resources["data"], cfg.resources["logs"]
    assert (data.provname, data.local, data.remote, data.source) == (
        "hastdata",
        "/dev/gpt/data",
        "tcp4://10.10.0.2",
        "10.10.0.1",
    )
    assert (data.replication, data.compression, data.checksum, data.timeout) == (
        "fullsync",
        "lzf",
        "crc32",
        10,
    )
    assert data.exec == "/usr/local/sbin/hast-event"
    assert data.metaflush is True
    assert (logs.replication, logs.metaflush) == ("async", False)
    assert (logs.local, logs.remote, logs.source, logs.provname) == (
        "/dev/gpt/logsA",
        "10.10.0.2",
        "",
        "logs",
    )
    assert (logs.compression, logs.checksum, logs.timeout, logs.exec) == (
        "lzf",
        "crc32",
        10,
        "/usr/local/sbin/hast-event",
    )


def test_example_b_on_storage2_matched_by_uuid() -> None:
    cfg = parse(EXAMPLE_B, node=STORAGE2)
    assert cfg.listen == ["10.10.0.2"]
    assert cfg.control == "/var/run/hastctl"
    data, logs = cfg.resources["data"], cfg.resources["logs"]
    assert (data.local, data.remote, data.source, data.provname) == (
        "/dev/gpt/data",
        "10.10.0.1:8457",
        "",
        "hastdata",
    )
    assert (logs.local, logs.remote) == ("/dev/gpt/logsB", "10.10.0.1")


@pytest.mark.parametrize("host,remote", [("alpha", "none"), ("beta", "tcp6://[2001:db8::10]:8457")])
def test_example_c_remote_none_and_ipv6(host: str, remote: str) -> None:
    cfg = parse(EXAMPLE_C, node=NodeIdentity(host, UUID_A, 9))
    assert cfg.listen == ["tcp6://[2001:db8::10]:8457"]
    res = cfg.resources["scratch"]
    assert (res.local, res.remote) == ("/var/hast/scratch.img", remote)


# --- §1.11 invalid cases -----------------------------------------------------------------------

NAMES_A = f"a, a.example.com, {UUID_A}, hostid3735928559"

INVALID = [
    ("replicaton fullsync\n", syntax(0, "replicaton"), 1),
    ("timeout 0\n", "Negative or zero timeout.", 1),
    ("# one\n\ntimeout 20s\n", syntax(2, "20s"), 3),
    ("replication sync\n", syntax(0, "sync"), 1),
    ("resource local {\n", syntax(0, "local"), 1),
    ("resource 42 {\n", syntax(0, "42"), 1),
    ("resource r0 {\n\ton a {\n\t\treplication async\n", syntax(2, "replication"), 3),
    ("resource r0 {\n\tremote 10.0.0.2\n}\n", syntax(1, "remote"), 2),
    ("resource r0 {\n\tlisten 0.0.0.0\n}\n", syntax(1, "listen"), 2),
    ("resource r0 {\n\ton a {\n\t\tsource none\n", syntax(2, "none"), 3),
    # Missing closing brace: the parser fails at EOF, where flex's yytext is empty and the
    # line counter has seen every newline of the file.
    (R0[:-2], syntax(5, ""), 6),
    (R0[:-2] + "\n\n", syntax(7, ""), 8),
    (
        "resource r0 {\n\ton b {\n\t\tlocal /x\n\t\tremote y\n\t}\n}\n",
        f"No resource r0 configuration for this node (acceptable node names: {NAMES_A}).",
        6,
    ),
    (
        "resource r0 {\n\tlocal /x\n\ton a {\n\t}\n}\n",
        "Remote address not configured for resource r0.",
        5,
    ),
    (
        "resource r0 {\n\ton a {\n\t\tremote none\n\t}\n}\n",
        "Path to local component not configured for resource r0.",
        5,
    ),
    (R0 + R0, "Resource r0 configured more than once.", 7),
]


@pytest.mark.parametrize("text,message,lineno", INVALID)
def test_invalid_cases_print_freebsd_messages(text: str, message: str, lineno: int) -> None:
    err = fails(text, path="/etc/hast.conf")
    assert str(err) == message
    assert err.message == message
    assert err.exitcode == 78
    assert err.path == "/etc/hast.conf"
    assert err.lineno == lineno
    assert err.detail == f"/etc/hast.conf:{lineno}: {message}"


@pytest.mark.parametrize("listen", ["tcp://2001:db8::1/64", "10.0.0.9:99999"])
def test_bad_listen_addresses_are_a_runtime_matter(listen: str) -> None:
    # The parser only stores them; hastd fails later when it tries to listen.
    assert parse(f"listen {listen}\n", node=A).listen == [listen]


def test_checks_order_no_node_block_before_missing_remote_and_local() -> None:
    err = fails("resource r0 {\n}\n")
    assert str(err).startswith("No resource r0 configuration for this node")


def test_remote_checked_before_local() -> None:
    err = fails("resource r0 { on a { } }")
    assert str(err) == "Remote address not configured for resource r0."


def test_resource_checked_at_its_closing_brace_before_later_syntax_errors() -> None:
    err = fails("resource r0 { on b { } }\nbogus\n")
    assert str(err).startswith("No resource r0 configuration")
    assert err.lineno == 1


def test_duplicate_detected_as_soon_as_the_name_is_read() -> None:
    err = fails(R0 + "resource r0")
    assert str(err) == "Resource r0 configured more than once."


def test_acceptable_names_without_a_dot_in_the_hostname() -> None:
    err = fails("resource r0 { }", node=NodeIdentity("vm", UUID_A, 7))
    assert str(err) == (
        "No resource r0 configuration for this node "
        f"(acceptable node names: vm, {UUID_A}, hostid7)."
    )


# --- scope matrix (§1.4) ---------------------------------------------------------------------

SAMPLES = {
    "control": "control /var/run/ctl",
    "pidfile": "pidfile /var/run/p.pid",
    "listen": "listen 0.0.0.0",
    "replication": "replication async",
    "checksum": "checksum crc32",
    "compression": "compression lzf",
    "timeout": "timeout 5",
    "exec": "exec /usr/local/sbin/hook",
    "metaflush": "metaflush off",
    "name": "name prov",
    "local": "local /dev/ada2",
    "remote": "remote 10.0.0.9",
    "source": "source 10.0.0.8",
    "on": "on b { }",
    "resource": "resource r1 { on a { local /l remote none } }",
}

# Each template puts the statement on physical line 3 (zero-based 2) and is otherwise complete.
SCOPES = {
    "global": "# x\n# y\n{stmt}\n" + R0,
    "global on": "on a {\n# y\n{stmt}\n}\n" + R0,
    "resource": "resource r0 {\n# y\n{stmt}\n\ton a { local /dev/ada1 remote none }\n}\n",
    "resource on": "resource r0 {\n\ton a {\n{stmt}\n\t\tlocal /dev/ada1\n\t\tremote none\n}\n}\n",
}

ALLOWED = {
    "control": {"global", "global on"},
    "pidfile": {"global", "global on"},
    "listen": {"global", "global on"},
    "replication": {"global", "resource"},
    "checksum": {"global", "resource"},
    "compression": {"global", "resource"},
    "timeout": {"global", "resource"},
    "exec": {"global", "resource"},
    "metaflush": {"global", "resource", "resource on"},
    "name": {"resource", "resource on"},
    "local": {"resource", "resource on"},
    "remote": {"resource on"},
    "source": {"resource on"},
    "on": {"global", "resource"},
    "resource": {"global"},
}

SCOPE_CASES = [(kw, scope) for kw in SAMPLES for scope in SCOPES]


@pytest.mark.parametrize("keyword,scope", SCOPE_CASES)
def test_scope_matrix(keyword: str, scope: str) -> None:
    text = SCOPES[scope].replace("{stmt}", SAMPLES[keyword])
    if scope in ALLOWED[keyword]:
        assert "r0" in parse(text, node=A).resources
    else:
        err = fails(text)
        assert str(err) == syntax(2, keyword)
        assert err.lineno == 3


@pytest.mark.parametrize(
    "text,near",
    [
        ("on a { on b { } }", "on"),
        ("resource r0 { resource r1 { } }", "resource"),
        ("resource r0 { on a { on b { } } }", "on"),
        ("}", "}"),
        ("{", "{"),
        ("on a { } }", "}"),
        ("on { }", "{"),
        ("listen", ""),
        ("metaflush yes", "yes"),
        ("timeout -1", "-1"),  # a minus sign makes it a STR
        ("control none", "none"),
        ("Resource r0 { }", "Resource"),
        ("on 42 { }", "42"),
        ("local /dev/gpt/my disk", "local"),
        ("resource r0 { local /dev/gpt/my disk }", "disk"),
        ("extentsize 4M", "extentsize"),
    ],
)
def test_grammar_rejections(text: str, near: str) -> None:
    assert str(fails(text)) == syntax(0, near)


# --- resolution (§1.5) -----------------------------------------------------------------------


def test_late_globals_apply_to_earlier_resources() -> None:
    text = R0 + (
        "replication async\nchecksum sha256\ncompression none\ntimeout 7\n"
        "exec /hook\nmetaflush off\n"
    )
    res = parse(text, node=A).resources["r0"]
    assert (res.replication, res.checksum, res.compression, res.timeout) == (
        "async",
        "sha256",
        "none",
        7,
    )
    assert (res.exec, res.metaflush) == ("/hook", False)


def test_resource_level_beats_any_global_and_last_global_wins() -> None:
    text = (
        "timeout 5\nreplication async\n"
        "resource r0 { timeout 30 on a { local /l remote none } }\n"
        "resource r1 { on a { local /m remote none } }\n"
        "timeout 9\nreplication memsync\n"
    )
    cfg = parse(text, node=A)
    assert (cfg.resources["r0"].timeout, cfg.resources["r0"].replication) == (30, "memsync")
    assert (cfg.resources["r1"].timeout, cfg.resources["r1"].replication) == (9, "memsync")


def test_listen_is_additive_in_file_order_and_keeps_duplicates() -> None:
    text = (
        "listen 10.0.0.1\n"
        "on a { listen 10.0.0.2 listen 10.0.0.1 }\n"
        "on b { listen 10.0.0.3 }\n"
        "listen tcp6://[::1]:9000\n"
    )
    assert parse(text, node=A).listen == ["10.0.0.1", "10.0.0.2", "10.0.0.1", "tcp6://[::1]:9000"]


def test_node_level_listen_alone_replaces_the_defaults() -> None:
    assert parse("on a { listen 10.0.0.2 }", node=A).listen == ["10.0.0.2"]


def test_matching_node_control_and_pidfile_win_over_later_globals() -> None:
    text = (
        "on a { control /run/a.sock pidfile /run/a.pid }\n"
        "on b { control /run/b.sock pidfile /run/b.pid }\n"
        "control /run/global.sock\npidfile /run/global.pid\n"
    )
    cfg = parse(text, node=A)
    assert (cfg.control, cfg.pidfile) == ("/run/a.sock", "/run/a.pid")
    cfg = parse(text, node=NodeIdentity("c", UUID_A.replace("0", "1"), 1))
    assert (cfg.control, cfg.pidfile) == ("/run/global.sock", "/run/global.pid")


def test_last_global_control_wins() -> None:
    cfg = parse("control /one\ncontrol /two\npidfile /p1\npidfile /p2\n", node=A)
    assert (cfg.control, cfg.pidfile) == ("/two", "/p2")


def test_several_matching_blocks_later_statement_wins() -> None:
    text = (
        "resource r0 {\n"
        "\ton a.example.com { local /dev/one remote 10.0.0.1 name first }\n"
        f"\ton {UUID_A} {{ local /dev/two name second }}\n"
        "\ton hostid3735928559 { source 10.0.0.9 }\n"
        "}\n"
    )
    res = parse(text, node=A).resources["r0"]
    assert (res.local, res.remote, res.provname, res.source) == (
        "/dev/two",
        "10.0.0.1",
        "second",
        "10.0.0.9",
    )


def test_node_level_name_and_local_beat_resource_level_wherever_written() -> None:
    text = (
        "resource r0 {\n\ton a { name nodename local /dev/node remote none }\n"
        "\tname resname\n\tlocal /dev/res\n}\n"
    )
    res = parse(text, node=A).resources["r0"]
    assert (res.provname, res.local) == ("nodename", "/dev/node")


def test_non_matching_block_statements_are_discarded() -> None:
    text = (
        "resource r0 {\n\tlocal /dev/res\n"
        "\ton b { name other local /dev/other remote 10.9.9.9 source 1.1.1.1 metaflush off }\n"
        "\ton a { remote 10.0.0.2 }\n}\n"
    )
    res = parse(text, node=A).resources["r0"]
    assert (res.provname, res.local, res.remote, res.source, res.metaflush) == (
        "r0",
        "/dev/res",
        "10.0.0.2",
        "",
        True,
    )


@pytest.mark.parametrize(
    "glob,res_level,node_level,expected",
    [
        ("", "", "", True),
        ("metaflush off", "", "", False),
        ("metaflush off", "metaflush on", "", True),
        ("", "metaflush off", "", False),
        ("metaflush off", "metaflush off", "metaflush on", True),
        ("", "metaflush on", "metaflush off", False),
    ],
)
def test_metaflush_layers(glob: str, res_level: str, node_level: str, expected: bool) -> None:
    text = (
        f"resource r0 {{\n\ton a {{ local /l remote none {node_level} }}\n\t{res_level}\n}}\n"
        f"{glob}\n"
    )
    assert parse(text, node=A).resources["r0"].metaflush is expected


def test_resources_keep_file_order() -> None:
    text = "".join(f"resource {n} {{ on a {{ local /{n} remote none }} }}\n" for n in "zam")
    assert list(parse(text, node=A).resources) == ["z", "a", "m"]


def test_remote_none_is_stored_as_the_word() -> None:
    assert (
        parse("resource r0 { local /l on a { remote none } }", node=A).resources["r0"].remote
        == "none"
    )


# --- node matching (§1.6) ----------------------------------------------------------------------


def one_resource(node_name: str) -> str:
    return f"resource r0 {{ on {node_name} {{ local /l remote none }} }}"


@pytest.mark.parametrize(
    "node_name",
    [
        "a.example.com",
        "a",
        UUID_A,
        UUID_A.upper(),
        "0B0E6F3C-1d2a-4C5B-8e9f-A0B1C2D3E4F5",
        "hostid3735928559",
    ],
)
def test_node_names_that_match(node_name: str) -> None:
    assert "r0" in parse(one_resource(node_name), node=A).resources


@pytest.mark.parametrize(
    "node_name",
    ["A.example.com", "A", "a.example", "example", "hostid3735928558", "hostid", "b"],
)
def test_node_names_that_do_not_match(node_name: str) -> None:
    assert str(fails(one_resource(node_name))).startswith("No resource r0 configuration")


def test_short_name_needs_a_dot_in_the_hostname() -> None:
    node = NodeIdentity("storage", UUID_A, 1)
    assert "r0" in parse(one_resource("storage"), node=node).resources
    assert str(fails(one_resource("stor"), node=node)).startswith("No resource r0")


def test_hast_node_name_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAST_NODE_NAME", "jail1.example.org")
    node = NodeIdentity.local()
    assert node.override == "jail1.example.org"
    assert node.matches("jail1.example.org")
    assert not node.matches("jail1")  # only that exact name
    assert not node.matches(socket.gethostname())
    text = (
        f"resource r0 {{ on {socket.gethostname()} {{ local /host remote none }}\n"
        "on jail1.example.org { local /jail remote 10.0.0.1 } }\n"
    )
    assert parse(text).resources["r0"].local == "/jail"  # node=None: the environment decides
    err = fails("resource r0 { on x { } }", node=node)
    assert str(err) == (
        "No resource r0 configuration for this node (acceptable node names: jail1.example.org)."
    )


def test_empty_hast_node_name_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAST_NODE_NAME", "")
    node = NodeIdentity.local()
    assert node.override is None
    assert node.hostname == socket.gethostname()


def test_local_identity_shape() -> None:
    node = NodeIdentity.local()
    assert node.hostname == socket.gethostname()
    assert node.override is None
    assert len(node.hostuuid) == 36 and node.hostuuid.count("-") == 4
    assert node.hostuuid == node.hostuuid.lower() or sys.platform.startswith("freebsd")
    assert 0 <= node.hostid < 2**64
    assert node.matches(socket.gethostname())
    assert node.matches(node.hostuuid.upper())
    assert node.matches(f"hostid{node.hostid}")


def test_linux_hostuuid_sources(tmp_path) -> None:
    machine_id = tmp_path / "machine-id"
    dmi = tmp_path / "product_uuid"
    missing = str(tmp_path / "missing")
    machine_id.write_text("3D1219C7C4C5404AAA1F6D2A48ADFDA4\n")
    dmi.write_text("4C4C4544-0042-3510-8052-B4C04F384D32\n")
    assert config._linux_hostuuid((str(machine_id), str(dmi))) == (
        "3d1219c7-c4c5-404a-aa1f-6d2a48adfda4"
    )
    assert config._linux_hostuuid((missing, str(dmi))) == "4c4c4544-0042-3510-8052-b4c04f384d32"
    machine_id.write_text("uninitialized\n")
    assert config._linux_hostuuid((str(machine_id), str(dmi))).startswith("4c4c4544-")
    assert config._linux_hostuuid((missing,)) == "00000000-0000-0000-0000-000000000000"


def test_linux_hostid(tmp_path) -> None:
    hostid = tmp_path / "hostid"
    hostid.write_bytes((0xDEADBEEF).to_bytes(4, sys.byteorder))
    assert config._linux_hostid(UUID2, str(hostid)) == 0xDEADBEEF
    missing = str(tmp_path / "missing")
    # FreeBSD rc.d/hostid: first 8 hex digits of md5(uuid).
    expected = int(hashlib.md5(UUID2.encode()).hexdigest()[:8], 16)
    assert config._linux_hostid(UUID2, missing) == expected
    assert config._linux_hostid("00000000-0000-0000-0000-000000000000", missing) == 0


def test_host_is_not_queried_without_on_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> NodeIdentity:
        raise AssertionError("queried")

    monkeypatch.setattr(NodeIdentity, "local", staticmethod(boom))
    assert parse("timeout 5\nlisten 10.0.0.1\n").listen == ["10.0.0.1"]


def test_identity_failure_is_a_config_error_at_the_on_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken() -> NodeIdentity:
        raise ConfigError("sysctlbyname(kern.hostuuid) failed: Operation not permitted.")

    monkeypatch.setattr(NodeIdentity, "local", staticmethod(broken))
    with pytest.raises(ConfigError) as info:
        parse("\n\non a { }\n", "f.conf")
    assert str(info.value) == "sysctlbyname(kern.hostuuid) failed: Operation not permitted."
    assert (info.value.exitcode, info.value.lineno) == (78, 3)


# --- lexical rules (§1.2) ---------------------------------------------------------------------


def test_ignored_characters_quotes_semicolons_cr() -> None:
    text = (
        'exec "/usr/local/sbin/hook";\r\n'
        "resource r0 {\r\n"
        "\ton a { local '/dev/ada1'; remote =10.0.0.2, }\r\n"
        "}\r\n"
    )
    res = parse(text, node=A).resources["r0"]
    assert (res.exec, res.local, res.remote) == ("/usr/local/sbin/hook", "/dev/ada1", "10.0.0.2")


def test_ignored_character_splits_a_word() -> None:
    err = fails('resource r0 {\n\tlocal /dev/a"b\n}\n')
    assert str(err) == syntax(1, "b")


def test_non_ascii_is_ignored_too() -> None:
    assert parse("listen 10.0.0.1\u00e9\n", node=A).listen == ["10.0.0.1"]


def test_hash_ends_a_word_and_comments_anywhere() -> None:
    text = "listen 0.0.0.0#x\n  # indented comment\nlisten 10.0.0.1 # trailing { }\n"
    assert parse(text, node=A).listen == ["0.0.0.0", "10.0.0.1"]


def test_comment_on_unterminated_last_line() -> None:
    assert parse("listen 10.0.0.1\n# last words", node=A).listen == ["10.0.0.1"]


def test_braces_without_blanks() -> None:
    res = parse("resource r0{on a{local /l remote none}}", node=A).resources["r0"]
    assert (res.local, res.remote) == ("/l", "none")


def test_statements_split_across_lines() -> None:
    cfg = parse(
        "listen\n0.0.0.0\nresource\nr0\n{\non\na\n{\nlocal\n/l\nremote\nnone\n}\n}\n", node=A
    )
    assert cfg.listen == ["0.0.0.0"]
    assert cfg.resources["r0"].local == "/l"


def test_keywords_are_lower_case_only_and_words_starting_with_keywords_are_str() -> None:
    text = "resource Resource { on a { local /localdisk remote online } }"
    res = parse(text, node=A).resources["Resource"]
    assert (res.provname, res.local, res.remote) == ("Resource", "/localdisk", "online")


def test_num_vs_str() -> None:
    cfg = parse("timeout 020\nresource 1r { on a { local /l remote none } }", node=A)
    assert cfg.resources["1r"].timeout == 20
    assert str(fails("resource r0 { name 123 }")) == syntax(0, "123")


@pytest.mark.parametrize("digits", ["4294967296", "99999999999999999999", "2147483648"])
def test_huge_timeouts_wrap_like_atoi(digits: str) -> None:
    assert str(fails(f"timeout {digits}")) == "Negative or zero timeout."


def test_timeout_wrapping_to_a_positive_value() -> None:
    assert parse(f"timeout {2**32 + 20}\n" + R0, node=A).resources["r0"].timeout == 20


def test_empty_and_comment_only_files() -> None:
    for text in ("", "# nothing here\n\n   \n"):
        cfg = parse(text, node=A)
        assert cfg.resources == {}
        assert (cfg.control, cfg.pidfile) == ("/var/run/hastctl", "/var/run/hastd.pid")
        assert cfg.listen == ["tcp4://0.0.0.0:8457", "tcp6://[::]:8457"]


def test_line_numbers_zero_based_in_message_one_based_in_attributes() -> None:
    err = fails("# 1\n# 2\n\n# 4\n  timeout  bogus\n", path="/x/hast.conf")
    assert str(err) == syntax(4, "bogus")
    assert err.lineno == 5
    assert err.detail == f"/x/hast.conf:5: {syntax(4, 'bogus')}"


# --- length limits (§1.9) ----------------------------------------------------------------------

LIMITED = [
    # keyword, template with {v}, longest accepted length, message
    ("control", "control {v}\n", 1023, "control argument is too long."),
    ("control", "on a {{ control {v} }}\n", 1023, "control argument is too long."),
    ("pidfile", "pidfile {v}\n", 1023, "pidfile argument is too long."),
    ("pidfile", "on a {{ pidfile {v} }}\n", 1023, "pidfile argument is too long."),
    ("listen", "listen {v}\n", 1023, "listen argument is too long."),
    ("listen", "on a {{ listen {v} }}\n", 1023, "listen argument is too long."),
    ("listen", "on b {{ listen {v} }}\n", 1023, "listen argument is too long."),
    ("exec", "exec {v}\n", 1023, "Exec path is too long."),
    (
        "exec",
        "resource r0 {{ exec {v} on a {{ local /l remote none }} }}",
        1023,
        "Exec path is too long.",
    ),
    (
        "name",
        "resource r0 {{ name {v} on a {{ local /l remote none }} }}",
        254,
        "name argument is too long.",
    ),
    (
        "name",
        "resource r0 {{ on a {{ name {v} local /l remote none }} }}",
        254,
        "name argument is too long.",
    ),
    (
        "local",
        "resource r0 {{ local {v} on a {{ remote none }} }}",
        1023,
        "local argument is too long.",
    ),
    (
        "local",
        "resource r0 {{ on a {{ local {v} remote none }} }}",
        1023,
        "local argument is too long.",
    ),
    (
        "remote",
        "resource r0 {{ on a {{ local /l remote {v} }} }}",
        1023,
        "remote argument is too long.",
    ),
    (
        "source",
        "resource r0 {{ on a {{ local /l remote none source {v} }} }}",
        1023,
        "source argument is too long.",
    ),
    (
        "resource",
        "resource {v} {{ on a {{ local /l remote none }} }}",
        254,
        "Resource name is too long.",
    ),
]


@pytest.mark.parametrize("keyword,template,limit,message", LIMITED)
def test_length_limits(keyword: str, template: str, limit: int, message: str) -> None:
    ok = "/" + "x" * (limit - 1)
    parse(template.format(v=ok), node=A)
    err = fails("\n" + template.format(v=ok + "x"))
    assert str(err) == message
    assert (err.exitcode, err.lineno) == (78, 2)


def test_length_limits_values_are_stored_intact() -> None:
    control = "/" + "c" * 1022
    assert parse(f"control {control}", node=A).control == control


@pytest.mark.parametrize("stmt", ["control", "pidfile", "name", "local", "remote", "source"])
def test_values_of_non_matching_blocks_are_not_length_checked(stmt: str) -> None:
    long = "/" + "x" * 2000
    if stmt in ("control", "pidfile"):
        text = f"on b {{ {stmt} {long} }}"
    else:
        text = f"resource r0 {{ on b {{ {stmt} {long} }} on a {{ local /l remote none }} }}"
    parse(text, node=A)


# --- files, exit codes, defaults -------------------------------------------------------------


def test_load_reads_the_file(tmp_path) -> None:
    path = tmp_path / "hast.conf"
    path.write_bytes(R0.encode() + b"# caf\xe9 \xff\n")
    cfg = load(str(path), node=A)
    assert cfg.path == str(path)
    assert cfg.resources["r0"].local == "/dev/ada1"


def test_load_errors_carry_the_path(tmp_path) -> None:
    path = tmp_path / "hast.conf"
    path.write_text("\nbogus\n")
    with pytest.raises(ConfigError) as info:
        load(str(path), node=A)
    assert info.value.detail == f"{path}:2: {syntax(1, 'bogus')}"


def test_unreadable_file_is_exit_72(tmp_path) -> None:
    path = str(tmp_path / "nope.conf")
    with pytest.raises(ConfigError) as info:
        load(path, node=A)
    err = info.value
    assert str(err) == f"Unable to open configuration file {path}: No such file or directory."
    assert (err.exitcode, err.path, err.lineno) == (72, path, None)
    assert err.detail == f"{path}: {err.message}"


def test_no_address_family_is_exit_75(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_family_supported", lambda family: False)
    err = fails(R0)
    assert str(err) == "No address to listen on."
    assert (err.exitcode, err.lineno) == (75, None)
    # An explicit listen never probes.
    assert parse("listen 10.0.0.1", node=A).listen == ["10.0.0.1"]


def test_default_listen_follows_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "_family_supported", lambda family: family == socket.AF_INET)
    assert parse("", node=A).listen == ["tcp4://0.0.0.0:8457"]


def test_family_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    assert REAL_FAMILY_SUPPORTED(socket.AF_INET) is True

    def refuse(err: int):
        def fake(*args, **kwargs):
            raise OSError(err, "nope")

        return fake

    monkeypatch.setattr(socket, "socket", refuse(errno.EPROTONOSUPPORT))
    assert REAL_FAMILY_SUPPORTED(socket.AF_INET6) is False
    monkeypatch.setattr(socket, "socket", refuse(errno.EAFNOSUPPORT))
    assert REAL_FAMILY_SUPPORTED(socket.AF_INET6) is False
    monkeypatch.setattr(socket, "socket", refuse(errno.EMFILE))
    assert REAL_FAMILY_SUPPORTED(socket.AF_INET6) is True  # only "unsupported" means no


def test_default_config_path() -> None:
    if sys.platform.startswith("freebsd"):
        assert DEFAULT_CONFIG == "/usr/local/etc/hast.conf"
    else:
        assert DEFAULT_CONFIG == "/etc/hast.conf"


def test_config_error_defaults() -> None:
    err = ConfigError("boom")
    assert (err.exitcode, err.path, err.lineno, err.detail, str(err)) == (
        78,
        None,
        None,
        "boom",
        "boom",
    )


# --- parse_address (§1.8) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "addr,default,expected",
    [
        ("10.0.0.1", 8457, ("tcp", "10.0.0.1", 8457)),
        ("10.0.0.1:1234", 8457, ("tcp", "10.0.0.1", 1234)),
        ("freefall.freebsd.org:8457", 8457, ("tcp", "freefall.freebsd.org", 8457)),
        ("tcp4://10.10.0.2", 8457, ("tcp4", "10.10.0.2", 8457)),
        ("TCP4://10.10.0.1:8457", 8457, ("tcp4", "10.10.0.1", 8457)),
        ("tcp://host", 8457, ("tcp", "host", 8457)),
        ("tcp6://::1", 8457, ("tcp6", "::1", 8457)),
        ("tcp6://[::1]:8457", 8457, ("tcp6", "::1", 8457)),
        ("Tcp6://[2001:db8::10]:65535", 8457, ("tcp6", "2001:db8::10", 65535)),
        ("tcp6://[::]:8457", 8457, ("tcp6", "::", 8457)),
        ("tcp://[10.0.0.1]:99", 8457, ("tcp", "10.0.0.1", 99)),
        ("tcp://2001:db8::1/64", 8457, ("tcp", "2001:db8::1/64", 8457)),  # fails at resolution
        ("10.0.0.1", 0, ("tcp", "10.0.0.1", 0)),  # `source` default port
        ("uds:///var/run/hastctl", 8457, ("uds", "/var/run/hastctl", 0)),
        ("UNIX:///var/run/x", 8457, ("uds", "/var/run/x", 0)),
        ("/var/run/hastctl", 8457, ("uds", "/var/run/hastctl", 0)),
    ],
)
def test_parse_address(addr: str, default: int, expected: tuple[str, str, int]) -> None:
    assert parse_address(addr, default) == expected


@pytest.mark.parametrize(
    "addr,err",
    [
        ("tcp6://[::1]", errno.EINVAL),  # the last colon is inside the brackets
        ("10.0.0.9:99999", errno.EINVAL),
        ("10.0.0.9:0", errno.EINVAL),
        ("10.0.0.9:", errno.EINVAL),
        ("10.0.0.9:84x", errno.EINVAL),
        ("10.0.0.9:+84", errno.EINVAL),
        ("tcp://:8457", errno.EINVAL),
        ("/a://b", errno.EINVAL),  # has "://", so it is not a UNIX path but TCP
        ("h" * 256, errno.ENAMETOOLONG),
        ("[" + "h" * 256 + "]:1", errno.ENAMETOOLONG),
        ("uds:///" + "s" * 200, errno.ENAMETOOLONG),
    ],
)
def test_parse_address_rejects(addr: str, err: int) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(addr)
    assert isinstance(info.value, AddressError)
    assert info.value.errno == err


def test_parse_address_limits() -> None:
    assert parse_address("h" * 255)[1] == "h" * 255
    path = "/" + "s" * (config._SUN_PATH - 2)
    assert parse_address(path) == ("uds", path, 0)
    with pytest.raises(AddressError):
        parse_address(path + "s")
