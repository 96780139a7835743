"""The activemap: which extents of the data area may differ between the two nodes.

This module owns the dirty-extent bitmap that FreeBSD's hastd keeps in
sbin/hastd/activemap.c (doc: hast-internals.md §2): the per-extent in-flight counters
(memtab), the in-memory, on-disk and to-synchronise maps, the keep-dirty LRU that spares a
bitmap write per write request on hot extents, the synchronisation cursor, and
calc_ondisk_size() used by `hastctl create`. The primary calls it on every write, so the
production implementation is C (hast/_bitmap.pyx).

Twin pattern (as msgpack does with its C extension and its fallback.py): PyActiveMap below
is a plain-Python implementation with the same API and the same semantics, down to the
return value of every call and every byte of bitmap(). It is the readable reference, the
fallback when the extension is not built, and the oracle of tests/test_activemap.py, which
drives both with random operation sequences. `ActiveMap` and `calc_ondisk_size` exported
here are the Cython ones, unless the extension cannot be imported or HAST_PURE_PYTHON=1 is
set in the environment; IMPLEMENTATION says which ("cython" or "python").

Conventions shared by both implementations:
* bit n of a map is byte n >> 3, mask 1 << (n & 7) (FreeBSD's layout on little-endian
  hosts); the in-memory map is bitstr_size(nextents) bytes (whole 64-bit words, FreeBSD
  >= 11), the on-disk/on-wire image that rounded up to the sector size;
* methods documented "True: flush" return True when the on-disk bitmap must be rewritten;
* where FreeBSD asserts (and aborts), we raise ValueError (bad geometry, out-of-range
  offsets, unbalanced completions) or OverflowError (a uint16 counter would wrap), before
  changing any state;
* deviations from FreeBSD, both deliberate: keepdirty=1 works (FreeBSD trips an assertion
  on eviction), and copyin() always rebuilds the counters from the buffer (FreeBSD skips
  that when the buffer is all clear; identical on a fresh map, which is how hastd uses it).
"""

from __future__ import annotations

import os
from array import array
from collections import OrderedDict

__all__ = ["ActiveMap", "IMPLEMENTATION", "PyActiveMap", "calc_ondisk_size",
           "py_calc_ondisk_size"]

# FreeBSD's MAXPHYS on 64-bit platforms since 13.0: the sync chunk size.
MAXPHYS = 1048576
_MEMTAB_MAX = 0xFFFF
# Bytes converted to one int per step by PyActiveMap.next_dirty.
_SCAN_CHUNK = 4096


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _check_geometry(mediasize: int, extentsize: int, sectorsize: int) -> None:
    if mediasize <= 0:
        raise ValueError(f"media size must be positive, not {mediasize}")
    if not _is_pow2(extentsize):
        raise ValueError(f"extent size {extentsize} is not a power of two")
    if not _is_pow2(sectorsize):
        raise ValueError(f"sector size {sectorsize} is not a power of two")


def _first_set(data: bytes | bytearray | memoryview, nbits: int, start: int) -> int:
    """Lowest set bit in [start, nbits) of a byte-layout map, or -1."""
    if start >= nbits:
        return -1
    nbytes = (nbits + 7) >> 3
    pos = start >> 3
    head = data[pos] >> (start & 7)
    if head:
        bit = start + ((head & -head).bit_length() - 1)
        return bit if bit < nbits else -1
    pos += 1
    while pos < nbytes:
        chunk = int.from_bytes(data[pos:min(pos + _SCAN_CHUNK, nbytes)], "little")
        if chunk:
            bit = (pos << 3) + ((chunk & -chunk).bit_length() - 1)
            return bit if bit < nbits else -1
        pos += _SCAN_CHUNK
    return -1


def py_calc_ondisk_size(mediasize: int, extentsize: int, sectorsize: int) -> int:
    """On-disk activemap size for `hastctl create` (activemap_calc_ondisk_size()).

    nextents = (mediasize - 1) // extentsize + 1, mapsize = bitstr_size(nextents) (whole
    64-bit words), rounded up to the sector size. A non-power-of-two extent or sector size
    raises ValueError (FreeBSD asserts).
    """
    _check_geometry(mediasize, extentsize, sectorsize)
    nextents = (mediasize - 1) // extentsize + 1
    mapsize = (nextents + 63) // 64 * 8
    return (mapsize + sectorsize - 1) & ~(sectorsize - 1)


