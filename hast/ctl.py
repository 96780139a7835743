"""ctl: hastctl(8), the command-line front end of py-hast (FreeBSD sbin/hastctl/hastctl.c).

This module owns hastctl's interface: argument parsing, usage text, messages and exit codes,
plus the two sub-commands that work on the local disk without hastd, ``create`` and ``dump``.
``role``, ``list`` and ``status`` are validated here and sent to hastd by hast.control (the
control protocol and the rendering of its replies, shared with the daemon side); ``list`` and
``status`` also take py-hast's ``--json``.

Scripts written for FreeBSD's hastctl parse its output and test its exit status, so both follow
FreeBSD byte for byte:

* The sub-command comes first, options after it, parsed with BSD getopt semantics (stop at the
  first non-option word, ``--`` ends the options, ``illegal option -- x`` /
  ``option requires an argument -- x`` diagnostics).  ``-h``, an unknown or missing
  sub-command, missing names and a bad role word print the usage and exit 64.
* The program name in the usage and in ``<prog>: Invalid extentsize`` is getprogname(): the
  basename of argv[0] (``py-hastctl`` for the console script).  Run as ``python -m hast.ctl``
  argv[0] is this file, so the name shown is FreeBSD's ``hastctl``.
* Every sub-command parses the whole configuration first; its errors are FreeBSD's single
  ``[ERROR] <message>`` line with exit 72 (unreadable) or 78 (invalid).
* ``create``: exit status is the first non-zero code over all names, later names are still
  processed; messages carry the ``[<res>] `` prefix.  ``dump``: 255 for a metadata failure
  (FreeBSD exits with -1), 65 for an unknown name.

Decisions where py-hast deviates from FreeBSD (docs/decisions.md):

* Configuration errors: FreeBSD's exact line comes first, so scripts matching it keep working;
  when the parser knows where the error is, a second line ``[ERROR] <file>:<line>: <message>``
  (1-based line) follows.  FreeBSD's own syntax errors print a 0-based line and no file name,
  which is what the second line fixes.
* ``create -e`` with a size that is not a power of two is reported as
  ``[ERROR] [<res>] Extent size (<n>) is not power of 2.`` with exit 65 (decisions.md item 5);
  FreeBSD trips an assertion in activemap_calc_ondisk_size() and dies with SIGABRT (134).  As
  there, the provider is left untouched.
* Values FreeBSD silently truncates or asserts on later are rejected with exit 65 before
  anything is written: an extent size or keepdirty above INT_MAX (hastd keeps both in an
  ``int``), and a media size too small to hold the metadata and the activemap.  Size options of
  2^63 or more (negative in FreeBSD's int64) are ``Invalid <option>`` (exit 64).
* ``dump`` with ``-d`` explains an invalid block at debug level 1 (which field is missing or
  has which type); FreeBSD only prints the errno.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from hast import config, log, metadata, subr
from hast.config import Config, ConfigError
from hast.metadata import MetadataError
from hast.subr import expand_number, humanize
from hast.sysexits import (
    EX_DATAERR,
    EX_IOERR,
    EX_NOINPUT,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
)

# hast.h: control commands and the role numbers sent to hastd.
HAST_TIMEOUT = 20

_INT_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
# dump_one() returns metadata_read()'s -1, which exit() turns into 255.
_DUMP_FAILED = 255

_OPTSTRINGS = {
    "create": "c:de:k:m:h",
    "role": "c:dh",
    "list": "c:dh",
    "status": "c:dh",
    "dump": "c:dh",
}


class _Exit(Exception):
    """Terminates the command with a status, like exit(3) deep inside hastctl.c."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def getprogname(argv0: str) -> str:
    """basename(argv[0]); ``hastctl`` when started as ``python -m hast.ctl``."""
    return subr.getprogname(argv0, "hastctl", "ctl.py")

def usage_text(prog: str) -> str:
    return (
        f"usage: {prog} create [-d] [-c config] [-e extentsize] [-k keepdirty]\n"
        "\t\t[-m mediasize] name ...\n"
        f"       {prog} role [-d] [-c config] <init | primary | secondary> all | name ...\n"
        f"       {prog} list [-d] [-c config] [all | name ...]\n"
        f"       {prog} status [-d] [-c config] [all | name ...]\n"
        f"       {prog} dump [-d] [-c config] [all | name ...]\n"
    )


def _usage(prog: str) -> _Exit:
    sys.stderr.write(usage_text(prog))
    sys.stderr.flush()
    return _Exit(EX_USAGE)


