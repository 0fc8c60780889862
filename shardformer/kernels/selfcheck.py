"""The kernels check themselves where they run, before they are used.

When the extension loads (``cuda.install``, with ``SHARDFORMER_KERNELS=check``), every kernel is
run through its public op against its PyTorch reference (``reference.py``, or the same op with
the extension off for the vocabulary-parallel loss pieces) on a few shapes, odd sizes included,
in fp32 and bf16, forward and every gradient. A kernel that disagrees beyond its tolerance, or
raises, is switched off for the process (``cuda.enabled(kernel)`` is False, so its reference
runs and training stays exact) with a one-line warning naming the kernel, the shape, the dtype
and the error. The verdict is cached as JSON under ``$SHARDFORMER_EXT_DIR/selfcheck/`` (default
``~/.cache/shardformer/ext``), keyed by the CUDA sources, torch, CUDA, the extension's origin
and the GPU model, so later runs reuse it; a changed source file gives a new key and a new check.

Tolerances (max |fused - reference| over max |reference|, per output and gradient): fp32 1e-5
times the square root of the reduction length over 8, at least 1e-5 (the kernels reduce in
another order); bf16 2e-2, the GPU tests' tolerance (the reference rounds its intermediate
products to bf16 where the kernels keep fp32: a few bf16 units on the gradients).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings

import torch

from . import cuda, reference

runs = 0  # how many times the checks have run in this process (tests read it)
DTYPES = (torch.float32, torch.bfloat16)


def _tolerance(dtype: torch.dtype, reduced: int) -> float:
    return 2e-2 if dtype == torch.bfloat16 else max(1e-5, 1e-5 * math.sqrt(reduced) / 8)


def _compare(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        raise AssertionError(f"{what}: not finite")
    scale = want.abs().max().item() or 1.0
    err = (got - want).abs().max().item() / scale
    if not err <= tol:
        raise AssertionError(f"{what}: error {err:.2e} > tolerance {tol:.1e}")


def _grads(fn, inputs: list[torch.Tensor], seed: int):
    """Outputs of `fn(*inputs)` and the gradients of all inputs for a fixed random cotangent."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    cot = [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, cot)
    return [o.detach() for o in outs], [x.grad for x in leaves if x.requires_grad]


def _against(name, fused, ref, inputs, dtype, reduced, seed=0):
    tol = _tolerance(dtype, reduced)
    outs, grads = _grads(fused, inputs, seed)
    ref_outs, ref_grads = _grads(ref, inputs, seed)
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        _compare(f"{name} output {i}", a, b, tol)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        _compare(f"{name} gradient {i}", a, b, tol)


def _rand(gen, device, dtype, *shape, scale=1.0):
    return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)


def _rmsnorm(device, dtype, gen):
    from . import ops

    shapes = ((5, 64), (33, 200), (7, 129)) + (((4096, 8200),) if device == "cuda" else ())  # many rows per block
    for rows, hidden in shapes:
        x, r = _rand(gen, device, dtype, rows, hidden), _rand(gen, device, dtype, rows, hidden)
        w = 1 + _rand(gen, device, dtype, hidden, scale=0.1)
        shape = f"x [{rows}, {hidden}] {dtype}"
        yield shape, lambda: _against("rms_norm", lambda x, w: ops.rms_norm(x, w, 1e-6),
                                      lambda x, w: reference.rms_norm(x, w, 1e-6), [x, w], dtype, rows * hidden)
        yield shape + " + residual", lambda: _against(
            "rms_norm_residual", lambda x, r, w: ops.rms_norm_residual(x, r, w, 1e-6),
            lambda x, r, w: reference.rms_norm_residual(x, r, w, 1e-6), [x, r, w], dtype, rows * hidden)


def _rotary(device, dtype, gen):
    from . import ops

    for b, hq, hk, s, d, hf in ((2, 4, 2, 9, 32, False), (1, 3, 1, 17, 64, False), (3, 4, 2, 7, 32, True)):
        if hf:  # as HF's attention passes them: [B, S, H, D] transposed views, cos of batch 1 (broadcast)
            q = _rand(gen, device, dtype, b, s, hq, d).transpose(1, 2)
            k = _rand(gen, device, dtype, b, s, hk, d).transpose(1, 2)
        else:
            q, k = _rand(gen, device, dtype, b, hq, s, d), _rand(gen, device, dtype, b, hk, s, d)
        angle = torch.rand(1 if hf else b, s, d, generator=gen, device=device) * 6.3
        for trig in ((angle.cos().to(dtype), angle.sin().to(dtype)), (angle.cos(), angle.sin())):  # fp32 cos too
            shape = f"q [{b}, {hq}, {s}, {d}]{' transposed' if hf else ''} {dtype}, cos {trig[0].dtype}"
            yield shape, lambda q=q, k=k, c=trig[0], sn=trig[1]: _against(
                "rotary", lambda q, k: ops.apply_rotary(q, k, c, sn), lambda q, k: reference.apply_rotary(q, k, c, sn),
                [q, k], dtype, 2)


