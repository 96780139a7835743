"""pjdlog: the one logging layer of hastd and hastctl.

FreeBSD's tools print every message as ``[LEVEL] <prefix><text>`` on a terminal (WARNING and
worse to stderr, the rest to stdout) and send the same body to syslog (LOG_DAEMON) once hastd
daemonizes.  Scripts grep these texts, so the format is part of the interface.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import sys
import syslog
from typing import TextIO

MODE_STD = 0
MODE_SYSLOG = 1

_LEVELS = {
    syslog.LOG_EMERG: "EMERG",
    syslog.LOG_ALERT: "ALERT",
    syslog.LOG_CRIT: "CRIT",
    syslog.LOG_ERR: "ERROR",
    syslog.LOG_WARNING: "WARNING",
    syslog.LOG_NOTICE: "NOTICE",
    syslog.LOG_INFO: "INFO",
    syslog.LOG_DEBUG: "DEBUG",
}

_mode = MODE_STD
_debug_level = 0
_prefix = ""


def init(mode: int = MODE_STD, ident: str = "hastd") -> None:
    global _mode
    _mode = mode
    if mode == MODE_SYSLOG:
        syslog.openlog(ident, syslog.LOG_PID | syslog.LOG_NDELAY, syslog.LOG_DAEMON)


def set_debug(level: int) -> None:
    global _debug_level
    _debug_level = level


def debug_level() -> int:
    return _debug_level


def set_prefix(prefix: str) -> None:
    """``[<res>] (<role>) `` in workers, ``[<res>] `` in hastctl create, empty otherwise."""
    global _prefix
    _prefix = prefix


def strerror(err: int) -> str:
    # FreeBSD's strerror texts match glibc's for the errnos hastd reports; a few differ
    # in case only, which scripts do not depend on.
    return os.strerror(err)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(m: re.Match[str]) -> str:
    code = ord(m.group())
    # U+DC80..U+DCFF: a byte that was not UTF-8, decoded with surrogateescape (hast.nv,
    # os.fsdecode); shown as the byte.  Any other lone surrogate as its code point.
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def _printable(text: str) -> str:
    """text as syslog() and a UTF-8 stream accept it.

    Peers choose some of what is logged (resource names, checksum names), and hast.nv
    decodes bytes that are not UTF-8 to lone surrogates, which syslog.syslog() and a strict
    stream refuse with UnicodeEncodeError.  Those become ``\\xNN`` escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub(_escape_surrogate, text)
    return text


def _write(stream: TextIO, line: str) -> None:
    try:
        stream.write(line)
    except UnicodeEncodeError:  # a stream that is not UTF-8 (LANG=C without coercion)
        enc = stream.encoding or "ascii"
        stream.write(line.encode(enc, "backslashreplace").decode(enc))
    stream.flush()


def _emit(level: int, text: str, dlevel: int = 0, err: int | None = None) -> None:
    body = _prefix + text
    if err is not None:
        body += f": {strerror(err)}."
    body = _printable(body)
    if _mode == MODE_SYSLOG:
        syslog.syslog(level, body)
        return
    tag = f"[{_LEVELS[level]}]"
    if level == syslog.LOG_DEBUG:
        tag += f"[{dlevel}]"
    _write(sys.stderr if level <= syslog.LOG_WARNING else sys.stdout, f"{tag} {body}\n")


def crit(text: str, err: int | None = None) -> None:
    _emit(syslog.LOG_CRIT, text, err=err)


def error(text: str, err: int | None = None) -> None:
    _emit(syslog.LOG_ERR, text, err=err)


def warning(text: str, err: int | None = None) -> None:
    _emit(syslog.LOG_WARNING, text, err=err)


def notice(text: str, err: int | None = None) -> None:
    _emit(syslog.LOG_NOTICE, text, err=err)


def info(text: str, err: int | None = None) -> None:
    _emit(syslog.LOG_INFO, text, err=err)


def debug(dlevel: int, text: str, err: int | None = None) -> None:
    if dlevel <= _debug_level:
        _emit(syslog.LOG_DEBUG, text, dlevel=dlevel, err=err)


def exc_errno(exc: BaseException) -> int:
    """The errno an OSError carries, EIO for anything else (pjdlog appends strerror of it)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    return _errno.EIO
