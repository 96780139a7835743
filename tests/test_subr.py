"""humanize_number, expand_number and %#T as FreeBSD's hastctl/hastd print them."""

from __future__ import annotations

import pytest

from hast.subr import expand_number, format_duration, humanize


@pytest.mark.parametrize("n,text", [
    (0, "0"), (512, "512"), (999, "999"), (1000, "1.0K"), (1023, "1.0K"), (1024, "1.0K"),
    (65536, "64K"), (2097152, "2.0M"), (9961472, "9.5M"), (10485760, "10M"),
    (99995392, "95M"), (268430848, "256M"), (1073737216, "1.0G"), (1 << 40, "1.0T"),
    (10737413120, "10G"), (2**64 - 1, "16E"),
])
def test_humanize_matches_libutil(n: int, text: str) -> None:
    assert humanize(n) == text


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("512", 512), ("4k", 4096), ("4K", 4096), ("192M", 192 << 20), ("1g", 1 << 30),
    ("2T", 2 << 40), ("1p", 1 << 50), ("3e", 3 << 60), ("100000000", 100000000),
])
def test_expand_number(text: str, value: int) -> None:
    assert expand_number(text) == value


@pytest.mark.parametrize("text", ["", "k", "1.5M", "-1", "12x", "16e", "0x10", " 1"])
def test_expand_number_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        expand_number(text)


@pytest.mark.parametrize("secs,text", [
    (0, "0s"), (59, "59s"), (60, "1m"), (61, "1m1s"), (3600, "1h"), (3601, "1h0m1s"),
    (86400, "1d"), (90061, "1d1h1m1s"), (365 * 86400 + 5, "1y0d0h0m5s"), (365 * 86400, "1y"),
])
def test_format_duration(secs: int, text: str) -> None:
    assert format_duration(secs) == text
