"""The NBD benchmark runs end to end (its --quick mode) and writes its three outputs.

No timing is asserted here: the benchmark reports figures and targets, it never decides a
test.  What is checked is that every part ran (references, py-hast in two modes, the copies,
the activemap figures) and that the table, the JSON and the PNG exist and agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_table_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "results"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "bench_nbd.py"), "--quick",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    doc = json.loads((out / "nbd.json").read_text())
    systems = {"nbdkit-file", "qemu-nbd", "nbdkit-python", "fio-direct", "hast-fullsync",
               "hast-degraded"}
    assert set(doc["fio"]) == systems
    for system, jobs in doc["fio"].items():
        assert set(jobs) == set(doc["jobs"]), system
        for job, summary in jobs.items():
            assert summary["runs"], (system, job)
            assert summary["iops"]["median"] > 0, (system, job)
            assert summary["lat_us"]["min"] <= summary["lat_us"]["median"], (system, job)
    assert {"nbdcopy-nbdkit-file", "hast-initial-sync", "hast-resync"} <= set(doc["copies"])
    assert doc["copies"]["hast-initial-sync"]["bytes"] > 0
    assert set(doc["rss_kib"]["hast-fullsync"]) == {"primary", "secondary"}
    assert doc["meta"]["client_cpus"] and doc["meta"]["server_cpus"]
    names = [t["name"] for t in doc["targets"]]
    assert any("QD32" in n for n in names) and any("activemap" in n for n in names)
    assert all(isinstance(t["met"], bool) for t in doc["targets"])

    table = (out / "nbd.txt").read_text()
    assert "placement: clients on CPU" in table
    for label in ("seq write 1 MiB QD8", "rand write 4 KiB QD32", "rand read 4 KiB QD32",
                  "hast-initial-sync", "target"):
        assert label in table, label
    assert table in res.stdout

    png = (out / "nbd.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
