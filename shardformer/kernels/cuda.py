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

from .build import CSRC, CXX_FLAGS, NVCC_FLAGS, SOURCES, link_flags

__all__ = ["load", "available", "require"]  # sources and flags: build.py

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


def _jit_build():
    from torch.utils import cpp_extension

    if not os.path.exists(os.path.join(CSRC, "bindings.cpp")):
        raise FileNotFoundError(f"CUDA sources not found under {CSRC} (installed without csrc/?)")
    return cpp_extension.load(name="shardformer_C", sources=SOURCES, extra_cflags=CXX_FLAGS,
                              extra_cuda_cflags=NVCC_FLAGS, extra_ldflags=link_flags(cpp_extension.CUDA_HOME),
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
