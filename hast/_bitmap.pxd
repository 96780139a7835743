# cython: language_level=3
"""Declarations of hast/_bitmap.pyx: the C-level activemap, for other Cython modules.

A Cython hot path (e.g. the primary's request loop) can `from hast._bitmap cimport ActiveMap`
and call the `_`-prefixed cdef methods directly, without Python argument parsing. Those
methods keep the semantics of the public def methods (return 1/0 for true/false, -1 with a
Python exception set on bad arguments) and must be called with the GIL held, except the
nogil scan `_next_set`.
"""

from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t


# Lowest bit >= start set in a little-endian-byte-layout bitmap of nbits bits, or -1.
cdef int64_t find_next_set(const uint64_t *words, int64_t nbits, int64_t start) noexcept nogil


cdef class ActiveMap:
    cdef readonly int64_t mediasize
    cdef readonly int64_t nextents
    cdef readonly int64_t keepdirty
    cdef readonly int64_t maxphys

    cdef int64_t _extentsize
    cdef int _extentshift
    cdef int64_t _mapsize       # bitstr_size(nextents): whole 64-bit words, in bytes
    cdef int64_t _diskmapsize   # _mapsize rounded up to the sector size
    cdef int64_t _nwords        # _mapsize / 8
    cdef int64_t _ndirty
    cdef int64_t _syncoff       # -2 nothing to do, -1 restart, >= 0 current offset
    cdef uint32_t _reqs_full    # ext2reqs() of a full extent
    cdef uint32_t _reqs_last    # ext2reqs() of the last (possibly partial) extent

    cdef uint16_t *_memtab
    cdef uint64_t *_memmap
    cdef uint64_t *_syncmap
    cdef uint64_t *_diskmap

    # keep-dirty LRU: doubly-linked list over `keepdirty` slots + open-addressing hash
    cdef int64_t *_kd_ext
    cdef int32_t *_kd_prev
    cdef int32_t *_kd_next
    cdef int32_t *_kd_hash
    cdef uint64_t _kd_hmask
    cdef int _kd_hshift
    cdef int32_t _kd_count
    cdef int32_t _kd_head
    cdef int32_t _kd_tail

    cdef int _write_start(self, int64_t off, int64_t length) except -1
    cdef int _write_complete(self, int64_t off, int64_t length) except -1
    cdef int _extent_complete(self, int64_t ext) except -1
    cdef int _need_sync(self, int64_t off, int64_t length) except -1
    cdef int _sync_offset(self, int64_t *offp, int64_t *lenp, int64_t *extp) except -1
    cdef void _sync_rewind(self) noexcept
    cdef int64_t _next_set(self, const uint64_t *words, int64_t start) noexcept nogil