class PyActiveMap:
    """Dirty-extent bitmap of one resource (struct activemap), pure-Python reference."""

    def __init__(self, mediasize: int, extentsize: int, sectorsize: int, keepdirty: int,
                 maxphys: int = MAXPHYS) -> None:
        _check_geometry(mediasize, extentsize, sectorsize)
        if not 0 < keepdirty <= 0x3FFFFFFF:
            raise ValueError(f"keepdirty must be between 1 and {0x3FFFFFFF}, not {keepdirty}")
        if maxphys <= 0:
            raise ValueError(f"maxphys must be positive, not {maxphys}")
        if (extentsize - 1) // maxphys + 1 > _MEMTAB_MAX:
            raise ValueError(f"extent size {extentsize} needs more than {_MEMTAB_MAX} "
                             f"requests of {maxphys} bytes")
        self.mediasize = mediasize
        self.keepdirty = keepdirty
        self.maxphys = maxphys
        self.nextents = (mediasize - 1) // extentsize + 1
        self._extentsize = extentsize
        self._shift = extentsize.bit_length() - 1
        self._mapsize = (self.nextents + 63) // 64 * 8
        self._diskmapsize = (self._mapsize + sectorsize - 1) & ~(sectorsize - 1)
        self._reqs_full = (extentsize - 1) // maxphys + 1
        left = mediasize % extentsize or extentsize
        self._reqs_last = (left - 1) // maxphys + 1
        self._memtab = array("H", bytes(2 * self.nextents))
        self._memmap = bytearray(self._mapsize)
        self._syncmap = bytearray(self._mapsize)
        self._diskmap = bytearray(self._diskmapsize)
        self._ndirty = 0
        self._syncoff = -2   # -2 nothing to do, -1 restart at lowest, >= 0 current offset
        # Most recently used extent last (FreeBSD keeps it at the TAILQ head).
        self._keepdirty: OrderedDict[int, None] = OrderedDict()

    # ---- helpers -------------------------------------------------------------------------

    def _ext2reqs(self, ext: int) -> int:
        return self._reqs_last if ext == self.nextents - 1 else self._reqs_full

    def _extents(self, off: int, length: int) -> range:
        if off < 0 or length <= 0 or off > self.mediasize - length:
            raise ValueError(f"range [{off}, {off}+{length}) outside the media "
                             f"(size {self.mediasize}) or empty")
        return range(off >> self._shift, ((off + length - 1) >> self._shift) + 1)

    @staticmethod
    def _test(m: bytearray, n: int) -> bool:
        return bool(m[n >> 3] & (1 << (n & 7)))

    @staticmethod
    def _set(m: bytearray, n: int) -> None:
        m[n >> 3] |= 1 << (n & 7)

    @staticmethod
    def _clear(m: bytearray, n: int) -> None:
        m[n >> 3] &= ~(1 << (n & 7)) & 0xFF

    def _keepdirty_add(self, ext: int) -> bool:
        if ext in self._keepdirty:
            self._keepdirty.move_to_end(ext)
            return False
        if len(self._keepdirty) >= self.keepdirty:
            self._keepdirty.popitem(last=False)
        self._keepdirty[ext] = None
        return True

    def _check_buf(self, buf: bytes | bytearray | memoryview) -> memoryview:
        view = memoryview(buf).cast("B")
        if len(view) < self._mapsize:
            raise ValueError(f"activemap buffer is {len(view)} bytes, "
                             f"need at least {self._mapsize}")
        return view

    # ---- operations ----------------------------------------------------------------------

    def write_start(self, off: int, length: int) -> bool:
        """A write of [off, off+length) is about to be dispatched; True: flush the map."""
        exts = self._extents(off, length)
        for ext in exts:
            if self._memtab[ext] == _MEMTAB_MAX:
                raise OverflowError(f"too many writes in flight on extent {ext}")
        modified = False
        for ext in exts:
            if self._memtab[ext] == 0:
                self._set(self._memmap, ext)
                self._ndirty += 1
            self._memtab[ext] += 1
            if self._keepdirty_add(ext):
                modified = True
        return modified

    def write_complete(self, off: int, length: int) -> bool:
        """The write finished on every component; True: flush the map."""
        exts = self._extents(off, length)
        for ext in exts:
            if self._memtab[ext] == 0:
                raise ValueError(f"write_complete without write_start on extent {ext}")
        modified = False
        for ext in exts:
            self._memtab[ext] -= 1
            if self._memtab[ext] == 0:
                self._clear(self._memmap, ext)
                self._ndirty -= 1
                if ext not in self._keepdirty:
                    modified = True
        return modified

    def extent_complete(self, ext: int) -> bool:
        """A synchronisation pass over `ext` finished; True: flush the map."""
        if not 0 <= ext < self.nextents:
            raise ValueError(f"extent {ext} out of range (0..{self.nextents - 1})")
        reqs = self._ext2reqs(ext)
        if self._memtab[ext] < reqs:
            raise ValueError(f"extent_complete on extent {ext} that is not being synchronised")
        self._memtab[ext] -= reqs
        if self._memtab[ext] == 0:
            self._clear(self._memmap, ext)
            self._ndirty -= 1
            return True
        return False

    def need_sync(self, off: int, length: int) -> bool:
        """Mark the extents of [off, off+length) for synchronisation; True: flush the map."""
        exts = self._extents(off, length)
        for ext in exts:
            if (not self._test(self._syncmap, ext)
                    and self._memtab[ext] + self._ext2reqs(ext) > _MEMTAB_MAX):
                raise OverflowError(f"too many writes in flight on extent {ext}")
        modified = False
        for ext in exts:
            if self._test(self._syncmap, ext):
                continue
            self._set(self._syncmap, ext)
            if not self._test(self._memmap, ext):
                self._set(self._memmap, ext)
                self._ndirty += 1
            self._memtab[ext] += self._ext2reqs(ext)
            modified = True
        return modified

    def copyin(self, buf: bytes | bytearray | memoryview) -> None:
        """Load the on-disk map (at least size() bytes); rewinds the sync cursor.

        Counters are rebuilt from buf: ext2reqs for set extents, 0 for clear ones.
        """
        view = self._check_buf(buf)
        data = bytes(view[:self._mapsize])
        self._diskmap[:self._mapsize] = data
        self._memmap[:] = data
        self._syncmap[:] = data
        self._memtab = array("H", bytes(2 * self.nextents))
        ndirty = 0
        ext = _first_set(data, self.nextents, 0)
        while ext >= 0:
            self._memtab[ext] = self._ext2reqs(ext)
            ndirty += 1
            ext = _first_set(data, self.nextents, ext + 1)
        self._ndirty = ndirty
        self.sync_rewind()

    def merge(self, buf: bytes | bytearray | memoryview) -> None:
        """OR in the peer's map (at least size() bytes) and rewind the sync cursor.

        Extents newly set get memtab = ext2reqs (assigned, not added: FreeBSD's quirk).
        Nothing at all happens, not even the rewind, when buf has no bit set.
        """
        view = self._check_buf(buf)
        ext = _first_set(view, self.nextents, 0)
        if ext < 0:
            return
        while ext >= 0:
            if not self._test(self._syncmap, ext):
                self._set(self._syncmap, ext)
                self._set(self._memmap, ext)
                self._set(self._diskmap, ext)
                if self._memtab[ext] == 0:
                    self._ndirty += 1
                self._memtab[ext] = self._ext2reqs(ext)
            ext = _first_set(view, self.nextents, ext + 1)
        self.sync_rewind()

    def bitmap(self) -> bytes:
        """The image to write at offset 4096: memmap | keep-dirty set, ondisk_size() bytes."""
        self._diskmap[:self._mapsize] = self._memmap
        for ext in self._keepdirty:
            self._set(self._diskmap, ext)
        return bytes(self._diskmap)

    def differ(self) -> bool:
        """True when the last image (bitmap(), copyin, merge) differs from the in-memory map."""
        return self._diskmap[:self._mapsize] != self._memmap

    def size(self) -> int:
        """In-memory map size in bytes: bitstr_size(nextents), whole 64-bit words."""
        return self._mapsize

    def ondisk_size(self) -> int:
        """size() rounded up to the sector size: the on-disk and on-wire map length."""
        return self._diskmapsize

    def ndirty(self) -> int:
        """Number of extents set in the in-memory map."""
        return self._ndirty

    def extent_size(self) -> int:
        return self._extentsize

    def sync_rewind(self) -> None:
        """Restart synchronisation at the lowest extent still to be synchronised."""
        self._syncoff = -2 if _first_set(self._syncmap, self.nextents, 0) < 0 else -1

    def sync_offset(self) -> tuple[int, int, int]:
        """Next chunk to synchronise: (offset or -1, length, finished extent or -1).

        Extents are copied from their start in maxphys chunks, lowest extent first; the
        call after an extent's last chunk reports it as finished (the caller then calls
        extent_complete) and moves on to the lowest extent still marked.
        """
        finished = -1
        shift = self._shift
        if self._syncoff == -2:
            return (-1, 0, -1)
        if self._syncoff >= 0 and (
                self._syncoff + self.maxphys >= self.mediasize
                or self._syncoff >> shift != (self._syncoff + self.maxphys) >> shift):
            finished = self._syncoff >> shift
            self._clear(self._syncmap, finished)
            self._syncoff = -1
        if self._syncoff == -1:
            ext = _first_set(self._syncmap, self.nextents, 0)
            if ext < 0:
                self._syncoff = -2
                return (-1, 0, finished)
            self._syncoff = ext << shift
        else:
            self._syncoff += self.maxphys
            if self._syncoff >= self.mediasize:
                self._syncoff = -2
                return (-1, 0, finished)
        syncoff = self._syncoff
        end = min(((syncoff >> shift) << shift) + self._extentsize, self.mediasize)
        return (syncoff, min(end - syncoff, self.maxphys), finished)

    def next_dirty(self, start_ext: int = 0) -> int:
        """Lowest extent >= start_ext set in the in-memory map, or -1."""
        if start_ext < 0:
            raise ValueError(f"start extent must be >= 0, not {start_ext}")
        return _first_set(self._memmap, self.nextents, start_ext)

    def pending(self, ext: int) -> int:
        """memtab[ext]: writes in flight plus sync requests reserved on the extent."""
        if not 0 <= ext < self.nextents:
            raise ValueError(f"extent {ext} out of range (0..{self.nextents - 1})")
        return self._memtab[ext]

    def memmap(self) -> bytes:
        """Copy of the in-memory map (size() bytes)."""
        return bytes(self._memmap)

    def syncmap(self) -> bytes:
        """Copy of the map of extents still to be synchronised (size() bytes)."""
        return bytes(self._syncmap)

    def dump(self) -> str:
        """activemap_dump(): one 0/1 character per extent for the M, D and S maps."""
        lines = []
        for name, m in (("M", self._memmap), ("D", self._diskmap), ("S", self._syncmap)):
            bits = "".join("1" if self._test(m, ext) else "0" for ext in range(self.nextents))
            lines.append(f"{name}: {bits}\n")
        return "".join(lines)

    def __repr__(self) -> str:
        return (f"<PyActiveMap mediasize={self.mediasize} extentsize={self._extentsize} "
                f"nextents={self.nextents} ndirty={self._ndirty}>")


def _select() -> tuple[type, object, str]:
    if os.environ.get("HAST_PURE_PYTHON") == "1":
        return PyActiveMap, py_calc_ondisk_size, "python"
    try:
        from hast._bitmap import ActiveMap as _CActiveMap
        from hast._bitmap import calc_ondisk_size as _c_calc_ondisk_size
    except ImportError:
        return PyActiveMap, py_calc_ondisk_size, "python"
    return _CActiveMap, _c_calc_ondisk_size, "cython"


ActiveMap, calc_ondisk_size, IMPLEMENTATION = _select()
