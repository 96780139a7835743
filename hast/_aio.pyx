# cython: language_level=3
"""Linux native AIO (io_setup/io_submit/io_getevents) for O_DIRECT provider I/O.

A provider opened with O_DIRECT blocks each pread/pwrite for the device's latency, so a
synchronous design needs one thread per request in flight and pays a thread hand-off (a
futex wake-up, a context switch and a GIL transfer) per request.  With native AIO the thread
that has a request submits it without blocking, and one reaper thread collects completions
in batches: at queue depth N one wake-up serves many requests.

Ring.submit() takes an opaque token (the caller's request object) and a buffer, which stays
referenced until the completion is reaped; Ring.reap() returns [(token, result)], result
being the byte count or -errno, as io_getevents reports it.  submit() refuses (returns False)
what O_DIRECT would refuse -- a buffer, offset or length not aligned to ``align`` -- so the
caller falls back to its synchronous path.  Ring.wake() makes a waiting reap() return at once
(a reaper that has to stop need not wait out its timeout).  Raw syscalls, no libaio.
Elsewhere than Linux AVAILABLE is False and Ring() raises OSError(ENOSYS).
"""

import errno as _errno
import os

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from posix.unistd cimport close as c_close

cdef extern from *:
    """
    #ifdef __linux__
    #include <linux/aio_abi.h>
    #include <poll.h>
    #include <sys/eventfd.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    #include <errno.h>
    #include <time.h>
    #define HAST_AIO 1
    static long hast_io_setup(unsigned nr, uint64_t *ctx) {
        aio_context_t c = 0;
        long r = syscall(__NR_io_setup, nr, &c);
        *ctx = (uint64_t)c;
        return r < 0 ? -errno : r;
    }
    static long hast_io_destroy(uint64_t ctx) {
        long r = syscall(__NR_io_destroy, (aio_context_t)ctx);
        return r < 0 ? -errno : r;
    }
    static long hast_io_submit1(uint64_t ctx, uint64_t data, int opcode, int fd, void *buf,
                                uint64_t nbytes, int64_t offset) {
        struct iocb cb;
        struct iocb *cbs[1];
        long r;
        memset(&cb, 0, sizeof cb);
        cb.aio_data = data;
        cb.aio_lio_opcode = (uint16_t)opcode;
        cb.aio_fildes = (uint32_t)fd;
        cb.aio_buf = (uint64_t)(uintptr_t)buf;
        cb.aio_nbytes = nbytes;
        cb.aio_offset = offset;
        cbs[0] = &cb;
        do {
            r = syscall(__NR_io_submit, (aio_context_t)ctx, 1L, cbs);
        } while (r < 0 && errno == EINTR);
        return r < 0 ? -errno : r;
    }
    /* Submit n prepared requests with one io_submit; returns how many the kernel took. */
    static long hast_io_submitn(uint64_t ctx, long n, const uint64_t *data, const int *opcode,
                                const int *fd, void * const *buf, const uint64_t *nbytes,
                                const int64_t *offset, struct iocb *cbs, struct iocb **ptrs) {
        long i, r, done = 0;
        for (i = 0; i < n; i++) {
            memset(&cbs[i], 0, sizeof cbs[i]);
            cbs[i].aio_data = data[i];
            cbs[i].aio_lio_opcode = (uint16_t)opcode[i];
            cbs[i].aio_fildes = (uint32_t)fd[i];
            cbs[i].aio_buf = (uint64_t)(uintptr_t)buf[i];
            cbs[i].aio_nbytes = nbytes[i];
            cbs[i].aio_offset = offset[i];
            ptrs[i] = &cbs[i];
        }
        while (done < n) {
            r = syscall(__NR_io_submit, (aio_context_t)ctx, n - done, ptrs + done);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) return done ? done : (r < 0 ? -errno : 0);
            done += r;
        }
        return done;
    }
    typedef struct { uint64_t data; int64_t res; } hast_aio_event;
    static long hast_io_getevents(uint64_t ctx, long min_nr, long nr, hast_aio_event *out,
                                  long timeout_ns) {
        struct io_event ev[64];
        struct timespec ts;
        long r, i;
        if (nr > 64) nr = 64;
        ts.tv_sec = timeout_ns / 1000000000L;
        ts.tv_nsec = timeout_ns % 1000000000L;
        r = syscall(__NR_io_getevents, (aio_context_t)ctx, min_nr, nr, ev,
                    timeout_ns < 0 ? NULL : &ts);
        if (r < 0) return -errno;
        for (i = 0; i < r; i++) {
            out[i].data = ev[i].data;
            out[i].res = ev[i].res;
        }
        return r;
    }
    /* An eventfd that stays readable (its counter is never read), for Ring.wake(). */
    static int hast_wake_fd(void) {
        int fd = eventfd(1, EFD_CLOEXEC);
        return fd < 0 ? -errno : fd;
    }
    /* One IOCB_CMD_POLL (Linux >= 4.18) for POLLIN on that eventfd: it completes at once. */
    static long hast_io_wake(uint64_t ctx, uint64_t data, int fd) {
        return hast_io_submit1(ctx, data, 5 /* IOCB_CMD_POLL */, fd, (void *)(uintptr_t)POLLIN,
                               0, 0);
    }
    #define HAST_IOCB_PREAD IOCB_CMD_PREAD
    #define HAST_IOCB_PWRITE IOCB_CMD_PWRITE
    #define HAST_IOCB_SIZE sizeof(struct iocb)
    #else
    #include <stdint.h>
    #include <errno.h>
    #define HAST_AIO 0
    typedef struct { uint64_t data; int64_t res; } hast_aio_event;
    static long hast_io_setup(unsigned nr, uint64_t *ctx) { *ctx = 0; return -ENOSYS; }
    static long hast_io_destroy(uint64_t ctx) { return -ENOSYS; }
    static long hast_io_submit1(uint64_t ctx, uint64_t data, int opcode, int fd, void *buf,
                                uint64_t nbytes, int64_t offset) { return -ENOSYS; }
    static long hast_io_getevents(uint64_t ctx, long min_nr, long nr, hast_aio_event *out,
                                  long timeout_ns) { return -ENOSYS; }
    static int hast_wake_fd(void) { return -ENOSYS; }
    static long hast_io_wake(uint64_t ctx, uint64_t data, int fd) { return -ENOSYS; }
    struct iocb { int unused; };
    static long hast_io_submitn(uint64_t ctx, long n, const uint64_t *data, const int *opcode,
                                const int *fd, void * const *buf, const uint64_t *nbytes,
                                const int64_t *offset, struct iocb *cbs, struct iocb **ptrs) {
        return -ENOSYS;
    }
    #define HAST_IOCB_SIZE sizeof(struct iocb)
    #define HAST_IOCB_PREAD 0
    #define HAST_IOCB_PWRITE 1
    #endif
    """
    int HAST_AIO
    int HAST_IOCB_PREAD
    int HAST_IOCB_PWRITE
    size_t HAST_IOCB_SIZE
    struct iocb:
        pass
    long hast_io_submitn(uint64_t ctx, long n, const uint64_t *data, const int *opcode,
                         const int *fd, void * const *buf, const uint64_t *nbytes,
                         const int64_t *offset, iocb *cbs, iocb **ptrs) nogil
    ctypedef struct hast_aio_event:
        uint64_t data
        int64_t res
    long hast_io_setup(unsigned nr, uint64_t *ctx) nogil
    long hast_io_destroy(uint64_t ctx) nogil
    long hast_io_submit1(uint64_t ctx, uint64_t data, int opcode, int fd, void *buf,
                         uint64_t nbytes, int64_t offset) nogil
    long hast_io_getevents(uint64_t ctx, long min_nr, long nr, hast_aio_event *out,
                           long timeout_ns) nogil
    int hast_wake_fd() nogil
    long hast_io_wake(uint64_t ctx, uint64_t data, int fd) nogil

