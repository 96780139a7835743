# cython: language_level=3
"""Declarations of hast/_codec.pyx: the C-level LZF and zero-detection kernels."""

from libc.stdint cimport uint32_t


# Negative results of lzf_decompress_raw (the errno liblzf would set).
cdef enum:
    LZF_E2BIG = -1
    LZF_EINVAL = -2

# Compress n bytes of src into at most limit bytes of dst using the caller's zeroed hash
# table of 1 << hlog entries; returns the stream length, or -1 when it would not fit.
cdef Py_ssize_t lzf_compress_raw(const unsigned char *src, Py_ssize_t n, unsigned char *dst,
                                 Py_ssize_t limit, uint32_t *htab, int hlog) noexcept nogil

# Decode a complete LZF stream into at most limit bytes; returns the output length or
# LZF_E2BIG / LZF_EINVAL.
cdef Py_ssize_t lzf_decompress_raw(const unsigned char *src, Py_ssize_t n, unsigned char *dst,
                                   Py_ssize_t limit) noexcept nogil

cdef bint is_zero_raw(const unsigned char *p, Py_ssize_t n) noexcept nogil
