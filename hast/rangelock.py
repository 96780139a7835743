"""rangelock: keeps synchronization chunks and regular writes off each other's ranges.

FreeBSD's primary holds two range-lock sets (rangelock.c): a synchronization chunk must not be
copied while a regular write to the same range is in flight (the copy could carry the old
data over the new), and a regular write waits while a chunk of its range is being copied.
Regular writes never exclude each other.  py-hast also takes the regular lock for DELETE,
which FreeBSD does not (hast-internals §14.11), for the same reason.
"""

from __future__ import annotations

import threading


class RangeLocks:
    """Two kinds of holders: ``regular`` (many, overlapping freely) and ``sync``.

    Holders are counted per (start, end) in plain dicts, and a waiter is woken only when
    one exists: the regular lock and unlock run once per WRITE on the data path, where
    collections.Counter's Python-level methods and a notify_all() with nobody waiting cost
    more than the rest of the lock.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._regular: dict[tuple[int, int], int] = {}
        self._sync: dict[tuple[int, int], int] = {}
        self._waiters = 0

    @staticmethod
    def _overlaps(held: dict[tuple[int, int], int], start: int, end: int) -> bool:
        return any(s < end and start < e for (s, e) in held)

    def _wait(self, timeout: float | None = None) -> None:
        self._waiters += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._waiters -= 1

    def lock_regular(self, offset: int, length: int) -> tuple[int, int]:
        key = (offset, offset + length)
        with self._cond:
            while self._sync and self._overlaps(self._sync, *key):
                self._wait()
            regular = self._regular
            regular[key] = regular.get(key, 0) + 1
        return key

    def unlock_regular(self, key: tuple[int, int]) -> None:
        with self._cond:
            regular = self._regular
            count = regular[key] - 1
            if count:
                regular[key] = count
            else:
                del regular[key]
            if self._waiters:
                self._cond.notify_all()

    def try_lock_sync(self, offset: int, length: int) -> tuple[int, int] | None:
        """The sync lock, or None while a regular write overlaps (the caller retries later)."""
        key = (offset, offset + length)
        with self._cond:
            if self._regular and self._overlaps(self._regular, *key):
                return None
            self._sync[key] = self._sync.get(key, 0) + 1
            return key

    def lock_sync(self, offset: int, length: int, stop: threading.Event | None = None,
                  poll: float = 0.5) -> tuple[int, int] | None:
        key = (offset, offset + length)
        with self._cond:
            while self._regular and self._overlaps(self._regular, *key):
                if stop is not None and stop.is_set():
                    return None
                self._wait(poll)
            self._sync[key] = self._sync.get(key, 0) + 1
        return key

    def unlock_sync(self, key: tuple[int, int]) -> None:
        with self._cond:
            count = self._sync[key] - 1
            if count:
                self._sync[key] = count
            else:
                del self._sync[key]
            if self._waiters:
                self._cond.notify_all()
