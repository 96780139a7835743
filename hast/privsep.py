"""privsep: what a worker gives up once it holds what it needs (FreeBSD subr.c drop_privs()).

FreeBSD's hastd workers, after opening their provider, sockets and (primary) ggate device,
jail(2) themselves into the ``hast`` user's home directory (``/var/empty``; chroot(2) when
jailing fails), then setgroups/setgid/setuid to ``hast`` and, where the kernel has it, enter
Capsicum (hast-userland.md §2.11).  :func:`drop_privileges` does the same with what each OS
allows, and verifies the result as FreeBSD's PJDLOG_VERIFYs do:

* **FreeBSD**: jail(2) with hostname ``hastd: <res> (<role>)`` and no addresses, falling back
  to chroot(2) with FreeBSD's warning; setgroups/setgid/setuid.  *Untested*: py-hast's tests
  run on Linux only; the jail(2) call is plain ctypes on FreeBSD's documented ``struct jail``
  (JAIL_API_VERSION 2).  Capsicum is not entered (doc/security.md says why).
* **Linux**: chroot(2) into the home directory, setgroups/setgid/setuid (which clears every
  capability), ``prctl(PR_SET_NO_NEW_PRIVS)`` and a small seccomp filter that makes the
  system calls a storage worker never needs -- execve, ptrace, mount and the new mount API,
  module loading, kexec, bpf, namespaces, keyrings, io_uring, process_vm_* -- fail with EPERM.
  The filter is a deny list (anything else is allowed), so it cannot break the data path;
  it is installed on x86_64 and aarch64, whose system call numbers are known here.

Which user.  ``hast`` as in FreeBSD, or the name in the environment variable ``HAST_USER``
(a py-hast extension: tests use their own user, an administrator can pick another name).
A missing user is FreeBSD's error ``'hast' user doesn't exist.`` and exit 78 (EX_CONFIG) on
FreeBSD, and on Linux too when ``HAST_USER`` names it explicitly.  On Linux the default
``hast`` user does not come with any distribution, and py-hast must not create accounts
behind the administrator's back, so there a missing default user is a warning and the worker
keeps running as root -- what py-hast did before it dropped privileges at all.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import pwd
import stat
import struct
import sys
import time
from dataclasses import dataclass, field

from hast import log

HAST_USER = "hast"
USER_ENV = "HAST_USER"

IS_LINUX = sys.platform.startswith("linux")
IS_FREEBSD = sys.platform.startswith("freebsd")

# <sys/prctl.h>, <linux/seccomp.h>, <linux/filter.h>, <linux/audit.h>
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_RET_K = 0x06
_X32_SYSCALL_BIT = 0x40000000

# System calls a worker never makes, per architecture: (AUDIT_ARCH_*, seccomp(2)'s number,
# {name: number}).  Numbers from <asm/unistd_64.h> (x86_64) and <asm-generic/unistd.h>.
_DENIED_NAMES = (
    "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "mount",
    "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "unshare", "setns", "init_module", "finit_module",
    "delete_module", "kexec_load", "kexec_file_load", "bpf", "perf_event_open", "userfaultfd",
    "name_to_handle_at", "open_by_handle_at", "add_key", "request_key", "keyctl", "swapon",
    "swapoff", "reboot", "io_uring_setup", "pidfd_getfd", "process_madvise",
)
_SYSCALLS: dict[str, tuple[int, int, dict[str, int]]] = {
    "x86_64": (0xC000003E, 317, {
        "execve": 59, "execveat": 322, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "mount": 165, "umount2": 166, "pivot_root": 155,
        "chroot": 161, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "unshare": 272, "setns": 308,
        "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246,
        "kexec_file_load": 320, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "add_key": 248,
        "request_key": 249, "keyctl": 250, "swapon": 167, "swapoff": 168, "reboot": 169,
        "io_uring_setup": 425, "pidfd_getfd": 438, "process_madvise": 440,
    }),
    "aarch64": (0xC00000B7, 277, {
        "execve": 221, "execveat": 281, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "mount": 40, "umount2": 39, "pivot_root": 41,
        "chroot": 51, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "unshare": 97, "setns": 268,
        "init_module": 105, "finit_module": 273, "delete_module": 106, "kexec_load": 104,
        "kexec_file_load": 294, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "name_to_handle_at": 264, "open_by_handle_at": 265, "add_key": 217,
        "request_key": 218, "keyctl": 219, "swapon": 224, "swapoff": 225, "reboot": 142,
        "io_uring_setup": 425, "pidfd_getfd": 438, "process_madvise": 440,
    }),
}

JAIL_API_VERSION = 2


class PrivsepError(Exception):
    """Privileges could not be dropped as required; the worker exits with EX_CONFIG (78)."""


@dataclass
class Dropped:
    """What :func:`drop_privileges` did."""

    user: str
    uid: int
    gid: int
    root: str | None                 # the jail/chroot directory; None: filesystem still visible
    methods: list[str] = field(default_factory=list)   # "jail", "chroot", "setgid", ...


def configured_user() -> tuple[str, bool]:
    """(user name, asked for explicitly): ``$HAST_USER`` if set and not empty, else hast."""
    name = os.environ.get(USER_ENV, "")
    if name:
        return name, True
    return HAST_USER, False


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc: ctypes.CDLL, option: int, arg2: int = 0) -> int:
    fn = libc.prctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                   ctypes.c_ulong]
    fn.restype = ctypes.c_int
    ret = fn(option, arg2, 0, 0, 0)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def no_new_privs() -> bool:
    """Linux: whether PR_SET_NO_NEW_PRIVS is set for this thread."""
    return IS_LINUX and _prctl(_libc(), PR_GET_NO_NEW_PRIVS) == 1


# -- seccomp (Linux) -------------------------------------------------------------------------------

def seccomp_program(machine: str | None = None) -> bytes | None:
    """The classic-BPF deny-list filter for ``machine`` (default: this one), or None.

    Layout: a foreign architecture is allowed through untouched (there is none in this
    process); on x86_64 every x32 system call is denied; each denied number returns EPERM;
    everything else is allowed.
    """
    arch = _SYSCALLS.get(machine or platform.machine())
    if arch is None or struct.calcsize("P") != 8:
        return None
    audit_arch, _nr_seccomp, numbers = arch
    checks: list[tuple[int, int]] = []
    if audit_arch == 0xC000003E:
        checks.append((_BPF_JGE_K, _X32_SYSCALL_BIT))
    checks += [(_BPF_JEQ_K, numbers[name]) for name in _DENIED_NAMES]
    insns = [(_BPF_LD_W_ABS, 0, 0, 4),                 # A = seccomp_data.arch
             (_BPF_JEQ_K, 1, 0, audit_arch),
             (_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
             (_BPF_LD_W_ABS, 0, 0, 0)]                 # A = seccomp_data.nr
    n = len(checks)
    for i, (code, value) in enumerate(checks):
        insns.append((code, n - i, 0, value))          # match: jump to the final EPERM
    insns.append((_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    insns.append((_BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM))
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp(libc: ctypes.CDLL | None = None) -> bool:
    """Install :func:`seccomp_program` on every thread (TSYNC); False where there is none.

    Needs no_new_privs (or CAP_SYS_ADMIN).  Raises OSError when the kernel refuses it.
    """
    prog = seccomp_program()
    if prog is None:
        return False
    libc = libc or _libc()
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    nr_seccomp = _SYSCALLS[platform.machine()][1]
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(ctypes.c_long(nr_seccomp), ctypes.c_ulong(SECCOMP_SET_MODE_FILTER),
                       ctypes.c_ulong(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(fprog))
    if ret == 0:
        return True
    err = ctypes.get_errno() if ret < 0 else errno.EBUSY   # > 0: a thread could not sync
    if ret < 0 and err == errno.ENOSYS:
        fn = libc.prctl
        fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                       ctypes.c_ulong]
        if fn(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) == 0:
            return True
        err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


# -- jail(2) (FreeBSD, untested) -----------------------------------------------------------

class _Jail(ctypes.Structure):
    # <sys/jail.h> struct jail, JAIL_API_VERSION 2
    _fields_ = [("version", ctypes.c_uint32), ("path", ctypes.c_char_p),
                ("hostname", ctypes.c_char_p), ("jailname", ctypes.c_char_p),
                ("ip4s", ctypes.c_uint32), ("ip6s", ctypes.c_uint32),
                ("ip4", ctypes.c_void_p), ("ip6", ctypes.c_void_p)]


def _jail(libc: ctypes.CDLL, path: str, hostname: str) -> None:
    """jail(2) into ``path`` with no addresses (UNTESTED: FreeBSD only)."""
    js = _Jail(JAIL_API_VERSION, os.fsencode(path), hostname.encode(), None, 0, 0, None, None)
    libc.jail.argtypes = [ctypes.POINTER(_Jail)]
    libc.jail.restype = ctypes.c_int
    if libc.jail(ctypes.byref(js)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# -- direct I/O that needs the filesystem --------------------------------------------------

def needs_proc_reopen(fd: int) -> bool:
    """Whether hast._io would have to reopen ``fd`` through /proc/self/fd (Linux).

    hast._io serves a request that an O_DIRECT regular file refuses (EINVAL for an offset or
    length below the filesystem's direct-I/O alignment) through a buffered descriptor opened
    from /proc/self/fd/<fd>.  Neither a chroot (no /proc) nor another uid (no permission on
    the provider) allows that open, so such a worker keeps its privileges.  A provider's
    requests are multiples of 512 bytes (regular file) or of its logical sector size (disk,
    where O_DIRECT always takes them): only a regular file whose direct I/O needs more than
    512-byte alignment is affected, and that is what a 512-byte direct read tells.
    """
    if not IS_LINUX:
        return False
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or not flags & getattr(os, "O_DIRECT", 0):
        return False
    if flags & os.O_ACCMODE == os.O_WRONLY:
        return True  # cannot probe with a read; assume the worst
    page = mmap.mmap(-1, mmap.PAGESIZE)     # page aligned: only offset and length matter
    view = memoryview(page)
    try:
        os.preadv(fd, [view[:512]], 0)
    except OSError as exc:
        return exc.errno == errno.EINVAL
    finally:
        view.release()
        page.close()
    return False


def proc_reopen_fds() -> list[int]:
    """Descriptors of this process for which :func:`needs_proc_reopen` is true."""
    if not IS_LINUX:
        return []
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return []
    return [fd for fd in fds if needs_proc_reopen(fd)]


# -- the drop ----------------------------------------------------------------------------------

def drop_privileges(user: str | None = None, chroot_dir: str | None = None, *,
                    required: bool | None = None, seccomp: bool = True,
                    hostname: str = "hastd") -> Dropped | None:
    """Become ``user`` (default: :func:`configured_user`) confined to ``chroot_dir``.

    ``chroot_dir`` None means the user's home directory (FreeBSD), "" means no chroot.
    ``required`` (default: on FreeBSD, or when ``$HAST_USER`` is set) turns a missing user
    into FreeBSD's error; otherwise it is a warning and nothing is dropped.  Returns what was
    done, or None when nothing was (not root, user missing and not required, user is root).
    Raises PrivsepError after logging FreeBSD's message when a required step fails.
    """
    explicit = user is not None
    if user is None:
        user, explicit = configured_user()
    if required is None:
        required = IS_FREEBSD or explicit
    if os.geteuid() != 0:
        log.debug(1, "Not running as root, no privileges to drop.")
        return None
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        if required:
            log.error(f"'{user}' user doesn't exist.")
            raise PrivsepError(f"'{user}' user doesn't exist") from None
        log.warning(f"'{user}' user doesn't exist.")
        log.warning("Privileges not dropped, running as root (see doc/security.md).")
        return None
    if pw.pw_uid == 0:
        log.debug(1, f"User '{user}' is root, no privileges to drop.")
        return None
    root = pw.pw_dir if chroot_dir is None else chroot_dir
    libc = _libc()
    done = Dropped(user, pw.pw_uid, pw.pw_gid, None)
    # What the C library loads from the filesystem on first use must be loaded now.
    time.localtime()
    if root:
        jailed = False
        if IS_FREEBSD:
            try:
                _jail(libc, root, hostname)
                jailed = True
                done.methods.append("jail")
            except (OSError, AttributeError) as exc:
                log.warning(f"Unable to jail to directory to {root}", log.exc_errno(exc))
        if not jailed:
            try:
                os.chroot(root)
            except OSError as exc:
                if IS_FREEBSD:
                    log.error(f"Unable to change root directory to {root}", log.exc_errno(exc))
                    raise PrivsepError(f"chroot {root}") from None
                # Linux: the home directory of a system user is often /nonexistent.
                log.warning(f"Unable to change root directory to {root}", log.exc_errno(exc))
            else:
                done.methods.append("chroot")
        if done.methods:
            done.root = root
            os.chdir("/")
    for what, call, arg in (("groups", os.setgroups, [pw.pw_gid]),
                            ("gid", os.setgid, pw.pw_gid), ("uid", os.setuid, pw.pw_uid)):
        try:
            call(arg)
        except OSError as exc:
            log.error(f"Unable to set {what} to {'gid ' if what == 'groups' else ''}"
                      f"{pw.pw_gid if what != 'uid' else pw.pw_uid}", log.exc_errno(exc))
            raise PrivsepError(f"set{what}") from None
    done.methods += ["setgid", "setuid"]
    if IS_LINUX:
        try:
            _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
            done.methods.append("no_new_privs")
        except OSError as exc:
            log.warning("Unable to set no_new_privs", log.exc_errno(exc))
        if seccomp and "no_new_privs" in done.methods:
            try:
                if install_seccomp(libc):
                    done.methods.append("seccomp")
            except OSError as exc:
                log.warning("Unable to install the seccomp filter", log.exc_errno(exc))
    # Better be sure that everything succeeded (FreeBSD's PJDLOG_VERIFYs).
    if (os.getresuid() != (pw.pw_uid,) * 3 or os.getresgid() != (pw.pw_gid,) * 3
            or os.getgroups() != [pw.pw_gid]):
        log.error("Privileges were not dropped as requested.")
        raise PrivsepError("verification failed")
    log.debug(1, f"Privileges successfully dropped using {'+'.join(done.methods)}.")
    return done
