"""torture: the crash-consistency harness of py-hast (issue 6, item 1).

``torture/run.py`` drives seeded cycles: a fresh two-node pair in namespaces, load through the
primary's NBD export (``workload``, over our own ``nbdclient``), one fault from ``faults``
(kill -9 of a node or both, partition, TCP resets, a slow link, a kernel EIO from ``eiofs``),
recovery, then the checks of ``checker``.  ``pair`` extends tests.hastpair.HastPair with raw
views of the disks; ``cycle`` strings one cycle together.  tests/test_torture.py runs a short
seeded subset in CI.
"""
