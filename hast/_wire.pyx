# cython: language_level=3
"""The replication protocol's per-request frames in C: what both workers do per I/O.

A frame is a 5-byte header (version u8, nv size u32 LE) and an nv blob (hast.nv has the
format and FreeBSD's rules).  Per request the primary encodes a request and parses a reply,
and the secondary does the opposite; in pure Python that is tens of microseconds of record
building and struct calls, here well under one.  Only the common shapes are handled:

* requests: ``cmd``, ``seq``, ``offset``, ``length``, optional ``memsync`` and ``size``
  -- every READ, WRITE, DELETE and FLUSH whose payload is not compressed or checksummed;
* replies: ``seq`` with optional ``error``, ``received`` or ``size``.

The bytes are exactly hast.nv's (the same records, in FreeBSD's order, zero padding), which
the tests check.  Anything else -- compression or checksum fields, duplicates, unknown names
or types, malformed records -- makes parse_frame() answer FALLBACK and the caller decodes
the blob with hast.nv, so FreeBSD's semantics and error texts stay in one place.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport int16_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

# nv types (hast.nv)
cdef enum:
    NV_INT8 = 1
    NV_UINT8 = 2
    NV_INT16 = 3
    NV_UINT32 = 6
    NV_UINT64 = 8
    NV_TYPE_MASK = 0x7F
    HEADER_SIZE = 5

# parse_frame() results
INCOMPLETE = 0   # fewer bytes than the frame holds
FAST = 1         # parsed here
FALLBACK = 2     # decode the blob with hast.nv


cdef inline Py_ssize_t _pad8(Py_ssize_t n) noexcept nogil:
    return (n + 7) & ~7


cdef inline void _put_le(unsigned char *p, uint64_t v, int size) noexcept nogil:
    cdef int i
    for i in range(size):
        p[i] = <unsigned char>(v >> (8 * i))


cdef inline uint64_t _get_le(const unsigned char *p, int size) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(size):
        v |= (<uint64_t>p[i]) << (8 * i)
    return v


cdef Py_ssize_t _record(unsigned char *p, int nvtype, const char *name, int namesize,
                        uint64_t value, int dsize) noexcept nogil:
    """One scalar record at p (namesize counts the NUL); returns its length."""
    cdef Py_ssize_t namearea = _pad8(namesize), valarea = _pad8(dsize)
    p[0] = <unsigned char>nvtype
    p[1] = <unsigned char>namesize
    _put_le(p + 2, <uint64_t>dsize, 4)
    memset(p + 6, 0, namearea + valarea)
    memcpy(p + 6, name, namesize)
    _put_le(p + 6 + namearea, value, dsize)
    return 6 + namearea + valarea


# Longest frame encoded here: header + 6 records of at most 6 + 16 + 8 bytes.
cdef enum:
    MAX_FRAME = HEADER_SIZE + 6 * 30


def encode_request(int version, int cmd, uint64_t seq, uint64_t offset, uint64_t length,
                   bint memsync=False, long long size=-1):
    """Header and nv of a request: cmd, seq, offset, length[, memsync][, size] (size >= 0)."""
    cdef unsigned char buf[MAX_FRAME]
    cdef Py_ssize_t pos = HEADER_SIZE
    pos += _record(buf + pos, NV_UINT8, b"cmd", 4, <uint64_t>cmd, 1)
    pos += _record(buf + pos, NV_UINT64, b"seq", 4, seq, 8)
    pos += _record(buf + pos, NV_UINT64, b"offset", 7, offset, 8)
    pos += _record(buf + pos, NV_UINT64, b"length", 7, length, 8)
    if memsync:
        pos += _record(buf + pos, NV_UINT8, b"memsync", 8, 1, 1)
    if size >= 0:
        pos += _record(buf + pos, NV_UINT32, b"size", 5, <uint64_t>size, 4)
    buf[0] = <unsigned char>version
    _put_le(buf + 1, <uint64_t>(pos - HEADER_SIZE), 4)
    return PyBytes_FromStringAndSize(<char *>buf, pos)


def encode_reply(int version, uint64_t seq, int error=0, bint received=False,
                 long long size=-1):
    """Header and nv of a reply: seq, then received, or error (if not 0), or size (>= 0)."""
    cdef unsigned char buf[MAX_FRAME]
    cdef Py_ssize_t pos = HEADER_SIZE
    pos += _record(buf + pos, NV_UINT64, b"seq", 4, seq, 8)
    if received:
        pos += _record(buf + pos, NV_INT8, b"received", 9, 1, 1)
    elif error:
        pos += _record(buf + pos, NV_INT16, b"error", 6, <uint64_t><uint16_t><int16_t>error, 2)
    elif size >= 0:
        pos += _record(buf + pos, NV_UINT32, b"size", 5, <uint64_t>size, 4)
    buf[0] = <unsigned char>version
    _put_le(buf + 1, <uint64_t>(pos - HEADER_SIZE), 4)
    return PyBytes_FromStringAndSize(<char *>buf, pos)


cdef inline bint _name_is(const unsigned char *name, int namesize, const char *want,
                          int wantsize) noexcept nogil:
    return namesize == wantsize and memcmp(name, want, wantsize) == 0


cdef int scan_fields(const unsigned char *p, Py_ssize_t n, Fields *f,
                     bint request) noexcept nogil:
    cdef Py_ssize_t pos = 0, namearea, reclen, i
    cdef int nvtype, namesize
    cdef uint32_t dsize, bit
    cdef const unsigned char *name
    cdef const unsigned char *val
    f.found = 0
    f.cmd = 0
    f.seq = f.offset = f.length = 0
    f.size = 0
    f.error = 0
    while pos < n:
        if p[pos] == 0:
            break       # trailing zeros: hast.nv stops here too
        if n - pos < 8:
            return 0
        nvtype = p[pos] & NV_TYPE_MASK
        namesize = p[pos + 1]
        dsize = <uint32_t>_get_le(p + pos + 2, 4)
        namearea = _pad8(namesize)
        if namesize < 2 or n - pos < 6 + namearea or dsize == 0:
            return 0
        name = p + pos + 6
        if name[namesize - 1] != 0:
            return 0
        for i in range(namesize - 1):
            if name[i] == 0:
                return 0
        reclen = 6 + namearea + _pad8(dsize)
        if n - pos < reclen:
            return 0
        val = name + namearea
        bit = 0
        if _name_is(name, namesize, b"seq", 4):
            if nvtype != NV_UINT64 or dsize != 8:
                return 0
            bit = F_SEQ
            f.seq = _get_le(val, 8)
        elif _name_is(name, namesize, b"size", 5):
            if nvtype != NV_UINT32 or dsize != 4:
                return 0
            bit = F_SIZE
            f.size = <uint32_t>_get_le(val, 4)
        elif request and _name_is(name, namesize, b"cmd", 4):
            if nvtype != NV_UINT8 or dsize != 1:
                return 0
            bit = F_CMD
            f.cmd = val[0]
        elif request and _name_is(name, namesize, b"offset", 7):
            if nvtype != NV_UINT64 or dsize != 8:
                return 0
            bit = F_OFFSET
            f.offset = _get_le(val, 8)
        elif request and _name_is(name, namesize, b"length", 7):
            if nvtype != NV_UINT64 or dsize != 8:
                return 0
            bit = F_LENGTH
            f.length = _get_le(val, 8)
        elif request and _name_is(name, namesize, b"memsync", 8):
            if nvtype != NV_UINT8 or dsize != 1:
                return 0
            bit = F_MEMSYNC
        elif not request and _name_is(name, namesize, b"error", 6):
            if nvtype != NV_INT16 or dsize != 2:
                return 0
            bit = F_ERROR
            f.error = <int16_t><uint16_t>_get_le(val, 2)
        elif not request and _name_is(name, namesize, b"received", 9):
            if nvtype != NV_INT8 or dsize != 1:
                return 0
            bit = F_RECEIVED
        else:
            return 0
        if f.found & bit:
            return 0    # a duplicate: hast.nv's first-wins lookup decides
        f.found |= bit
        pos += reclen
    return 1


def parse_frame(buf, Py_ssize_t start, Py_ssize_t end, bint request):
    """The frame at buf[start:end]: (status, version, nvsize, fields...).

    status INCOMPLETE: fewer than the header, or than header + nvsize, bytes are there
    (nvsize is then -1 or the announced size).  FAST: parsed; the tuple is (FAST, version,
    nvsize, found, cmd, seq, offset, length, size, error) with ``found`` the F_* bits of the
    records present.  FALLBACK: (FALLBACK, version, nvsize): decode the blob at
    buf[start + 5:start + 5 + nvsize] with hast.nv.  The caller checks version and nvsize
    against its limits before trusting either.
    """
    cdef Py_buffer view
    cdef const unsigned char *p
    cdef Fields f
    cdef int version, ok
    cdef Py_ssize_t nvsize
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        if start < 0 or end > view.len or end < start:
            raise ValueError("bad frame bounds")
        p = <const unsigned char *>view.buf + start
        if end - start < HEADER_SIZE:
            return (INCOMPLETE, -1, -1)
        version = p[0]
        nvsize = <Py_ssize_t>_get_le(p + 1, 4)
        if end - start - HEADER_SIZE < nvsize:
            return (INCOMPLETE, version, nvsize)
        ok = scan_fields(p + HEADER_SIZE, nvsize, &f, request) if nvsize else 0
        if not ok:
            return (FALLBACK, version, nvsize)
        return (FAST, version, nvsize, f.found, f.cmd, f.seq, f.offset, f.length, f.size,
                f.error)
    finally:
        PyBuffer_Release(&view)
