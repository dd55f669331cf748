"""cffi builder for the private extension ``udedup._native``.

Every ``csrc/NAME.cdef.h`` feeds ``ffi.cdef`` and its real header ``csrc/NAME.h`` is included by
``set_source``, so the compiler checks the declarations against the definitions. Every ``csrc/*.c``
is compiled. ``UDEDUP_WERROR=1`` (set by CI) turns warnings into errors.
"""
import glob
import os

from cffi import FFI

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")


def _rel(path):
    # setuptools wants source paths relative to the project root when it builds from there
    rel = os.path.relpath(path, os.getcwd())
    return path if rel.startswith("..") else rel


def _cdef_headers():
    headers = sorted(glob.glob(os.path.join(CSRC, "*.cdef.h")))
    main = os.path.join(CSRC, "udedup.cdef.h")
    return [main] + [h for h in headers if h != main]


ffibuilder = FFI()
for header in _cdef_headers():
    with open(header, encoding="utf-8") as f:
        ffibuilder.cdef(f.read())

_compile_args = ["-std=c11", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"]
if os.environ.get("UDEDUP_WERROR") == "1":
    _compile_args.append("-Werror")

ffibuilder.set_source(
    "udedup._native",
    "\n".join(f'#include "{os.path.basename(h)[:-len(".cdef.h")]}.h"' for h in _cdef_headers()),
    sources=[_rel(p) for p in sorted(glob.glob(os.path.join(CSRC, "*.c")))],
    include_dirs=[_rel(CSRC)],
    extra_compile_args=_compile_args,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
