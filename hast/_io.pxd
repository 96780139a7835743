# cython: language_level=3
"""Declarations of hast/_io.pyx: the OS calls (all via compat.h) and AlignedBuffer."""

from libc.stdint cimport uint64_t


cdef extern from "compat.h" nogil:
    ctypedef long off_t
    ctypedef unsigned int mode_t

    struct iovec:
        void *iov_base
        size_t iov_len

    struct stat:
        mode_t st_mode
        off_t st_size
        long st_blocks

    int errno
    enum:
        EINTR
        EINVAL
        EIO
        ENOSPC
        EOPNOTSUPP
        O_RDONLY
        O_RDWR
        O_CLOEXEC
        LOCK_EX
        LOCK_NB
        HAST_O_DIRECT
        HAST_ENOTPROVIDER
        HAST_IOV_MAX

    ssize_t c_pread "pread"(int fd, void *buf, size_t count, off_t offset)
    ssize_t c_pwrite "pwrite"(int fd, const void *buf, size_t count, off_t offset)
    ssize_t c_preadv "preadv"(int fd, const iovec *iov, int iovcnt, off_t offset)
    ssize_t c_pwritev "pwritev"(int fd, const iovec *iov, int iovcnt, off_t offset)
    int open(const char *path, int flags, ...)
    int close(int fd)
    int fstat(int fd, stat *st)
    int flock(int fd, int operation)
    int posix_memalign(void **memptr, size_t alignment, size_t size)
    void free(void *ptr)
    char *strerror(int errnum)

    int hast_is_disk(mode_t mode)
    int hast_is_regular(mode_t mode)
    int hast_disk_mediasize(int fd, uint64_t *sizep)
    int hast_disk_sectorsize(int fd, unsigned int *sizep)
    int hast_disk_flush(int fd)
    int hast_file_flush(int fd)
    int hast_disk_delete(int fd, uint64_t offset, uint64_t length)
    int hast_file_punch(int fd, uint64_t offset, uint64_t length)
    int hast_fd_is_direct(int fd)
    int hast_reopen_buffered(int fd)


cdef class AlignedBuffer:
    cdef char *ptr
    cdef readonly Py_ssize_t size
    cdef readonly Py_ssize_t alignment
    cdef Py_ssize_t _shape[1]
    cdef Py_ssize_t _strides[1]
