"""nbdkit python plugin serving a file: the pure-Python reference of bench/bench_nbd.py.

What a straightforward Python NBD server costs per request, with nbdkit doing the protocol in
C: ``nbdkit -f --unix SOCK python bench/nbdkit_pyfile.py file=PATH``.  os.pread/os.pwrite on
a buffered descriptor, fdatasync for FLUSH and FUA, the parallel thread model (nbdkit's
default pool of 16 threads), so it is as concurrent as the GIL lets it be.  Run by nbdkit's
embedded interpreter (Debian's python3), never imported by py-hast.
"""

import os

import nbdkit

API_VERSION = 2

_path = None


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global _path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key}")
    _path = value


def config_complete():
    if _path is None:
        raise RuntimeError("file=PATH is required")


def open(readonly):
    return os.open(_path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)


def close(fd):
    os.close(fd)


def get_size(fd):
    return os.fstat(fd).st_size


def can_multi_conn(fd):
    return True


def can_flush(fd):
    return True


def can_fua(fd):
    return nbdkit.FUA_NATIVE


def pread(fd, buf, offset, flags):
    view = memoryview(buf)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            view[done:] = bytes(len(view) - done)
            return
        done += n


def pwrite(fd, buf, offset, flags):
    view = memoryview(buf)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(fd)


def flush(fd, flags):
    os.fdatasync(fd)
