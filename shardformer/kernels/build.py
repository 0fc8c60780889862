"""What the CUDA extension is built from, shared by the JIT loader (``cuda.py``) and ``setup.py``.

Imports nothing from shardformer, so ``setup.py`` can load this file by path before the package is
installed: one list of sources, one set of compiler flags, one answer to where libcudart is.
"""

from __future__ import annotations

import glob
import os

__all__ = ["CSRC", "SOURCES", "CXX_FLAGS", "NVCC_FLAGS", "link_flags", "cuda_extension"]

CSRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "csrc"))
SOURCES = sorted(glob.glob(os.path.join(CSRC, "*.cu"))) + [os.path.join(CSRC, "bindings.cpp")]
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def link_flags(cuda_home, toolkits=None) -> list[str]:
    """``-L`` for libcudart when torch's ``CUDA_HOME`` lacks it.

    torch derives ``CUDA_HOME`` from ``which nvcc`` when the variable is unset; where that is a
    wrapper script (``/usr/local/bin/nvcc``) it becomes ``/usr/local`` and the link fails with
    "cannot find -lcudart". Then the first toolkit under ``/usr/local/cuda*`` that has it is used.
    """
    def has_cudart(lib):
        return os.path.exists(os.path.join(lib, "libcudart.so"))

    if cuda_home and any(has_cudart(os.path.join(cuda_home, d)) for d in ("lib64", "lib")):
        return []
    if toolkits is None:
        toolkits = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in toolkits:
        if has_cudart(os.path.join(root, "lib64")):
            return [f"-L{os.path.join(root, 'lib64')}"]
    return []


def cuda_extension(root: str, name: str = "shardformer._C"):
    """The ahead-of-time ``CUDAExtension`` (``CUDA_EXT=1 pip install .``), sources relative to ``root``."""
    from torch.utils import cpp_extension

    return cpp_extension.CUDAExtension(
        name, [os.path.relpath(s, root) for s in SOURCES],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        extra_link_args=link_flags(cpp_extension.CUDA_HOME))
