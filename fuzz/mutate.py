"""A fast, deterministic seed mutator: libFuzzer's byte mutations without its coverage.

Hypothesis spends milliseconds per example drawing a structured input; the CI subset needs
thousands of inputs per target in seconds, so it replays every seed and then feeds inputs
from this generator (``random.Random(seed)``: the same inputs on every run and machine).
The operations are the ones of :func:`fuzz.strategies.mutate` -- bit flips, interesting
integers at random offsets, inserted protocol tokens, cut/duplicated ranges, splices of two
seeds, length fields made (in)consistent with what follows.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator, Sequence

from fuzz.strategies import INTERESTING, TOKENS


def mutate(rng: random.Random, data: bytes, others: Sequence[bytes],
           tokens: Sequence[bytes] = TOKENS, max_ops: int = 6) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, max_ops)):
        op = rng.randrange(11)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rng.choice(INTERESTING) & 0xFF
        elif op in (2, 3):
            width = 4 if op == 2 else 8
            value = rng.choice(INTERESTING) if rng.random() < 0.8 else rng.getrandbits(64)
            buf[pos:pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif op == 4:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 5:
            del buf[pos:pos + rng.randint(1, 64)]
        elif op == 6:
            chunk = buf[pos:pos + rng.randint(1, 64)]
            buf[pos:pos] = chunk * rng.randint(1, 4)
        elif op == 7 and others:
            other = rng.choice(others)
            buf[pos:] = other[rng.randint(0, len(other)):]
        elif op == 8 and tokens:
            buf[pos:pos] = rng.choice(tokens)
        elif op == 9:
            del buf[pos:]
        elif op == 10:
            value = rng.choice([len(buf) - pos, len(buf) - pos - 4, 0, 0xFFFFFFFF])
            buf[pos:pos + 4] = struct.pack("<I", value & 0xFFFFFFFF)
    return bytes(buf)


def inputs(seeds: Sequence[bytes], count: int, seed: int, max_len: int) -> Iterator[bytes]:
    """Every seed once, then mutants, ``count`` inputs in all."""
    rng = random.Random(seed)
    pool = [s[:max_len] for s in seeds] or [b""]
    produced = 0
    for s in pool:
        if produced >= count:
            return
        produced += 1
        yield s
    while produced < count:
        produced += 1
        if rng.random() < 0.05:
            yield rng.randbytes(rng.randint(0, min(max_len, 256)))
        else:
            yield mutate(rng, rng.choice(pool), pool)[:max_len]
