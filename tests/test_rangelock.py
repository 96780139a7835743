"""hast.rangelock: regular writes share ranges, synchronization chunks exclude them."""

from __future__ import annotations

import threading

from hast.rangelock import RangeLocks


def test_regular_holders_share_and_count() -> None:
    r = RangeLocks()
    a = r.lock_regular(0, 4096)
    b = r.lock_regular(0, 4096)
    c = r.lock_regular(2048, 4096)
    assert r.try_lock_sync(4096, 4096) is None          # overlaps c
    assert r.try_lock_sync(8192, 4096) == (8192, 12288)
    r.unlock_regular(a)
    r.unlock_regular(c)
    assert r.try_lock_sync(0, 4096) is None             # b still holds it
    r.unlock_regular(b)
    assert r.try_lock_sync(0, 4096) == (0, 4096)


def test_sync_waits_for_regular_and_regular_for_sync() -> None:
    r = RangeLocks()
    key = r.lock_regular(0, 8192)
    got: list = []
    t = threading.Thread(target=lambda: got.append(r.lock_sync(4096, 4096)))
    t.start()
    t.join(0.2)
    assert t.is_alive() and not got                     # waiting on the regular holder
    r.unlock_regular(key)
    t.join(30)
    assert got == [(4096, 8192)]
    t2 = threading.Thread(target=lambda: got.append(r.lock_regular(0, 8192)))
    t2.start()
    t2.join(0.2)
    assert t2.is_alive()                                # waiting on the sync holder
    r.unlock_sync(got[0])
    t2.join(30)
    assert got[1] == (0, 8192)


def test_lock_sync_gives_up_when_stopped() -> None:
    r = RangeLocks()
    r.lock_regular(0, 4096)
    stop = threading.Event()
    stop.set()
    assert r.lock_sync(0, 4096, stop=stop, poll=0.01) is None
