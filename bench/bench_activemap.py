"""Benchmark of the activemap hot paths: Cython ActiveMap against its pure-Python twin.

Owns the two figures that justify hast/_bitmap.pyx existing at all: the cost the primary
pays on every write request (write_start + write_complete, a 4 KiB write on a hot extent),
and the dirty-extent scan the synchronisation and status code run over the whole map,
measured on a 64 TiB-equivalent map (2 MiB extents: 32 Mi extents, a 4 MiB bitmap) whose
only dirty extents sit at the very end. Both implementations run in the same process and
run, so the ratio is meaningful on any machine. `python bench/bench_activemap.py` prints a
table; run() returns the rows for a bench runner.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hast import _bitmap, activemap  # noqa: E402

ActiveMap = _bitmap.ActiveMap
PyActiveMap = activemap.PyActiveMap

MiB = 1 << 20
SCAN_MEDIASIZE = 64 << 40          # 64 TiB
SCAN_EXTENT = 2 * MiB
WRITE_LEN = 4096


def _best(fn: Callable[[], Any], number: int, repeat: int) -> float:
    """Best wall time of `repeat` batches of `number` calls, per call, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / number


def _scan_gbps(cls: type, number: int, repeat: int) -> float:
    m = cls(SCAN_MEDIASIZE, SCAN_EXTENT, 4096, 64)
    n = m.nextents
    for ext in (n - 3, n - 1):              # the only dirty extents: a full-map scan
        m.write_start(ext * SCAN_EXTENT, WRITE_LEN)
    assert m.next_dirty(0) == n - 3
    per_call = _best(lambda: m.next_dirty(0), number, repeat)
    return m.size() / per_call / 1e9


def _write_pair_us(cls: type, number: int, repeat: int) -> float:
    m = cls(1 << 40, SCAN_EXTENT, 512, 64)
    ws, wc = m.write_start, m.write_complete
    off = 7 * SCAN_EXTENT + 8192

    def pair() -> None:
        ws(off, WRITE_LEN)
        wc(off, WRITE_LEN)

    pair()                                  # the extent is now hot in the keep-dirty LRU
    return _best(pair, number, repeat) * 1e6


def run() -> list[dict]:
    """Rows {name, unit, value (Cython), baseline (pure Python), ratio value/baseline}."""
    rows = []
    c_scan, p_scan = _scan_gbps(ActiveMap, 200, 5), _scan_gbps(PyActiveMap, 5, 3)
    rows.append({"name": "activemap next_dirty scan, 64 TiB map (4 MiB bitmap)",
                 "unit": "GB/s", "value": c_scan, "baseline": p_scan,
                 "ratio": c_scan / p_scan})
    c_pair, p_pair = _write_pair_us(ActiveMap, 200_000, 5), _write_pair_us(PyActiveMap,
                                                                           20_000, 5)
    rows.append({"name": "activemap write_start+write_complete, 4 KiB write",
                 "unit": "us/pair", "value": c_pair, "baseline": p_pair,
                 "ratio": c_pair / p_pair})
    return rows


def main() -> None:
    rows = run()
    print(f"{'benchmark':<56} {'unit':>8} {'cython':>10} {'python':>10} "
          f"{'cy/py':>8} {'speedup':>8}")
    for r in rows:
        # Speedup reads the same way for throughput (higher is better) and time (lower).
        speedup = r["ratio"] if r["unit"] == "GB/s" else 1 / r["ratio"]
        print(f"{r['name']:<56} {r['unit']:>8} {r['value']:>10.3f} {r['baseline']:>10.3f} "
              f"{r['ratio']:>8.3f} {speedup:>7.1f}x")


if __name__ == "__main__":
    main()
