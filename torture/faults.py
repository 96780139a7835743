"""faults: the seeded fault plan of a cycle and the means to inject each fault.

A cycle's plan is a pure function of (seed, cycle number, the modes and faults allowed): the
fault kind and replication mode rotate with the cycle number so that every combination comes
up, everything else (timings, sizes, the side a rule goes on, the recovery path) is drawn from
``random.Random(f"{seed}/{cycle}")``.  Replaying ``--seed S --cycle N --cycles 1`` with the same
``--modes``/``--faults`` therefore runs the same scenario again (the timing of the machine is
the only thing that is not replayed).

Fault kinds (what the issue lists):

* ``kill_primary``   kill -9 of every process of the primary's namespace, then failover to the
  secondary (optionally after bringing the old primary back as secondary first) or a restart
  of the old primary as primary;
* ``kill_secondary`` kill -9 of the secondary's processes; the load goes on degraded, then the
  secondary comes back and resynchronizes;
* ``kill_both``      both nodes die (in either order, a few ms apart); restart with the old
  primary as primary, or (fullsync only) fail over to the old secondary;
* ``partition``      iptables DROP of all traffic to/from the peer inside one namespace, shorter
  or longer than the replication ``timeout``;
* ``reset``          iptables REJECT --reject-with tcp-reset on the replication port inside one
  namespace: established connections get RSTs;
* ``slow``           tbf on both ends of the veth link (there is no netem on this kernel);
* ``eio``            a kernel EIO on chosen ranges of a node's provider (torture/eiofs.py), for
  reads, writes or both, on the primary or the secondary.

Only namespaces the harness created are touched; their deletion removes every rule and qdisc.
"""

from __future__ import annotations

import random
import subprocess
from dataclasses import dataclass, field

from tests.cluster import Node

FAULTS = ("kill_primary", "kill_secondary", "kill_both", "partition", "reset", "slow", "eio")
MODES = ("fullsync", "memsync", "async")
HAST_PORT = 8457
MiB = 1024 * 1024


@dataclass
class Plan:
    seed: int
    cycle: int
    mode: str
    fault: str
    variant: dict[str, object] = field(default_factory=dict)
    size: int = 24 * MiB
    extentsize: int = 256 * 1024
    keepdirty: int = 8
    compression: str = "hole"
    checksum: str = "none"
    timeout: int = 3
    qd: int = 8
    load: float = 2.0            # seconds of load before the writer stops
    fault_at: float = 1.0        # seconds into the load
    fault_len: float = 0.0       # for faults that are lifted again
    after_load: float = 0.8      # load on the node that serves after a failover/restart

    @property
    def cycle_seed(self) -> int:
        return random.Random(f"content/{self.seed}/{self.cycle}").getrandbits(63)

    def describe(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.variant.items())
        return f"{self.mode} {self.fault}{' ' + extra if extra else ''}"


def make_plan(seed: int, cycle: int, modes: tuple[str, ...], faults: tuple[str, ...]) -> Plan:
    rng = random.Random(f"{seed}/{cycle}")
    fault = faults[cycle % len(faults)]
    mode = modes[(cycle // len(faults)) % len(modes)]
    p = Plan(seed, cycle, mode, fault)
    p.extentsize = rng.choice((128 * 1024, 256 * 1024, 1 * MiB))
    p.keepdirty = rng.choice((2, 4, 8, 64))
    p.compression = rng.choice(("none", "hole", "lzf"))
    p.checksum = rng.choice(("none", "crc32", "sha256"))
    p.qd = rng.choice((1, 4, 8, 16))
    p.load = round(rng.uniform(1.5, 2.5), 2)
    p.fault_at = round(rng.uniform(0.3, 0.7) * p.load, 2)
    p.after_load = round(rng.uniform(0.4, 1.0), 2)
    v = p.variant
    if fault == "kill_primary":
        v["recovery"] = rng.choice(("failover", "failover", "restart"))
        if v["recovery"] == "failover":
            v["rejoin"] = rng.choice(("before", "after"))
    elif fault == "kill_secondary":
        v["restart"] = rng.choice(("during", "after"))
    elif fault == "kill_both":
        v["first"] = rng.choice(("primary", "secondary"))
        v["gap_ms"] = rng.choice((0, 5, 50))
        v["recovery"] = "failover" if mode == "fullsync" and rng.random() < 0.5 else "restart"
    elif fault == "partition":
        v["side"] = rng.choice(("primary", "secondary"))
        p.fault_len = round(rng.choice((rng.uniform(0.3, 0.6 * p.timeout),
                                        rng.uniform(p.timeout + 0.5, p.timeout + 2.5))), 2)
    elif fault == "reset":
        v["side"] = rng.choice(("primary", "secondary"))
        p.fault_len = round(rng.uniform(0.1, 1.0), 2)
    elif fault == "slow":
        v["rate"] = rng.choice(("4mbit", "10mbit", "40mbit"))
        p.fault_len = round(rng.uniform(0.5, 2.0), 2)
    elif fault == "eio":
        v["node"] = rng.choice(("primary", "primary", "secondary"))
        v["ops"] = rng.choice(("w", "r", "rw"))
        v["blocks"] = rng.choice((1, 16, 256))
        p.fault_len = round(rng.uniform(0.5, 1.5), 2)
    if p.fault_len:
        p.load = max(p.load, p.fault_at + p.fault_len + 0.5)
    return p


# -- network faults (inside one namespace) ----------------------------------------------------
def _run(node: Node, *argv: str) -> None:
    res = node.run(*argv, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {node.netns}: {res.stderr.strip()}")


def partition(node: Node, peer_addr: str, on: bool) -> None:
    op = "-I" if on else "-D"
    _run(node, "iptables", op, "INPUT", "-s", peer_addr, "-j", "DROP")
    _run(node, "iptables", op, "OUTPUT", "-d", peer_addr, "-j", "DROP")


def reset(node: Node, primary_side: bool, on: bool) -> None:
    """RSTs for the replication connections.  On the secondary every segment the primary
    sends to port 8457 is answered with a reset; on the primary, every segment coming from
    port 8457 (the secondary's replies and acks) is."""
    op = "-I" if on else "-D"
    match = ["--sport", str(HAST_PORT)] if primary_side else ["--dport", str(HAST_PORT)]
    _run(node, "iptables", op, "INPUT", "-p", "tcp", *match, "-j", "REJECT",
         "--reject-with", "tcp-reset")


def veth(node: Node) -> str:
    out = node.run("ip", "-o", "link", "show", "type", "veth", timeout=30).stdout
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name:
            return name
    raise RuntimeError(f"no veth in {node.netns}")


def slow(node: Node, rate: str, on: bool) -> None:
    dev = veth(node)
    if on:
        _run(node, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
             "burst", "32kb", "latency", "400ms")
    else:
        _run(node, "tc", "qdisc", "del", "dev", dev, "root")


def require_tools() -> None:
    """Missing tools are failures, not skips."""
    import shutil

    for tool, pkg in (("iptables", "iptables"), ("tc", "iproute2"), ("ip", "iproute2"),
                      ("nsenter", "util-linux"), ("fusermount3", "fuse3")):
        if shutil.which(tool) is None and shutil.which(f"/usr/sbin/{tool}") is None:
            raise RuntimeError(f"{tool} is required (Debian package {pkg})")
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"{exc.name} is required (pip install pyfuse3; it needs the "
                           "Debian packages libfuse3-dev and pkg-config to build)") from None
    subprocess.run(["iptables", "--version"], check=True, capture_output=True)
