"""Two (or more) HAST hosts on one machine: network + UTS namespaces joined by a veth pair.

Each node gets its own network namespace (``ip netns``), its own persistent UTS namespace with
its own hostname (so hast.conf's ``on <node>`` matching works unchanged, as decisions.md asks),
and an address on a private veth link that exists only between namespaces we create.
Everything is torn down by ``close()``, also when a test fails half-way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

NETNS_DIR = Path("/run/netns")
UTS_DIR = Path("/run/hast-test")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


@dataclass
class Node:
    hostname: str
    netns: str
    uts: Path
    addr: str
    workdir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def prefix(self) -> list[str]:
        return ["nsenter", f"--net={NETNS_DIR / self.netns}", f"--uts={self.uts}", "--"]

    def run(self, *argv: str, check: bool = False, timeout: float = 120,
            env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix(), *argv], check=check, capture_output=True,
                              text=True, timeout=timeout, env=env, **kw)

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        proc = subprocess.Popen([*self.prefix(), *argv], **kw)
        self.procs.append(proc)
        return proc


class Cluster:
    """``Cluster(["hasta", "hastb"], tmp_path)``; nodes get 10.231.<n>.1, .2, ... on one link."""

    def __init__(self, hostnames: list[str], workdir: Path) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.nodes: dict[str, Node] = {}
        self._bridge = f"hb{self.tag}"
        self._links: list[str] = []
        self.subnet = f"10.231.{int(self.tag[:2], 16)}"
        UTS_DIR.mkdir(parents=True, exist_ok=True)
        try:
            self._setup(hostnames, workdir)
        except BaseException:
            self.close()
            raise

    def _setup(self, hostnames: list[str], workdir: Path) -> None:
        multi = len(hostnames) > 2
        if multi:
            _run("ip", "link", "add", self._bridge, "type", "bridge")
            _run("ip", "link", "set", self._bridge, "up")
        for i, host in enumerate(hostnames):
            netns = f"hast-{self.tag}-{i}"
            uts = UTS_DIR / f"uts-{self.tag}-{i}"
            node = Node(host, netns, uts, f"{self.subnet}.{i + 1}", workdir / host)
            node.workdir.mkdir(parents=True, exist_ok=True)
            _run("ip", "netns", "add", netns)
            self.nodes[host] = node
            uts.touch()
            _run("unshare", f"--uts={uts}", "hostname", host)
            _run("ip", "-n", netns, "link", "set", "lo", "up")
        names = list(self.nodes)
        if multi:
            for i, host in enumerate(names):
                self._attach(self.nodes[host], f"hv{self.tag}{i}", bridge=True)
        else:
            a, b = (self.nodes[n] for n in names)
            la, lb = f"ha{self.tag}", f"hb{self.tag}x"
            _run("ip", "link", "add", la, "type", "veth", "peer", "name", lb)
            for node, link in ((a, la), (b, lb)):
                _run("ip", "link", "set", link, "netns", node.netns)
                _run("ip", "-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", link)
                _run("ip", "-n", node.netns, "link", "set", link, "up")

    def _attach(self, node: Node, link: str, bridge: bool) -> None:
        _run("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0",
             "netns", node.netns)
        _run("ip", "link", "set", link, "master", self._bridge)
        _run("ip", "link", "set", link, "up")
        _run("ip", "-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
        _run("ip", "-n", node.netns, "link", "set", "eth0", "up")
        self._links.append(link)

    def __getitem__(self, host: str) -> Node:
        return self.nodes[host]

    def close(self) -> None:
        for node in self.nodes.values():
            for proc in node.procs:
                if proc.poll() is None:
                    proc.kill()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
            # anything still running inside the namespace (daemons that forked) goes too
            pids = _run("ip", "netns", "pids", node.netns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "del", node.netns, check=False)
            if node.uts.exists():
                _run("umount", str(node.uts), check=False)
                node.uts.unlink(missing_ok=True)
        for link in self._links:
            _run("ip", "link", "del", link, check=False)
        if len(self.nodes) > 2:
            _run("ip", "link", "del", self._bridge, check=False)
        self.nodes.clear()


def require_root_tools() -> None:
    """Missing tools are failures, not skips (developers' guide)."""
    for tool in ("ip", "nsenter", "unshare"):
        assert shutil.which(tool), f"{tool} is required (iproute2/util-linux)"
    assert os.geteuid() == 0, "the namespace tests need root"
