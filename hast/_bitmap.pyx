# cython: language_level=3
"""The activemap (dirty-extent bitmap) in C: FreeBSD's sbin/hastd/activemap.c, in Cython.

The primary touches the map twice per write request (write_start before dispatch,
write_complete after the last completion) and scans it during synchronisation, so it lives
in C: malloc'd arrays, no Python objects on the hot path. hast/activemap.py holds the
pure-Python twin (PyActiveMap), which is the readable reference; both must behave
identically (tests/test_activemap.py runs them side by side), so any change here has to be
made there too.

Layout. Every bitmap is stored exactly as it is on disk and on the wire: bit n is byte
n >> 3, mask 1 << (n & 7). The buffers are allocated as 64-bit words so that scans can
read 8 bytes at a time; words are byte-swapped on load on a big-endian host (a no-op on
amd64/arm64), which keeps the byte layout host-independent.

Thread safety. Every method except next_dirty() runs entirely with the GIL held and never
calls back into Python while the state is inconsistent, so concurrent calls from several
Python threads are serialised by the GIL (what hastd's hr_amp_lock mutex gives the C
code). next_dirty() only reads, and releases the GIL for large scans; a concurrent writer
can at worst make it miss or report a bit that changed during the scan, which is the same
race the caller would have after the call returns. (A free-threaded CPython would need an
explicit lock around the mutating methods.)
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* Bitmaps are kept in on-disk byte order; a word load must see byte 0 as bits 0-7. */
    static inline uint64_t hast_le64(uint64_t x) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        return __builtin_bswap64(x);
    #else
        return x;
    #endif
    }
    static inline uint64_t hast_load_le64(const unsigned char *p) {
        uint64_t x;
        memcpy(&x, p, 8);   /* the peer's buffer need not be 8-aligned */
        return hast_le64(x);
    }
    static inline int hast_ctz64(uint64_t x) { return __builtin_ctzll(x); }
    /* Fibonacci hashing multiplier (2^64 / golden ratio) for the keep-dirty hash. */
    #define HAST_GOLDEN64 UINT64_C(0x9E3779B97F4A7C15)
    """
    const uint64_t HAST_GOLDEN64
    uint64_t hast_le64(uint64_t x) noexcept nogil
    uint64_t hast_load_le64(const unsigned char *p) noexcept nogil
    int hast_ctz64(uint64_t x) noexcept nogil

cdef enum:
    MEMTAB_MAX = 0xFFFF
    # Release the GIL only for scans longer than this many words (64 KiB of bitmap):
    # dropping and retaking it costs more than scanning a small map.
    NOGIL_SCAN_WORDS = 8192
    KD_EMPTY = -1


cdef inline bint _is_pow2(int64_t x) noexcept nogil:
    return x > 0 and (x & (x - 1)) == 0


cdef inline void _bit_set(uint64_t *words, int64_t n) noexcept nogil:
    (<uint8_t *>words)[n >> 3] |= <uint8_t>(1 << (n & 7))


cdef inline void _bit_clear(uint64_t *words, int64_t n) noexcept nogil:
    (<uint8_t *>words)[n >> 3] &= <uint8_t>~(1 << (n & 7))


cdef inline bint _bit_test(const uint64_t *words, int64_t n) noexcept nogil:
    return ((<const uint8_t *>words)[n >> 3] >> (n & 7)) & 1


cdef int64_t find_next_set(const uint64_t *words, int64_t nbits, int64_t start) noexcept nogil:
    """Lowest set bit in [start, nbits) or -1; bits past nbits (word padding) are ignored."""
    cdef int64_t nwords = (nbits + 63) >> 6
    cdef int64_t i, bit
    cdef uint64_t w
    if start < 0:
        start = 0
    if start >= nbits:
        return -1
    i = start >> 6
    w = hast_le64(words[i]) & (~<uint64_t>0 << (start & 63))
    while True:
        if w != 0:
            bit = (i << 6) + hast_ctz64(w)
            return bit if bit < nbits else -1
        i += 1
        # Skip runs of clean words 4 at a time: one OR-tree and one branch per 32 bytes.
        while i + 4 <= nwords and (words[i] | words[i + 1] | words[i + 2] | words[i + 3]) == 0:
            i += 4
        if i >= nwords:
            return -1
        w = hast_le64(words[i])


