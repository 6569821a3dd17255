"""cffi build script for lazyshare's native core (API mode, out-of-line).

Run by ``pip install`` through setup.py's ``cffi_modules``; produces the
extension module ``lazyshare._native``. Paths are relative to the project root.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ffibuilder = FFI()
with open(os.path.join(HERE, "lazyshare.h")) as f:
    ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "lazyshare._native",
    '#include "internal.h"\n',
    sources=[
        os.path.relpath(os.path.join(HERE, n), ROOT) for n in sorted(os.listdir(HERE)) if n.endswith(".c")
    ],
    include_dirs=[os.path.relpath(HERE, ROOT)],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
    libraries=["pthread", "dl"],
)

if __name__ == "__main__":
    os.chdir(ROOT)
    ffibuilder.compile(verbose=True)
