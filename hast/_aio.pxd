# cython: language_level=3
"""Declarations of hast/_aio.pyx: Linux native AIO for O_DIRECT provider I/O."""

from libc.stdint cimport uint64_t


cdef class Ring:
    cdef uint64_t ctx          # aio_context_t
    cdef readonly int depth
    cdef dict _inflight        # request id -> (token, memoryview keeping the buffer alive)
    cdef uint64_t _next_id
    cdef bint _closed
    cdef int _wakefd           # eventfd of wake(), -1 until the first call