def _swiglu(device, dtype, gen):
    from . import ops

    for shape in ((3, 11, 96), (5, 129)):
        g, u = _rand(gen, device, dtype, *shape, scale=2.0), _rand(gen, device, dtype, *shape)
        yield f"gate {list(shape)} {dtype}", lambda g=g, u=u: _against("swiglu", ops.swiglu, reference.swiglu, [g, u],
                                                                        dtype, 1)


def _cross_entropy(device, dtype, gen):
    from .cross_entropy import linear_cross_entropy

    # (rows, hidden, this slice's vocabulary rows, its offset, the full vocabulary): full < start + v is
    # the last tensor-parallel rank's slice with padding rows, which must be ignored
    for n, h, v, start, full in ((37, 64, 1000, 0, 1000), (29, 48, 517, 300, 917), (23, 40, 300, 0, 250),
                                 (19, 40, 300, 600, 850)):
        hidden, weight = _rand(gen, device, dtype, n, h), _rand(gen, device, dtype, v, h, scale=0.2)
        target = torch.randint(0, full, (n,), generator=gen, device=device)
        target[::7] = -100

        def fused(hd, w, use=True, start=start, full=full, target=target):
            return linear_cross_entropy(hd, w, target, -100, "mean", 8, None, start, full, use_cuda=use)

        def ref(hd, w, start=start, full=full, target=target):
            if start:  # the vocabulary-parallel pieces: the same loop with the torch chunk functions
                return fused(hd, w, use=False)
            return torch.nn.functional.cross_entropy((hd @ w[:full].t()).float(), target, ignore_index=-100)

        yield f"hidden [{n}, {h}], vocab rows {v} at {start} of {full} {dtype}", lambda f=fused, r=ref, hd=hidden, w=weight: _against(
            "linear_cross_entropy", f, r, [hd, w], dtype, h * 8)


CHECKS = {"rmsnorm": _rmsnorm, "rotary": _rotary, "swiglu": _swiglu, "cross_entropy": _cross_entropy}


def run(device: str) -> dict[str, str | None]:
    """{kernel: None when it agrees, else "shape: error"} (every kernel run on `device`)."""
    global runs
    runs += 1
    verdict: dict[str, str | None] = {}
    for kernel, cases in CHECKS.items():
        verdict[kernel] = None
        try:
            for dtype in DTYPES:
                gen = torch.Generator(device=device).manual_seed(0)
                for shape, check in cases(device, dtype, gen):
                    try:
                        check()
                    except Exception as err:  # noqa: BLE001 - a kernel that raises is switched off too
                        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                        raise RuntimeError(f"{shape}: {text}") from None
        except RuntimeError as err:
            verdict[kernel] = str(err)
    return verdict


def cache_key(device: str) -> str:
    """What the verdict depends on: sources, torch, CUDA, the extension's origin and file, the GPU."""
    ext = cuda._state["ext"]
    python = hashlib.sha1()  # the ops' autograd wrappers and this check are part of what is verified
    for name in ("ops.py", "cross_entropy.py", "selfcheck.py"):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            python.update(f.read())
    parts = [cuda.sources_digest(), python.hexdigest()[:12], torch.__version__, str(torch.version.cuda),
             str(cuda._state["origin"])]
    path = getattr(ext, "__file__", None)
    if path and os.path.exists(path):
        stat = os.stat(path)
        parts.append(f"{stat.st_size}:{int(stat.st_mtime)}")
    if device == "cuda":
        parts += [torch.cuda.get_device_name(), str(torch.cuda.get_device_capability())]
    else:
        parts.append(device)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def cache_path(device: str) -> str:
    return os.path.join(cuda.cache_root(), "selfcheck", f"{cache_key(device)}.json")


def verify(device: str) -> dict[str, str]:
    """The kernels to switch off ({kernel: reason}): the cached verdict for this build and GPU, or
    a fresh check (then cached). Warns once per kernel switched off."""
    path = cache_path(device)
    verdict = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                verdict = json.load(f)["kernels"]
        except (OSError, ValueError, KeyError):
            verdict = None
    if verdict is None or set(verdict) != set(CHECKS):
        verdict = run(device)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"kernels": verdict, "torch": torch.__version__, "cuda": torch.version.cuda}, f, indent=1)
            os.replace(tmp, path)
        except OSError as err:  # a read-only cache only costs the check again next time
            warnings.warn(f"shardformer: could not cache the kernel self-check in {path} ({err})")
    off = {kernel: reason for kernel, reason in verdict.items() if reason}
    for kernel, reason in off.items():
        warnings.warn(f"shardformer: CUDA kernel {kernel!r} switched off for this process, its PyTorch reference "
                      f"runs instead: it failed its self-check on {reason}")
    return off
