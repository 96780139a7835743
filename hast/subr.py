"""Small helpers shared by hastd and hastctl (FreeBSD's subr.c plus the libutil bits they use).

humanize() reproduces libutil's humanize_number(buf, 5, n, "", HN_AUTOSCALE,
HN_NOSPACE | HN_DECIMAL) because hastctl's ``(2.0MB)`` texts are parsed by scripts;
expand_number() is libutil's, which hastctl uses for its size options.
"""

from __future__ import annotations

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
