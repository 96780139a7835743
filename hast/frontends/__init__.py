"""Frontends: how the primary's data is exposed to its users.

On Linux the primary serves NBD (``nbd``) and ``/dev/hast/<name>`` is made from it
(``devnode``: the kernel NBD client where it exists, otherwise nbdfuse plus a loop device).
On FreeBSD the frontend is GEOM_GATE (``ggate``), as in base hastd.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Join:
    """Completes one frontend request made of several primary requests (maxio pieces):
    ``done`` gets the first error, or 0, once every part has reported."""

    __slots__ = ("left", "error", "lock", "done")

    def __init__(self, parts: int, done: Callable[[int], None]) -> None:
        self.left = parts
        self.error = 0
        self.lock = threading.Lock()
        self.done = done

    def part(self, err: int) -> None:
        with self.lock:
            if err and not self.error:
                self.error = err
            self.left -= 1
            last = self.left == 0
        if last:
            self.done(self.error)
