"""py-hast: FreeBSD's HAST (Highly Available STorage) in Python with Cython hot paths.

The package mirrors hastd's one-file-per-subsystem layout: config (hast.conf), nv (the
name/value codec), metadata (the 4096-byte on-disk header), activemap (the dirty-extent
bitmap), pipeline (compression and checksums), ctl (hastctl), daemon (hastd).
"""

__version__ = "0.1.0"
