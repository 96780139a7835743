# cython: language_level=3
"""LZF and zero detection at C speed: the two data transforms of hastd's pipeline.

hastd's "lzf" compression is liblzf's format (LZF 1.x); "hole" compression needs a fast
all-zero test.  Both run on every replicated block, so they are written here in typed
Cython with the GIL released, not in Python.

The compressor is our own, written from the format (spec §5.6): a hash table of 3-byte
sequences like liblzf's, greedy matching, literal runs of up to 32 bytes, back-references
of 3..264 bytes within 8 KiB.  Its output is a valid LZF stream but not necessarily
byte-identical to liblzf's; the decompressor accepts any LZF stream and checks every bound
(liblzf's E2BIG / EINVAL cases), so hostile input only ever raises LZFError.
"""

import errno as _errno

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

cdef enum:
    MAX_LIT = 32            # literal run length limit (control byte 0..31)
    MAX_OFF = 8192          # back-reference distance limit
    MAX_REF = 264           # back-reference length limit: (7 + 255) + 2
    HLOG_MIN = 8
    HLOG_MAX = 16           # liblzf's default table size
    NOGIL_MIN = 65536       # below this, releasing the GIL costs more than the scan

LZF_MAX_OFF = MAX_OFF
LZF_MAX_REF = MAX_REF


