"""settings: py-hast's own knobs, kept out of hast.conf so FreeBSD's parser never sees them.

hast.conf must stay byte-for-byte acceptable to base hastd (the same file is deployed on a
FreeBSD node of a mixed pair), so what only py-hast has -- the Linux frontend, the largest
request sent to the peer -- lives in ``py-hast.conf`` beside hast.conf.  The file is optional;
every line is ``<keyword> <value>`` or ``<keyword> <resource> <value>`` in UTF-8, ``#`` starts
a comment (in any encoding):

    maxio 1M                       # largest READ/WRITE sent to the peer (default 1 MiB)
    maxio shared 128K              # ... per resource (a FreeBSD <= 12 peer takes 128 KiB)
    direct off                     # O_DIRECT on the local provider (default on)
    devdir /dev/hast               # where /dev/hast/<name> appears on Linux ("none": never)
    sockdir /var/run/hast          # NBD UNIX sockets: <sockdir>/<resource>.sock
    nbd shared 127.0.0.1:10809     # also serve this resource's NBD export on TCP

The peer's limit is not negotiated by the HAST protocol (hast-internals §0.3): a FreeBSD >= 13
amd64 node and py-hast accept 1 MiB, which is the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hast.subr import expand_number

FILENAME = "py-hast.conf"
DEFAULT_MAXIO = 1024 * 1024
MAX_MAXIO = 1024 * 1024  # what our own secondary accepts


class SettingsError(ValueError):
    pass


@dataclass
class Settings:
    path: str = ""
    maxio: int = DEFAULT_MAXIO
    direct: bool = True
    devdir: str = "/dev/hast"
    sockdir: str = "/var/run/hast"
    res_maxio: dict[str, int] = field(default_factory=dict)
    nbd_tcp: dict[str, str] = field(default_factory=dict)

    def maxio_for(self, resource: str) -> int:
        return self.res_maxio.get(resource, self.maxio)

    def socket_for(self, resource: str) -> str:
        return os.path.join(self.sockdir, resource.replace("/", "_") + ".sock")


def _size(text: str, where: str) -> int:
    try:
        value = expand_number(text)
    except ValueError:
        raise SettingsError(f"{where}: invalid size '{text}'") from None
    if value < 4096 or value > MAX_MAXIO or value & (value - 1):
        raise SettingsError(f"{where}: maxio must be a power of two in [4K, 1M], not {text}")
    return value


def load(config_path: str) -> Settings:
    """Settings for the hast.conf at ``config_path`` (defaults when py-hast.conf is absent)."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_path)), FILENAME)
    settings = Settings(path=path)
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return settings
    except OSError as exc:
        raise SettingsError(f"Unable to open {path}: {exc.strerror}.") from None
    for lineno, rawbytes in enumerate(lines, 1):
        where = f"{path}:{lineno}"
        # Comments may be in any encoding; what is parsed must be UTF-8 (paths, names).
        directive = rawbytes.split(b"#", 1)[0]
        try:
            words = directive.decode("utf-8").split()
        except UnicodeDecodeError as exc:
            shown = directive.strip().decode("utf-8", "backslashreplace")
            raise SettingsError(f"{where}: invalid UTF-8 byte 0x{directive[exc.start]:02x} "
                                f"in '{shown}'") from None
        if not words:
            continue
        raw = rawbytes.decode("utf-8", "backslashreplace")
        key, args = words[0], words[1:]
        if key == "maxio" and len(args) == 1:
            settings.maxio = _size(args[0], where)
        elif key == "maxio" and len(args) == 2:
            settings.res_maxio[args[0]] = _size(args[1], where)
        elif key == "direct" and len(args) == 1 and args[0] in ("on", "off"):
            settings.direct = args[0] == "on"
        elif key in ("devdir", "sockdir") and len(args) == 1:
            setattr(settings, key, args[0])
        elif key == "nbd" and len(args) == 2:
            settings.nbd_tcp[args[0]] = args[1]
        else:
            raise SettingsError(f"{where}: cannot parse '{raw.strip()}'")
    return settings
