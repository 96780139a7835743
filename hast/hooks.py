"""hooks: running a resource's ``exec`` program for an event (FreeBSD sbin/hastd/hooks.c).

hastd's main process runs the hook for every event, its own ``role`` changes and the events its
workers report.  HA scripts (CARP/devd failover, monitoring) are written against FreeBSD's
contract, so it is reproduced exactly (hast-userland.md §4.1):

* ``argv = [basename(path), <event>, <resource>, ...]`` executed with execv(path): no shell, no
  PATH search, no word splitting -- a resource name or path full of shell metacharacters is
  passed as one literal argument and cannot inject commands.
* The hook runs asynchronously; nothing waits for it, several may run at once.  The caller (the
  daemon's loop) reaps children on SIGCHLD and hands every pid that is not a worker to
  :func:`reap`, and calls :func:`check` on its 5-second tick, which warns about hooks running
  for 60 s or more (again every 60 s) and about hooks that vanished unreaped.  There is no
  timeout and no kill, as in FreeBSD.
* In the child every descriptor above 2 is closed; without ``-F`` stdin/stdout/stderr are
  ``/dev/null``, with ``-F`` the hook shares hastd's terminal.  The signal mask is cleared.
  The environment and working directory are hastd's.
* A failed exec is reported by the child itself (``Unable to execute <path>: <strerror>.``)
  before it exits with 70, which the parent then logs as an ungraceful exit -- that is why the
  child is made with a plain fork() and not with subprocess/posix_spawn, which would turn the
  exec failure into an exception in the parent.  fork() is safe here: hastd's main process has
  no threads (hast.daemon keeps it that way).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

from hast import log
from hast.sysexits import EX_SOFTWARE

# hooks.c: report hooks running for too long at most this often (seconds).
REPORT_INTERVAL = 60
# hp_comm is a PATH_MAX buffer; a command line that does not fit is refused.
_PATH_MAX = 1024


@dataclass
class HookProc:
    """One running hook: what FreeBSD keeps in struct hookproc."""

    pid: int
    comm: str           # full path and the arguments, space separated: the cmd=[...] text
    birthtime: float    # time.monotonic() at start
    lastreport: float


_procs: dict[int, HookProc] = {}
_foreground = False


def init(foreground: bool) -> None:
    """Say whether hooks share hastd's terminal (``-F``) or get /dev/null as stdio."""
    global _foreground
    _foreground = foreground


def running() -> list[HookProc]:
    """Hooks started and not yet reaped, oldest first."""
    return list(_procs.values())


def run(path: str, *args: str) -> int | None:
    """hook_exec(): start ``path`` with ``args`` in the background; the child's pid or None.

    An empty ``path`` means no hook is configured.  Never blocks on the child.
    """
    if not path:
        return None
    comm = " ".join((path, *args))
    # FreeBSD's test is strlen(hp_comm) >= PATH_MAX - 1 on the truncated copy.
    if len(comm.encode("utf-8", "surrogateescape")) >= _PATH_MAX - 1:
        log.error("Exec path too long, correct configuration file.")
        return None
    argv = [os.path.basename(path), *args]
    log.debug(1, f"Executing hook: {comm}")
    try:
        pid = os.fork()
    except OSError as exc:
        log.error(f"Unable to fork to execute {path}", log.exc_errno(exc))
        return None
    if pid == 0:
        _child(path, argv)  # never returns
    now = time.monotonic()
    _procs[pid] = HookProc(pid, comm, now, now)
    return pid


def _child(path: str, argv: list[str]) -> None:
    """The forked child: set up descriptors and signals, then execv; exit 70 if that fails."""
    try:
        try:
            try:
                # The parent's wakeup descriptor must not be written from here; Python's
                # ignored SIGPIPE/SIGXFSZ would survive execv, so restore the defaults.
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                    signal.signal(sig, signal.SIG_DFL)
            except ValueError:
                pass  # forked from a thread other than the main one: nothing was set up
            _descriptors()
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.execv(path, argv)
        except OSError as exc:
            log.error(f"Unable to execute {path}", log.exc_errno(exc))
    finally:
        os._exit(EX_SOFTWARE)


def _descriptors() -> None:
    maxfd = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536
    if _foreground:
        os.closerange(3, maxfd)
        return
    os.closerange(0, maxfd)
    # open() returns the lowest free descriptor: 0, then 1; 2 is a dup of 1.  Python opens
    # everything close-on-exec, so the three must be made inheritable explicitly.
    fd = os.open(os.devnull, os.O_RDONLY)
    if fd != 0:
        os.dup2(fd, 0)
    os.set_inheritable(0, True)
    fd = os.open(os.devnull, os.O_WRONLY)
    if fd != 1:
        os.dup2(fd, 1)
    os.set_inheritable(1, True)
    os.dup2(1, 2)


def exit_text(pid: int, status: int, comm: str) -> tuple[bool, str]:
    """(graceful, message) for a hook's wait status, as hook_check_one() words it.

    A graceful exit is logged at debug level 1, anything else as an error.
    """
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return True, f"Hook exited gracefully (pid={pid}, cmd=[{comm}])."
    if os.WIFSIGNALED(status):
        return False, f"Hook was killed (pid={pid}, signal={os.WTERMSIG(status)}, cmd=[{comm}])."
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    return False, f"Hook exited ungracefully (pid={pid}, exitcode={code}, cmd=[{comm}])."


def reap(pid: int, status: int) -> bool:
    """hook_check_one(): log the end of a child the caller already waited for.

    Returns False (after a debug line, as FreeBSD) when ``pid`` is not one of our hooks.
    """
    hp = _procs.pop(pid, None)
    if hp is None:
        log.debug(1, f"Unknown process pid={pid}")
        return False
    graceful, text = exit_text(pid, status, hp.comm)
    if graceful:
        log.debug(1, text)
    else:
        log.error(text)
    return True


def collect() -> int:
    """Wait (without blocking) for our own hooks only; for callers that do not reap with -1.

    Returns how many hooks finished.
    """
    done = 0
    for pid in list(_procs):
        try:
            wpid, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue  # somebody else reaped it; check() will report it as disappeared
        if wpid == pid:
            reap(pid, status)
            done += 1
    return done


def check(now: float | None = None) -> None:
    """hook_check(): warn about hooks running for too long or gone without being reaped."""
    log.debug(2, "Checking hooks.")
    if now is None:
        now = time.monotonic()
    for hp in list(_procs.values()):
        try:
            os.kill(hp.pid, 0)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                log.warning(f"Hook disappeared (pid={hp.pid}, cmd=[{hp.comm}]).")
                del _procs[hp.pid]
                continue
        if now - hp.lastreport < REPORT_INTERVAL:
            continue
        log.warning(f"Hook is running for {int(now - hp.birthtime)} seconds "
                    f"(pid={hp.pid}, cmd=[{hp.comm}]).")
        hp.lastreport = now


def fini() -> None:
    """Forget every tracked hook (they keep running; nobody will report them)."""
    _procs.clear()