def calc_ondisk_size(int64_t mediasize, int64_t extentsize, int64_t sectorsize) -> int:
    """On-disk activemap size for `hastctl create` (activemap_calc_ondisk_size()).

    nextents = (mediasize - 1) // extentsize + 1, mapsize = bitstr_size(nextents) (whole
    64-bit words), rounded up to the sector size. FreeBSD asserts (aborts) on a
    non-power-of-two extent size; we raise ValueError so hastctl can report it cleanly.
    """
    _check_geometry(mediasize, extentsize, sectorsize)
    cdef int64_t nextents = (mediasize - 1) // extentsize + 1
    cdef int64_t mapsize = ((nextents + 63) >> 6) * 8
    return (mapsize + sectorsize - 1) & ~(sectorsize - 1)


cdef int _check_geometry(int64_t mediasize, int64_t extentsize, int64_t sectorsize) except -1:
    if mediasize <= 0:
        raise ValueError(f"media size must be positive, not {mediasize}")
    if not _is_pow2(extentsize):
        raise ValueError(f"extent size {extentsize} is not a power of two")
    if not _is_pow2(sectorsize):
        raise ValueError(f"sector size {sectorsize} is not a power of two")
    return 0


# ---- ActiveMap helpers: module-level so the .pxd API stays small ------------------------

cdef inline uint32_t _ext2reqs(ActiveMap am, int64_t ext) noexcept nogil:
    # Requests of MAXPHYS bytes needed to copy the extent; the last one may be partial.
    return am._reqs_last if ext == am.nextents - 1 else am._reqs_full

cdef inline int _check_range(ActiveMap am, int64_t off, int64_t length) except -1:
    # FreeBSD asserts length > 0 and 0 <= offset, offset + length - 1 < mediasize.
    if off < 0 or length <= 0 or off > am.mediasize - length:
        raise ValueError(f"range [{off}, {off}+{length}) outside the media "
                         f"(size {am.mediasize}) or empty")
    return 0

# ---- keep-dirty LRU ---------------------------------------------------------------------
# Slots 0.._kd_count-1 are in use (a slot is only ever freed by evicting it and
# immediately reusing it), linked head (most recent) to tail. _kd_hash maps an extent
# to its slot by linear probing; deletion shifts entries back, so no tombstones.

cdef inline uint64_t _kd_home(ActiveMap am, int64_t ext) noexcept nogil:
    return (<uint64_t>ext * HAST_GOLDEN64) >> am._kd_hshift

cdef inline int32_t _kd_find(ActiveMap am, int64_t ext) noexcept nogil:
    cdef uint64_t h = _kd_home(am, ext)
    cdef int32_t s
    while True:
        s = am._kd_hash[h]
        if s == KD_EMPTY or am._kd_ext[s] == ext:
            return s
        h = (h + 1) & am._kd_hmask

cdef inline void _kd_hash_insert(ActiveMap am, int32_t slot) noexcept nogil:
    cdef uint64_t h = _kd_home(am, am._kd_ext[slot])
    while am._kd_hash[h] != KD_EMPTY:
        h = (h + 1) & am._kd_hmask
    am._kd_hash[h] = slot

cdef void _kd_hash_remove(ActiveMap am, int64_t ext) noexcept nogil:
    cdef uint64_t hole = _kd_home(am, ext)
    cdef uint64_t j, home
    cdef int32_t s
    while am._kd_ext[am._kd_hash[hole]] != ext:
        hole = (hole + 1) & am._kd_hmask
    j = hole
    while True:
        j = (j + 1) & am._kd_hmask
        s = am._kd_hash[j]
        if s == KD_EMPTY:
            break
        home = _kd_home(am, am._kd_ext[s])
        # Entry j may move into the hole unless its home lies cyclically in (hole, j].
        if ((j - home) & am._kd_hmask) >= ((j - hole) & am._kd_hmask):
            am._kd_hash[hole] = s
            hole = j
    am._kd_hash[hole] = KD_EMPTY

