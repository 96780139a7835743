"""cffi builder for the OS calls that differ per platform (out-of-line API mode).

FreeBSD: sysctlbyname (kern.hostuuid, kern.hostid), modfind/kldload (geom_gate.ko on demand),
setproctitle.  Linux: prctl(PR_SET_NAME) for the worker titles, gethostid.  Each platform
gets only its own declarations, so the module builds on both.
"""

import sys

from cffi import FFI

ffibuilder = FFI()

if sys.platform.startswith("freebsd"):
    ffibuilder.cdef("""
        int sysctlbyname(const char *name, void *oldp, size_t *oldlenp,
                         const void *newp, size_t newlen);
        int modfind(const char *modname);
        int kldload(const char *file);
        void setproctitle(const char *fmt, ...);
        long gethostid(void);
    """)
    ffibuilder.set_source("hast._os", """
        #include <sys/types.h>
        #include <sys/param.h>
        #include <sys/linker.h>
        #include <sys/module.h>
        #include <sys/sysctl.h>
        #include <unistd.h>
    """)
else:
    ffibuilder.cdef("""
        int prctl(int option, unsigned long arg2, unsigned long arg3,
                  unsigned long arg4, unsigned long arg5);
        long gethostid(void);
        #define PR_SET_NAME ...
    """)
    ffibuilder.set_source("hast._os", """
        #include <sys/prctl.h>
        #include <unistd.h>
    """)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
