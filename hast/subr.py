"""Small helpers shared by hastd and hastctl (FreeBSD's subr.c plus the libutil bits they use).

humanize() reproduces libutil's humanize_number(buf, 5, n, "", HN_AUTOSCALE,
HN_NOSPACE | HN_DECIMAL) because hastctl's ``(2.0MB)`` texts are parsed by scripts;
expand_number() is libutil's, which hastctl uses for its size options; bsd_getopt() and
getprogname() are libc's, whose exact diagnostics both hastd and hastctl print.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

_PREFIXES = ("", "K", "M", "G", "T", "P", "E")


def humanize(n: int) -> str:
    """Size as hastctl prints it before the literal ``B``: 0, 999, 1.0K, 64K, 2.0M, 10M."""
    q, rem, i = n, 0, 0
    while (q >= 1000 or (q == 999 and rem >= 512)) and i < len(_PREFIXES) - 1:
        rem = q % 1024
        q //= 1024
        i += 1
    if i > 0 and (q < 9 or (q == 9 and rem < 973)):
        t = (rem * 10 + 512) // 1024
        return f"{q + t // 10}.{t % 10}{_PREFIXES[i]}"
    return f"{q + (rem + 512) // 1024}{_PREFIXES[i]}"


_SHIFTS = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def expand_number(text: str) -> int:
    """libutil expand_number(3): decimal with an optional k/m/g/t/p/e suffix (powers of 1024).

    Raises ValueError on anything else or on overflow of uint64, as expand_number fails.
    """
    if not text:
        raise ValueError(text)
    body, shift = text, 0
    if text[-1].lower() in _SHIFTS:
        body, shift = text[:-1], _SHIFTS[text[-1].lower()]
    elif text[-1].lower() == "b":
        body = text[:-1]
    if not body.isdigit() or not body.isascii():
        raise ValueError(text)
    value = int(body) << shift
    if value >= 1 << 64:
        raise ValueError(text)
    return value


def format_duration(seconds: int) -> str:
    """FreeBSD's %#T with precision 0, used in the synchronization log lines."""
    t = int(seconds)
    out = ""
    rest = t
    year = 365 * 86400
    if rest >= year:
        out += f"{rest // year}y"
        rest %= year
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if t >= size and rest:
            out += f"{rest // size}{unit}"
            rest %= size
    if rest or t == 0:
        out += f"{rest}s"
    return out


def getprogname(argv0: str, name: str, module_file: str) -> str:
    """getprogname(3): basename(argv[0]); ``name`` when run as ``python -m hast.<module>``."""
    base = os.path.basename(argv0)
    if base in ("", module_file, "__main__.py", "-c", "-m"):
        return name
    return base


def bsd_getopt(args: list[str], optstring: str, prog: str,
               rest: list[str]) -> Iterator[tuple[str, str]]:
    """BSD getopt(3) over ``args``, as hastd and hastctl parse their options.

    Yields (option, argument or "") one at a time, so an error is reported where FreeBSD
    reports it (``-e foo -h`` fails on the extent size, ``-h -e foo`` prints the usage).
    Unknown options and missing arguments yield ("?", "") after the diagnostic.  The operands
    left after the options are stored into ``rest``.
    """
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if len(arg) < 2 or arg[0] != "-":
            break
        j = 1
        while j < len(arg):
            ch = arg[j]
            pos = optstring.find(ch)
            if ch == ":" or pos < 0:
                sys.stderr.write(f"{prog}: illegal option -- {ch}\n")
                yield "?", ""
                return
            if pos + 1 < len(optstring) and optstring[pos + 1] == ":":
                if j + 1 < len(arg):
                    value = arg[j + 1:]
                elif i + 1 < len(args):
                    i += 1
                    value = args[i]
                else:
                    sys.stderr.write(f"{prog}: option requires an argument -- {ch}\n")
                    yield "?", ""
                    return
                yield ch, value
                break
            yield ch, ""
            j += 1
        i += 1
    rest[:] = args[i:]
