"""Dispatching ops: the CUDA kernel when the tensors are on CUDA and the extension loaded, else
the PyTorch reference (identical semantics; see ``reference.py``).

The CUDA entry points are registered as ``torch.library`` custom ops (``shardformer::*``) with
fake implementations, and the autograd Functions around them only call those ops, so
``torch.compile`` traces through them without graph breaks. Inside a compiled graph the
element-wise ops trace their reference formulas by default (see ``COMPILED_KERNELS``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import cuda, reference
from .cross_entropy import linear_cross_entropy as _linear_cross_entropy

__all__ = ["rms_norm", "rms_norm_residual", "apply_rotary", "swiglu", "linear_cross_entropy"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# Under torch.compile the element-wise kernels (RMSNorm, SwiGLU, rotary) would be opaque custom ops
# that Inductor cannot fuse with their neighbours: the residual add before a norm, the bf16 cast after
# it under autocast, the transposes and dtype promotions around rotary. By default ("inductor") a
# compiled graph traces their reference formulas instead, which Inductor fuses into its own kernels;
# eager execution runs the CUDA kernels. The chunked linear + cross-entropy changes the algorithm (no
# full logits) and is a custom op in both. SHARDFORMER_COMPILED_KERNELS=custom keeps the custom ops
# inside compiled graphs too.
COMPILED_KERNELS = os.environ.get("SHARDFORMER_COMPILED_KERNELS", "inductor")
if COMPILED_KERNELS not in ("inductor", "custom"):
    raise ValueError(f"SHARDFORMER_COMPILED_KERNELS={COMPILED_KERNELS!r}: expected 'inductor' or 'custom'")


def _leave_to_inductor() -> bool:
    return COMPILED_KERNELS == "inductor" and torch.compiler.is_compiling()


def _use_cuda(*tensors) -> bool:
    """The extension is loaded and takes these tensors (its device, a float dtype)."""
    return all(t.device.type == cuda.device_type() and t.dtype in _FLOATS for t in tensors) and cuda.available()


def _use_kernel(kernel: str, *tensors) -> bool:
    """`_use_cuda` and the self-check left `kernel` on."""
    return _use_cuda(*tensors) and cuda.enabled(kernel)


# --------------------------------------------------------------------------- custom ops (CUDA)
@torch.library.custom_op("shardformer::rmsnorm_fwd", mutates_args=())
def _rmsnorm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, rstd = cuda.require().rmsnorm_fwd(x, residual, weight, eps)
    return y, s, rstd


@_rmsnorm_fwd.register_fake
def _(x, residual, weight, eps):
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    s = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape, dtype=out_dtype), s, x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("shardformer::rmsnorm_bwd", mutates_args=())
def _rmsnorm_bwd(dy: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 ds: Optional[torch.Tensor], need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = cuda.require().rmsnorm_bwd(dy, xs, weight, rstd, ds, need_dw)
    return dx, dw


@_rmsnorm_bwd.register_fake
def _(dy, xs, weight, rstd, ds, need_dw):
    return torch.empty_like(xs), torch.empty_like(weight)


@torch.library.custom_op("shardformer::rotary", mutates_args=())
def _rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            backward: bool, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    qo, ko = cuda.require().rotary(q, k, cos, sin, backward, out_dtype)
    return qo, ko


@_rotary.register_fake
def _(q, k, cos, sin, backward, out_dtype):
    return torch.empty_like(q, dtype=out_dtype), torch.empty_like(k, dtype=out_dtype)


@torch.library.custom_op("shardformer::swiglu_fwd", mutates_args=())
def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return cuda.require().swiglu_fwd(gate, up)


@_swiglu_fwd.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("shardformer::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dg, du = cuda.require().swiglu_bwd(dy, gate, up)
    return dg, du


@_swiglu_bwd.register_fake
def _(dy, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


# --------------------------------------------------------------------------- autograd wrappers
class _RMSNorm(torch.autograd.Function):
    """y = w * cast(x * rstd); with a residual, x is replaced by s = x + residual and s is returned."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        r2 = residual.reshape(-1, shape[-1]).contiguous() if residual is not None else None
        weight = weight.contiguous()  # the backward kernel needs it contiguous too
        y, s, rstd = _rmsnorm_fwd(x2, r2, weight, eps)
        ctx.has_res = residual is not None
        ctx.shape = shape
        ctx.save_for_backward(s if ctx.has_res else x2, weight, rstd)
        if ctx.has_res:
            return y.view(shape), s.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy, ds=None):
        xs, weight, rstd = ctx.saved_tensors
        h = ctx.shape[-1]
        ds2 = ds.reshape(-1, h).contiguous() if ds is not None else None
        dx, dw = _rmsnorm_bwd(dy.reshape(-1, h).contiguous(), xs, weight, rstd, ds2,
                              ctx.needs_input_grad[2])
        dx = dx.view(ctx.shape)
        return dx, (dx if ctx.has_res else None), (dw if ctx.needs_input_grad[2] else None), None


