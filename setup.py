"""Build of the Cython hot paths and the per-platform cffi OS bindings.

Extensions: hast._bitmap (activemap), hast._io (aligned block I/O, provider geometry,
flush/delete, flock), hast._codec (LZF, zero detection).  OS bindings that differ per
platform go through cffi (hast/_os_build.py picks the declarations for sys.platform).
Set HAST_CYTHON_ANNOTATE=1 for HTML annotation, HAST_DEBUG=1 for -O0 -g.
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

cflags = ["-O3"] if not os.environ.get("HAST_DEBUG") else ["-O0", "-g"]

extensions = [
    Extension(f"hast.{name}", [f"hast/{name}.pyx"], include_dirs=["hast"],
              extra_compile_args=cflags)
    for name in ("_bitmap", "_io", "_codec", "_wire", "_aio")
]
if sys.platform.startswith("freebsd"):
    # GEOM Gate frontend (/dev/hast/<name>); its ABI header is hast/ggate.h.
    extensions.append(Extension("hast._ggate", ["hast/_ggate.pyx"], include_dirs=["hast"],
                                depends=["hast/ggate.h"], extra_compile_args=cflags))

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "boundscheck": False,
                             "wraparound": False, "cdivision": True},
        annotate=bool(os.environ.get("HAST_CYTHON_ANNOTATE")),
    ),
    cffi_modules=["hast/_os_build.py:ffibuilder"],
    zip_safe=False,
)

if sys.platform not in ("linux", "freebsd") and not sys.platform.startswith("freebsd"):
    print(f"warning: py-hast is tested on Linux and FreeBSD, not {sys.platform}", file=sys.stderr)