def _errx(prog: str, code: int, text: str) -> _Exit:
    sys.stderr.write(f"{prog}: {text}\n")
    sys.stderr.flush()
    return _Exit(code)


def _size_option(prog: str, text: str, what: str) -> int:
    try:
        value = expand_number(text)
    except ValueError:
        value = -1
    if not 0 <= value <= _INT64_MAX:
        raise _errx(prog, EX_USAGE, f"Invalid {what}")
    return value


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """hastctl's main(): ``argv`` without the program name; returns the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    if prog is None:
        prog = getprogname(sys.argv[0] if sys.argv else "")
    log.set_prefix("")
    log.set_debug(0)
    try:
        return _main(list(argv), prog)
    except _Exit as exc:
        return exc.code
    finally:
        sys.stdout.flush()
        log.set_prefix("")


def _main(argv: list[str], prog: str) -> int:
    if not argv or argv[0] not in _OPTSTRINGS:
        raise _usage(prog)
    cmd = argv[0]
    json_out = False
    if cmd in ("list", "status") and "--json" in argv[1:]:
        # py-hast extension: machine-readable output; FreeBSD's getopt never sees it
        json_out = True
        argv = [a for a in argv if a != "--json"]
    cfgpath: str | None = None
    debug = 0
    mediasize = extentsize = keepdirty = 0
    names: list[str] = []
    for opt, value in subr.bsd_getopt(argv[1:], _OPTSTRINGS[cmd], prog, names):
        if opt == "c":
            cfgpath = value
        elif opt == "d":
            debug += 1
        elif opt == "e":
            extentsize = _size_option(prog, value, "extentsize")
        elif opt == "k":
            keepdirty = _size_option(prog, value, "keepdirty")
        elif opt == "m":
            mediasize = _size_option(prog, value, "mediasize")
        else:  # -h, an illegal option or a missing argument
            raise _usage(prog)
    if cmd in ("create", "role") and not names:
        raise _usage(prog)
    log.set_debug(debug)

    cfg = _load_config(cfgpath)

    if cmd == "create":
        return _create(cfg, names, mediasize, extentsize, keepdirty)
    if cmd == "dump":
        return _dump(cfg, names)
    from hast import control

    if cmd == "role":
        if len(names) < 2 or names[0] not in control.ROLE_NUMBERS:
            raise _usage(prog)
        return control.client_role(cfg, names[0], names[1:], debug)
    # list, status: no names means all; "all" rules are applied by hastd.
    if cmd == "list":
        return control.client_list(cfg, names, json_out)
    return control.client_status(cfg, names, json_out)


def _load_config(cfgpath: str | None) -> Config:
    try:
        return config.load(cfgpath if cfgpath is not None else config.DEFAULT_CONFIG)
    except ConfigError as exc:
        log.error(exc.message)
        if _detail_adds_information(exc):
            log.error(exc.detail)
        raise _Exit(exc.exitcode) from None


def _detail_adds_information(exc: ConfigError) -> bool:
    """True when ``<file>:<line>: <message>`` tells more than FreeBSD's line alone.

    It does when it has a line number, or names a file the message does not mention; it
    does not for ``Unable to open configuration file <path>: ...``.
    """
    if not exc.detail or exc.detail == exc.message:
        return False
    return exc.lineno is not None or not exc.path or exc.path not in exc.message


def _log_failure(exc: MetadataError) -> None:
    log.error(exc.text, exc.errno)
    if exc.reason:
        log.debug(1, exc.reason)


# -- create ---------------------------------------------------------------------------------

def _create(cfg: Config, names: list[str], mediasize: int, extentsize: int, keepdirty: int) -> int:
    """control_create(): initialise every named resource; the first failure's code wins."""
    ec = EX_OK
    for name in names:
        res = cfg.resources.get(name)
        if res is None:
            log.error(f"Unknown resource {name}.")
            ec = ec or EX_DATAERR
            continue
        log.set_prefix(f"[{res.name}] ")
        try:
            ret = _create_one(res.name, res.local, mediasize, extentsize, keepdirty)
        finally:
            log.set_prefix("")
        ec = ec or ret
    return ec


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _create_one(name: str, path: str, mediasize: int, extentsize: int, keepdirty: int) -> int:
    try:
        prov = metadata.open_provider(path, write=True)
    except MetadataError as exc:
        _log_failure(exc)
        return EX_NOINPUT
    try:
        return _create_on(prov, name, mediasize, extentsize, keepdirty)
    finally:
        os.close(prov.fd)


