"""Run every benchmark module in bench/ and print one table of ratios.

Each bench_*.py exposes run() -> list of {name, unit, value, baseline, ratio}; the baseline is
measured in the same run (pure-Python twin, zlib, a reference server), so the ratios hold when
the machine's speed drifts.  Results also go to bench/results/latest.json.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    wanted = set(argv)
    rows: list[dict] = []
    for path in sorted(HERE.glob("bench_*.py")):
        if wanted and path.stem not in wanted:
            continue
        module = importlib.import_module(path.stem)
        for row in module.run():
            rows.append({"bench": path.stem, **row})
    width = max((len(r["name"]) for r in rows), default=10)
    print(f"{'benchmark':<{width}}  {'value':>12}  {'baseline':>12}  unit       ratio")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['value']:>12.4g}  {r['baseline']:>12.4g}  "
              f"{r['unit']:<10} {r['ratio']:.2f}x")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps({"time": time.time(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
