"""Builds the C++ CPU kernels in csrc/ as ``prompt_kernels._C`` when torch is importable.

If torch (or a compiler) is missing the package is still installed; it then runs its CPU ops on
the PyTorch reference and warns once when a C++ kernel would have been used.
"""

import glob
import os
import sys

from setuptools import setup


def _extensions():
    if os.environ.get("PROMPT_KERNELS_NO_EXT") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("prompt_kernels: torch not importable, skipping the C++ extension", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    flags = ["-O3", "-std=c++17", "-fopenmp"]
    ext = CppExtension(
        "prompt_kernels._C",
        sources,
        extra_compile_args={"cxx": flags},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