cdef inline void _kd_unlink(ActiveMap am, int32_t s) noexcept nogil:
    cdef int32_t p = am._kd_prev[s], n = am._kd_next[s]
    if p != KD_EMPTY:
        am._kd_next[p] = n
    else:
        am._kd_head = n
    if n != KD_EMPTY:
        am._kd_prev[n] = p
    else:
        am._kd_tail = p

cdef inline void _kd_push_head(ActiveMap am, int32_t s) noexcept nogil:
    am._kd_prev[s] = KD_EMPTY
    am._kd_next[s] = am._kd_head
    if am._kd_head != KD_EMPTY:
        am._kd_prev[am._kd_head] = s
    else:
        am._kd_tail = s
    am._kd_head = s

cdef inline bint _kd_touch(ActiveMap am, int64_t ext) noexcept nogil:
    """keepdirty_add(): move to front if present (False) or insert, evicting (True)."""
    cdef int32_t s = _kd_find(am, ext)
    if s != KD_EMPTY:
        if s != am._kd_head:
            _kd_unlink(am, s)
            _kd_push_head(am, s)
        return False
    if am._kd_count >= am.keepdirty:
        s = am._kd_tail
        _kd_hash_remove(am, am._kd_ext[s])
        _kd_unlink(am, s)
    else:
        s = am._kd_count
        am._kd_count += 1
    am._kd_ext[s] = ext
    _kd_hash_insert(am, s)
    _kd_push_head(am, s)
    return True


