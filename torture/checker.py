"""checker: what the harness proves after each fault, and how a violation is reported.

Three properties (issue 6, item 1):

1. **No acknowledged write lost or corrupted on the node that serves.**  The whole export of
   the node that serves after the failover/restart is read through NBD; every 4 KiB block
   must hold one of ``History.allowed(block)``: the last acknowledged write to it, or a write
   that was in flight (no reply, or an error reply) at the fault, or -- async only -- a write
   acknowledged inside the loss window below.  A block that is neither zeros nor the content
   of any write is garbage and always a violation.
2. **Both data areas identical after resync**, byte for byte, read from the providers
   themselves once the primary reports ``complete`` with ``dirty 0``.
3. **The dirty map never under-reports.**  Whenever the harness snapshots the primary's
   on-disk activemap -- right after the primary crashed (before anything restarts), or while
   it is alive, idle and cut off from its peer -- every extent in which the two data areas
   differ must be set in it; otherwise a resync from that map would leave the difference.

Async loss window.  In async mode the primary acknowledges a WRITE once its local copy is
written (hast/primary.py ``_early_ack``); hast.conf.5 says "data not yet sent is lost if the
primary fails".  Where can acknowledged data be when the primary is killed?  The NBD reader
thread that submitted the write hands it to connection #1 itself (``remote_send`` right after
the local I/O is queued), so with one NBD connection at most one acknowledged write is still
in user space; everything else is in the kernel: the primary's send buffer and the
secondary's receive buffer, which the secondary stops reading as soon as it notices the dead
primary (an RST on connection #2).  That backlog can never exceed the largest send buffer plus
the largest receive buffer plus one request.  So for every async failover the checker walks
the primary's acknowledged writes back from the kill, newest first, adding up their bytes, and
allows the loss of those acknowledged after the point where the sum exceeds

    capacity = tcp_wmem max + tcp_rmem max + 1 MiB     (read inside the primary's namespace)

-- the window N, in ms before the fault, is therefore measured per cycle from the engine's
buffering and the write rate, and printed in the summary.  A FUA write, and a write
acknowledged before an acknowledged FLUSH was sent, are completed on the secondary too and
never in the window.  A loss older than the window is a violation.  Measured on this machine
(2 vCPU, 200-cycle runs): no async write was lost at all in the harness's async failovers
(summary line ``async: ...``): the kernel still delivers the dead primary's send buffer and
the secondary drains it before it exits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torture.nbdclient import NbdClient
from torture.workload import BLOCK, GARBAGE, History, identify

ASYNC_LOSS_WINDOW: float | None = None     # seconds; None: computed per cycle (above)
MAX_REQUEST = 1024 * 1024


def async_loss_window(capacity: int, acked: list[tuple[float, int]], t_fault: float) -> float:
    """Seconds before ``t_fault`` covered by ``capacity`` bytes of the newest acknowledged
    writes (``acked``: (t_ack, length) pairs of the node that died)."""
    if ASYNC_LOSS_WINDOW is not None:
        return ASYNC_LOSS_WINDOW
    total = 0
    for t_ack, length in sorted(acked, reverse=True):
        total += length
        if total > capacity:
            return max(t_fault - t_ack, 0.0)
    return max((t_fault - min(t for t, _ in acked)) if acked else 0.0, 0.0)
SCAN_CHUNK = 1024 * 1024


@dataclass
class Totals:
    """What the summary adds up over all cycles."""

    writes_acked: int = 0
    writes_unknown: int = 0
    writes_failed: int = 0
    writes_checked: int = 0
    blocks_checked: int = 0
    reads_checked: int = 0
    bytes_compared: int = 0
    synced_bytes: int = 0
    lost_async: int = 0
    lost_async_max_age: float | None = None   # seconds before the fault, of the newest loss
    async_windows: list[float] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)


def verify_export(socket_path: str, export: str, history: History, totals: Totals,
                  where: str) -> list[str]:
    """Property 1 on the node that serves; returns violation texts."""
    client = NbdClient(socket_path, export)
    problems: list[str] = []
    lost_old = 0
    try:
        size = client.size
        for off in range(0, size - size % BLOCK, SCAN_CHUNK):
            n = min(SCAN_CHUNK, size - off) // BLOCK * BLOCK
            data = client.pread(off, n)
            for i in range(n // BLOCK):
                b = off // BLOCK + i
                seen = identify(history.seed, b, data[i * BLOCK:(i + 1) * BLOCK])
                totals.blocks_checked += 1
                allowed = history.allowed(b)
                if seen not in allowed or seen == GARBAGE:
                    if len(problems) < 8:
                        problems.append(f"{where}: " + history.explain(b, seen))
                    elif len(problems) == 8:
                        problems.append(f"{where}: ... more blocks")
                else:
                    lost_old += _count_loss(history, b, seen, totals)
            totals.bytes_compared += n
    finally:
        client.close()
    totals.lost_async += lost_old
    return problems


def _count_loss(history: History, block: int, seen: int, totals: Totals) -> int:
    """1 if ``block`` holds an older write than an acknowledged one (an allowed async loss);
    records how long before the fault the lost write was acknowledged."""
    lost = 0
    for wid in reversed(history.blocks.get(block, [])):
        if wid == seen:
            break
        rec = history.writes[wid]
        if rec.state != "acked" or rec.t_ack is None:
            continue
        lost = 1
        for w in history.windows:
            if w.node == rec.node and w.since <= rec.t_ack <= w.until:
                age = w.fault - rec.t_ack
                if totals.lost_async_max_age is None or age > totals.lost_async_max_age:
                    totals.lost_async_max_age = age
    return lost


def first_differences(a: bytes, b: bytes, limit: int = 4) -> list[int]:
    """Offsets of the first differing blocks (compared a MiB at a time, then per block)."""
    out: list[int] = []
    for off in range(0, min(len(a), len(b)), SCAN_CHUNK):
        if a[off:off + SCAN_CHUNK] == b[off:off + SCAN_CHUNK]:
            continue
        for boff in range(off, min(off + SCAN_CHUNK, len(a)), BLOCK):
            if a[boff:boff + BLOCK] != b[boff:boff + BLOCK]:
                out.append(boff)
                if len(out) >= limit:
                    return out
    return out


def describe_block(history: History, offset: int, a: bytes, b: bytes,
                   names: tuple[str, str]) -> str:
    blk = offset // BLOCK
    wa = identify(history.seed, blk, a[offset:offset + BLOCK])
    wb = identify(history.seed, blk, b[offset:offset + BLOCK])

    def name(w: int) -> str:
        return "garbage" if w == GARBAGE else f"write #{w}" if w else "zeros"

    lines = [f"block {blk} (byte {offset}): {names[0]} has {name(wa)}, {names[1]} has {name(wb)}"]
    for w in (wa, wb):
        if w > 0 and w in history.writes:
            lines.append("    " + history.writes[w].describe(history.t0))
    return "\n".join(lines)


def compare_areas(history: History, a: bytes, b: bytes, names: tuple[str, str],
                  totals: Totals) -> list[str]:
    """Property 2; returns violation texts."""
    totals.bytes_compared += len(a)
    if len(a) != len(b):
        return [f"data areas differ in size: {names[0]} {len(a)}, {names[1]} {len(b)}"]
    if a == b:
        return []
    diffs = first_differences(a, b)
    ndiff = sum(1 for off in range(0, len(a), BLOCK) if a[off:off + BLOCK] != b[off:off + BLOCK])
    out = [f"data areas of {names[0]} and {names[1]} differ in {ndiff} blocks after resync"]
    out += [describe_block(history, off, a, b, names) for off in diffs]
    return out


def extent_bit(image: bytes, ext: int) -> bool:
    return bool(image[ext >> 3] & (1 << (ext & 7)))


def dirty_map_check(history: History, image: bytes, extentsize: int, a: bytes, b: bytes,
                    names: tuple[str, str], when: str, totals: Totals) -> list[str]:
    """Property 3: every extent where ``a`` and ``b`` differ is set in ``image``."""
    totals.bytes_compared += len(a)
    out: list[str] = []
    nextents = (len(a) + extentsize - 1) // extentsize
    missing = []
    for ext in range(nextents):
        lo, hi = ext * extentsize, min((ext + 1) * extentsize, len(a))
        if a[lo:hi] != b[lo:hi] and not extent_bit(image, ext):
            missing.append(ext)
    if missing:
        out.append(f"dirty map under-reports {when}: extents {missing[:16]} differ between "
                   f"{names[0]} and {names[1]} but are clean in {names[0]}'s on-disk activemap "
                   f"(extent size {extentsize})")
        for ext in missing[:3]:
            lo = ext * extentsize
            for off in first_differences(a[lo:lo + extentsize], b[lo:lo + extentsize], 2):
                out.append(describe_block(history, lo + off, a, b, names))
    return out
