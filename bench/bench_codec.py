"""Throughput of the pipeline's data transforms, each against a baseline measured in the same run.

Rows (MB/s, higher is better): our LZF (hast._codec) against zlib level 1 on 1 MiB of the
vectors' pattern data and on 1 MiB of random data, and against a pure-Python LZF (the
baseline a Python-only hastd would have) on a small input; crc32 (zlib) against sha256
(hashlib), the two checksum options; sha256 against a plain memory copy; is_zero against
bytes.count(0) and not any().
Run standalone (`python bench/bench_codec.py`) or through bench/run.py, which calls run().
"""

from __future__ import annotations

import hashlib
import random
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hast import _codec  # noqa: E402

MiB = 1 << 20


def pattern(tag: str) -> bytes:
    """The vectors' data: 256 lines of 16 bytes, "<tag>-<3 hex digits>" padded with '.'."""
    return b"".join(f"{tag}-{i:03x}".ljust(15, ".").encode() + b"\n" for i in range(256))


def sample(size: int = MiB) -> bytes:
    """Text-like, compressible: pattern blocks with a different tag each."""
    blocks = [pattern(f"HAST{i:04x}") for i in range(size // 4096 + 1)]
    return b"".join(blocks)[:size]


# -- pure-Python LZF baseline (same format, same greedy algorithm) ---------------------------

def py_lzf_compress(src: bytes) -> bytes:
    out = bytearray([0])
    table: dict[bytes, int] = {}
    n, ip, lit = len(src), 0, 0
    while ip < n - 2:
        key = src[ip:ip + 3]
        ref = table.get(key, -1)
        table[key] = ip
        off = ip - ref - 1
        if ref >= 0 and off < 8192:
            maxlen = min(n - ip, 264)
            length = 3
            while length < maxlen and src[ref + length] == src[ip + length]:
                length += 1
            if lit:
                out[-lit - 1] = lit - 1
            else:
                out.pop()
            code = length - 2
            if code < 7:
                out.append((off >> 8) + (code << 5))
            else:
                out += bytes([(off >> 8) + (7 << 5), code - 7])
            out += bytes([off & 0xFF, 0])
            lit = 0
            for p in range(ip + 1, min(ip + length, n - 2)):
                table[src[p:p + 3]] = p
            ip += length
            continue
        out.append(src[ip])
        ip += 1
        lit += 1
        if lit == 32:
            out[-33] = 31
            lit = 0
            out.append(0)
    while ip < n:
        out.append(src[ip])
        ip += 1
        lit += 1
        if lit == 32:
            out[-33] = 31
            lit = 0
            out.append(0)
    if lit:
        out[-lit - 1] = lit - 1
    else:
        out.pop()
    return bytes(out)


def py_lzf_decompress(src: bytes, out_len: int) -> bytes:
    out = bytearray()
    ip, n = 0, len(src)
    while ip < n:
        ctrl = src[ip]
        ip += 1
        if ctrl < 32:
            out += src[ip:ip + ctrl + 1]
            ip += ctrl + 1
            continue
        length = ctrl >> 5
        if length == 7:
            length += src[ip]
            ip += 1
        ref = len(out) - ((ctrl & 0x1F) << 8) - src[ip] - 1
        ip += 1
        for k in range(length + 2):
            out.append(out[ref + k])
    if len(out) > out_len:
        raise ValueError("E2BIG")
    return bytes(out)


# -- measurement -----------------------------------------------------------------------------

def mbps(fn: Callable[[], object], nbytes: int, min_time: float = 0.2, repeat: int = 3) -> float:
    """Best-of-repeat throughput of fn() processing nbytes, in MB/s (10^6 bytes)."""
    loops = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time / 4 or loops >= 1 << 20:
            break
        loops *= 4
    best = dt
    for _ in range(repeat - 1):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes * loops / best / 1e6


def _row(name: str, value: float, baseline: float, unit: str = "MB/s") -> dict:
    return {"name": name, "unit": unit, "value": value, "baseline": baseline,
            "ratio": value / baseline if baseline else float("inf")}


def run() -> list[dict]:
    data = sample(MiB)
    limit = len(data)
    ours_c = _codec.lzf_compress(data, limit)
    assert ours_c is not None and _codec.lzf_decompress(ours_c, len(data)) == data
    zc = zlib.compress(data, 1)
    small = data[:16384]
    small_c = py_lzf_compress(small)
    assert py_lzf_decompress(small_c, len(small)) == small
    assert _codec.lzf_decompress(small_c, len(small)) == small
    zeros = bytes(MiB)
    # Incompressible data is the expensive case: the whole block is scanned before LZF gives up.
    noise = random.Random(1).randbytes(MiB)
    view = memoryview(data)

    rows = [
        _row("lzf compress 1MiB text vs zlib -1",
             mbps(lambda: _codec.lzf_compress(data, limit), len(data)),
             mbps(lambda: zlib.compress(data, 1), len(data))),
        _row("lzf compress 1MiB random vs zlib -1",
             mbps(lambda: _codec.lzf_compress(noise, len(noise) - 1024), len(noise)),
             mbps(lambda: zlib.compress(noise, 1), len(noise))),
        _row("lzf decompress 1MiB text vs zlib",
             mbps(lambda: _codec.lzf_decompress(ours_c, len(data)), len(data)),
             mbps(lambda: zlib.decompress(zc), len(data))),
        _row("lzf compress 16KiB vs pure-Python LZF",
             mbps(lambda: _codec.lzf_compress(small, len(small)), len(small)),
             mbps(lambda: py_lzf_compress(small), len(small), min_time=0.05, repeat=1)),
        _row("lzf decompress 16KiB vs pure-Python LZF",
             mbps(lambda: _codec.lzf_decompress(small_c, len(small)), len(small)),
             mbps(lambda: py_lzf_decompress(small_c, len(small)), len(small),
                  min_time=0.05, repeat=1)),
        _row("crc32 (zlib) 1MiB vs sha256 (hashlib)",
             mbps(lambda: zlib.crc32(data), len(data)),
             mbps(lambda: hashlib.sha256(data).digest(), len(data))),
        _row("sha256 (hashlib) 1MiB vs memory copy",
             mbps(lambda: hashlib.sha256(data).digest(), len(data)),
             mbps(lambda: bytes(view), len(data))),
        _row("is_zero 1MiB zeros vs bytes.count(0)",
             mbps(lambda: _codec.is_zero(zeros), len(zeros)),
             mbps(lambda: zeros.count(0) == len(zeros), len(zeros))),
        _row("is_zero 1MiB zeros vs not any()",
             mbps(lambda: _codec.is_zero(zeros), len(zeros)),
             mbps(lambda: not any(zeros), len(zeros), min_time=0.05, repeat=1)),
    ]
    return rows


def main() -> int:
    data = sample(MiB)
    ours = _codec.lzf_compress(data, len(data))
    assert ours is not None
    print(f"compressed size of 1 MiB sample: lzf {len(ours)} bytes, "
          f"zlib -1 {len(zlib.compress(data, 1))} bytes")
    for r in run():
        print(f"{r['name']:<42} {r['value']:>10.1f} {r['unit']}  baseline {r['baseline']:>10.1f}"
              f"  ratio {r['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
