"""run: the crash-consistency torture runner (``make torture``; issue 6, item 1).

    python torture/run.py --cycles 200 --seed S [--modes fullsync,memsync,async]
                          [--faults kill_primary,...] [--cycle N] [--keep] [--workdir DIR]

Runs ``--cycles`` cycles numbered from ``--cycle`` (default 0).  Each cycle is a fresh pair of
nodes in namespaces, seeded load through NBD, one fault, recovery and the checks of
torture.checker (see torture/cycle.py and torture/faults.py).  One line per cycle, then a
summary: faults injected by kind, writes checked, bytes compared, and every violation with the
command that replays its cycle alone.  Exit status 1 if any cycle found a violation, 2 on
bad arguments or missing tools, 130 on Ctrl-C (after cleaning up).

Needs root (namespaces, iptables, tc, FUSE), the Debian packages iproute2, iptables,
util-linux, fuse3 (and libfuse3-dev + pkg-config to build pyfuse3), and pyfuse3 in the venv.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torture import checker, faults  # noqa: E402
from torture.checker import Totals  # noqa: E402
from torture.cycle import Cycle, CycleResult  # noqa: E402


def _list(value: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad}; choose from {list(allowed)}")
    return items


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="torture/run.py", description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--cycle", type=int, default=0, help="number of the first cycle")
    ap.add_argument("--seed", type=int, default=None, help="default: random, printed")
    ap.add_argument("--modes", default=",".join(faults.MODES),
                    type=lambda v: _list(v, faults.MODES, "mode"))
    ap.add_argument("--faults", default=",".join(faults.FAULTS),
                    type=lambda v: _list(v, faults.FAULTS, "fault"))
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where cycles run (default: a new directory under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the directories of passing "
                    "cycles too")
    ap.add_argument("--stop-on-violation", action="store_true")
    ap.add_argument("--async-window", type=float, default=None, metavar="SECONDS",
                    help="fixed async loss window instead of the one derived per cycle from "
                    "the socket buffers and the write rate (see torture/checker.py)")
    return ap.parse_args(argv)


def replay_command(args: argparse.Namespace, seed: int, cycle: int) -> str:
    cmd = [sys.executable, "torture/run.py", "--seed", str(seed), "--cycle", str(cycle),
           "--cycles", "1"]
    if args.modes != faults.MODES:
        cmd += ["--modes", ",".join(args.modes)]
    if args.faults != faults.FAULTS:
        cmd += ["--faults", ",".join(args.faults)]
    return " ".join(shlex.quote(c) for c in cmd)


def line(res: CycleResult) -> str:
    p = res.plan
    verdict = "ok" if not res.violations else f"VIOLATION ({len(res.violations)})"
    return (f"cycle {p.cycle:4d} seed {p.seed} {p.describe():<58} writes {res.writes:5d} "
            f"acked {res.acked:5d} unknown {res.unknown:2d} failed {res.failed:2d} "
            f"serve {res.serving or '-':5} sync {res.synced / (1 << 20):5.1f}M "
            f"{res.seconds:5.1f}s {verdict}")


def summary(args: argparse.Namespace, seed: int, results: list[CycleResult], totals: Totals,
            elapsed: float, interrupted: bool) -> str:
    bad = [r for r in results if r.violations]
    out = ["", "=" * 78, f"torture summary: seed {seed}, {len(results)} cycles"
           f"{' (interrupted)' if interrupted else ''} in {elapsed / 60:.1f} min, "
           f"{len(bad)} with violations"]
    kinds = ", ".join(f"{k} {totals.faults.get(k, 0)}" for k in faults.FAULTS
                      if k in args.faults)
    out.append(f"faults injected by kind: {kinds}")
    modes: dict[str, int] = {}
    for r in results:
        modes[r.plan.mode] = modes.get(r.plan.mode, 0) + 1
    out.append("cycles by mode: " + ", ".join(f"{m} {n}" for m, n in modes.items()))
    out.append(f"writes checked: {totals.writes_checked} acknowledged "
               f"({totals.writes_unknown} in flight at a fault, {totals.writes_failed} "
               f"answered with an error), {totals.reads_checked} blocks verified by reads "
               f"during load, {totals.blocks_checked} blocks verified on the serving node")
    out.append(f"bytes compared: {totals.bytes_compared} "
               f"({totals.bytes_compared / (1 << 30):.2f} GiB); resynchronized by hastd: "
               f"{totals.synced_bytes / (1 << 20):.1f} MiB")
    age = ("" if totals.lost_async_max_age is None
           else f", the newest lost write acknowledged {totals.lost_async_max_age * 1000:.0f} ms"
           " before the primary died")
    w = totals.async_windows
    allowed = (f"allowed window {min(w) * 1000:.0f}..{max(w) * 1000:.0f} ms over {len(w)} "
               "async failovers" if w else "no async failover ran")
    out.append(f"async: {totals.lost_async} blocks held an older write than the last "
               f"acknowledged one{age} ({allowed})")
    for r in bad:
        out.append("-" * 78)
        out.append(f"VIOLATION cycle {r.plan.cycle} seed {r.plan.seed}: {r.plan.describe()}")
        out.append(f"  replay: {replay_command(args, r.plan.seed, r.plan.cycle)}")
        if r.workdir is not None:
            out.append(f"  logs kept in {r.workdir}")
        for v in r.violations:
            out.append("  " + v.replace("\n", "\n  "))
        for n in r.notes:
            out.append("  " + n.replace("\n", "\n  "))
    out.append("=" * 78)
    out.append("RESULT: " + ("PASS" if not bad and not interrupted else "FAIL")
               + f" ({len(bad)} violating cycles of {len(results)})")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("torture: needs root (namespaces, iptables, tc, FUSE)", file=sys.stderr)
        return 2
    try:
        faults.require_tools()
    except RuntimeError as exc:
        print(f"torture: {exc}", file=sys.stderr)
        return 2
    if args.async_window is not None:
        checker.ASYNC_LOSS_WINDOW = args.async_window
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="hast-torture-"))
    root.mkdir(parents=True, exist_ok=True)
    # Ctrl-C and SIGTERM (make, CI) clean up the same way, even where a background job
    # started with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    totals = Totals()
    results: list[CycleResult] = []
    started = time.monotonic()
    print(f"torture: seed {seed}, cycles {args.cycle}..{args.cycle + args.cycles - 1}, "
          f"modes {','.join(args.modes)}, faults {','.join(args.faults)}, workdir {root}",
          flush=True)
    interrupted = False
    try:
        for n in range(args.cycle, args.cycle + args.cycles):
            plan = faults.make_plan(seed, n, args.modes, args.faults)
            res = Cycle(plan, root, totals, keep=args.keep).run()
            results.append(res)
            print(line(res), flush=True)
            if res.violations and args.stop_on_violation:
                break
    except KeyboardInterrupt:
        interrupted = True
        print("torture: interrupted, cleaned up", flush=True)
    print(summary(args, seed, results, totals, time.monotonic() - started, interrupted),
          flush=True)
    if not args.keep and not any(r.violations for r in results):
        try:
            root.rmdir()
        except OSError:
            pass
    if interrupted:
        return 130
    return 1 if any(r.violations for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