def _unit_stride(*tensors):
    """The tensors, each copied only where its last dimension is strided (the rotary kernel takes
    any other strides as they are)."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


class _Rotary(torch.autograd.Function):
    """q' = q*cos + rotate_half(q)*sin (same for k); backward applies the transposed rotation.

    The outputs have HF's dtype, ``promote(q, cos)``: fp32 under autocast (bf16 q/k, fp32 cos/sin),
    and the gradients come back in q's dtype.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.in_dtype = q.dtype
        return _rotary(q, k, cos, sin, False, torch.promote_types(q.dtype, cos.dtype))

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        gq, gk = _rotary(*_unit_stride(dq, dk), cos, sin, True, ctx.in_dtype)
        return gq, gk, None, None


class _SwiGLU(torch.autograd.Function):
    """y = silu(g) * u;  dg = dy * u * s * (1 + g * (1 - s)), du = dy * silu(g), s = sigmoid(g)."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return _swiglu_bwd(dy.contiguous(), gate, up)


# --------------------------------------------------------------------------- public ops
_RMS_MAX_H = 16384  # the backward keeps one fp32 row of dw per block in shared memory


def _rms_cuda_ok(x, weight) -> bool:
    return (not _leave_to_inductor() and _use_kernel("rmsnorm", x, weight) and weight.device == x.device and weight.dim() == 1 and weight.numel() == x.shape[-1]
            and 0 < x.shape[-1] <= _RMS_MAX_H)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm`` forward; see ``reference.rms_norm``."""
    if _rms_cuda_ok(x, weight):
        return _RMSNorm.apply(x, None, weight, eps)
    return reference.rms_norm(x, weight, eps)


def rms_norm_residual(x, residual, weight, eps):
    """``s = x + residual``; returns ``(rms_norm(s), s)``; see ``reference.rms_norm_residual``."""
    if (_rms_cuda_ok(x, weight) and _use_cuda(residual) and residual.device == x.device
            and residual.dtype == x.dtype and residual.shape == x.shape):
        return _RMSNorm.apply(x, residual, weight, eps)
    return reference.rms_norm_residual(x, residual, weight, eps)


_ROTARY_MAX_GRID_YZ = 65535  # the kernel's grid has one y per head and one z per batch row


def _rotary_dtypes_ok(q, k, cos, sin) -> bool:
    """The kernel's dtype combinations: all equal, or low-precision q/k with fp32 cos/sin."""
    return (q.dtype == k.dtype and cos.dtype == sin.dtype
            and (q.dtype == cos.dtype or cos.dtype == torch.float32))


def apply_rotary(q, k, cos, sin, unsqueeze_dim: int = 1):
    """HF ``apply_rotary_pos_emb``; the CUDA path takes 4-D q/k and 3-D cos/sin, even head_dim.

    Output dtype as HF's: ``promote(q, cos)`` (under autocast, bf16 q/k and fp32 cos/sin give fp32).
    """
    ok = (not _leave_to_inductor() and _use_kernel("rotary", q, k, cos, sin) and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3
          and unsqueeze_dim in (1, 2) and q.shape[-1] % 2 == 0 and _rotary_dtypes_ok(q, k, cos, sin)
          and len({q.device, k.device, cos.device, sin.device}) == 1
          and cos.shape == sin.shape and cos.shape[-1] == q.shape[-1] == k.shape[-1] and not (cos.requires_grad or sin.requires_grad))
    if not ok:
        return reference.apply_rotary(q, k, cos, sin, unsqueeze_dim)
    if unsqueeze_dim == 2:  # [B, S, H, D] -> [B, H, S, D] views, no copy
        qo, ko = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 1)
        return qo.transpose(1, 2), ko.transpose(1, 2)
    b, s = max(q.shape[0], cos.shape[0]), q.shape[2]
    if (q.shape[0] != k.shape[0] or q.shape[0] != b or q.shape[2] != k.shape[2] or cos.shape[1] != s
            or cos.shape[0] not in (1, b)  # q broadcast against a larger cos batch: reference
            or max(b, q.shape[1], k.shape[1]) > _ROTARY_MAX_GRID_YZ):
        return reference.apply_rotary(q, k, cos, sin, unsqueeze_dim)
    return _Rotary.apply(*_unit_stride(q, k, cos.expand(b, s, -1), sin.expand(b, s, -1)))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    if not _leave_to_inductor() and _use_kernel("swiglu", gate, up) and gate.dtype == up.dtype and gate.shape == up.shape:
        return _SwiGLU.apply(gate, up)
    return reference.swiglu(gate, up)


def linear_cross_entropy(hidden, weight, target, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int | None = None, process_group=None, vocab_start: int = 0,
                         vocab_size: int | None = None, reduce_grad_hidden: bool = True):
    """Chunked ``F.cross_entropy(hidden @ weight.T, target)``; see ``cross_entropy.py``."""
    return _linear_cross_entropy(hidden, weight, target, ignore_index, reduction, chunk_size,
                                 process_group, vocab_start, vocab_size, use_cuda=_use_kernel("cross_entropy", hidden, weight),
                                 reduce_grad_hidden=reduce_grad_hidden)
