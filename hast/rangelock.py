"""rangelock: keeps synchronization chunks and regular writes off each other's ranges.

FreeBSD's primary holds two range-lock sets (rangelock.c): a synchronization chunk must not be
copied while a regular write to the same range is in flight (the copy could carry the old
data over the new), and a regular write waits while a chunk of its range is being copied.
Regular writes never exclude each other.  py-hast also takes the regular lock for DELETE,
which FreeBSD does not (hast-internals §14.11), for the same reason.
"""

from __future__ import annotations

import threading
from collections import Counter


class RangeLocks:
    """Two kinds of holders: ``regular`` (many, overlapping freely) and ``sync``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._regular: Counter[tuple[int, int]] = Counter()
        self._sync: Counter[tuple[int, int]] = Counter()

    @staticmethod
    def _overlaps(held: Counter[tuple[int, int]], start: int, end: int) -> bool:
        return any(s < end and start < e for (s, e) in held)

    def lock_regular(self, offset: int, length: int) -> tuple[int, int]:
        key = (offset, offset + length)
        with self._cond:
            while self._sync and self._overlaps(self._sync, *key):
                self._cond.wait()
            self._regular[key] += 1
        return key

    def unlock_regular(self, key: tuple[int, int]) -> None:
        with self._cond:
            self._regular[key] -= 1
            if not self._regular[key]:
                del self._regular[key]
            self._cond.notify_all()

    def try_lock_sync(self, offset: int, length: int) -> tuple[int, int] | None:
        """The sync lock, or None while a regular write overlaps (the caller retries later)."""
        key = (offset, offset + length)
        with self._cond:
            if self._regular and self._overlaps(self._regular, *key):
                return None
            self._sync[key] += 1
            return key

    def lock_sync(self, offset: int, length: int, stop: threading.Event | None = None,
                  poll: float = 0.5) -> tuple[int, int] | None:
        key = (offset, offset + length)
        with self._cond:
            while self._regular and self._overlaps(self._regular, *key):
                if stop is not None and stop.is_set():
                    return None
                self._cond.wait(poll)
            self._sync[key] += 1
        return key

    def unlock_sync(self, key: tuple[int, int]) -> None:
        with self._cond:
            self._sync[key] -= 1
            if not self._sync[key]:
                del self._sync[key]
            self._cond.notify_all()