class LZFError(ValueError):
    """A stream liblzf would reject: ``errno`` is E2BIG (output too small) or EINVAL."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


cdef inline uint64_t _load64(const unsigned char *p) noexcept nogil:
    cdef uint64_t w
    memcpy(&w, p, 8)      # unaligned-safe; compiles to a single load
    return w


cdef inline uint32_t _hash(const unsigned char *p, int shift) noexcept nogil:
    cdef uint32_t v = (<uint32_t>p[0] << 16) | (<uint32_t>p[1] << 8) | p[2]
    return (v * <uint32_t>2654435761u) >> shift


cdef Py_ssize_t lzf_compress_raw(const unsigned char *src, Py_ssize_t n, unsigned char *dst,
                                 Py_ssize_t limit, uint32_t *htab, int hlog) noexcept nogil:
    cdef Py_ssize_t ip = 0, op, lit = 0, ref, off, length, maxlen, end
    cdef int shift = 32 - hlog
    cdef uint32_t h
    if n == 0:
        return 0
    if limit < 1:
        return -1
    # dst[op - lit - 1] is always the (pending) control byte of the current literal run.
    op = 1
    while ip < n - 2:
        h = _hash(src + ip, shift)
        ref = <Py_ssize_t>htab[h] - 1      # table holds position + 1; 0 = empty
        htab[h] = <uint32_t>(ip + 1)
        off = ip - ref - 1
        if (ref >= 0 and off < MAX_OFF and src[ref] == src[ip]
                and src[ref + 1] == src[ip + 1] and src[ref + 2] == src[ip + 2]):
            maxlen = n - ip
            if maxlen > MAX_REF:
                maxlen = MAX_REF
            length = 3
            while length + 8 <= maxlen and _load64(src + ref + length) == _load64(src + ip + length):
                length += 8
            while length < maxlen and src[ref + length] == src[ip + length]:
                length += 1
            # Close the literal run (or take back its unused control byte).
            if lit == 0:
                op -= 1
            else:
                dst[op - lit - 1] = <unsigned char>(lit - 1)
            # up to 3 bytes of reference + the next run's control byte
            if op + 4 > limit:
                return -1
            end = ip + length
            length -= 2
            if length < 7:
                dst[op] = <unsigned char>((off >> 8) + (length << 5))
                op += 1
            else:
                dst[op] = <unsigned char>((off >> 8) + (7 << 5))
                dst[op + 1] = <unsigned char>(length - 7)
                op += 2
            dst[op] = <unsigned char>(off & 0xff)
            op += 2
            lit = 0
            # Index the positions the match covered, so later data can refer into it.
            ip += 1
            while ip < end and ip < n - 2:
                htab[_hash(src + ip, shift)] = <uint32_t>(ip + 1)
                ip += 1
            ip = end
            continue
        if op + 2 > limit:      # the byte, and a control byte if the run fills up
            return -1
        dst[op] = src[ip]
        op += 1
        ip += 1
        lit += 1
        if lit == MAX_LIT:
            dst[op - lit - 1] = MAX_LIT - 1
            lit = 0
            op += 1
    while ip < n:
        if op + 2 > limit:
            return -1
        dst[op] = src[ip]
        op += 1
        ip += 1
        lit += 1
        if lit == MAX_LIT:
            dst[op - lit - 1] = MAX_LIT - 1
            lit = 0
            op += 1
    if lit == 0:
        op -= 1
    else:
        dst[op - lit - 1] = <unsigned char>(lit - 1)
    return op


cdef Py_ssize_t lzf_decompress_raw(const unsigned char *src, Py_ssize_t n, unsigned char *dst,
                                   Py_ssize_t limit) noexcept nogil:
    cdef Py_ssize_t ip = 0, op = 0, length, ref, dist, i
    cdef unsigned int ctrl
    while ip < n:
        ctrl = src[ip]
        ip += 1
        if ctrl < 32:
            length = ctrl + 1
            if op + length > limit:
                return LZF_E2BIG
            if ip + length > n:
                return LZF_EINVAL
            memcpy(dst + op, src + ip, length)
            op += length
            ip += length
            continue
        length = ctrl >> 5
        if length == 7:
            if ip >= n:
                return LZF_EINVAL
            length += src[ip]
            ip += 1
        if ip >= n:
            return LZF_EINVAL
        dist = ((<Py_ssize_t>(ctrl & 0x1f) << 8) | src[ip]) + 1
        ip += 1
        length += 2
        if op + length > limit:
            return LZF_E2BIG
        ref = op - dist
        if ref < 0:
            return LZF_EINVAL
        if dist >= length:
            memcpy(dst + op, dst + ref, length)
        elif dist == 1:
            memset(dst + op, dst[ref], length)
        else:
            # Overlapping copy: the run repeats the last dist bytes.
            for i in range(length):
                dst[op + i] = dst[ref + i]
        op += length
    return op


cdef bint is_zero_raw(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef int j
    cdef uint64_t acc = 0
    if n == 0:
        return True
    # Probe both ends and the middle first, like hastd: most data fails here.
    if p[0] | p[n >> 1] | p[n - 1]:
        return False
    # 256-byte blocks of independent ORs vectorise; one test per block keeps early exit.
    while i + 256 <= n:
        for j in range(32):
            acc |= _load64(p + i + 8 * j)
        if acc:
            return False
        i += 256
    while i + 8 <= n:
        acc |= _load64(p + i)
        i += 8
    while i < n:
        acc |= p[i]
        i += 1
    return acc == 0


cdef int _hlog_for(Py_ssize_t n) noexcept nogil:
    # A table about the size of the input: small blocks don't pay for zeroing 256 KiB.
    cdef int hlog = HLOG_MIN
    while hlog < HLOG_MAX and (<Py_ssize_t>1 << hlog) < n:
        hlog += 1
    return hlog


def lzf_compress(src, Py_ssize_t out_limit, *, bint size_prefix=False):
    """LZF stream of src if it fits in out_limit bytes, else None.

    With size_prefix the result is HAST's wire form: len(src) as u32 LE, then the stream
    (out_limit still bounds the stream alone, as hastd bounds liblzf's output).
    Empty input gives an empty stream.
    """
    cdef Py_buffer view
    cdef unsigned char *out = NULL
    cdef uint32_t *htab = NULL
    cdef Py_ssize_t r = -1, pre = 4 if size_prefix else 0
    cdef int hlog
    cdef uint32_t n32
    if out_limit < 0:
        raise ValueError("out_limit must be >= 0")
    PyObject_GetBuffer(src, &view, PyBUF_SIMPLE)
    try:
        if size_prefix and view.len > 0xFFFFFFFF:
            raise OverflowError("input longer than 4 GiB cannot carry a u32 length")
        # Never allocate beyond the worst case (all literals: 33 bytes per 32, plus slack).
        if out_limit > view.len + view.len // 32 + 16:
            out_limit = view.len + view.len // 32 + 16
        hlog = _hlog_for(view.len)
        out = <unsigned char *>malloc(pre + out_limit + 1)
        htab = <uint32_t *>calloc(<size_t>1 << hlog, sizeof(uint32_t))
        if out == NULL or htab == NULL:
            raise MemoryError()
        with nogil:
            r = lzf_compress_raw(<const unsigned char *>view.buf, view.len, out + pre,
                                 out_limit, htab, hlog)
        if r < 0:
            return None
        if size_prefix:
            n32 = <uint32_t>view.len
            out[0] = n32 & 0xff
            out[1] = (n32 >> 8) & 0xff
            out[2] = (n32 >> 16) & 0xff
            out[3] = n32 >> 24
        return PyBytes_FromStringAndSize(<char *>out, pre + r)
    finally:
        free(out)
        free(htab)
        PyBuffer_Release(&view)


cdef int _check(Py_ssize_t r) except -1:
    if r == LZF_E2BIG:
        raise LZFError(_errno.E2BIG, "LZF stream decodes to more than the output size")
    if r == LZF_EINVAL:
        raise LZFError(_errno.EINVAL, "corrupt LZF stream")
    return 0


def lzf_decompress(src, Py_ssize_t out_len):
    """Decode an LZF stream whose output is at most out_len bytes.

    Returns the decoded bytes (possibly shorter than out_len).  Raises LZFError (a
    ValueError) with errno E2BIG when the output would exceed out_len and EINVAL for a
    truncated stream or a reference before the start of the output.
    """
    cdef Py_buffer view
    cdef Py_ssize_t r
    cdef bytes out
    cdef unsigned char *dst
    if out_len < 0:
        raise ValueError("out_len must be >= 0")
    PyObject_GetBuffer(src, &view, PyBUF_SIMPLE)
    try:
        # Decode straight into a fresh bytes object; nobody else can see it yet.
        out = PyBytes_FromStringAndSize(NULL, out_len)
        dst = <unsigned char *>PyBytes_AS_STRING(out)
        with nogil:
            r = lzf_decompress_raw(<const unsigned char *>view.buf, view.len, dst, out_len)
        _check(r)
    finally:
        PyBuffer_Release(&view)
    return out if r == out_len else out[:r]


def lzf_decompress_into(src, dst):
    """Decode an LZF stream into the writable buffer dst; returns the decoded length."""
    cdef Py_buffer sview, dview
    cdef Py_ssize_t r
    PyObject_GetBuffer(src, &sview, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(dst, &dview, PyBUF_WRITABLE)
        try:
            with nogil:
                r = lzf_decompress_raw(<const unsigned char *>sview.buf, sview.len,
                                       <unsigned char *>dview.buf, dview.len)
        finally:
            PyBuffer_Release(&dview)
    finally:
        PyBuffer_Release(&sview)
    _check(r)
    return r


def is_zero(buf):
    """True when every byte of buf is zero (an empty buffer is all zeros)."""
    cdef Py_buffer view
    cdef bint z
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if view.len >= NOGIL_MIN:
            with nogil:
                z = is_zero_raw(<const unsigned char *>view.buf, view.len)
        else:
            z = is_zero_raw(<const unsigned char *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return z
