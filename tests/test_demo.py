"""README's demo command, run as a test: two nodes, a file system, a crash and a failover."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_demo_passes_and_leaves_nothing_behind() -> None:
    res = subprocess.run([sys.executable, str(REPO / "tools" / "demo.py")], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "demo: PASSED: every file intact on hastb after the failover" in res.stdout
    for step in ("hastctl create demo", "hastctl role primary demo", "hastctl status",
                 "hastctl list demo", "file7.bin"):
        assert step in res.stdout
    assert "hast-demo-" not in Path("/proc/mounts").read_text()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert "hast-demo-" not in loops
    ours = set(res.stdout.split("namespaces: ", 1)[1].split("\n", 1)[0].split())
    assert len(ours) == 2 and not ours & netns()
    assert not Path("/dev/hast/demo").exists()
