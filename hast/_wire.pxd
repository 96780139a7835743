# cython: language_level=3
"""Declarations of hast/_wire.pyx: per-request replication frames in C."""

from libc.stdint cimport int16_t, uint8_t, uint32_t, uint64_t


# Bits of Fields.found: which of the expected records a blob carried.
cdef enum:
    F_CMD = 1
    F_SEQ = 2
    F_OFFSET = 4
    F_LENGTH = 8
    F_MEMSYNC = 16
    F_SIZE = 32
    F_ERROR = 64
    F_RECEIVED = 128


cdef struct Fields:
    uint32_t found
    uint8_t cmd
    uint64_t seq
    uint64_t offset
    uint64_t length
    uint32_t size
    int16_t error


# Parse an nv blob made only of the records a request (request=1: cmd, seq, offset, length,
# memsync, size) or a reply (seq, error, received, size) carries, each at most once and with
# its usual type.  1: done, f filled; 0: anything else -- the caller decodes with hast.nv,
# which applies FreeBSD's rules (and raises on malformed blobs).
cdef int scan_fields(const unsigned char *p, Py_ssize_t n, Fields *f,
                     bint request) noexcept nogil
