"""metadata: the 4096-byte header at offset 0 of every HAST local provider (FreeBSD metadata.c).

This module owns the on-disk metadata block, the provider geometry it is derived from and the
layout arithmetic of ``hastctl create``.  FreeBSD's hastd reads our providers and we read
theirs, so everything here is byte-compatible:

* The block is one nv blob (``hast.nv``, little-endian) written from byte 0 and zero-filled to
  4096 bytes; there is no magic, version or checksum.  Fields, in the writer's order and with
  the exact types the reader demands: ``resource:string datasize:uint64 extentsize:uint32
  keepdirty:uint32 offset:uint64 resuid:uint64 localcnt:uint64 remotecnt:uint64
  prevrole:string``.  Note the on-disk name ``offset`` for what the code calls ``localoff``.
* Reading follows metadata_read(): a blob the nv validator rejects is "invalid"
  (``Metadata read from <path> is invalid: <strerror>.``); a ``resource`` string naming
  another resource is ``Provider <path> is not part of resource <name>.``; any other field
  that is missing (ENOENT) or has another type (EINVAL) makes the whole read fail with
  ``Unable to read metadata from <path>: <strerror>.`` -- the first offending field, in the
  reader's order, decides the errno.  A zero-filled block (a provider never initialised) is a
  *valid empty* nv blob for FreeBSD, so it fails on the missing ``resource`` field with
  ENOENT, not as "invalid".
* The block is always read and written whole: one 4096-byte pread/pwrite at offset 0.

Layout of a provider: ``[0, 4096)`` metadata, ``[4096, localoff)`` the activemap
(``mapsize`` bytes, sector-rounded), ``[localoff, mediasize)`` the data area.

Counters and roles (metadata.c, kept here for the daemon): the generation counters exist twice
in memory, a "primary" pair and a "secondary" pair.  When the writer acts as PRIMARY or INIT it
persists its primary pair, as SECONDARY its secondary pair; ``prevrole`` is always the writer's
current role.  On read, a non-primary role loads the stored pair into its secondary variables,
a non-secondary role into its primary ones (INIT loads both), and only a stored ``prevrole`` of
"primary" or "secondary" changes the remembered previous role.  See persisted_counters(),
loaded_counters() and previous_role().
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import NamedTuple

from hast import _io, nv
from hast.log import strerror

METADATA_SIZE = 4096
HAST_EXTENTSIZE = 2 * 1024 * 1024
HAST_KEEPDIRTY = 64

ROLE_INIT = "init"
ROLE_PRIMARY = "primary"
ROLE_SECONDARY = "secondary"
ROLES = (ROLE_INIT, ROLE_PRIMARY, ROLE_SECONDARY)

# (nv name, nv type, Metadata attribute), in the order metadata_write() emits them.
_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("resource", nv.STRING, "resource"),
    ("datasize", nv.UINT64, "datasize"),
    ("extentsize", nv.UINT32, "extentsize"),
    ("keepdirty", nv.UINT32, "keepdirty"),
    ("offset", nv.UINT64, "localoff"),
    ("resuid", nv.UINT64, "resuid"),
    ("localcnt", nv.UINT64, "localcnt"),
    ("remotecnt", nv.UINT64, "remotecnt"),
    ("prevrole", nv.STRING, "prevrole"),
)


class MetadataError(Exception):
    """A metadata or provider failure carrying FreeBSD's log text.

    ``text`` is the message as pjdlog prints it without the errno part; ``errno`` (if any) is
    appended as ``: <strerror>.`` by str(), exactly like pjdlog_errno().  ``reason`` is an
    optional human explanation (which field was wrong) that FreeBSD does not print.
    """

    def __init__(self, text: str, err: int | None = None, reason: str | None = None) -> None:
        self.text = text
        self.errno = err
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.errno is None:
            return self.text
        return f"{self.text}: {strerror(self.errno)}."


class ProviderError(MetadataError):
    """The local component could not be opened, stat'ed or sized (hastctl create: exit 66)."""


class MetadataIOError(MetadataError):
    """pread/pwrite of the metadata block failed."""


