"""Frontends: how the primary's data is exposed to its users.

On Linux the primary serves NBD (``nbd``) and ``/dev/hast/<name>`` is made from it
(``devnode``: the kernel NBD client where it exists, otherwise nbdfuse plus a loop device).
On FreeBSD the frontend will be GEOM_GATE, as in base hastd.
"""
