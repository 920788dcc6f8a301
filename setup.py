"""Build script: the pure-Python package always; the C++/CUDA extension when it can be built.

The extension part lives in `milenas_fast/ops/build.py`-style logic below; it is skipped when torch is
not importable at build time (pip's isolated build) or when MILENAS_FAST_BUILD_EXT=0, in which case
the extension is compiled just in time on first use.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["milenas_fast", "milenas_fast.*"]) + ["milenas_fast.kernels"]

setup(
    packages=packages,
    package_dir={"milenas_fast.kernels": "kernels"},
)
