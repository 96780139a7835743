# cython: language_level=3
"""GEOM Gate control for the FreeBSD primary: the ioctls hastd makes on /dev/ggctl.

This module owns the conversation with the kernel's GEOM_GATE class (hast-internals §11):
creating the provider ``hast/<name>`` (CREATE, or CANCEL to adopt the device a dead worker
left behind), the request loop (START hands one kernel request to userland, DONE returns
its result), direct reads (MODIFY) and destruction (DESTROY).  hast.frontends.ggate drives
it and connects the requests to the primary.

Why Cython: START sleeps in the kernel until a request arrives and DONE copies up to a full
request in or out, so both run with the GIL released; the request buffers are handed to the
primary as memoryviews without a copy.

Kernel behaviour this code relies on (sys/geom/gate/g_gate.c):
  * START answers with gctl_error, not with a failed ioctl: ECANCELED when the device is
    being destroyed (or when a signal interrupts the sleep, which is why the frontend's
    START thread blocks signals), ENOMEM when a WRITE does not fit in gctl_length -- the
    kernel then puts the needed size in gctl_length and keeps the request queued.  hastd
    calls that case impossible (its buffers are MAXPHYS) and exits; py-hast's buffers are
    ``maxio``, which may be smaller than the kernel's maxphys, so the buffer grows and START
    is retried, as ggatec and ggatel do.
  * A READ longer than gctl_length is handed out anyway (the length check is for WRITEs
    only) and DONE copies gctl_length bytes from gctl_data: such a request gets a grown
    buffer before it is served, or the kernel would read past ours.
  * DONE for an unknown seq (a cancelled request) succeeds and does nothing; DONE after the
    device is gone fails with ENOENT.

All OS headers come through ggate.h.
"""

import os
import threading

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer

from hast._io import AlignedBuffer

CTL_PATH = os.fsdecode(G_GATE_CTL_PATH)
KLD_MODNAME = os.fsdecode(G_GATE_KLD_MODNAME)
KLD_FILE = os.fsdecode(G_GATE_KLD_FILE)
VERSION = G_GATE_VERSION
NAME_MAX = HAST_GG_NAME_MAX
FLAG_READONLY = G_GATE_FLAG_READONLY
FLAG_WRITEONLY = G_GATE_FLAG_WRITEONLY
UNIT_AUTO = G_GATE_UNIT_AUTO
NAME_GIVEN = G_GATE_NAME_GIVEN
BIO_READ = HAST_BIO_READ
BIO_WRITE = HAST_BIO_WRITE
BIO_DELETE = HAST_BIO_DELETE
BIO_GETATTR = HAST_BIO_GETATTR
BIO_FLUSH = HAST_BIO_FLUSH
BIO_SPEEDUP = HAST_BIO_SPEEDUP
CMD_CREATE = G_GATE_CMD_CREATE
CMD_MODIFY = G_GATE_CMD_MODIFY
CMD_DESTROY = G_GATE_CMD_DESTROY
CMD_CANCEL = G_GATE_CMD_CANCEL
CMD_START = G_GATE_CMD_START
CMD_DONE = G_GATE_CMD_DONE

# Buffers are page aligned (local O_DIRECT reads land in them) and grown in whole pages.
cdef enum:
    PAGE = 4096
# Largest request a buffer grows to.  The kernel never builds a bio larger than its maxphys
# (1 MiB by default, a tunable); a length beyond this is a broken kernel/userland contract.
MAX_REQUEST = 64 * 1024 * 1024
# hastd's HAST_HIO_MAX: requests handed to userland at once; START waits for a free one.
POOL_LIMIT = 256


cdef inline int _raise(int err, object filename=None) except -1:
    if filename is None:
        raise OSError(err, os.strerror(err))
    raise OSError(err, os.strerror(err), filename)


