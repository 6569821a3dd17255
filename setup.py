from setuptools import setup

# cffi has no pyproject hook: the native core is declared here (csrc/build.py).
setup(cffi_modules=["csrc/build.py:ffibuilder"])