def _create_on(prov: metadata.Provider, name: str, mediasize: int, extentsize: int,
               keepdirty: int) -> int:
    path, sectorsize = prov.path, prov.sectorsize
    if mediasize == 0:
        mediasize = prov.mediasize
    elif mediasize > prov.mediasize:
        log.error(f"Provided mediasize is larger than provider {path} size.")
        return EX_DATAERR
    if not _is_pow2(sectorsize):
        log.error(f"Sector size of provider {path} is not power of 2 ({sectorsize}).")
        return EX_DATAERR
    if extentsize == 0:
        extentsize = metadata.HAST_EXTENTSIZE
    if extentsize < sectorsize:
        log.error(f"Extent size ({extentsize}) is less than sector size ({sectorsize}).")
        return EX_DATAERR
    if extentsize % sectorsize != 0:
        log.error(f"Extent size ({extentsize}) is not multiple of sector size ({sectorsize}).")
        return EX_DATAERR
    # py-hast: FreeBSD asserts here (SIGABRT) -- see the module docstring.
    if not _is_pow2(extentsize):
        log.error(f"Extent size ({extentsize}) is not power of 2.")
        return EX_DATAERR
    if extentsize > _INT_MAX:
        log.error(f"Extent size ({extentsize}) is too large.")
        return EX_DATAERR
    if keepdirty == 0:
        keepdirty = metadata.HAST_KEEPDIRTY
    if keepdirty > _INT_MAX:
        log.error(f"Keepdirty ({keepdirty}) is too large.")
        return EX_DATAERR
    try:
        mapsize, datasize, localoff = metadata.layout(mediasize, extentsize, sectorsize)
    except ValueError as exc:
        log.error(f"Mediasize ({mediasize}) is too small for metadata and activemap.")
        log.debug(1, str(exc))
        return EX_DATAERR

    # hastctl runs in role INIT: resuid 0, the primary counters (0, 0), prevrole "init".
    md = metadata.Metadata(resource=name, datasize=datasize, extentsize=extentsize,
                           keepdirty=keepdirty, localoff=localoff)
    try:
        metadata.write(prov.fd, md)
    except MetadataError as exc:
        _log_failure(exc)
        return EX_IOERR
    try:
        metadata.write_zeroed_activemap(prov.fd, mapsize)
    except MemoryError:
        log.error(f"Unable to allocate {mapsize} bytes of memory for initial bitmap.")
        return EX_TEMPFAIL
    except OSError as exc:
        log.error(f"Unable to store initial bitmap on {path}", log.exc_errno(exc))
        return EX_IOERR
    return EX_OK


# -- dump -----------------------------------------------------------------------------------

def _dump(cfg: Config, names: list[str]) -> int:
    """Print the metadata of each resource; ``all`` only counts as the sole argument."""
    ret = EX_OK
    if not names or names == ["all"]:
        for res in cfg.resources.values():
            error = _dump_one(res.name, res.local)
            ret = ret or error
        return ret
    for name in names:
        res = cfg.resources.get(name)
        if res is None:
            log.error(f"Unknown resource {name}.")
            ret = ret or EX_DATAERR
            continue
        error = _dump_one(res.name, res.local)
        ret = ret or error
    return ret


def _as_int(value: int) -> int:
    """hastd keeps extentsize/keepdirty in an ``int`` and prints them with %d."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value > _INT_MAX else value


def _human(value: int) -> str:
    return humanize(value) if value >= 0 else "-" + humanize(-value)


def _dump_one(name: str, path: str) -> int:
    try:
        md = metadata.read(path, name)
    except MetadataError as exc:
        _log_failure(exc)
        return _DUMP_FAILED
    extentsize, keepdirty = _as_int(md.extentsize), _as_int(md.keepdirty)
    # hastctl's own role is INIT, so its remembered previous role starts as "init".
    prevrole = metadata.previous_role(md, metadata.ROLE_INIT)
    sys.stdout.write(
        f"resource: {name}\n"
        f"    datasize: {md.datasize} ({_human(md.datasize)}B)\n"
        f"    extentsize: {extentsize} ({_human(extentsize)}B)\n"
        f"    keepdirty: {keepdirty}\n"
        f"    localoff: {md.localoff}\n"
        f"    resuid: {md.resuid}\n"
        f"    localcnt: {md.localcnt}\n"
        f"    remotecnt: {md.remotecnt}\n"
        f"    prevrole: {prevrole}\n"
    )
    sys.stdout.flush()
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