cdef int _copy_name(char *dst, object value, object what) except -1:
    """Copy a NUL-terminated name into a char[NAME_MAX] field, refusing truncation.

    The kernel looks providers up by these names, so a silently truncated one would
    create or destroy the wrong device.
    """
    cdef bytes raw = os.fsencode(value)
    if len(raw) >= HAST_GG_NAME_MAX:
        raise OSError(ENAMETOOLONG, f"{what} longer than {HAST_GG_NAME_MAX - 1} bytes", value)
    if b"\0" in raw:
        raise ValueError(f"{what} contains a NUL byte")
    memcpy(dst, <const char *>raw, len(raw))
    dst[len(raw)] = 0
    return 0


cdef class Request:
    """One kernel request in userland: its g_gate_ctl_io and the buffer gctl_data points to.

    After a successful START: ``cmd``, ``seq``, ``offset``, ``length``; ``data`` is the
    payload of a WRITE, or where a READ's result goes before DONE.
    """

    def __cinit__(self, Py_ssize_t bufsize):
        self.has_view = False
        self.capacity = 0
        memset(&self.io, 0, sizeof(self.io))
        self.io.gctl_version = G_GATE_VERSION
        self._grow(bufsize if bufsize > 0 else PAGE)

    def __dealloc__(self):
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False

    cdef int _grow(self, Py_ssize_t need) except -1:
        cdef Py_ssize_t size = (need + PAGE - 1) // PAGE * PAGE
        buf = AlignedBuffer(size, PAGE)
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False
        PyObject_GetBuffer(buf, &self.view, PyBUF_WRITABLE)
        self.has_view = True
        self.buf = buf
        self.capacity = size
        self.io.gctl_data = self.view.buf
        return 0

    cdef void _prepare(self, int unit) noexcept:
        # What hastd sets before every START; seq/cmd/offset are outputs.
        self.io.gctl_version = G_GATE_VERSION
        self.io.gctl_unit = unit
        self.io.gctl_data = self.view.buf
        self.io.gctl_length = self.capacity
        self.io.gctl_error = 0

    @property
    def cmd(self) -> int:
        return self.io.gctl_cmd

    @property
    def seq(self) -> int:
        return self.io.gctl_seq

    @property
    def offset(self) -> int:
        return self.io.gctl_offset

    @property
    def length(self) -> int:
        return self.io.gctl_length

    @property
    def error(self) -> int:
        return self.io.gctl_error

    @property
    def data(self) -> memoryview:
        """The request's bytes: ``length`` bytes of the buffer (READ and WRITE only)."""
        cdef int64_t n = self.io.gctl_length
        if n < 0 or n > self.capacity:
            raise ValueError(f"request length {n} does not fit the buffer ({self.capacity})")
        return memoryview(self.buf)[:n]

    def __repr__(self) -> str:
        return (f"<Request cmd={self.io.gctl_cmd} seq={self.io.gctl_seq} "
                f"offset={self.io.gctl_offset} length={self.io.gctl_length}>")


