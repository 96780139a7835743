#!/usr/bin/env python3
"""Fuzz py-hast's parsers: ``python fuzz/run.py --target nv --runs 1000000`` or ``--all``.

Each target runs in its own child process (atheris ends the process when it is done, and the
address-space limit must not outlive the target), under:

* engine: atheris (libFuzzer, coverage-guided over the instrumented ``hast`` package,
  seeded with fuzz/corpus/<target>/ and the protocol dictionary fuzz/hast.dict; new inputs
  are kept in fuzz/work/<target>/) when it is importable, else hypothesis (seed mutation
  plus the target's structure-aware strategy, see fuzz/strategies.py); ``--engine mutate``
  is fuzz/mutate.py's fast seeded byte mutation (what the CI subset uses);
* a per-input time bound (``--timeout``, SIGALRM in the input's thread, plus a watchdog
  that saves the input and kills the child if even that cannot interrupt it);
* an address-space limit of what the child maps after start-up plus ``--max-alloc-mb``:
  a parser that allocates a declared size before validating it hits MemoryError;
* findings -- any exception outside the target's EXPECTED, broken invariants, hangs -- are
  recorded, de-duplicated and saved to fuzz/findings/<target>/<sha1>.bin (+ .txt) and the
  run continues; the summary lists them and the exit status is 1 when there is any.

``--jobs N`` splits each target's runs over N child processes (different seeds).
``--reproduce FILE`` runs saved inputs once against ``--target`` and prints the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fuzz.targets import TARGETS  # noqa: E402

WORK = HERE / "work"
DICT = HERE / "hast.dict"


def _have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


# -- child: one target, one engine --------------------------------------------------------------

def _write_summary(path: str | None, summary: dict) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f)
        os.replace(tmp, path)


def child(args: argparse.Namespace) -> int:
    from fuzz import engine
    from fuzz.common import quiet_logs
    from fuzz.targets import load

    name = args.child
    if args.engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["hast", "fuzz.reference"]):
            target = load(name)
    else:
        target = load(name)
    quiet_logs()
    setup = getattr(target, "setup", None)
    if setup is not None:
        setup()
    findings = Path(args.findings) if args.findings else engine.FINDINGS
    runner = engine.Runner(name, target, timeout=args.timeout, findings_dir=findings,
                           verbose=True)
    if args.max_alloc_mb:
        engine.set_memory_limit(args.max_alloc_mb)
    runner.start_watchdog()
    summary = {"engine": args.engine}

    def done() -> None:
        stats = runner.finish()
        teardown = getattr(target, "teardown", None)
        if teardown is not None:
            try:
                teardown()
            except Exception:
                traceback.print_exc()
        _write_summary(args.summary, {**summary, **stats.summary()})

    if args.engine == "atheris":
        import atheris

        def one(data: bytes) -> None:
            runner.feed(data)
            if runner.stats.inputs % 1000 == 0:
                _write_summary(args.summary, {**summary, **runner.stats.summary()})
            if runner.stats.inputs >= args.runs:
                done()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)

        work = WORK / name
        work.mkdir(parents=True, exist_ok=True)
        corpus = HERE / "corpus" / name
        argv = [sys.argv[0], f"-runs={args.runs * 2}", f"-seed={args.seed}",
                f"-max_len={getattr(target, 'MAX_LEN', 4096)}", "-rss_limit_mb=0",
                # libFuzzer's own SIGALRM timer is off: the runner's per-input timer and
                # watchdog use SIGALRM and a thread instead.
                "-timeout=0", "-print_final_stats=0",
                f"-artifact_prefix={findings / name}/", str(work)]
        (findings / name).mkdir(parents=True, exist_ok=True)
        if DICT.exists():
            argv.insert(1, f"-dict={DICT}")
        if corpus.is_dir():
            argv.append(str(corpus))
        atheris.Setup(argv, one)
        atheris.Fuzz()
        done()  # not reached: libFuzzer exits; one() ends the process at --runs
        return 0

    if args.engine == "mutate":
        from fuzz.mutate import inputs

        for data in inputs(target.seeds(), args.runs, args.seed,
                           getattr(target, "MAX_LEN", 4096)):
            runner.feed(data)
        done()
        return 0

    from hypothesis import HealthCheck, Phase, given, seed, settings

    from fuzz.strategies import from_seeds

    strat = getattr(target, "strategy", None)
    strategy = strat() if strat is not None else from_seeds(
        target.seeds(), getattr(target, "MAX_LEN", 4096))

    @seed(args.seed)
    @settings(max_examples=args.runs, database=None, deadline=None, derandomize=False,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(data: bytes) -> None:
        runner.feed(data)

    for data in target.seeds():       # every seed once, as libFuzzer does
        runner.feed(data)
    run()
    done()
    return 0


# -- parent --------------------------------------------------------------------------------------

def _spawn(args: argparse.Namespace, name: str, runs: int, seed: int,
           summary: str) -> subprocess.Popen:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", name,
            "--engine", args.engine, "--runs", str(runs), "--seed", str(seed),
            "--timeout", str(args.timeout), "--max-alloc-mb", str(args.max_alloc_mb),
            "--summary", summary]
    if args.findings:
        argv += ["--findings", args.findings]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    if args.verbose:
        return subprocess.Popen(argv, env=env)
    # The engines' own chatter (libFuzzer's status lines) goes to a log next to the summary.
    with open(f"{summary}.log", "wb") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def _merge(summaries: list[dict]) -> dict:
    out = {"inputs": 0, "rejected": 0, "seconds": 0.0, "findings": {}}
    for s in summaries:
        out["inputs"] += s.get("inputs", 0)
        out["rejected"] += s.get("rejected", 0)
        out["seconds"] = max(out["seconds"], s.get("seconds", 0.0))
        for f in s.get("findings", []):
            prev = out["findings"].setdefault(f["signature"], dict(f, count=0))
            prev["count"] += f["count"]
    return out


def parent(args: argparse.Namespace, names: list[str]) -> int:
    tmp = tempfile.mkdtemp(prefix="hast-fuzz-run-")
    jobs = max(1, args.jobs)
    queue = [(name, shard) for name in names for shard in range(jobs)]
    running: list[tuple[str, subprocess.Popen, str]] = []
    results: dict[str, list[dict]] = {name: [] for name in names}
    crashed: dict[str, list[str]] = {name: [] for name in names}
    started = time.monotonic()
    while queue or running:
        while queue and len(running) < jobs:
            name, shard = queue.pop(0)
            runs = args.runs // jobs + (1 if shard < args.runs % jobs else 0)
            summary = os.path.join(tmp, f"{name}.{shard}.json")
            running.append((name, _spawn(args, name, runs, args.seed + shard, summary),
                            summary))
        time.sleep(0.2)
        for item in list(running):
            name, proc, summary = item
            if proc.poll() is None:
                continue
            running.remove(item)
            try:
                with open(summary) as f:
                    results[name].append(json.load(f))
            except (OSError, ValueError):
                pass
            if proc.returncode != 0:
                crashed[name].append(f"child exited with status {proc.returncode}"
                                     + (" (hang: watchdog)" if proc.returncode == 3 else "")
                                     + ("" if args.verbose else f", see {summary}.log"))
    total = 0
    print(f"\n{'target':<10} {'engine':<10} {'inputs':>10} {'rejected':>10} "
          f"{'findings':>8} {'seconds':>8}")
    details = []
    for name in names:
        merged = _merge(results[name])
        nfind = len(merged["findings"]) + len(crashed[name])
        total += nfind
        print(f"{name:<10} {args.engine:<10} {merged['inputs']:>10} {merged['rejected']:>10} "
              f"{nfind:>8} {merged['seconds']:>8.0f}")
        for f in merged["findings"].values():
            details.append(f"  [{name}] {f['signature']} (x{f['count']}) "
                           f"input: {args.findings or 'fuzz/findings'}/{name}/{f['input']}.bin")
        details += [f"  [{name}] {text}" for text in crashed[name]]
    print(f"total: {total} finding(s) in {time.monotonic() - started:.0f} s")
    for line in details:
        print(line)
    return 1 if total else 0


def reproduce(args: argparse.Namespace) -> int:
    from fuzz import engine
    from fuzz.common import quiet_logs
    from fuzz.targets import load

    if len(args.target) != 1:
        print("--reproduce needs exactly one --target", file=sys.stderr)
        return 2
    target = load(args.target[0])
    quiet_logs()
    if hasattr(target, "setup"):
        target.setup()
    runner = engine.Runner(args.target[0], target, timeout=args.timeout, findings_dir=None)
    status = 0
    try:
        for path in args.reproduce:
            data = Path(path).read_bytes()
            try:
                runner.execute(data)
                check = getattr(target, "check", None)
                if check is not None:
                    time.sleep(0.5)     # let a dying server finish dying
                    check()
                print(f"{path}: ok (accepted or rejected as documented)")
            except Exception:
                status = 1
                print(f"{path}: FINDING")
                traceback.print_exc()
    finally:
        if hasattr(target, "teardown"):
            target.teardown()
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", default=[], choices=TARGETS,
                   help="target to run (repeatable)")
    p.add_argument("--all", action="store_true",
                   help="every target (--jobs children run at a time)")
    p.add_argument("--list", action="store_true", help="list the targets")
    p.add_argument("--runs", type=int, default=10000, help="inputs per target")
    p.add_argument("--engine", choices=("auto", "atheris", "hypothesis", "mutate"),
                   default="auto",
                   help="auto: atheris if importable, else hypothesis; mutate: seeded random "
                        "byte mutation of the corpus (fast, no coverage feedback)")
    p.add_argument("--jobs", type=int, default=1,
                   help="child processes at a time; each target's runs are split over as many")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per input")
    p.add_argument("--max-alloc-mb", type=int, default=1024,
                   help="address space a child may map beyond its start-up size (0: no limit)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--findings", help="directory for findings (default fuzz/findings)")
    p.add_argument("--reproduce", nargs="+", metavar="FILE", help="run saved inputs once")
    p.add_argument("--verbose", action="store_true", help="show the engines' own output")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--summary", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine == "auto":
        args.engine = "atheris" if _have_atheris() else "hypothesis"
    if args.child:
        return child(args)
    if args.list:
        print("\n".join(TARGETS))
        return 0
    if args.reproduce:
        return reproduce(args)
    names = list(TARGETS) if args.all else args.target
    if not names:
        p.error("give --target NAME or --all")
    return parent(args, names)


if __name__ == "__main__":
    sys.exit(main())
