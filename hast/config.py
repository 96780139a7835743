"""hast.conf(5): the scanner, parser and resolver that hastd and hastctl share.

This module owns everything between the bytes of hast.conf and a resolved :class:`Config`:
FreeBSD's flex scanner (token.l), its yacc grammar (parse.y), the node matching that decides
which ``on <node>`` blocks apply to this host, the inheritance rules, the defaults and every
validation message.  Both programs print those messages verbatim and scripts grep them, so the
texts and exit codes are FreeBSD's (hast-userland.md §1).  It also owns the address splitting
of proto_tcp.c/proto_uds.c (:func:`parse_address`), which the daemon needs later and which is
specified together with the config syntax (§1.8).

Decisions (deliberate, documented here because hast.conf must keep meaning the same thing on
both implementations):

* **Default replication is fullsync**, not base hastd's memsync (decisions.md #1).
* **Ignored characters.**  Every character no flex rule covers (``"``, ``'``, ``;``, ``=``,
  ``,``, ``@``, ``\\r``, non-ASCII bytes, ...) separates words and is otherwise ignored, as in
  FreeBSD.  FreeBSD's flex default rule also echoes it to stdout; py-hast does not echo it,
  because hastctl's stdout is parsed by scripts and stray quotes there help nobody.
* **Comments** run from ``#`` (anywhere on a line, also inside what would be a word) to the end
  of the line *or of the file*.  FreeBSD's ``#.*$`` rule needs a newline after the comment, so
  there a comment on an unterminated last line degrades into words; py-hast fixes that.
* **Line numbers.**  ``str(ConfigError)`` is FreeBSD's exact text, including the zero-based
  line in ``Unable to parse configuration file at line <N> near '<token>': syntax error``, so
  scripts matching it keep working.  The exception also carries ``path`` and a 1-based
  ``lineno`` (line of the token the error is about; None for errors without one), and
  ``detail`` = ``"<path>:<lineno>: <message>"``, which hastd/hastctl print as a second line so
  that config errors name the file and a human line number.
* **Missing closing brace**: the parser fails at end of file, where flex leaves ``yytext``
  empty, so the message reads ``near ''`` with N = number of newlines in the file.
* **Length limits** are FreeBSD's buffer sizes (PATH_MAX 1024, HAST_ADDRSIZE 1024, NAME_MAX
  255, each including the NUL) and are checked where FreeBSD checks them: values of
  non-matching ``on`` blocks are discarded unchecked (except ``listen``).  One fix: a
  resource-level ``name`` longer than 254 bytes is rejected with ``name argument is too long.``
  where FreeBSD silently truncates it.
* ``timeout`` converts like FreeBSD's ``atoi`` (strtol clamped to LONG_MAX, then cut to a C
  int), so absurd values behave as on FreeBSD (mostly ``Negative or zero timeout.``).
* Default listen addresses are probed by creating a socket; EPROTONOSUPPORT means "no such
  family" as in FreeBSD, and so does EAFNOSUPPORT, which is what Linux returns when IPv6 is
  disabled.
* The ``acceptable node names`` list is built afresh each time (FreeBSD's static buffer can
  repeat itself after reloads on a dot-less hostname).

Node identity (:class:`NodeIdentity`), i.e. what an ``on <node>`` header is compared with:

* hostname: ``socket.gethostname()`` (full name, and the part before the first dot).
* host UUID (compared case-insensitively): FreeBSD ``kern.hostuuid`` via sysctlbyname from the
  cffi module ``hast._os``.  Linux: ``/etc/machine-id`` formatted as a lower-case 8-4-4-4-12
  UUID, else ``/sys/class/dmi/id/product_uuid``, else the all-zero UUID (FreeBSD's unset value).
* ``hostid<N>``: FreeBSD ``kern.hostid``.  Linux: the 4 bytes of ``/etc/hostid`` in host byte
  order (what glibc's gethostid() and hostid(1) report; little-endian on all usual hardware),
  else FreeBSD's rc.d/hostid derivation, the first 8 hex digits of md5(host UUID) as a number
  (0 when the UUID is unknown).
* ``HAST_NODE_NAME``: when set and non-empty, ``on <node>`` matches exactly that name and
  nothing else, and the host is not queried.  Meant for containers and jails that share a
  hostname or machine-id; with separate UTS namespaces (decisions.md #6) it is not needed.

The host is only queried when the file contains an ``on`` block (or a resource lacks one), as
in FreeBSD; tests pass an explicit ``node`` to :func:`parse`/:func:`load` instead.

Extensions: settings that only py-hast understands (e.g. the Linux NBD frontend) must never be
written into hast.conf, which FreeBSD's parser must keep accepting unchanged.  They will live
in a separate py-hast configuration file with its own parser; nothing here reads them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from hast import log
from hast.sysexits import EX_CONFIG, EX_OSFILE, EX_TEMPFAIL

# The FreeBSD port must not shadow base hastd's /etc/hast.conf (decisions.md #3).
DEFAULT_CONFIG = (
    "/usr/local/etc/hast.conf" if sys.platform.startswith("freebsd") else "/etc/hast.conf"
)

DEFAULT_PORT = 8457
DEFAULT_CONTROL = "/var/run/hastctl"
DEFAULT_PIDFILE = "/var/run/hastd.pid"
DEFAULT_LISTEN_TCP4 = "tcp4://0.0.0.0:8457"
DEFAULT_LISTEN_TCP6 = "tcp6://[::]:8457"
# Deliberately not base hastd's memsync (its default since 2013): the Handbook documents
# fullsync as the default and it is the safest mode (decisions.md #1).
DEFAULT_REPLICATION = "fullsync"
DEFAULT_CHECKSUM = "none"
DEFAULT_COMPRESSION = "hole"
DEFAULT_TIMEOUT = 20
DEFAULT_METAFLUSH = True

_ZERO_UUID = "00000000-0000-0000-0000-000000000000"
_MAXHOSTNAMELEN = 256
# sizeof(sockaddr_un.sun_path): the UNIX socket path limit of proto_uds.c.
_SUN_PATH = 104 if sys.platform.startswith("freebsd") else 108


class ConfigError(Exception):
    """A configuration failure: ``str()`` is FreeBSD's message, ``exitcode`` its sysexits code."""

    def __init__(
        self,
        message: str,
        exitcode: int = EX_CONFIG,
        path: str | None = None,
        lineno: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exitcode = exitcode
        self.path = path
        self.lineno = lineno

    @property
    def detail(self) -> str:
        """``<path>:<1-based line>: <message>`` (without the line when there is none)."""
        if self.path is None:
            return self.message
        where = self.path if self.lineno is None else f"{self.path}:{self.lineno}"
        return f"{where}: {self.message}"


@dataclass
class Resource:
    """One resource as resolved for this node (every inheritance and default applied)."""

    name: str
    provname: str
    local: str
    remote: str
    source: str
    replication: str
    checksum: str
    compression: str
    timeout: int
    exec: str
    metaflush: bool


@dataclass
class Config:
    """The resolved file: ``listen`` already holds the defaults when the file gave none."""

    path: str
    control: str
    pidfile: str
    listen: list[str]
    resources: dict[str, Resource] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeIdentity:
    """What ``on <node>`` headers are matched against (FreeBSD's isitme())."""

    hostname: str
    hostuuid: str
    hostid: int
    # HAST_NODE_NAME: when set, the only name that matches; the other fields are then unused.
    override: str | None = None

    @classmethod
    def local(cls) -> NodeIdentity:
        """This host's identity; raises ConfigError (exit 78) when it cannot be read."""
        override = os.environ.get("HAST_NODE_NAME")
        if override:
            return cls(hostname=override, hostuuid="", hostid=0, override=override)
        try:
            hostname = socket.gethostname()
        except OSError as exc:
            raise ConfigError(f"gethostname() failed: {_strerror(exc)}.") from None
        if sys.platform.startswith("freebsd"):
            hostuuid, hostid = _freebsd_ids()
        else:
            hostuuid = _linux_hostuuid()
            hostid = _linux_hostid(hostuuid)
        return cls(hostname=hostname, hostuuid=hostuuid, hostid=hostid)

    def matches(self, name: str) -> bool:
        if self.override is not None:
            return name == self.override
        if name == self.hostname:
            return True
        short, dot, _ = self.hostname.partition(".")
        if dot and name == short:
            return True
        if name.lower() == self.hostuuid.lower():
            return True
        return name == f"hostid{self.hostid}"

    def names(self) -> str:
        """The ``acceptable node names`` list of the "No resource ..." message."""
        if self.override is not None:
            return self.override
        short, dot, _ = self.hostname.partition(".")
        prefix = f"{short}, " if dot and short else ""
        return f"{prefix}{self.hostname}, {self.hostuuid}, hostid{self.hostid}"


def _strerror(exc: BaseException) -> str:
    return log.strerror(log.exc_errno(exc))


def _freebsd_ids() -> tuple[str, int]:
    from hast._os import ffi, lib  # the sysctl bindings exist only in the FreeBSD build

    size = ffi.new("size_t *", _MAXHOSTNAMELEN)
    buf = ffi.new("char[]", _MAXHOSTNAMELEN)
    if lib.sysctlbyname(b"kern.hostuuid", buf, size, ffi.NULL, 0) < 0:
        err = ffi.errno
        raise ConfigError(f"sysctlbyname(kern.hostuuid) failed: {log.strerror(err)}.")
    hostuuid = ffi.string(buf).decode("ascii", "replace")
    hostid = ffi.new("unsigned long *")
    size[0] = ffi.sizeof("unsigned long")
    if lib.sysctlbyname(b"kern.hostid", hostid, size, ffi.NULL, 0) < 0:
        err = ffi.errno
        raise ConfigError(f"sysctlbyname(kern.hostid) failed: {log.strerror(err)}.")
    return hostuuid, int(hostid[0])


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


# machine-id is the stable per-installation identifier every systemd/dbus host has; the DMI
# UUID is only readable by root, hence the second choice.
_UUID_SOURCES = ("/etc/machine-id", "/sys/class/dmi/id/product_uuid")


def _linux_hostuuid(sources: tuple[str, ...] = _UUID_SOURCES) -> str:
    for path in sources:
        raw = _read_text(path)
        try:
            return str(uuid.UUID(raw))
        except ValueError:
            continue  # missing, empty, or "uninitialized" during early boot
    return _ZERO_UUID


def _linux_hostid(hostuuid: str, path: str = "/etc/hostid") -> int:
    try:
        with open(path, "rb") as f:
            data = f.read(4)
    except OSError:
        data = b""
    if len(data) == 4:
        return int.from_bytes(data, sys.byteorder)
    if hostuuid == _ZERO_UUID:
        return 0
    # FreeBSD's rc.d/hostid: kern.hostid = 0x<first 8 hex digits of md5(kern.hostuuid)>.
    return int(hashlib.md5(hostuuid.encode()).hexdigest()[:8], 16)


# --- scanner (token.l) -----------------------------------------------------------------------

_KEYWORDS = frozenset(
    "control pidfile listen replication checksum compression timeout exec metaflush resource "
    "name local remote source on off fullsync memsync async none crc32 sha256 hole lzf".split()
)
_NUM = "NUM"
_STR = "STR"
_EOF = "EOF"

# finditer() skips whatever no alternative matches, which is exactly flex's default rule for
# blanks and uncovered characters (minus the echo, see the module docstring).
_TOKEN_RE = re.compile(r"[A-Za-z0-9._/:\[\]-]+|[{}]|#[^\n]*|\n")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # the keyword itself, "{", "}", NUM, STR or EOF
    text: str
    line: int  # zero-based, as FreeBSD counts


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    line = 0
    for m in _TOKEN_RE.finditer(text):
        word = m.group()
        if word == "\n":
            line += 1
        elif word[0] != "#":
            # Whole words only: flex's longest match makes "online" a STR, while an exact
            # keyword or an all-digit word wins the tie against STR by rule order.
            if word in _KEYWORDS or word in ("{", "}"):
                kind = word
            elif word.isdigit():
                kind = _NUM
            else:
                kind = _STR
            tokens.append(_Token(kind, word, line))
    tokens.append(_Token(_EOF, "", line))
    return tokens


# --- grammar (parse.y) -----------------------------------------------------------------------

_SETTINGS = frozenset({"replication", "checksum", "compression", "timeout", "exec", "metaflush"})
_SCOPE_GLOBAL = frozenset({"control", "pidfile", "listen", "on", "resource"}) | _SETTINGS
_SCOPE_GLOBAL_NODE = frozenset({"control", "pidfile", "listen"})
_SCOPE_RESOURCE = _SETTINGS | {"name", "local", "on"}
_SCOPE_RESOURCE_NODE = frozenset({"name", "local", "remote", "source", "metaflush"})

_CHOICES = {
    "replication": ("fullsync", "memsync", "async"),
    "checksum": ("none", "crc32", "sha256"),
    "compression": ("none", "hole", "lzf"),
    "metaflush": ("on", "off"),
}

# Longest accepted value in bytes (FreeBSD buffer size minus the NUL) and its message.
_LIMITS = {
    "control": (1023, "control argument is too long."),
    "pidfile": (1023, "pidfile argument is too long."),
    "listen": (1023, "listen argument is too long."),
    "exec": (1023, "Exec path is too long."),
    "name": (254, "name argument is too long."),
    "local": (1023, "local argument is too long."),
    "remote": (1023, "remote argument is too long."),
    "source": (1023, "source argument is too long."),
}
_RESOURCE_NAME_MAX = 254

_INT_MAX = 2**31 - 1
_LONG_MAX = 2**63 - 1


def _atoi(digits: str) -> int:
    # More significant digits than LONG_MAX has clamp without int(), which refuses strings
    # of over 4300 digits (sys.get_int_max_str_digits()).
    significant = digits.lstrip("0")
    value = _LONG_MAX if len(significant) > 19 else min(int(significant or "0"), _LONG_MAX)
    value &= 0xFFFFFFFF
    return value - 2**32 if value > _INT_MAX else value


Value = str | int | bool
Store = Callable[[str, Value, _Token], None]


@dataclass
class _PendingResource:
    name: str
    level1: dict[str, Value] = field(default_factory=dict)  # resource-level statements
    level2: dict[str, Value] = field(default_factory=dict)  # matching resource-node blocks
    matched: bool = False


class _Parser:
    """Recursive descent over the token list, acting at the points where yacc reduces."""

    def __init__(self, text: str, path: str, node: NodeIdentity | None) -> None:
        self._tokens = _tokenize(text)
        self._pos = 0
        self._path = path
        self._node = node
        self._globals: dict[str, Value] = {}
        self._node_globals: dict[str, Value] = {}  # control/pidfile of matching `on` blocks
        self._listen: list[str] = []
        self._resources: dict[str, _PendingResource] = {}

    # token helpers

    @property
    def _tok(self) -> _Token:
        return self._tokens[self._pos]

    def _advance(self) -> _Token:
        tok = self._tokens[self._pos]
        if tok.kind != _EOF:
            self._pos += 1
        return tok

    def _expect(self, *kinds: str) -> _Token:
        if self._tok.kind not in kinds:
            raise self._syntax_error()
        return self._advance()

    def _error(self, message: str, tok: _Token | None, exitcode: int = EX_CONFIG) -> ConfigError:
        lineno = None if tok is None else tok.line + 1
        return ConfigError(message, exitcode, self._path, lineno)

    def _syntax_error(self) -> ConfigError:
        tok = self._tok
        return self._error(
            f"Unable to parse configuration file at line {tok.line} near '{tok.text}': "
            "syntax error",
            tok,
        )

    def _identity(self, tok: _Token) -> NodeIdentity:
        if self._node is None:
            try:
                self._node = NodeIdentity.local()
            except ConfigError as exc:
                raise self._error(exc.message, tok) from None
        return self._node

    # grammar

    def parse(self) -> Config:
        self._statements(_SCOPE_GLOBAL, self._store_global, _EOF, self._node_block)
        return self._resolve()

    def _statements(
        self,
        allowed: frozenset[str],
        store: Store,
        end: str,
        on: Callable[[], None] | None = None,
    ) -> _Token:
        """Statements up to `end` (consumed and returned); anything outside `allowed` fails."""
        while self._tok.kind != end:
            keyword = self._tok
            if keyword.kind not in allowed:
                raise self._syntax_error()
            self._advance()
            if keyword.kind == "on" and on is not None:
                on()
            elif keyword.kind == "resource":
                self._resource()
            else:
                value, tok = self._value(keyword.kind)
                store(keyword.kind, value, tok)
        return self._advance()

    def _value(self, keyword: str) -> tuple[Value, _Token]:
        if keyword in _CHOICES:
            tok = self._expect(*_CHOICES[keyword])
            return (tok.text == "on" if keyword == "metaflush" else tok.text), tok
        if keyword == "timeout":
            tok = self._expect(_NUM)
            timeout = _atoi(tok.text)
            if timeout <= 0:
                raise self._error("Negative or zero timeout.", tok)
            return timeout, tok
        tok = self._expect(_STR, "none") if keyword == "remote" else self._expect(_STR)
        return tok.text, tok

    def _check_length(self, keyword: str, value: Value, tok: _Token) -> None:
        if keyword in _LIMITS:
            limit, message = _LIMITS[keyword]
            if len(str(value).encode()) > limit:
                raise self._error(message, tok)

    def _store_global(self, keyword: str, value: Value, tok: _Token) -> None:
        self._check_length(keyword, value, tok)
        if keyword == "listen":
            self._listen.append(str(value))
        else:
            self._globals[keyword] = value

    def _node_block(self) -> None:
        name = self._expect(_STR)
        mine = self._identity(name).matches(name.text)
        self._expect("{")

        def store(keyword: str, value: Value, tok: _Token) -> None:
            # FreeBSD length-checks listen everywhere, control/pidfile only when they apply.
            if keyword == "listen" or mine:
                self._check_length(keyword, value, tok)
            if not mine:
                return
            if keyword == "listen":
                self._listen.append(str(value))
            else:
                self._node_globals[keyword] = value

        self._statements(_SCOPE_GLOBAL_NODE, store, "}")

    def _resource(self) -> None:
        name = self._expect(_STR)
        # Like yacc, check the name as soon as it is read, before the `{`.
        if name.text in self._resources:
            raise self._error(f"Resource {name.text} configured more than once.", name)
        if len(name.text.encode()) > _RESOURCE_NAME_MAX:
            raise self._error("Resource name is too long.", name)
        res = _PendingResource(name.text)
        self._expect("{")

        def store(keyword: str, value: Value, tok: _Token) -> None:
            self._check_length(keyword, value, tok)
            res.level1[keyword] = value

        close = self._statements(
            _SCOPE_RESOURCE, store, "}", lambda: self._resource_node_block(res)
        )
        self._check_resource(res, close)
        self._resources[res.name] = res

    def _resource_node_block(self, res: _PendingResource) -> None:
        name = self._expect(_STR)
        mine = self._identity(name).matches(name.text)
        res.matched |= mine
        self._expect("{")

        def store(keyword: str, value: Value, tok: _Token) -> None:
            if mine:
                self._check_length(keyword, value, tok)
                res.level2[keyword] = value

        self._statements(_SCOPE_RESOURCE_NODE, store, "}")

    def _check_resource(self, res: _PendingResource, close: _Token) -> None:
        """FreeBSD's checks at the resource's closing brace, in its order."""
        if not res.matched:
            names = self._identity(close).names()
            raise self._error(
                f"No resource {res.name} configuration for this node "
                f"(acceptable node names: {names}).",
                close,
            )
        if "remote" not in res.level2:
            raise self._error(f"Remote address not configured for resource {res.name}.", close)
        if "local" not in res.level2 and "local" not in res.level1:
            raise self._error(
                f"Path to local component not configured for resource {res.name}.", close
            )

    # resolution (after the whole file, so late globals still apply)

    def _resolve(self) -> Config:
        def pick(keyword: str, default: Value) -> Value:
            return self._node_globals.get(keyword, self._globals.get(keyword, default))

        listen = list(self._listen) or self._default_listen()
        resources = {name: self._resolve_resource(res) for name, res in self._resources.items()}
        return Config(
            path=self._path,
            control=str(pick("control", DEFAULT_CONTROL)),
            pidfile=str(pick("pidfile", DEFAULT_PIDFILE)),
            listen=listen,
            resources=resources,
        )

    def _resolve_resource(self, res: _PendingResource) -> Resource:
        l1, l2, g = res.level1, res.level2, self._globals

        def setting(keyword: str, default: Value) -> Value:
            return l1.get(keyword, g.get(keyword, default))

        return Resource(
            name=res.name,
            provname=str(l2.get("name", l1.get("name", res.name))),
            local=str(l2.get("local", l1.get("local"))),
            remote=str(l2["remote"]),
            source=str(l2.get("source", "")),
            replication=str(setting("replication", DEFAULT_REPLICATION)),
            checksum=str(setting("checksum", DEFAULT_CHECKSUM)),
            compression=str(setting("compression", DEFAULT_COMPRESSION)),
            timeout=int(setting("timeout", DEFAULT_TIMEOUT)),
            exec=str(setting("exec", "")),
            metaflush=bool(l2.get("metaflush", setting("metaflush", DEFAULT_METAFLUSH))),
        )

    def _default_listen(self) -> list[str]:
        listen = []
        if _family_supported(socket.AF_INET):
            listen.append(DEFAULT_LISTEN_TCP4)
        if _family_supported(getattr(socket, "AF_INET6", -1)):
            listen.append(DEFAULT_LISTEN_TCP6)
        if not listen:
            raise self._error("No address to listen on.", None, EX_TEMPFAIL)
        return listen


def _family_supported(family: int) -> bool:
    """FreeBSD's family_supported(): only "protocol not supported" means no."""
    if family < 0:
        return False
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
    except OSError as exc:
        return exc.errno not in (errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT)
    return True


# --- public entry points ---------------------------------------------------------------------


def parse(text: str, path: str = "<string>", node: NodeIdentity | None = None) -> Config:
    """Parse and resolve hast.conf text for `node` (default: this host)."""
    return _Parser(text, path, node).parse()


def load(path: str, node: NodeIdentity | None = None) -> Config:
    """Read and parse `path`; unreadable files fail with exit 72 like FreeBSD's fopen check."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(
            f"Unable to open configuration file {path}: {_strerror(exc)}.", EX_OSFILE, path
        ) from None
    # latin-1 maps every byte to one character, so byte lengths and flex's byte-wise view
    # (non-ASCII bytes are ignored characters) are preserved whatever the file's encoding.
    return parse(data.decode("latin-1"), path, node)


class AddressError(ValueError):
    """An address proto_tcp.c/proto_uds.c would reject; ``errno`` is the errno they return."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


def parse_address(addr: str, default_port: int = DEFAULT_PORT) -> tuple[str, str, int]:
    """Split a hast.conf address like hastd does before resolving it.

    Returns ``(kind, host_or_path, port)`` with kind ``"uds"`` (port 0) for ``uds://``,
    ``unix://`` or a bare absolute path without ``://``; otherwise ``"tcp4"``, ``"tcp6"`` or
    ``"tcp"`` (no scheme or ``tcp://``: either family).  The host is neither resolved nor
    validated beyond what tcp_addr() checks itself.  Raises AddressError (a ValueError):
    EINVAL for a bad port or empty host, ENAMETOOLONG for an over-long host or socket path.
    """
    lower = addr.lower()
    for scheme in ("uds://", "unix://"):
        if lower.startswith(scheme):
            return _uds_address(addr[len(scheme) :])
    if addr.startswith("/") and "://" not in addr:
        return _uds_address(addr)

    kind = "tcp"
    for scheme in ("tcp4", "tcp6", "tcp"):
        if lower.startswith(scheme + "://"):
            kind, addr = scheme, addr[len(scheme) + 3 :]
            break

    # Two or more colons mean IPv6, whose port is only recognised after a bracketed address.
    if addr.count(":") > 1:
        colon = addr.rfind(":") if addr.startswith("[") else -1
    else:
        colon = addr.rfind(":")
    if colon < 0:
        host, port = addr, default_port
    else:
        digits = addr[colon + 1 :]
        if not (digits.isascii() and digits.isdigit()) or not 1 <= int(digits) <= 65535:
            raise AddressError(errno.EINVAL)
        port = int(digits)
        if addr.startswith("[") and addr[colon - 1] == "]":
            host = addr[1 : colon - 1]
        else:
            host = addr[:colon]
    if len(host.encode()) >= _MAXHOSTNAMELEN:
        raise AddressError(errno.ENAMETOOLONG)
    if not host:
        raise AddressError(errno.EINVAL)  # getaddrinfo() would fail, which hastd maps to this
    return kind, host, port


def _uds_address(path: str) -> tuple[str, str, int]:
    if len(path.encode()) >= _SUN_PATH:
        raise AddressError(errno.ENAMETOOLONG)
    return "uds", path, 0
