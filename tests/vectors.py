"""Access to the golden FreeBSD vectors in ../shared/vectors/freebsd-hastd (read-only)."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(os.environ.get(
    "HAST_VECTORS",
    Path(__file__).resolve().parents[1].parent / "shared" / "vectors" / "freebsd-hastd"))
WIRE = ROOT / "wire"
METADATA = ROOT / "metadata"


def wire_messages() -> list[tuple[str, dict]]:
    """(scenario/label, json entry) of every recorded wire message, in wire order."""
    out = []
    for scen in sorted(p for p in WIRE.iterdir() if p.is_dir()):
        for entry in json.loads((scen / "index.json").read_text()):
            out.append((f"{scen.name}/{entry['file'][:-4]}", entry))
    return out


def wire_path(ident: str, suffix: str) -> Path:
    return WIRE / f"{ident}{suffix}"


def metadata_cases() -> list[str]:
    cases = [p.name[: -len(".dump.txt")] for p in METADATA.glob("*.dump.txt")]
    cases += [f"secondary-written/{p.name[: -len('.dump.txt')]}"
              for p in (METADATA / "secondary-written").glob("*.dump.txt")]
    return sorted(cases)