AVAILABLE = bool(HAST_AIO)
READ = HAST_IOCB_PREAD
WRITE = HAST_IOCB_PWRITE


cdef class Ring:
    """One AIO context: submit from any thread, reap from one."""

    def __cinit__(self, int depth=256):
        cdef long r
        self.ctx = 0
        self._closed = True
        self._inflight = {}
        self._next_id = 1       # 0 is Ring.wake()'s, which reap() never reports
        self._wakefd = -1
        self.depth = depth
        r = hast_io_setup(depth, &self.ctx)
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        self._closed = False

    def __dealloc__(self):
        if not self._closed:
            hast_io_destroy(self.ctx)
        if self._wakefd >= 0:
            c_close(self._wakefd)

    def __len__(self):
        """Requests submitted and not reaped yet."""
        return len(self._inflight)

    def submit(self, token, int opcode, int fd, buf, int64_t offset, int align=512):
        """Start one READ (into buf) or WRITE (of buf) at offset; False if not aligned.

        Raises OSError when the kernel refuses the request (EAGAIN: the ring is full).
        """
        cdef Py_buffer view
        cdef object keep = memoryview(buf)
        cdef uint64_t rid
        cdef long r
        cdef char *ptr
        cdef Py_ssize_t n
        if self._closed:
            raise OSError(_errno.EBADF, "AIO ring closed")
        PyObject_GetBuffer(keep, &view, PyBUF_WRITABLE if opcode == HAST_IOCB_PREAD
                           else PyBUF_SIMPLE)
        ptr = <char *>view.buf
        n = view.len
        PyBuffer_Release(&view)     # `keep` holds the export until the completion is reaped
        if align > 1 and ((<uint64_t><size_t>ptr | <uint64_t>n | <uint64_t>offset)
                          & <uint64_t>(align - 1)):
            return False
        rid = self._next_id
        self._next_id += 1
        self._inflight[rid] = (token, keep)
        with nogil:
            r = hast_io_submit1(self.ctx, rid, opcode, fd, ptr, <uint64_t>n, offset)
        if r != 1:
            del self._inflight[rid]
            err = -r if r < 0 else _errno.EAGAIN
            raise OSError(err, os.strerror(err))
        return True

    def submit_many(self, list ops, int align=512):
        """Start several (token, opcode, fd, buf, offset) with one io_submit.

        Returns the tokens not started -- refused for alignment, or left over when the
        kernel took only part of the batch -- for the caller's synchronous path.
        """
        cdef Py_ssize_t n = len(ops), i, k = 0
        cdef long r
        cdef Py_buffer view
        cdef uint64_t *data = NULL
        cdef int *opcode = NULL
        cdef int *fds = NULL
        cdef void **bufs = NULL
        cdef uint64_t *nbytes = NULL
        cdef int64_t *offsets = NULL
        cdef iocb *cbs = NULL
        cdef iocb **ptrs = NULL
        cdef list refused = []
        cdef list taken = []
        cdef uint64_t rid
        cdef int64_t off
        cdef int op
        if self._closed:
            raise OSError(_errno.EBADF, "AIO ring closed")
        if n == 0:
            return refused
        data = <uint64_t *>malloc(n * sizeof(uint64_t))
        opcode = <int *>malloc(n * sizeof(int))
        fds = <int *>malloc(n * sizeof(int))
        bufs = <void **>malloc(n * sizeof(void *))
        nbytes = <uint64_t *>malloc(n * sizeof(uint64_t))
        offsets = <int64_t *>malloc(n * sizeof(int64_t))
        cbs = <iocb *>malloc(n * HAST_IOCB_SIZE)
        ptrs = <iocb **>malloc(n * sizeof(iocb *))
        try:
            if (data == NULL or opcode == NULL or fds == NULL or bufs == NULL
                    or nbytes == NULL or offsets == NULL or cbs == NULL or ptrs == NULL):
                raise MemoryError()
            for i in range(n):
                token, op, fd, buf, off = ops[i]
                keep = memoryview(buf)
                PyObject_GetBuffer(keep, &view, PyBUF_WRITABLE if op == HAST_IOCB_PREAD
                                   else PyBUF_SIMPLE)
                bufs[k] = view.buf
                nbytes[k] = <uint64_t>view.len
                PyBuffer_Release(&view)
                if align > 1 and ((<uint64_t><size_t>bufs[k] | nbytes[k] | <uint64_t>off)
                                  & <uint64_t>(align - 1)):
                    refused.append(token)
                    continue
                rid = self._next_id
                self._next_id += 1
                self._inflight[rid] = (token, keep)
                data[k] = rid
                opcode[k] = op
                fds[k] = fd
                offsets[k] = off
                taken.append(rid)
                k += 1
            with nogil:
                r = hast_io_submitn(self.ctx, k, data, opcode, fds, bufs, nbytes, offsets,
                                    cbs, ptrs)
            if r < 0:
                r = 0
            for i in range(r, k):
                refused.append(self._inflight.pop(taken[i])[0])
            return refused
        finally:
            free(data)
            free(opcode)
            free(fds)
            free(bufs)
            free(nbytes)
            free(offsets)
            free(cbs)
            free(ptrs)

    def reap(self, int min_nr=1, double timeout=1.0):
        """Completions [(token, result)]: at least min_nr unless timeout (s) passes first.

        result is the byte count transferred or -errno.  A negative timeout waits forever.
        """
        cdef hast_aio_event events[64]
        cdef long r, i
        cdef long ns = -1 if timeout < 0 else <long>(timeout * 1e9)
        cdef list out = []
        if self._closed:
            raise OSError(_errno.EBADF, "AIO ring closed")
        with nogil:
            r = hast_io_getevents(self.ctx, min_nr, 64, events, ns)
        if r == -_errno.EINTR:
            return out
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        for i in range(r):
            entry = self._inflight.pop(events[i].data, None)
            if entry is not None:
                out.append((entry[0], events[i].res))
        return out

    def wake(self):
        """Make the reap() that waits now, or else the next one, return at once.

        No request of the caller completes: reap() returns what else has completed, maybe
        nothing.  For the thread that stops the reaper; costs nothing until called (one
        eventfd, made on the first call, and one io_submit per call).  False where the
        kernel cannot poll through AIO (Linux < 4.18): reap() then waits out its timeout.
        """
        cdef long r
        cdef int fd
        if self._closed:
            return False
        if self._wakefd < 0:
            fd = hast_wake_fd()
            if fd < 0:
                return False
            self._wakefd = fd
        with nogil:
            r = hast_io_wake(self.ctx, 0, self._wakefd)
        return r == 1

    def close(self):
        """Destroy the context (waits for what is in flight, as io_destroy does)."""
        if not self._closed:
            self._closed = True
            with nogil:
                hast_io_destroy(self.ctx)
            self._inflight.clear()
        if self._wakefd >= 0:
            c_close(self._wakefd)
            self._wakefd = -1
