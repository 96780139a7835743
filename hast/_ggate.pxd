# cython: language_level=3
"""Declarations of hast/_ggate.pyx: the GEOM Gate ABI of hast/ggate.h and the cdef classes.

Everything from the OS comes through ggate.h (its structures are py-hast's own, checked by
tests/test_ggate.py for amd64, i386 and arm64); nothing here cimports libc or posix.
"""

from libc.stdint cimport int64_t, uint32_t, uintptr_t


cdef extern from "ggate.h" nogil:
    const char *G_GATE_CTL_PATH
    const char *G_GATE_KLD_MODNAME
    const char *G_GATE_KLD_FILE

    enum:
        G_GATE_VERSION
        HAST_GG_NAME_MAX
        G_GATE_INFOSIZE
        G_GATE_FLAG_READONLY
        G_GATE_FLAG_WRITEONLY
        G_GATE_UNIT_AUTO
        G_GATE_NAME_GIVEN
        GG_MODIFY_MEDIASIZE
        GG_MODIFY_INFO
        GG_MODIFY_READPROV
        GG_MODIFY_READOFFSET
        HAST_BIO_READ
        HAST_BIO_WRITE
        HAST_BIO_DELETE
        HAST_BIO_GETATTR
        HAST_BIO_FLUSH
        HAST_BIO_SPEEDUP

    # Request codes: unsigned long, the type of ioctl(2)'s second argument on FreeBSD.
    const unsigned long G_GATE_CMD_CREATE
    const unsigned long G_GATE_CMD_MODIFY
    const unsigned long G_GATE_CMD_DESTROY
    const unsigned long G_GATE_CMD_CANCEL
    const unsigned long G_GATE_CMD_START
    const unsigned long G_GATE_CMD_DONE

    struct g_gate_ctl_create:
        unsigned int gctl_version
        int64_t gctl_mediasize
        unsigned int gctl_sectorsize
        unsigned int gctl_flags
        unsigned int gctl_maxcount
        unsigned int gctl_timeout
        char gctl_name[255]
        char gctl_info[2048]
        char gctl_readprov[255]
        int64_t gctl_readoffset
        int gctl_unit

    struct g_gate_ctl_modify:
        unsigned int gctl_version
        int gctl_unit
        uint32_t gctl_modify
        int64_t gctl_mediasize
        char gctl_info[2048]
        char gctl_readprov[255]
        int64_t gctl_readoffset

    struct g_gate_ctl_destroy:
        unsigned int gctl_version
        int gctl_unit
        int gctl_force
        char gctl_name[255]

    struct g_gate_ctl_cancel:
        unsigned int gctl_version
        int gctl_unit
        uintptr_t gctl_seq
        char gctl_name[255]

    struct g_gate_ctl_io:
        unsigned int gctl_version
        int gctl_unit
        uintptr_t gctl_seq
        unsigned int gctl_cmd
        int64_t gctl_offset
        int64_t gctl_length
        void *gctl_data
        int gctl_error

    int errno
    enum:
        EBADF
        EINTR
        EINVAL
        ENOMEM
        ENXIO
        ENAMETOOLONG
        ECANCELED

    void *memset(void *s, int c, size_t n)
    void *memcpy(void *dst, const void *src, size_t n)

    int hast_gg_open(const char *path)
    int hast_gg_close(int fd)
    int hast_gg_ioctl(int fd, unsigned long request, void *arg)


cdef class Request:
    cdef g_gate_ctl_io io
    cdef object buf                 # the hast._io.AlignedBuffer gctl_data points into
    cdef Py_buffer view
    cdef bint has_view
    cdef readonly Py_ssize_t capacity

    cdef int _grow(self, Py_ssize_t need) except -1
    cdef void _prepare(self, int unit) noexcept


cdef class RequestPool:
    cdef object cond
    cdef list free
    cdef bint closed
    cdef readonly Py_ssize_t bufsize
    cdef readonly Py_ssize_t limit
    cdef readonly Py_ssize_t allocated


cdef class Control:
    cdef int fd
    cdef int users                  # calls in progress on fd (GIL released inside)
    cdef bint closing
    cdef readonly int unit
    cdef readonly object path

    cdef int _call(self, unsigned long request, void *arg) except -1
