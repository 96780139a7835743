"""config: hast.conf, scanner to resolved Config (hast-userland.md §1), then its addresses.

hast.conf is root's file, but hastd re-reads it on SIGHUP and hastctl parses it on every
command, so a typo must never become a traceback: every failure is a ConfigError with
FreeBSD's message.  The input is the file's bytes, decoded as ``load()`` does (latin-1); the
node identity is fixed ("hasta.example.net", the UUID of the spec's example (b)) so that the
``on`` blocks of the seeds match.  For a file that parses, every address it holds (listen,
control, remote, source) then goes through ``parse_address``, as the daemon does before
listening/connecting, which may only refuse it with AddressError.  Also checked: the resolved
values are what the grammar allows (timeout > 0, known replication/checksum/compression).

The same bytes are also py-hast's own ``py-hast.conf`` (``hast.settings.load``, read by every
worker at start-up), which may only refuse them with SettingsError.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import strategies as st

from fuzz.common import Finding, load_seeds
from fuzz.strategies import from_seeds
from hast import config, settings

EXPECTED: tuple[type[BaseException], ...] = (config.ConfigError, config.AddressError)
MAX_LEN = 16 * 1024
NODE = config.NodeIdentity(hostname="hasta.example.net",
                           hostuuid="6e1d2b84-0f3a-11ef-9b8e-3cecef0a1b2c", hostid=1234)
_WORDS = ("resource", "on", "hasta", "{", "}", "local", "remote", "source", "listen",
          "control", "pidfile", "timeout", "replication", "checksum", "compression", "exec",
          "metaflush", "name", "fullsync", "memsync", "async", "none", "crc32", "sha256",
          "hole", "lzf", "off", "\n", "#", "/dev/ada1", "10.0.0.1", "tcp6://[::1]:8457",
          "uds:///tmp/x", "0", "20", "99999999999999999999", "r0")


def seeds() -> list[bytes]:
    return load_seeds("config")


@st.composite
def _words(draw: st.DrawFn) -> bytes:
    """Token soup from the grammar's own words: reaches the parser's deep branches."""
    words = draw(st.lists(st.sampled_from(_WORDS), max_size=60))
    return " ".join(words).encode()


def strategy() -> st.SearchStrategy[bytes]:
    return from_seeds(seeds(), MAX_LEN, _words())


_dir: Path | None = None


def setup() -> None:
    global _dir
    if _dir is None:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None   # a write per input
        _dir = Path(tempfile.mkdtemp(prefix="hast-fuzz-config-", dir=shm))


def teardown() -> None:
    global _dir
    if _dir is not None:
        shutil.rmtree(_dir, ignore_errors=True)
        _dir = None


def _settings(data: bytes) -> None:
    setup()
    assert _dir is not None
    (_dir / settings.FILENAME).write_bytes(data)
    try:
        got = settings.load(str(_dir / "hast.conf"))
    except settings.SettingsError:
        return
    for value in (got.maxio, *got.res_maxio.values()):
        if value < 4096 or value > settings.MAX_MAXIO or value & (value - 1):
            raise Finding(f"py-hast.conf: maxio {value} accepted")


def one_input(data: bytes) -> None:
    _settings(data)
    cfg = config.parse(data.decode("latin-1"), "fuzz.conf", NODE)
    for res in cfg.resources.values():
        if res.timeout <= 0:
            raise Finding(f"resource {res.name}: timeout {res.timeout} accepted")
        if res.replication not in ("fullsync", "memsync", "async"):
            raise Finding(f"resource {res.name}: replication {res.replication!r}")
        if res.checksum not in ("none", "crc32", "sha256"):
            raise Finding(f"resource {res.name}: checksum {res.checksum!r}")
        if res.compression not in ("none", "hole", "lzf"):
            raise Finding(f"resource {res.name}: compression {res.compression!r}")
        if not res.local or not res.remote:
            raise Finding(f"resource {res.name}: empty local or remote")
    addresses = [*cfg.listen, cfg.control]
    for res in cfg.resources.values():
        if res.remote != "none":
            addresses.append(res.remote)
        if res.source:
            addresses.append(res.source)
    for addr in addresses:
        try:
            config.parse_address(addr)
        except config.AddressError:
            pass  # hastd reports it when it listens or connects (exit 71 / retry)