class InvalidMetadata(MetadataError):
    """The block is not usable metadata.

    ``rejected`` is true when the nv validator refused the blob (FreeBSD's "Metadata read from
    <path> is invalid"), false when a field was missing or mistyped ("Unable to read metadata
    from <path>").  unpack() does not know the path; read() rewords the text with it.
    """

    def __init__(self, rejected: bool, err: int, reason: str) -> None:
        self.rejected = rejected
        text = "Metadata is invalid" if rejected else "Unable to read metadata"
        super().__init__(text, err, reason)

    def with_path(self, path: str) -> InvalidMetadata:
        out = InvalidMetadata(self.rejected, self.errno or errno.EINVAL, self.reason or "")
        out.text = (f"Metadata read from {path} is invalid" if self.rejected
                    else f"Unable to read metadata from {path}")
        out.args = (str(out),)
        return out


class WrongResource(MetadataError):
    """The block's ``resource`` names another resource than the one configured."""

    def __init__(self, found: str, expected: str, path: str | None = None) -> None:
        self.found = found
        self.expected = expected
        where = path if path is not None else "<provider>"
        super().__init__(f"Provider {where} is not part of resource {expected}.",
                         reason=f"metadata belongs to resource {found!r}")


@dataclass
class Metadata:
    """The decoded metadata block.  ``prevrole`` is kept as stored (any string)."""

    resource: str
    datasize: int
    extentsize: int
    keepdirty: int
    localoff: int
    resuid: int = 0
    localcnt: int = 0
    remotecnt: int = 0
    prevrole: str = ROLE_INIT

    def to_nv(self) -> nv.NV:
        out = nv.NV()
        for name, nvtype, attr in _FIELDS:
            out.add(name, nvtype, getattr(self, attr))
        return out

    def pack(self) -> bytes:
        """The 4096-byte block: the nv blob in FreeBSD's field order, zero-filled."""
        blob = self.to_nv().pack()
        # metadata_write() asserts the blob is strictly shorter than the block.
        if len(blob) >= METADATA_SIZE:
            raise MetadataError(
                f"Metadata is too large ({len(blob)} bytes, limit {METADATA_SIZE - 1}).")
        return blob.ljust(METADATA_SIZE, b"\0")

    @classmethod
    def unpack(cls, block: bytes | bytearray | memoryview,
               resource_name: str | None = None) -> Metadata:
        """Decode with metadata_read()'s rules.

        Raises InvalidMetadata (blob rejected, or a field missing/mistyped) and, when
        ``resource_name`` is given and the stored name differs, WrongResource.
        """
        try:
            blob = nv.NV.unpack(block)
        except nv.NVError as exc:
            raise InvalidMetadata(True, errno.EINVAL, str(exc)) from None
        # The name check comes before the field check, as in metadata_read(): a provider of
        # another resource is reported as such even if other fields are damaged.
        found = blob.find("resource")
        if (resource_name is not None and found is not None and found[0] == nv.STRING
                and found[1] != resource_name):
            assert isinstance(found[1], str)
            raise WrongResource(found[1], resource_name)
        values: dict[str, object] = {}
        for name, nvtype, attr in _FIELDS:
            hit = blob.find(name)
            if hit is None:
                raise InvalidMetadata(False, errno.ENOENT,
                                      f"metadata field '{name}' is missing")
            if hit[0] != nvtype:
                raise InvalidMetadata(
                    False, errno.EINVAL,
                    f"metadata field '{name}' is {nv.TYPE_NAMES[hit[0]]}, "
                    f"expected {nv.TYPE_NAMES[nvtype]}")
            values[attr] = hit[1]
        return cls(**values)  # type: ignore[arg-type]


class Provider(NamedTuple):
    """An open local component and its geometry (FreeBSD's provinfo())."""

    fd: int
    path: str
    mediasize: int
    sectorsize: int


def open_provider(path: str, write: bool) -> Provider:
    """Open the local component like provinfo(): O_RDWR or O_RDONLY, then stat and size it.

    Raises ProviderError with FreeBSD's messages; the descriptor is closed on failure.
    """
    try:
        fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    except OSError as exc:
        raise ProviderError(f"Unable to open {path}", exc.errno) from None
    try:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise ProviderError(f"Unable to stat {path}", exc.errno) from None
        if stat.S_ISREG(st.st_mode):
            # hastd hard-wires 512-byte sectors for regular files.
            return Provider(fd, path, st.st_size, 512)
        if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            # FreeBSD takes character devices (GEOM); Linux disks are block devices.
            raise ProviderError(f"{path} is neither GEOM provider nor regular file.")
        try:
            mediasize, sectorsize = _io.provider_info(fd)
        except _io.NotAProvider:
            raise ProviderError(
                f"{path} is neither GEOM provider nor regular file.") from None
        except OSError as exc:
            # _io does not say which of its two ioctls failed; the first is the likely one.
            raise ProviderError(f"Unable obtain provider {path} mediasize",
                                exc.errno) from None
        return Provider(fd, path, mediasize, sectorsize)
    except BaseException:
        os.close(fd)
        raise


