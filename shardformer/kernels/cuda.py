"""Loader for the CUDA extension built from ``csrc/``.

Order: the ahead-of-time module ``shardformer._C`` (``CUDA_EXT=1 pip install .``), else a JIT
build through ``torch.utils.cpp_extension.load`` cached under ``$SHARDFORMER_EXT_DIR`` (default
``~/.cache/shardformer/ext/<torch>-<cuda>-<sources hash>``). Nothing is attempted unless
``torch.cuda.is_available()``. ``load()`` never raises: a failed build warns once and returns
None, and callers fall back to ``reference.py``.

``SHARDFORMER_KERNELS`` (read when the extension loads): ``check`` (default) runs every kernel
against its reference once per build and GPU (``selfcheck.py``) and switches off, for the
process, each kernel that disagrees or raises; ``trust`` skips the check; ``off`` never loads
the extension (the references run; ``SHARDFORMER_NO_CUDA_KERNELS=1`` means the same).
``enabled(kernel)`` says whether one kernel may run.
"""

from __future__ import annotations

import glob
import hashlib
import os
import warnings

import torch

from .build import CSRC, CXX_FLAGS, NVCC_FLAGS, SOURCES, link_flags

__all__ = ["load", "available", "require", "enabled", "mode", "install", "reset"]  # sources, flags: build.py

KERNELS = ("rmsnorm", "rotary", "swiglu", "cross_entropy")  # what the self-check can switch off one by one
MODES = ("check", "trust", "off")
# ext: the module; origin: "aot" / "jit" / a stand-in's name; why: why there is none; device: where
# the ops dispatch to it; disabled: {kernel: the self-check's one-line reason}
_state: dict = {"tried": False, "ext": None, "origin": None, "why": None, "device": "cuda", "disabled": {}}


def mode() -> str:
    """``SHARDFORMER_KERNELS``: check (default) | trust | off; ValueError for another value."""
    if os.environ.get("SHARDFORMER_NO_CUDA_KERNELS", "0") == "1":
        return "off"
    value = os.environ.get("SHARDFORMER_KERNELS", "check")
    if value not in MODES:
        raise ValueError(f"SHARDFORMER_KERNELS={value!r}: expected one of {', '.join(MODES)}")
    return value


def sources_digest() -> str:
    """Hash of the CUDA sources (and headers): a changed file means a new build and a new check."""
    digest = hashlib.sha1()
    for path in SOURCES + sorted(glob.glob(os.path.join(CSRC, "*.cuh"))):
        if os.path.exists(path):
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:12]


def cache_root() -> str:
    return os.environ.get("SHARDFORMER_EXT_DIR", os.path.join(os.path.expanduser("~"), ".cache", "shardformer", "ext"))


def _build_dir() -> str:
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-{sources_digest()}"
    path = os.path.join(cache_root(), tag.replace("+", "_"))
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
    """Return the extension module, or None when CUDA or the build is unavailable (the reason is
    in ``_state["why"]``). With ``SHARDFORMER_KERNELS=check`` the kernels are checked first."""
    if _state["tried"]:
        return _state["ext"]
    current = mode()  # a bad value raises on every call, before anything is tried
    _state["tried"] = True
    if current == "off":
        _state["why"] = "SHARDFORMER_KERNELS=off"
        return None
    if not torch.cuda.is_available():
        _state["why"] = "no CUDA device"
        return None
    try:
        try:
            from shardformer import _C as ext  # ahead-of-time build
            origin = "aot"
        except ImportError:
            ext, origin = _jit_build(), "jit"
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the reference path"
        _state["why"] = f"the build failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
        warnings.warn(f"shardformer: CUDA kernels unavailable, using PyTorch fallbacks ({exc})")
        return None
    return install(ext, origin, "cuda")


def install(ext, origin: str, device: str = "cuda"):
    """Use `ext` (the extension, or a stand-in with the same functions) for tensors on `device`,
    after the self-check when ``SHARDFORMER_KERNELS=check``; returns `ext`."""
    from . import selfcheck

    _state.update(tried=True, ext=ext, origin=origin, why=None, device=device, disabled={})
    if mode() == "check":
        try:
            _state["disabled"] = selfcheck.verify(device)
        except Exception as exc:  # noqa: BLE001 - the check itself broke: trust no kernel
            _state["disabled"] = {kernel: f"the self-check could not run ({exc})" for kernel in KERNELS}
            warnings.warn(f"shardformer: the CUDA kernels' self-check failed ({exc}); every kernel is switched off "
                          "for this process, the PyTorch references run")
    return ext


def reset() -> None:
    """Forget the loaded extension and the verdicts (the next ``load()`` starts again)."""
    _state.update(tried=False, ext=None, origin=None, why=None, device="cuda", disabled={})


def device_type() -> str:
    """The device type whose tensors the ops hand to the extension."""
    return _state["device"]


def enabled(kernel: str) -> bool:
    """False when the self-check switched `kernel` off (one of ``KERNELS``)."""
    return kernel not in _state["disabled"]


def available() -> bool:
    """True when the CUDA extension is loaded (or loads now)."""
    return load() is not None


def require():
    """The extension module; ``RuntimeError`` when it is not available (custom-op bodies call this)."""
    ext = load()
    if ext is None:
        raise RuntimeError("shardformer CUDA extension is not available")
    return ext
