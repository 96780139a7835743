"""Running a target on inputs: rejection vs finding, time and memory bounds, finding records.

Used by ``fuzz/run.py`` (atheris or hypothesis, millions of inputs) and by
``tests/test_fuzz.py`` (the CI subset).  One rule decides: an exception listed in the
target's ``EXPECTED`` is a rejection, anything else escaping ``one_input`` -- including
:class:`fuzz.common.Finding`, MemoryError under the address-space limit and :class:`Hang`
from the per-input timer -- is a finding.  Findings are de-duplicated by a signature (the
exception type and the innermost frames in hast/ or fuzz/) and saved as
``<dir>/<target>/<sha1 of input>.bin`` with a ``.txt`` traceback next to it.
"""

from __future__ import annotations

import faulthandler
import hashlib
import os
import re
import resource
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from fuzz.common import FUZZ_DIR

FINDINGS = FUZZ_DIR / "findings"


class Hang(Exception):
    """One input took longer than the per-input time bound."""


@dataclass
class FindingRecord:
    target: str
    signature: str
    text: str
    data: bytes
    count: int = 1

    def save(self, directory: Path) -> Path:
        out = directory / self.target
        out.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(self.data).hexdigest()
        path = out / f"{digest}.bin"
        path.write_bytes(self.data)
        (out / f"{digest}.txt").write_text(f"{self.signature}\n\n{self.text}",
                                           errors="backslashreplace")
        return path


@dataclass
class Stats:
    target: str
    inputs: int = 0
    rejected: int = 0
    findings: dict[str, FindingRecord] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, object]:
        return {
            "target": self.target, "inputs": self.inputs, "rejected": self.rejected,
            "seconds": round(self.seconds, 1),
            "findings": [{"signature": f.signature, "count": f.count,
                          "input": hashlib.sha1(f.data).hexdigest()}
                         for f in self.findings.values()],
        }


def signature(exc: BaseException) -> str:
    """Exception type plus the innermost frames of our code: equal bugs, equal signatures."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/hast/" in f.filename or "/fuzz/" in f.filename]
    where = ", ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:])
    if type(exc).__name__ == "Finding":
        # The raise site names the invariant; the text without its values describes it.
        title = re.sub(r"b?'[^']*'|b?\"[^\"]*\"|\d+", "_", str(exc))[:70]
        return f"Finding at {where}: {title}"
    return f"{type(exc).__name__} at {where}"


def set_memory_limit(headroom_mb: int) -> int:
    """Cap the address space at what the process maps now plus ``headroom_mb``.

    A parser that allocates what a length field declares, before checking it against a
    bound, then fails with MemoryError -- a finding -- instead of going unnoticed.  Returns
    the limit in bytes (0 when /proc is unavailable and no limit was set).
    """
    try:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        return 0
    limit = vm + headroom_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


class Runner:
    """Feeds inputs to one target; owns the per-input timer and the hang watchdog."""

    def __init__(self, name: str, target: ModuleType, timeout: float = 10.0,
                 findings_dir: Path | None = FINDINGS, check_every: int = 200,
                 verbose: bool = True) -> None:
        self.name = name
        self.target = target
        self.expected: tuple[type[BaseException], ...] = getattr(target, "EXPECTED", ())
        self.timeout = timeout
        self.findings_dir = findings_dir
        self.check_every = check_every
        self.verbose = verbose
        self.stats = Stats(name)
        self._current: bytes | None = None
        self._started = 0.0
        self._t0 = time.monotonic()
        self._watchdog: threading.Thread | None = None
        self._last = b""     # the previous input: blamed for what a periodic check finds

    # -- bounds -------------------------------------------------------------------------------

    def _alarm(self, _signo: int, _frame: object) -> None:
        raise Hang(f"input still running after {self.timeout:g} s")

    def start_watchdog(self) -> None:
        """Last resort for a hang the timer cannot interrupt (C code holding the GIL or a
        lock): save the input and the stacks, then end the process with status 3."""
        def watch() -> None:
            while True:
                time.sleep(self.timeout)
                current, started = self._current, self._started
                if current is not None and time.monotonic() - started > 5 * self.timeout:
                    rec = FindingRecord(self.name, "Hang (process killed by the watchdog)",
                                        "", current)
                    if self.findings_dir is not None:
                        path = rec.save(self.findings_dir)
                        with open(path.with_suffix(".txt"), "a") as f:
                            faulthandler.dump_traceback(f, all_threads=True)
                    sys.stderr.write(f"fuzz[{self.name}]: hang, input saved\n")
                    os._exit(3)

        self._watchdog = threading.Thread(target=watch, name="fuzz-watchdog", daemon=True)
        self._watchdog.start()

    # -- one input --------------------------------------------------------------------------

    def execute(self, data: bytes) -> None:
        """Run one input; raises whatever is a finding, returns on success or rejection."""
        self._current, self._started = data, time.monotonic()
        in_main = threading.current_thread() is threading.main_thread()
        if in_main and self.timeout:
            old = signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
        try:
            self.target.one_input(data)
        except self.expected:
            self.stats.rejected += 1
        finally:
            if in_main and self.timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
                # None: the previous handler was not Python's (libFuzzer's own timer).
                signal.signal(signal.SIGALRM, old if old is not None else signal.SIG_DFL)
            self._current = None
            self.stats.inputs += 1

    def record(self, exc: BaseException, data: bytes) -> FindingRecord:
        sig = signature(exc)
        rec = self.stats.findings.get(sig)
        if rec is not None:
            rec.count += 1
            if len(data) < len(rec.data):       # keep the smallest reproducer
                rec.data = data
                if self.findings_dir is not None:
                    rec.save(self.findings_dir)
            return rec
        text = "".join(traceback.format_exception(exc))
        rec = FindingRecord(self.name, sig, text, data)
        self.stats.findings[sig] = rec
        if self.findings_dir is not None:
            path = rec.save(self.findings_dir)
            where = f" -> {path}"
        else:
            where = ""
        if self.verbose:
            sys.stderr.write(f"fuzz[{self.name}]: FINDING {sig}{where}\n")
        return rec

    def feed(self, data: bytes) -> None:
        """execute() that records findings instead of raising them (the long runs)."""
        try:
            self.execute(data)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            # A Finding may name an earlier input as the culprit (a daemon found dead).
            culprit = getattr(exc, "data", None)
            self.record(exc, culprit if culprit is not None else data)
            self._last = data
        else:
            self._last = data
        if self.check_every and self.stats.inputs % self.check_every == 0:
            self.check()

    def check(self) -> None:
        check = getattr(self.target, "check", None)
        if check is None:
            return
        try:
            check()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            culprit = getattr(exc, "data", None)
            self.record(exc, culprit if culprit is not None else self._last)

    def finish(self) -> Stats:
        self.check()
        self.stats.seconds = time.monotonic() - self._t0
        return self.stats