def _read_block(fd: int) -> bytes:
    buf = bytearray(METADATA_SIZE)
    # _io.pread loops until done and copes with O_DIRECT descriptors (the daemon's).
    if _io.pread(fd, buf, 0) != METADATA_SIZE:
        # FreeBSD reports a short read through whatever errno is left over; EIO is the
        # honest equivalent (the provider is smaller than the metadata block).
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    return bytes(buf)


def read_block(fd: int) -> bytes:
    """The raw 4096-byte block; MetadataIOError("Unable to read metadata") on failure."""
    try:
        return _read_block(fd)
    except OSError as exc:
        raise MetadataIOError("Unable to read metadata", exc.errno or errno.EIO) from None


def read(source: int | str, resource_name: str | None = None,
         path: str | None = None) -> Metadata:
    """metadata_read(): decode the block of an open fd or of a provider path (read-only).

    ``path`` names the provider in messages when ``source`` is a descriptor.  Raises
    ProviderError, MetadataIOError, InvalidMetadata (with the path in its text) or
    WrongResource with FreeBSD's exact messages.
    """
    if isinstance(source, int):
        name = path if path is not None else f"fd {source}"
        return _read_fd(source, resource_name, name)
    prov = open_provider(source, write=False)
    try:
        return _read_fd(prov.fd, resource_name, source)
    finally:
        os.close(prov.fd)


def _read_fd(fd: int, resource_name: str | None, path: str) -> Metadata:
    block = read_block(fd)
    try:
        return Metadata.unpack(block, resource_name)
    except InvalidMetadata as exc:
        raise exc.with_path(path) from None
    except WrongResource as exc:
        raise WrongResource(exc.found, exc.expected, path) from None


def write(fd: int, md: Metadata) -> None:
    """metadata_write(): one 4096-byte pwrite at offset 0 (MetadataIOError on failure)."""
    block = md.pack()
    try:
        _io.pwrite(fd, block, 0)
    except OSError as exc:
        raise MetadataIOError("Unable to write metadata", exc.errno or errno.EIO) from None


def write_zeroed_activemap(fd: int, mapsize: int) -> None:
    """The all-clean bitmap ``hastctl create`` stores right after the metadata block."""
    _io.pwrite(fd, bytes(mapsize), METADATA_SIZE)


def layout(mediasize: int, extentsize: int, sectorsize: int) -> tuple[int, int, int]:
    """(mapsize, datasize, localoff) of a provider of ``mediasize`` bytes (hastctl create).

    The activemap is sized over ``mediasize - 4096``; ``datasize`` is neither rounded to the
    extent nor to the sector size.  Raises ValueError for a geometry FreeBSD would assert on
    (non-power-of-two sizes, no room for the metadata) or that leaves a negative data area.
    """
    from hast.activemap import calc_ondisk_size  # the bitmap's own sizing rule

    if mediasize <= METADATA_SIZE:
        raise ValueError(f"media size {mediasize} leaves no room after the metadata")
    mapsize = calc_ondisk_size(mediasize - METADATA_SIZE, extentsize, sectorsize)
    datasize = mediasize - METADATA_SIZE - mapsize
    if datasize < 0:
        raise ValueError(f"media size {mediasize} is smaller than metadata and activemap")
    return mapsize, datasize, METADATA_SIZE + mapsize


# -- role-dependent counters (metadata.c); used by the daemon ----------------------------------

def persisted_counters(role: str, primary: tuple[int, int],
                       secondary: tuple[int, int]) -> tuple[int, int]:
    """(localcnt, remotecnt) metadata_write() stores: the primary pair unless SECONDARY."""
    if role == ROLE_SECONDARY:
        return secondary
    return primary


def loaded_counters(role: str, md: Metadata
                    ) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(primary pair, secondary pair) metadata_read() loads; None = left unchanged.

    A non-primary role loads the secondary pair, a non-secondary role the primary pair, so
    INIT loads both.
    """
    pair = (md.localcnt, md.remotecnt)
    return (pair if role != ROLE_SECONDARY else None,
            pair if role != ROLE_PRIMARY else None)


def previous_role(md: Metadata, current: str) -> str:
    """The remembered previous role after a read: only "primary"/"secondary" change it."""
    if md.prevrole in (ROLE_PRIMARY, ROLE_SECONDARY):
        return md.prevrole
    return current
