"""Loader for the CUDA extension built from ``csrc/``.

Order: the ahead-of-time module ``shardformer._C`` (``CUDA_EXT=1 pip install .``), else a JIT
build through ``torch.utils.cpp_extension.load`` cached under ``$SHARDFORMER_EXT_DIR`` (default
``~/.cache/shardformer/ext/<torch>-<cuda>-<sources hash>``). Nothing is attempted unless
``torch.cuda.is_available()``; set ``SHARDFORMER_NO_CUDA_KERNELS=1`` to force the PyTorch path.
``load()`` never raises: a failed build warns once and returns None, and callers fall back to
``reference.py``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import warnings

import torch

__all__ = ["load", "available", "require", "SOURCES", "NVCC_FLAGS", "CXX_FLAGS"]

CSRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "csrc"))
SOURCES = sorted(glob.glob(os.path.join(CSRC, "*.cu"))) + [os.path.join(CSRC, "bindings.cpp")]
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]

_state: dict = {"tried": False, "ext": None}


def _build_dir() -> str:
    digest = hashlib.sha1()
    for path in SOURCES + sorted(glob.glob(os.path.join(CSRC, "*.cuh"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-{digest.hexdigest()[:12]}"
    root = os.environ.get("SHARDFORMER_EXT_DIR", os.path.join(os.path.expanduser("~"), ".cache", "shardformer", "ext"))
    path = os.path.join(root, tag.replace("+", "_"))
    os.makedirs(path, exist_ok=True)
    return path


def _link_flags(cuda_home, toolkits=None) -> list[str]:
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


def _jit_build():
    from torch.utils import cpp_extension

    if not os.path.exists(os.path.join(CSRC, "bindings.cpp")):
        raise FileNotFoundError(f"CUDA sources not found under {CSRC} (installed without csrc/?)")
    return cpp_extension.load(name="shardformer_C", sources=SOURCES, extra_cflags=CXX_FLAGS,
                              extra_cuda_cflags=NVCC_FLAGS, extra_ldflags=_link_flags(cpp_extension.CUDA_HOME),
                              build_directory=_build_dir(), verbose=False)


def load():
    """Return the extension module, or None when CUDA or the build is unavailable."""
    if _state["tried"]:
        return _state["ext"]
    _state["tried"] = True
    if os.environ.get("SHARDFORMER_NO_CUDA_KERNELS", "0") == "1":
        return None
    try:
        if not torch.cuda.is_available():
            return None
        try:
            from shardformer import _C as ext  # ahead-of-time build
        except ImportError:
            ext = _jit_build()
        _state["ext"] = ext
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the reference path"
        warnings.warn(f"shardformer: CUDA kernels unavailable, using PyTorch fallbacks ({exc})")
        _state["ext"] = None
    return _state["ext"]


def available() -> bool:
    """True when the CUDA extension is loaded (or loads now)."""
    return load() is not None


def require():
    """The extension module; ``RuntimeError`` when it is not available (custom-op bodies call this)."""
    ext = load()
    if ext is None:
        raise RuntimeError("shardformer CUDA extension is not available")
    return ext
