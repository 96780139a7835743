"""One module per parser that reads untrusted bytes; see fuzz/common.py for the interface."""

from __future__ import annotations

import importlib
from types import ModuleType

# In the order `fuzz/run.py --all` runs them: pure parsers first, then the socket servers.
TARGETS: tuple[str, ...] = (
    "nv", "frame", "wire", "pipeline", "lzf", "config", "metadata",
    "control", "handshake", "secondary", "replies", "nbd",
)


def load(name: str) -> ModuleType:
    if name not in TARGETS:
        raise KeyError(f"unknown fuzz target {name!r} (known: {', '.join(TARGETS)})")
    return importlib.import_module(f"fuzz.targets.{name}")
