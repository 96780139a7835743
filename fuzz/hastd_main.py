"""``python fuzz/hastd_main.py <hastd args>``: hastd whose log is encoded as syslog(3) does.

Used by fuzz/hastd.py.  In the foreground hastd writes its log to stdout/stderr, whose
encoders may escape what is not UTF-8; daemonized it calls syslog(), which raises
UnicodeEncodeError on it.  Peers choose some of the text hastd logs (resource names), so the
fuzzed daemon must behave as the daemonized one does: every message, as hast.log hands it to
its sink, is first encoded strictly, then written as usual.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hast import log  # noqa: E402

_printable = log._printable


def _strict_printable(text: str) -> str:
    out = _printable(text)
    out.encode("utf-8")     # what syslog.syslog() does first
    return out


log._printable = _strict_printable

from hast import daemon  # noqa: E402

if __name__ == "__main__":
    sys.exit(daemon.main(sys.argv[1:], "hastd"))
