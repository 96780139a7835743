"""The namespace cluster the two-node tests stand on: hostnames, addresses, clean-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.cluster import Cluster, require_root_tools


def test_two_nodes_have_own_hostnames_and_reach_each_other(tmp_path: Path) -> None:
    require_root_tools()
    cluster = Cluster(["hasta", "hastb"], tmp_path)
    try:
        a, b = cluster["hasta"], cluster["hastb"]
        assert a.run("hostname").stdout.strip() == "hasta"
        assert b.run("hostname").stdout.strip() == "hastb"
        server = b.popen(sys.executable, "-c",
                         f"import socket;s=socket.create_server(('{b.addr}',9999));"
                         "c,_=s.accept();c.sendall(c.recv(5)[::-1])",
                         stdout=subprocess.PIPE)
        client = a.run(sys.executable, "-c",
                       "import socket,time\n"
                       "for _ in range(100):\n"
                       f"  try: c=socket.create_connection(('{b.addr}',9999)); break\n"
                       "  except OSError: time.sleep(0.05)\n"
                       "c.sendall(b'hello'); print(c.recv(5).decode())")
        assert client.stdout.strip() == "olleh"
        server.wait(timeout=10)
        netns = [a.netns, b.netns]
    finally:
        cluster.close()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in netns)
