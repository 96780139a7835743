"""The CI subset of fuzz/ (issue 6 item 2): a few thousand inputs per target, deterministic.

For every target of fuzz/targets, two runs with fixed seeds, so CI sees the same inputs on
every machine and a failure reproduces:

* ``test_mutated``: every seed of fuzz/corpus/<target>/, then fuzz/mutate.py's byte
  mutations of them (random.Random(0)) -- thousands of inputs in seconds;
* ``test_structured``: the target's structure-aware hypothesis strategy (frames built from
  hastd's own fields, NBD sessions, hast.conf token soup), ``derandomize=True``, shrinking
  on, so a finding is reported minimal.

A finding fails the test with its traceback and the input (hex).  Findings already reported
to the owner of a module that is not fixed yet are listed in ``KNOWN_OPEN``; each has a
strict-xfail regression test in tests/test_fuzz_regressions.py, which starts failing the day
the fix lands -- then remove the xfail and the entry here.  The whole file runs in about a
minute; ``make fuzz`` (fuzz/run.py, atheris) runs a million inputs per target.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from fuzz import engine, mutate
from fuzz.common import quiet_logs
from fuzz.strategies import from_seeds
from fuzz.targets import TARGETS, load

# (mutated inputs, hypothesis examples) per target: about a minute in all.
BUDGET: dict[str, tuple[int, int]] = {
    "nv": (5000, 300), "frame": (4000, 200), "wire": (5000, 300), "pipeline": (5000, 300),
    "lzf": (5000, 300), "config": (5000, 300), "metadata": (5000, 300),
    "control": (4000, 200), "handshake": (3000, 150), "secondary": (3000, 150),
    "replies": (2500, 150), "nbd": (3000, 150),
}
MAX_ALLOC_MB = 2048     # what one input may map beyond the process's size before the runs
INPUT_TIMEOUT = 20.0
# Wall-clock cap per test: a target that got slow (a server that takes a second per
# session) runs fewer inputs instead of holding CI for an hour; the count is printed.
TIME_CAP = 12.0


KNOWN_OPEN: dict[str, Callable[[BaseException], bool]] = {}


def _known(exc: BaseException) -> str | None:
    for name, matches in KNOWN_OPEN.items():
        if matches(exc):
            return name
    return None


@contextlib.contextmanager
def _memory_limit(headroom_mb: int) -> Iterator[None]:
    """Lower the soft RLIMIT_AS for the duration (the hard limit stays, so it can be
    restored): a parser that allocates a declared size before checking it gets
    MemoryError, a finding, instead of quietly succeeding on a big machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        yield
        return
    limit = vm + headroom_mb * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def _target(name: str) -> Iterator[tuple[ModuleType, engine.Runner]]:
    restore_logs = quiet_logs()
    target = load(name)
    setup = getattr(target, "setup", None)
    if setup is not None:
        setup()
    runner = engine.Runner(name, target, timeout=INPUT_TIMEOUT, findings_dir=None,
                           verbose=False)
    try:
        with _memory_limit(MAX_ALLOC_MB):
            yield target, runner
    finally:
        teardown = getattr(target, "teardown", None)
        if teardown is not None:
            teardown()
        restore_logs()


def _report(name: str, runner: engine.Runner) -> str:
    lines = [f"{len(runner.stats.findings)} finding(s) in target {name}:"]
    for rec in runner.stats.findings.values():
        lines += [f"--- {rec.signature} (x{rec.count})", f"input: {rec.data.hex()}", rec.text]
    return "\n".join(lines)


@pytest.mark.parametrize("name", TARGETS)
def test_mutated(name: str) -> None:
    runs, _ = BUDGET[name]
    deadline = time.monotonic() + TIME_CAP
    with _target(name) as (target, runner):
        for data in mutate.inputs(target.seeds(), runs, 0, getattr(target, "MAX_LEN", 4096)):
            if time.monotonic() > deadline:
                break
            try:
                runner.execute(data)
            except Exception as exc:
                if _known(exc) is None:
                    runner.record(exc, data)
        runner.check_every = 0
        try:
            check = getattr(target, "check", None)
            if check is not None:
                check()
        except Exception as exc:
            if _known(exc) is None:
                runner.record(exc, b"")
        assert not runner.stats.findings, _report(name, runner)
        print(f"{name}: {runner.stats.inputs} inputs ({runner.stats.rejected} rejected)")


@pytest.mark.parametrize("name", TARGETS)
def test_structured(name: str) -> None:
    _, examples = BUDGET[name]
    deadline = time.monotonic() + TIME_CAP
    with _target(name) as (target, runner):
        strat = getattr(target, "strategy", None)
        strategy = strat() if strat is not None else from_seeds(
            target.seeds(), getattr(target, "MAX_LEN", 4096))

        @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate, Phase.shrink])
        @given(strategy)
        def one(data: bytes) -> None:
            if time.monotonic() > deadline:
                return
            try:
                runner.execute(data)
            except Exception as exc:
                if _known(exc) is None:
                    raise

        one()
        print(f"{name}: {runner.stats.inputs} examples")
        check = getattr(target, "check", None)
        if check is not None:
            check()
