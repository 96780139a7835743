"""Regression tests for what fuzzing found (fuzz/, issue 6 item 2).

One test per finding, named after the parser and the input that broke it, each with the
smallest reproducer the fuzzer produced (or a hand-reduced one).  The fuzz target that found
it is named in the docstring: ``python fuzz/run.py --target <name> --reproduce <file>``
replays any saved input.
"""

from __future__ import annotations

import pytest

from fuzz.common import frame, nv_record
from hast import config, nv

NODE = config.NodeIdentity(hostname="hasta", hostuuid="", hostid=0)


# -- nv: decoded strings must be encodable again (target nv, control) -------------------------

@pytest.mark.parametrize("blob", [
    nv_record(17, b"resource", b"\xff\xfe\0"),            # a string value that is not UTF-8
    nv_record(2, b"ver\x88ion", b"\2"),                    # a name that is not UTF-8
    nv_record(17, b"resource0", b"Vt\xff\x03\0") + nv_record(2, b"cmd", b"\2"),
])
def test_nv_non_utf8_round_trip(blob: bytes) -> None:
    """NV.unpack decodes non-UTF-8 bytes with surrogateescape; NV.pack raised
    UnicodeEncodeError on them, so the daemon could not echo a peer's resource name (its
    STATUS reply) -- hastd died on ``cmd=2 resource0="\\xfe"`` sent to the control socket."""
    msg = nv.NV.unpack(blob)
    assert msg.pack() == blob
    assert nv.NV.unpack(msg.pack()) == msg


# -- config: timeout with more digits than int() converts (target config) ---------------------

def test_config_timeout_with_5000_digits() -> None:
    """``timeout 111...1`` (5000 digits) raised ValueError from int() (Python's 4300-digit
    limit) instead of a ConfigError.  FreeBSD's atoi: strtol clamps to LONG_MAX, the cut to
    int gives -1, hence "Negative or zero timeout."."""
    text = "timeout " + "1" * 5000 + "\n"
    with pytest.raises(config.ConfigError, match="Negative or zero timeout."):
        config.parse(text, "fuzz.conf", NODE)


def test_config_timeout_with_leading_zeros_still_parses() -> None:
    text = ("timeout " + "0" * 5000 + "7\nresource r {\n on hasta {\n local /a\n"
            " remote 10.0.0.2\n }\n}\n")
    assert config.parse(text, "fuzz.conf", NODE).resources["r"].timeout == 7


def test_frame_helpers_are_nv_compatible() -> None:
    """The raw builders the regressions use produce what hast.nv produces."""
    assert nv_record(2, b"cmd", b"\2") == nv.NV().add_uint8("cmd", 2).pack()
    assert frame(b"") == b"\2\0\0\0\0"