cdef class RequestPool:
    """At most ``limit`` Requests with ``bufsize`` buffers, allocated on first use.

    acquire() blocks while all are in flight (hastd's free list of HAST_HIO_MAX hios), so
    the kernel keeps further requests queued instead of userland growing without bound.
    """

    def __cinit__(self, Py_ssize_t bufsize, Py_ssize_t limit=POOL_LIMIT):
        if bufsize <= 0 or limit <= 0:
            raise ValueError("bufsize and limit must be positive")
        self.bufsize = bufsize
        self.limit = limit
        self.allocated = 0
        self.free = []
        self.closed = False
        self.cond = threading.Condition()

    def acquire(self):
        """A free Request, or None once the pool is closed."""
        with self.cond:
            while not self.closed and not self.free and self.allocated >= self.limit:
                self.cond.wait()
            if self.closed:
                return None
            if self.free:
                return self.free.pop()
            self.allocated += 1
        try:
            return Request(self.bufsize)
        except BaseException:
            with self.cond:
                self.allocated -= 1
                self.cond.notify()
            raise

    def release(self, Request req not None) -> None:
        with self.cond:
            self.free.append(req)
            self.cond.notify()

    def close(self) -> None:
        """Wake every acquire() with None."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    @property
    def in_use(self) -> int:
        with self.cond:
            return self.allocated - len(self.free)


cdef class Control:
    """An open /dev/ggctl and the unit of the gate provider it serves.

    Methods raise OSError when the ioctl fails; start() returns the kernel's gctl_error.
    close() may be called while other threads are inside an ioctl: the descriptor is closed
    by the last of them, so a late DONE never lands on a reused descriptor number.
    """

    def __cinit__(self):
        self.fd = -1
        self.users = 0
        self.closing = False
        self.unit = -1

    def __init__(self, path=CTL_PATH):
        self.path = os.fsdecode(path)
        cdef bytes raw = os.fsencode(path)
        self.fd = hast_gg_open(raw)
        if self.fd == -1:
            _raise(errno, self.path)

    def __dealloc__(self):
        if self.fd >= 0:
            hast_gg_close(self.fd)
            self.fd = -1

    cdef int _call(self, unsigned long request, void *arg) except -1:
        """ioctl with the GIL released; returns 0 or the errno (EINTR retried)."""
        cdef int fd = self.fd
        cdef int rv
        if self.closing or fd < 0:
            return EBADF
        self.users += 1
        try:
            while True:
                with nogil:
                    rv = hast_gg_ioctl(fd, request, arg)
                if rv != EINTR or self.closing:
                    return rv
        finally:
            self.users -= 1
            if self.closing and self.users == 0 and self.fd >= 0:
                hast_gg_close(self.fd)
                self.fd = -1

    @property
    def closed(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        if self.users == 0 and self.fd >= 0:
            hast_gg_close(self.fd)
            self.fd = -1

    def create(self, name, int64_t mediasize, unsigned int sectorsize, *,
               unsigned int flags=0, unsigned int timeout=0, unsigned int maxcount=0,
               int unit=G_GATE_NAME_GIVEN, info=None) -> int:
        """G_GATE_CMD_CREATE of provider ``name``; returns (and remembers) the unit."""
        cdef g_gate_ctl_create ggioc
        cdef int rv
        memset(&ggioc, 0, sizeof(ggioc))
        ggioc.gctl_version = G_GATE_VERSION
        ggioc.gctl_mediasize = mediasize
        ggioc.gctl_sectorsize = sectorsize
        ggioc.gctl_flags = flags
        ggioc.gctl_maxcount = maxcount
        ggioc.gctl_timeout = timeout
        ggioc.gctl_unit = unit
        _copy_name(ggioc.gctl_name, name, "provider name")
        if info is not None:
            raw = os.fsencode(info)[:G_GATE_INFOSIZE - 1]
            memcpy(ggioc.gctl_info, <const char *>raw, len(raw))
        rv = self._call(G_GATE_CMD_CREATE, &ggioc)
        if rv != 0:
            _raise(rv, name)
        self.unit = ggioc.gctl_unit
        return self.unit

    def cancel(self, name=None, uintptr_t seq=0) -> int:
        """G_GATE_CMD_CANCEL: requests handed to userland (all if seq is 0) go back to the
        kernel's queue.  With ``name``, the unit is looked up by provider name, returned and
        remembered (hastd adopts the device of a worker that died)."""
        cdef g_gate_ctl_cancel ggioc
        cdef int rv
        memset(&ggioc, 0, sizeof(ggioc))
        ggioc.gctl_version = G_GATE_VERSION
        ggioc.gctl_seq = seq
        if name is not None:
            ggioc.gctl_unit = G_GATE_NAME_GIVEN
            _copy_name(ggioc.gctl_name, name, "provider name")
        else:
            ggioc.gctl_unit = self.unit
        rv = self._call(G_GATE_CMD_CANCEL, &ggioc)
        if rv != 0:
            _raise(rv, name)
        self.unit = ggioc.gctl_unit
        return self.unit

    def destroy(self, bint force=True) -> None:
        """G_GATE_CMD_DESTROY of our unit.  The kernel wakes a blocked START with ECANCELED
        and waits for it to leave, so this may block briefly (GIL released)."""
        cdef g_gate_ctl_destroy ggiod
        cdef int rv
        memset(&ggiod, 0, sizeof(ggiod))
        ggiod.gctl_version = G_GATE_VERSION
        ggiod.gctl_unit = self.unit
        ggiod.gctl_force = 1 if force else 0
        rv = self._call(G_GATE_CMD_DESTROY, &ggiod)
        if rv != 0:
            _raise(rv)

    def modify(self, *, readprov=None, readoffset=None, mediasize=None, info=None) -> None:
        """G_GATE_CMD_MODIFY with the GG_MODIFY_* bits of the arguments given.

        ``readprov`` (a provider name or /dev path; "" detaches) with ``readoffset`` makes
        the kernel serve READs from that provider at offset + readoffset (direct reads).
        """
        cdef g_gate_ctl_modify ggiom
        cdef int rv
        memset(&ggiom, 0, sizeof(ggiom))
        ggiom.gctl_version = G_GATE_VERSION
        ggiom.gctl_unit = self.unit
        if mediasize is not None:
            ggiom.gctl_modify |= GG_MODIFY_MEDIASIZE
            ggiom.gctl_mediasize = mediasize
        if info is not None:
            ggiom.gctl_modify |= GG_MODIFY_INFO
            raw = os.fsencode(info)[:G_GATE_INFOSIZE - 1]
            memcpy(ggiom.gctl_info, <const char *>raw, len(raw))
        if readprov is not None:
            ggiom.gctl_modify |= GG_MODIFY_READPROV
            _copy_name(ggiom.gctl_readprov, readprov, "read provider")
        if readoffset is not None:
            ggiom.gctl_modify |= GG_MODIFY_READOFFSET
            ggiom.gctl_readoffset = readoffset
        rv = self._call(G_GATE_CMD_MODIFY, &ggiom)
        if rv != 0:
            _raise(rv, readprov)

    def start(self, Request req not None) -> int:
        """G_GATE_CMD_START into ``req``: blocks until the kernel has a request.

        Returns gctl_error: 0 (``req`` describes the request, a WRITE's payload is in its
        buffer), ECANCELED (device being destroyed), or another errno (hastd: fatal).
        ENOMEM for a WRITE larger than the buffer is handled here: grow and retry.
        """
        cdef int rv, err
        cdef int64_t need
        while True:
            req._prepare(self.unit)
            rv = self._call(G_GATE_CMD_START, &req.io)
            if rv != 0:
                _raise(rv, self.path)
            err = req.io.gctl_error
            need = req.io.gctl_length
            if err == ENOMEM and req.io.gctl_cmd == HAST_BIO_WRITE and need > req.capacity:
                if need > MAX_REQUEST:
                    return ENOMEM
                req._grow(need)          # the kernel kept the WRITE queued: ask again
                continue
            if err == 0 and req.io.gctl_cmd == HAST_BIO_READ and need > req.capacity:
                if need > MAX_REQUEST:
                    return ENOMEM
                req._grow(need)          # DONE will copy `need` bytes from gctl_data
            return err

    def done(self, Request req not None, int error) -> None:
        """G_GATE_CMD_DONE: complete ``req`` with ``error`` (0 or an errno).  For a
        successful READ the kernel copies ``length`` bytes from the buffer."""
        cdef int rv
        req.io.gctl_version = G_GATE_VERSION
        req.io.gctl_unit = self.unit
        req.io.gctl_data = req.view.buf
        req.io.gctl_error = error
        rv = self._call(G_GATE_CMD_DONE, &req.io)
        if rv != 0:
            _raise(rv, self.path)
