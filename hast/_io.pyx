# cython: language_level=3
"""Block I/O on HAST's local component: the syscalls hastd makes on its provider.

This module owns everything that touches the provider file descriptor: positioned reads and
writes that loop until complete (hastd treats a short transfer as an error, so we never
return one except at end of file), aligned buffers for O_DIRECT, the provider geometry
(mediasize, sectorsize) that `hastctl create` and the workers size everything from, the
cache flush and TRIM behind HIO_FLUSH / HIO_DELETE, and the exclusive flock hastd takes.
Every blocking syscall runs with the GIL released, so the worker threads (local send,
remote receive, sync) overlap their disk I/O.

O_DIRECT.  On Linux an O_DIRECT descriptor refuses (EINVAL) transfers whose buffer, offset
or length are not aligned to the device's logical block size.  Callers should use
AlignedBuffer and sector-aligned offsets and lengths; when they do not, pread/pwrite (and
the vectored forms) notice the EINVAL and redo the transfer correctly: through an aligned
bounce buffer when only the memory is misaligned, or through a buffered descriptor of the
same file when the offset or length is.  That path costs one failed syscall and a copy, so
it must stay rare, but it is never wrong.  FreeBSD's O_DIRECT has no alignment rule.

All OS headers come through compat.h; the platform differences live there.
"""

import os

