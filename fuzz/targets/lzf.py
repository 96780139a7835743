"""lzf: the LZF decoder in C (``hast._codec.lzf_decompress``, hast-internals.md §5.6).

The decoder is Cython with raw pointers and runs on every lzf payload a peer sends, so it is
fuzzed on its own, differentially: the input is a 3-byte output size (at most 1 MiB, the
largest a receiver allows, MAXPHYS) followed by an LZF stream, and the result must be exactly
what the spec's decoder (:func:`fuzz.reference.lzf_decode`, liblzf's checks in liblzf's
order) produces -- the same bytes, or the same error (E2BIG / EINVAL as LZFError).
``lzf_decompress_into`` is held to the same answer, and compressing the decoded bytes with
our own compressor must round-trip.
"""

from __future__ import annotations

from hast._codec import LZFError, lzf_compress, lzf_decompress, lzf_decompress_into
from hypothesis import strategies as st

from fuzz import reference
from fuzz.common import Finding, load_seeds
from fuzz.strategies import from_seeds

EXPECTED: tuple[type[BaseException], ...] = (LZFError,)
MAX_LEN = 64 * 1024
MAX_OUT = 1024 * 1024


def seeds() -> list[bytes]:
    return load_seeds("lzf")


@st.composite
def _structured(draw: st.DrawFn) -> bytes:
    plain = draw(st.one_of(st.binary(max_size=3000),
                           st.binary(min_size=1, max_size=8).map(lambda b: b * 400)))
    stream = lzf_compress(plain, len(plain) + 64) or b""
    out_len = draw(st.sampled_from([len(plain), len(plain) + 1, max(0, len(plain) - 1), 0]))
    return out_len.to_bytes(3, "little") + stream


def strategy() -> st.SearchStrategy[bytes]:
    return from_seeds(seeds(), MAX_LEN, _structured())


def one_input(data: bytes) -> None:
    out_len = min(int.from_bytes(data[:3].ljust(3, b"\0"), "little"), MAX_OUT)
    stream = data[3:]
    expect = reference.lzf_decode(stream, out_len)
    try:
        got = lzf_decompress(stream, out_len)
    except LZFError as exc:
        if exc.errno != expect:
            raise Finding(f"lzf_decompress fails with {exc.errno}, the spec "
                          f"{'decodes it' if isinstance(expect, bytes) else expect}") from exc
        buf = bytearray(out_len)
        try:
            lzf_decompress_into(stream, buf)
        except LZFError as exc2:
            if exc2.errno != exc.errno:
                raise Finding("lzf_decompress_into fails differently") from exc2
        else:
            raise Finding("lzf_decompress_into accepts what lzf_decompress rejects") from None
        raise
    if got != expect:
        raise Finding(f"lzf_decompress gives {len(got)} bytes, the spec "
                      f"{len(expect) if isinstance(expect, bytes) else expect}")
    buf = bytearray(out_len)
    if lzf_decompress_into(stream, buf) != len(got) or buf[:len(got)] != got:
        raise Finding("lzf_decompress_into disagrees with lzf_decompress")
    packed = lzf_compress(got, len(got) + len(got) // 32 + 16)
    if packed is None or lzf_decompress(packed, len(got)) != got:
        raise Finding("compressing the decoded bytes does not round-trip")