cdef class ActiveMap:
    """Dirty-extent bitmap of one resource (struct activemap), C implementation.

    Methods returning bool return True when the on-disk bitmap must be rewritten (fetch
    the image with bitmap()). Offsets and lengths are bytes within the data area.
    """

    def __cinit__(self, int64_t mediasize, int64_t extentsize, int64_t sectorsize,
                  int64_t keepdirty, int64_t maxphys=1048576):
        cdef int64_t left, hsize
        cdef int32_t i
        _check_geometry(mediasize, extentsize, sectorsize)
        # FreeBSD asserts keepdirty > 0. keepdirty == 1 trips its eviction assertion; here
        # the LRU simply holds one extent (deliberate deviation: it "just works").
        if keepdirty <= 0 or keepdirty > 0x3FFFFFFF:
            raise ValueError(f"keepdirty must be between 1 and {0x3FFFFFFF}, not {keepdirty}")
        if maxphys <= 0:
            raise ValueError(f"maxphys must be positive, not {maxphys}")
        self.mediasize = mediasize
        self.keepdirty = keepdirty
        self.maxphys = maxphys
        self._extentsize = extentsize
        self._extentshift = hast_ctz64(<uint64_t>extentsize)
        self.nextents = (mediasize - 1) // extentsize + 1
        self._nwords = (self.nextents + 63) >> 6
        self._mapsize = self._nwords * 8
        self._diskmapsize = (self._mapsize + sectorsize - 1) & ~(sectorsize - 1)
        self._ndirty = 0
        self._syncoff = -2
        # Counters are uint16 as in FreeBSD; a per-extent sync reservation must fit.
        if (extentsize - 1) // maxphys + 1 > MEMTAB_MAX:
            raise ValueError(f"extent size {extentsize} needs more than {MEMTAB_MAX} "
                             f"requests of {maxphys} bytes")
        self._reqs_full = <uint32_t>((extentsize - 1) // maxphys + 1)
        left = mediasize % extentsize
        if left == 0:
            left = extentsize
        self._reqs_last = <uint32_t>((left - 1) // maxphys + 1)

        self._memtab = <uint16_t *>calloc(self.nextents, sizeof(uint16_t))
        self._memmap = <uint64_t *>calloc(self._nwords, 8)
        self._syncmap = <uint64_t *>calloc(self._nwords, 8)
        # diskmap is the full sector-rounded image; the tail past mapsize stays zero.
        self._diskmap = <uint64_t *>calloc((self._diskmapsize + 7) // 8, 8)

        hsize = 4
        while hsize < 2 * keepdirty:
            hsize <<= 1
        self._kd_hmask = <uint64_t>(hsize - 1)
        self._kd_hshift = 64 - hast_ctz64(<uint64_t>hsize)
        self._kd_ext = <int64_t *>malloc(keepdirty * sizeof(int64_t))
        self._kd_prev = <int32_t *>malloc(keepdirty * sizeof(int32_t))
        self._kd_next = <int32_t *>malloc(keepdirty * sizeof(int32_t))
        self._kd_hash = <int32_t *>malloc(hsize * sizeof(int32_t))
        if (self._memtab == NULL or self._memmap == NULL or self._syncmap == NULL
                or self._diskmap == NULL or self._kd_ext == NULL or self._kd_prev == NULL
                or self._kd_next == NULL or self._kd_hash == NULL):
            raise MemoryError()
        for i in range(hsize):
            self._kd_hash[i] = KD_EMPTY
        self._kd_count = 0
        self._kd_head = KD_EMPTY
        self._kd_tail = KD_EMPTY

    def __dealloc__(self):
        free(self._memtab)
        free(self._memmap)
        free(self._syncmap)
        free(self._diskmap)
        free(self._kd_ext)
        free(self._kd_prev)
        free(self._kd_next)
        free(self._kd_hash)

    cdef int64_t _next_set(self, const uint64_t *words, int64_t start) noexcept nogil:
        return find_next_set(words, self.nextents, start)

    # ---- C-level operations (declared in the .pxd) ---------------------------------------

    cdef int _write_start(self, int64_t off, int64_t length) except -1:
        cdef int64_t ext, first, last
        cdef int modified = 0
        _check_range(self, off, length)
        first = off >> self._extentshift
        last = (off + length - 1) >> self._extentshift
        for ext in range(first, last + 1):
            if self._memtab[ext] == MEMTAB_MAX:
                raise OverflowError(f"too many writes in flight on extent {ext}")
        for ext in range(first, last + 1):
            if self._memtab[ext] == 0:
                _bit_set(self._memmap, ext)
                self._ndirty += 1
            self._memtab[ext] += 1
            if _kd_touch(self, ext):
                modified = 1
        return modified

    cdef int _write_complete(self, int64_t off, int64_t length) except -1:
        cdef int64_t ext, first, last
        cdef int modified = 0
        _check_range(self, off, length)
        first = off >> self._extentshift
        last = (off + length - 1) >> self._extentshift
        for ext in range(first, last + 1):
            if self._memtab[ext] == 0:
                raise ValueError(f"write_complete without write_start on extent {ext}")
        for ext in range(first, last + 1):
            self._memtab[ext] -= 1
            if self._memtab[ext] == 0:
                _bit_clear(self._memmap, ext)
                self._ndirty -= 1
                if _kd_find(self, ext) == KD_EMPTY:
                    modified = 1
        return modified

    cdef int _extent_complete(self, int64_t ext) except -1:
        cdef uint32_t reqs
        if ext < 0 or ext >= self.nextents:
            raise ValueError(f"extent {ext} out of range (0..{self.nextents - 1})")
        reqs = _ext2reqs(self, ext)
        if self._memtab[ext] < reqs:
            raise ValueError(f"extent_complete on extent {ext} that is not being synchronised")
        self._memtab[ext] -= reqs
        if self._memtab[ext] == 0:
            _bit_clear(self._memmap, ext)
            self._ndirty -= 1
            return 1
        return 0

    cdef int _need_sync(self, int64_t off, int64_t length) except -1:
        cdef int64_t ext, first, last
        cdef int modified = 0
        _check_range(self, off, length)
        first = off >> self._extentshift
        last = (off + length - 1) >> self._extentshift
        for ext in range(first, last + 1):
            if (not _bit_test(self._syncmap, ext)
                    and self._memtab[ext] + _ext2reqs(self, ext) > MEMTAB_MAX):
                raise OverflowError(f"too many writes in flight on extent {ext}")
        for ext in range(first, last + 1):
            if _bit_test(self._syncmap, ext):
                continue    # already marked for synchronisation
            _bit_set(self._syncmap, ext)
            if not _bit_test(self._memmap, ext):
                _bit_set(self._memmap, ext)
                self._ndirty += 1
            self._memtab[ext] += _ext2reqs(self, ext)
            modified = 1
        return modified

    cdef void _sync_rewind(self) noexcept:
        if find_next_set(self._syncmap, self.nextents, 0) < 0:
            self._syncoff = -2
        else:
            self._syncoff = -1

    cdef int _sync_offset(self, int64_t *offp, int64_t *lenp, int64_t *extp) except -1:
        cdef int64_t ext, syncoff, left, shift = self._extentshift
        extp[0] = -1
        offp[0] = -1
        lenp[0] = 0
        if self._syncoff == -2:
            return 0
        if self._syncoff >= 0 and (
                self._syncoff + self.maxphys >= self.mediasize
                or (self._syncoff >> shift) != ((self._syncoff + self.maxphys) >> shift)):
            # The chunk handed out last was the extent's last: it is now synchronised.
            ext = self._syncoff >> shift
            _bit_clear(self._syncmap, ext)
            extp[0] = ext
            self._syncoff = -1
        if self._syncoff == -1:
            ext = find_next_set(self._syncmap, self.nextents, 0)
            if ext < 0:
                self._syncoff = -2
                return 0
            self._syncoff = ext << shift
        else:
            self._syncoff += self.maxphys
            if self._syncoff >= self.mediasize:
                self._syncoff = -2
                return 0
        syncoff = self._syncoff
        left = ((syncoff >> shift) << shift) + self._extentsize - syncoff
        if syncoff + left > self.mediasize:
            left = self.mediasize - syncoff
        if left > self.maxphys:
            left = self.maxphys
        offp[0] = syncoff
        lenp[0] = left
        return 0

    # ---- Python API ----------------------------------------------------------------------

    def write_start(self, int64_t off, int64_t length) -> bool:
        """A write of [off, off+length) is about to be dispatched; True: flush the map."""
        return self._write_start(off, length) != 0

    def write_complete(self, int64_t off, int64_t length) -> bool:
        """The write finished on every component; True: flush the map."""
        return self._write_complete(off, length) != 0

    def extent_complete(self, int64_t ext) -> bool:
        """A synchronisation pass over `ext` finished; True: flush the map."""
        return self._extent_complete(ext) != 0

    def need_sync(self, int64_t off, int64_t length) -> bool:
        """Mark the extents of [off, off+length) for synchronisation; True: flush the map."""
        return self._need_sync(off, length) != 0

    def copyin(self, const uint8_t[::1] buf not None) -> None:
        """Load the on-disk map (at least size() bytes); rewinds the sync cursor.

        Meant for a freshly initialised map, as hastd uses it. Unlike FreeBSD, which only
        recounts when a bit is set, the state is always rebuilt from buf (counters of clear
        extents are zeroed), so calling it on a used map cannot leave memmap and memtab
        disagreeing.
        """
        cdef int64_t i, ext, n = 0
        cdef uint64_t w, lastmask
        cdef uint32_t reqs
        if <int64_t>buf.shape[0] < self._mapsize:
            raise ValueError(f"activemap buffer is {buf.shape[0]} bytes, "
                             f"need at least {self._mapsize}")
        memcpy(self._diskmap, &buf[0], self._mapsize)
        memcpy(self._memmap, &buf[0], self._mapsize)
        memcpy(self._syncmap, &buf[0], self._mapsize)
        memset(self._memtab, 0, self.nextents * sizeof(uint16_t))
        lastmask = ~<uint64_t>0 if (self.nextents & 63) == 0 else \
            ((<uint64_t>1 << (self.nextents & 63)) - 1)
        for i in range(self._nwords):
            w = hast_le64(self._memmap[i])
            if i == self._nwords - 1:
                w &= lastmask
            while w != 0:
                ext = (i << 6) + hast_ctz64(w)
                w &= w - 1
                self._memtab[ext] = <uint16_t>_ext2reqs(self, ext)
                n += 1
        self._ndirty = n
        self._sync_rewind()

    def merge(self, const uint8_t[::1] buf not None) -> None:
        """OR in the peer's map (at least size() bytes) and rewind the sync cursor.

        Extents newly set get memtab = ext2reqs (assigned, not added: FreeBSD's quirk, a
        write in flight on such an extent is forgotten). Nothing at all happens, not even
        the rewind, when buf has no bit set.
        """
        cdef int64_t i, ext
        cdef uint64_t r, new, lastmask
        cdef bint anyset = False
        if <int64_t>buf.shape[0] < self._mapsize:
            raise ValueError(f"activemap buffer is {buf.shape[0]} bytes, "
                             f"need at least {self._mapsize}")
        lastmask = ~<uint64_t>0 if (self.nextents & 63) == 0 else \
            ((<uint64_t>1 << (self.nextents & 63)) - 1)
        for i in range(self._nwords):
            r = hast_load_le64(&buf[i * 8])
            if i == self._nwords - 1:
                r &= lastmask
            if r == 0:
                continue
            anyset = True
            new = r & ~hast_le64(self._syncmap[i])
            while new != 0:
                ext = (i << 6) + hast_ctz64(new)
                new &= new - 1
                _bit_set(self._syncmap, ext)
                _bit_set(self._memmap, ext)
                _bit_set(self._diskmap, ext)
                if self._memtab[ext] == 0:
                    self._ndirty += 1
                self._memtab[ext] = <uint16_t>_ext2reqs(self, ext)
        if anyset:
            self._sync_rewind()

    def bitmap(self) -> bytes:
        """The image to write at offset 4096: memmap | keep-dirty set, ondisk_size() bytes."""
        cdef int32_t s
        memcpy(self._diskmap, self._memmap, self._mapsize)
        s = self._kd_head
        while s != KD_EMPTY:
            _bit_set(self._diskmap, self._kd_ext[s])
            s = self._kd_next[s]
        return PyBytes_FromStringAndSize(<char *>self._diskmap, self._diskmapsize)

    def differ(self) -> bool:
        """True when the last image (bitmap(), copyin, merge) differs from the in-memory map."""
        cdef int64_t i
        for i in range(self._nwords):
            if self._diskmap[i] != self._memmap[i]:
                return True
        return False

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
        self._sync_rewind()

    def sync_offset(self) -> tuple:
        """Next chunk to synchronise: (offset or -1, length, finished extent or -1)."""
        cdef int64_t off, length, ext
        self._sync_offset(&off, &length, &ext)
        return (off, length, ext)

    def next_dirty(self, int64_t start_ext=0) -> int:
        """Lowest extent >= start_ext set in the in-memory map, or -1."""
        cdef int64_t r
        if start_ext < 0:
            raise ValueError(f"start extent must be >= 0, not {start_ext}")
        if self._nwords - (start_ext >> 6) > NOGIL_SCAN_WORDS:
            with nogil:
                r = find_next_set(self._memmap, self.nextents, start_ext)
        else:
            r = find_next_set(self._memmap, self.nextents, start_ext)
        return r

    def pending(self, int64_t ext) -> int:
        """memtab[ext]: writes in flight plus sync requests reserved on the extent."""
        if ext < 0 or ext >= self.nextents:
            raise ValueError(f"extent {ext} out of range (0..{self.nextents - 1})")
        return self._memtab[ext]

    def memmap(self) -> bytes:
        """Copy of the in-memory map (size() bytes)."""
        return PyBytes_FromStringAndSize(<char *>self._memmap, self._mapsize)

    def syncmap(self) -> bytes:
        """Copy of the map of extents still to be synchronised (size() bytes)."""
        return PyBytes_FromStringAndSize(<char *>self._syncmap, self._mapsize)

    def dump(self) -> str:
        """activemap_dump(): one 0/1 character per extent for the M, D and S maps."""
        cdef int64_t n = self.nextents, ext, k
        cdef bytes out = PyBytes_FromStringAndSize(NULL, 3 * (n + 4))
        cdef char *p = PyBytes_AS_STRING(out)
        cdef const uint64_t *maps[3]
        cdef const char *names = b"MDS"
        maps[0] = self._memmap
        maps[1] = self._diskmap
        maps[2] = self._syncmap
        for k in range(3):
            p[0] = names[k]
            p[1] = b':'
            p[2] = b' '
            p += 3
            for ext in range(n):
                p[ext] = b'1' if _bit_test(maps[k], ext) else b'0'
            p[n] = b'\n'
            p += n + 1
        return out.decode("ascii")

    def __repr__(self) -> str:
        return (f"<ActiveMap mediasize={self.mediasize} extentsize={self._extentsize} "
                f"nextents={self.nextents} ndirty={self._ndirty}>")