from cpython.buffer cimport (
    PyBUF_FORMAT,
    PyBUF_ND,
    PyBUF_SIMPLE,
    PyBUF_STRIDES,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy, memset

# Alignment of the bounce buffers: a multiple of every logical block size we meet (512, 4K).
cdef enum:
    BOUNCE_ALIGN = 4096

BOUNCE_ALIGNMENT = BOUNCE_ALIGN
O_DIRECT_SUPPORTED = HAST_O_DIRECT != 0
# errno of NotAProvider: EFTYPE on FreeBSD (as hastd), ENOTBLK on Linux.
ENOTPROVIDER = HAST_ENOTPROVIDER
# Sector size hastd assumes for regular-file providers.
REGULAR_FILE_SECTORSIZE = 512


class NotAProvider(OSError):
    """The descriptor is neither a disk (GEOM provider / block device) nor a regular file.

    hastctl reports it as ``<path> is neither GEOM provider nor regular file.``
    """


cdef inline int _raise(int err, object filename=None) except -1:
    if filename is None:
        raise OSError(err, os.strerror(err))
    raise OSError(err, os.strerror(err), filename)


cdef inline int _retry_eintr() except -1:
    # PEP 475 semantics: retry, unless a signal handler raised.
    PyErr_CheckSignals()
    return 0


# --------------------------------------------------------------------------------------
# AlignedBuffer


cdef class AlignedBuffer:
    """A zero-filled, writable buffer whose address is a multiple of ``alignment``.

    Exposes the buffer protocol (``memoryview(buf)`` is writable, slices are views), so one
    buffer can be reused for every request of a worker thread.  Required for I/O on an
    O_DIRECT descriptor without a bounce copy.
    """

    def __cinit__(self, Py_ssize_t size, Py_ssize_t alignment=BOUNCE_ALIGN):
        cdef void *p = NULL
        if size < 0:
            raise ValueError("size must be >= 0")
        if alignment < <Py_ssize_t>sizeof(void *) or alignment & (alignment - 1):
            raise ValueError("alignment must be a power of two >= sizeof(void *)")
        # posix_memalign(size 0) may return NULL; keep a real allocation.
        if posix_memalign(&p, alignment, size if size > 0 else alignment) != 0:
            raise MemoryError()
        # Zeroed: a short read must never expose old heap contents on the wire.
        memset(p, 0, size)
        self.ptr = <char *>p
        self.size = size
        self.alignment = alignment
        self._shape[0] = size
        self._strides[0] = 1

    def __dealloc__(self):
        if self.ptr != NULL:
            free(self.ptr)
            self.ptr = NULL

    def __getbuffer__(self, Py_buffer *view, int flags):
        view.buf = self.ptr
        view.obj = self
        view.len = self.size
        view.readonly = 0
        view.itemsize = 1
        if flags & PyBUF_FORMAT:
            view.format = "B"
        else:
            view.format = NULL
        view.ndim = 1
        view.shape = self._shape if flags & PyBUF_ND else NULL
        view.strides = self._strides if (flags & PyBUF_STRIDES) == PyBUF_STRIDES else NULL
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __len__(self):
        return self.size

    @property
    def address(self):
        """Address of the first byte (for alignment checks)."""
        return <size_t>self.ptr

    def zero(self):
        """Fill the buffer with zeros."""
        memset(self.ptr, 0, self.size)

    def __repr__(self):
        return f"AlignedBuffer(size={self.size}, alignment={self.alignment})"


# --------------------------------------------------------------------------------------
# Positioned I/O


cdef Py_ssize_t _rw_loop(int fd, char *p, Py_ssize_t n, off_t off, bint write,
                         bint may_bounce) except -1:
    """Transfer n bytes at off until done; reads stop early only at end of file."""
    cdef Py_ssize_t done = 0
    cdef ssize_t r
    cdef int err = 0
    while done < n:
        with nogil:
            if write:
                r = c_pwrite(fd, p + done, <size_t>(n - done), off + done)
            else:
                r = c_pread(fd, p + done, <size_t>(n - done), off + done)
            if r < 0:
                err = errno
        if r > 0:
            done += r
            continue
        if r == 0:
            if write:
                # A zero-byte write would loop forever; the device has no room left.
                _raise(ENOSPC)
            break
        if err == EINTR:
            _retry_eintr()
            continue
        if err == EINVAL and may_bounce and hast_fd_is_direct(fd):
            return done + _bounce(fd, p + done, n - done, off + done, write)
        _raise(err)
    return done


cdef Py_ssize_t _bounce(int fd, char *p, Py_ssize_t n, off_t off, bint write) except -1:
    """Redo a transfer an O_DIRECT descriptor refused (EINVAL)."""
    cdef void *tmp = NULL
    cdef Py_ssize_t got
    cdef int fd2
    if ((off | n) & (BOUNCE_ALIGN - 1)) == 0:
        # Offset and length suit every sector size: only the memory can be at fault.
        if posix_memalign(&tmp, BOUNCE_ALIGN, n) != 0:
            raise MemoryError()
        try:
            if write:
                memcpy(tmp, p, n)
                return _rw_loop(fd, <char *>tmp, n, off, True, False)
            got = _rw_loop(fd, <char *>tmp, n, off, False, False)
            memcpy(p, tmp, got)
            return got
        finally:
            free(tmp)
    # Offset or length below the device's granularity: a read-modify-write would race with
    # other writers and get end-of-file wrong, a buffered descriptor has neither problem.
    with nogil:
        fd2 = hast_reopen_buffered(fd)
    if fd2 < 0:
        _raise(EINVAL)
    try:
        return _rw_loop(fd2, p, n, off, write, False)
    finally:
        close(fd2)


def pread(int fd, buf, off_t offset):
    """Read len(buf) bytes at offset into buf; returns the count (short only at EOF)."""
    cdef Py_buffer view
    PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
    try:
        return _rw_loop(fd, <char *>view.buf, view.len, offset, False, True)
    finally:
        PyBuffer_Release(&view)


def pwrite(int fd, buf, off_t offset):
    """Write all of buf at offset; returns len(buf).  Raises OSError on failure."""
    cdef Py_buffer view
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        return _rw_loop(fd, <char *>view.buf, view.len, offset, True, True)
    finally:
        PyBuffer_Release(&view)


cdef Py_ssize_t _vec_loop(int fd, iovec *iov, Py_ssize_t cnt, off_t off, bint write) except -1:
    cdef Py_ssize_t idx = 0, done = 0, got
    cdef ssize_t r
    cdef int err = 0, batch
    while idx < cnt:
        if iov[idx].iov_len == 0:
            idx += 1
            continue
        batch = <int>(cnt - idx if cnt - idx < HAST_IOV_MAX else HAST_IOV_MAX)
        with nogil:
            if write:
                r = c_pwritev(fd, iov + idx, batch, off + done)
            else:
                r = c_preadv(fd, iov + idx, batch, off + done)
            if r < 0:
                err = errno
        if r < 0:
            if err == EINTR:
                _retry_eintr()
                continue
            if err == EINVAL and hast_fd_is_direct(fd):
                # Rare: finish buffer by buffer through the bouncing scalar path.
                while idx < cnt:
                    got = _rw_loop(fd, <char *>iov[idx].iov_base, iov[idx].iov_len,
                                   off + done, write, True)
                    done += got
                    if got < <Py_ssize_t>iov[idx].iov_len:
                        break
                    idx += 1
                return done
            _raise(err)
        if r == 0:
            if write:
                _raise(ENOSPC)
            break
        done += r
        while r > 0:
            if <size_t>r >= iov[idx].iov_len:
                r -= iov[idx].iov_len
                idx += 1
            else:
                iov[idx].iov_base = <char *>iov[idx].iov_base + r
                iov[idx].iov_len -= r
                r = 0
    return done


cdef Py_ssize_t _vectored(int fd, object bufs, off_t offset, bint write) except -1:
    cdef list items = list(bufs)
    cdef Py_ssize_t cnt = len(items), i, acquired = 0
    cdef Py_buffer *views
    cdef iovec *iov
    if cnt == 0:
        return 0
    views = <Py_buffer *>PyMem_Malloc(cnt * sizeof(Py_buffer))
    iov = <iovec *>PyMem_Malloc(cnt * sizeof(iovec))
    try:
        if views == NULL or iov == NULL:
            raise MemoryError()
        for i in range(cnt):
            PyObject_GetBuffer(items[i], &views[i], PyBUF_SIMPLE if write else PyBUF_WRITABLE)
            acquired += 1
            iov[i].iov_base = views[i].buf
            iov[i].iov_len = <size_t>views[i].len
        return _vec_loop(fd, iov, cnt, offset, write)
    finally:
        for i in range(acquired):
            PyBuffer_Release(&views[i])
        PyMem_Free(views)
        PyMem_Free(iov)


def preadv(int fd, bufs, off_t offset):
    """Scatter read into the buffers in order from offset; returns the total (short at EOF)."""
    return _vectored(fd, bufs, offset, False)


def pwritev(int fd, bufs, off_t offset):
    """Gather write of all the buffers in order at offset; returns the total."""
    return _vectored(fd, bufs, offset, True)


# --------------------------------------------------------------------------------------
# Provider


def open_provider(path, bint writable=True, bint direct=True):
    """Open a provider; returns (fd, is_direct).

    O_DIRECT is requested when ``direct`` and the platform has it; a filesystem that refuses
    it at open time (EINVAL) gets a plain open instead and is_direct False.  The descriptor
    is close-on-exec (hastd's workers exec hooks).  On a direct descriptor use AlignedBuffer
    and sector-aligned offsets/lengths to stay on the fast path.
    """
    cdef bytes bpath = os.fsencode(path)
    cdef const char *cpath = bpath
    cdef int flags = (O_RDWR if writable else O_RDONLY) | O_CLOEXEC
    cdef bint use_direct = direct and HAST_O_DIRECT != 0
    cdef int fd, err = 0
    while True:
        with nogil:
            fd = open(cpath, flags | (HAST_O_DIRECT if use_direct else 0))
            if fd < 0:
                err = errno
        if fd >= 0:
            return fd, bool(use_direct)
        if err == EINTR:
            _retry_eintr()
        elif err == EINVAL and use_direct:
            use_direct = False
        else:
            _raise(err, path)


def fd_is_direct(int fd):
    """True when the descriptor has O_DIRECT set."""
    return bool(hast_fd_is_direct(fd))


cdef int _fstat(int fd, stat *st) except -1:
    cdef int r, err = 0
    with nogil:
        r = fstat(fd, st)
        if r != 0:
            err = errno
    if r != 0:
        _raise(err)
    return 0


def provider_info(int fd):
    """(mediasize, sectorsize) of an open provider, as hastd obtains them.

    Regular file: (st_size, 512).  Disk (Linux block device, FreeBSD GEOM character
    device): the media size and logical sector size ioctls.  Anything else raises
    NotAProvider.
    """
    cdef stat st
    cdef uint64_t mediasize = 0
    cdef unsigned int sectorsize = 0
    cdef int r, err = 0
    _fstat(fd, &st)
    if hast_is_regular(st.st_mode):
        return st.st_size, REGULAR_FILE_SECTORSIZE
    if not hast_is_disk(st.st_mode):
        raise NotAProvider(HAST_ENOTPROVIDER, os.strerror(HAST_ENOTPROVIDER))
    with nogil:
        r = hast_disk_mediasize(fd, &mediasize)
        if r == 0:
            r = hast_disk_sectorsize(fd, &sectorsize)
        if r != 0:
            err = errno
    if r != 0:
        _raise(err)
    return mediasize, sectorsize


def flush(int fd):
    """Make completed writes durable (HIO_FLUSH).

    Regular file: fdatasync.  Disk: fdatasync on Linux (it issues the device cache flush),
    DIOCGFLUSH on FreeBSD.  Other descriptors: OSError(EOPNOTSUPP).
    """
    cdef stat st
    cdef int r = -1, err = EOPNOTSUPP
    _fstat(fd, &st)
    with nogil:
        if hast_is_regular(st.st_mode):
            r = hast_file_flush(fd)
        elif hast_is_disk(st.st_mode):
            r = hast_disk_flush(fd)
        if r != 0 and (hast_is_regular(st.st_mode) or hast_is_disk(st.st_mode)):
            err = errno
    if r != 0:
        _raise(err)


def delete(int fd, uint64_t offset, uint64_t length):
    """Discard a range (HIO_DELETE): BLKDISCARD / DIOCGDELETE on a disk, a punched hole in a
    regular file (reads return zeros, size unchanged).  OSError(EOPNOTSUPP) where the
    platform or filesystem cannot."""
    cdef stat st
    cdef int r = -1, err = EOPNOTSUPP
    if length == 0:
        return
    _fstat(fd, &st)
    with nogil:
        if hast_is_regular(st.st_mode):
            r = hast_file_punch(fd, offset, length)
        elif hast_is_disk(st.st_mode):
            r = hast_disk_delete(fd, offset, length)
        if r != 0 and (hast_is_regular(st.st_mode) or hast_is_disk(st.st_mode)):
            err = errno
    if r != 0:
        _raise(err)


def changed_runs(old, new, Py_ssize_t sector):
    """Byte ranges [(start, end), ...] of whole sectors where new differs from old.

    What a partial rewrite of an on-disk image (the activemap) has to write: runs of
    adjacent changed sectors are merged, the last run ends at len(new).  old shorter than
    new counts as different beyond its end.
    """
    cdef Py_buffer a, b
    cdef Py_ssize_t pos = 0, n, run = -1, cmp_len
    cdef list out = []
    if sector <= 0:
        raise ValueError("sector must be positive")
    PyObject_GetBuffer(old, &a, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(new, &b, PyBUF_SIMPLE)
        try:
            while pos < b.len:
                n = min(sector, b.len - pos)
                cmp_len = min(n, a.len - pos) if a.len > pos else 0
                if cmp_len == n and memcmp(<char *>a.buf + pos, <char *>b.buf + pos, n) == 0:
                    if run >= 0:
                        out.append((run, pos))
                        run = -1
                elif run < 0:
                    run = pos
                pos += n
            if run >= 0:
                out.append((run, b.len))
        finally:
            PyBuffer_Release(&b)
    finally:
        PyBuffer_Release(&a)
    return out


def lock_exclusive(int fd):
    """flock(LOCK_EX | LOCK_NB) as hastd takes on its provider.

    Raises BlockingIOError (EWOULDBLOCK) when another open file description holds it; a
    filesystem without flock raises EOPNOTSUPP, which hastd tolerates with a warning.
    """
    cdef int r, err = 0
    while True:
        with nogil:
            r = flock(fd, LOCK_EX | LOCK_NB)
            if r != 0:
                err = errno
        if r == 0:
            return
        if err == EINTR:
            _retry_eintr()
            continue
        _raise(err)
