"""Fused linear + cross-entropy that never materialises the full ``[N, V]`` logits.

Math (per row ``i``, target ``t_i``, logits ``z_i = W h_i`` in the matmul dtype, read as fp32)::

    lse_i  = log(sum_j exp(z_ij))            loss = sum_i valid_i * (lse_i - z_{i t_i}) * scale
    dz_ij  = scale * valid_i * (softmax(z_i)_j - [j == t_i])
    dh_i   = dz_i @ W          dW = sum_i dz_i^T h_i       (dW accumulated in fp32)

``scale`` is 1 for ``reduction="sum"`` and ``1 / #valid`` for ``"mean"`` (exactly
``F.cross_entropy``'s mean over non-ignored rows). The rows are processed ``chunk_size`` at a
time, and the gradients are computed *in forward*, chunk by chunk, and kept; backward only
multiplies them by the incoming scalar gradient. Peak extra memory is one chunk of logits.

Vocab-parallel (``process_group`` given): ``weight`` is this rank's vocab shard, rows
``[vocab_start, vocab_start + V_local)`` of the full head; ``hidden`` and ``target`` are
replicated over the group. Per chunk, the row max, the sum of exponentials and the target
logit are all-reduced (MAX, SUM, SUM), so every rank gets the same loss. The returned hidden
gradient is the *full* gradient (summed over the group in forward), so the caller must not
all-reduce it again. Vocabulary rows at global index ``>= vocab_size`` (padding) are excluded.

The per-chunk work is pluggable: ``torch`` ops here, or the CUDA extension's kernels. The
extension's entry points are only called through the ``shardformer::linear_ce_forward``,
``shardformer::ce_chunk_stats``, ``shardformer::ce_chunk_grad_`` and ``shardformer::addmm_fp32_``
custom ops below (with fake
implementations), so ``torch.compile`` traces the fused loss without a graph break.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..comm import all_reduce_no_grad
from . import cuda

__all__ = ["linear_cross_entropy", "LinearCrossEntropyFunction", "default_chunk_size"]


_CHUNK_ELEMENTS = 1 << 28  # logits elements per chunk at most: 512 MiB in bf16


def default_chunk_size(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk (``vocab``: the full vocabulary, over all ranks).

    Every chunk reads and writes the fp32 ``[V, H]`` weight-gradient accumulator once, so few
    large chunks cost less than many small ones: up to ``2**28`` logits elements per chunk (a
    power of two of rows), at least about ``hidden`` elements per row of the chunk's share of the
    vocabulary; and never more than a quarter of the rows (rounded up), so the full ``[N, V]``
    logits never exist. E.g. N=16384, H=2048, V=128256: 2048 rows, 8 chunks of 512 MiB (bf16).
    """
    n_rows = max(1, n_rows)
    by_width = math.ceil(n_rows / max(1, math.ceil(vocab / max(1, hidden))))
    by_width = 1 << max(0, math.ceil(math.log2(max(1, by_width))))
    by_size = 1 << max(0, (_CHUNK_ELEMENTS // max(1, vocab)).bit_length() - 1)
    return max(1, min(n_rows, math.ceil(n_rows / 4), max(by_width, by_size)))


def _chunk_logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``h @ w.T`` for one chunk (a separate function so tests can observe chunk sizes)."""
    return h @ w.t()


def ce_chunk_stats(logits: torch.Tensor, target_local: torch.Tensor, vocab_valid: int):
    """Per-row ``(max, sum(exp(z - max)), z[target])`` in fp32 over the first ``vocab_valid`` columns.

    ``target_local`` is the target's column in this chunk, or -1 when it is not here / ignored
    (its target logit is then 0).
    """
    rows = logits.shape[0]
    if vocab_valid == 0:
        zeros = logits.new_zeros(rows, dtype=torch.float32)
        return torch.full_like(zeros, -math.inf), zeros, zeros
    z = logits[:, :vocab_valid].float()
    m = z.amax(dim=1)
    s = torch.exp(z - m[:, None]).sum(dim=1)
    has = target_local >= 0
    zt = z.gather(1, target_local.clamp(min=0)[:, None]).squeeze(1)
    return m, s, torch.where(has, zt, torch.zeros_like(zt))


def ce_chunk_grad(logits, lse, target_local, vocab_valid: int, row_scale):
    """``row_scale * (softmax - onehot)`` in the logits' dtype; padding columns get 0."""
    p = torch.exp(logits.float() - lse[:, None])
    if vocab_valid < p.shape[1]:
        p[:, vocab_valid:] = 0
    has = (target_local >= 0).to(p.dtype)
    p.scatter_add_(1, target_local.clamp(min=0)[:, None], -has[:, None])
    p.mul_(row_scale[:, None])
    return p.to(logits.dtype)


# --------------------------------------------------------------------------- custom ops (CUDA)
@torch.library.custom_op("shardformer::linear_ce_forward", mutates_args=())
def _linear_ce_forward(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int,
                       chunk_size: int, mean: bool, vocab_valid: int, need_h: bool,
                       need_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole chunk loop in C++: ``(loss fp32 [], grad_hidden fp32 [N, H], grad_weight fp32 [V, H])``;
    a gradient not asked for (``need_h`` / ``need_w`` False) is an empty fp32 ``[0]``."""
    loss, gh, gw = cuda.require().linear_ce_forward(hidden, weight, target, ignore_index, chunk_size, mean,
                                            vocab_valid, need_h, need_w)
    return loss, gh, gw


@_linear_ce_forward.register_fake
def _(hidden, weight, target, ignore_index, chunk_size, mean, vocab_valid, need_h, need_w):
    n, h_dim = hidden.shape
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty((), **f32), hidden.new_empty((n, h_dim) if need_h else (0,), **f32),
            hidden.new_empty((weight.shape[0], h_dim) if need_w else (0,), **f32))


@torch.library.custom_op("shardformer::ce_chunk_stats", mutates_args=())
def _ce_chunk_stats(logits: torch.Tensor, target_local: torch.Tensor,
                    vocab_valid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA ``ce_chunk_stats``: per-row ``(max, sumexp, target logit)``, three fp32 ``[C]`` tensors."""
    m, s, zt = cuda.require().ce_chunk_stats(logits, target_local, vocab_valid)
    return m, s, zt


@_ce_chunk_stats.register_fake
def _(logits, target_local, vocab_valid):
    return tuple(logits.new_empty(logits.shape[0], dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("shardformer::ce_chunk_grad_", mutates_args=("logits",))
def _ce_chunk_grad_(logits: torch.Tensor, lse: torch.Tensor, target_local: torch.Tensor, vocab_valid: int,
                    row_scale: torch.Tensor) -> None:
    """CUDA ``ce_chunk_grad_``: overwrites ``logits`` with its scaled CE gradient (see ``ce_chunk_grad``)."""
    cuda.require().ce_chunk_grad_(logits, lse, target_local, vocab_valid, row_scale)


@_ce_chunk_grad_.register_fake
def _(logits, lse, target_local, vocab_valid, row_scale):
    return None


@torch.library.custom_op("shardformer::addmm_fp32_", mutates_args=("acc",))
def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """CUDA ``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` in the matmul dtype, accumulated in
    the GEMM's epilogue (no ``[V, H]`` temporary in the matmul dtype)."""
    cuda.require().addmm_fp32_(acc, a, b)


@_addmm_fp32_.register_fake
def _(acc, a, b):
    return None


def _torch_accumulate(acc, a, b):
    acc += (a @ b).float()


def _ext_chunk_grad(logits, lse, target_local, vocab_valid: int, row_scale):
    """``ce_chunk_grad``'s signature over the in-place op: the logits buffer becomes the gradient."""
    _ce_chunk_grad_(logits, lse, target_local, vocab_valid, row_scale)
    return logits


def _loop(hidden, weight, target, ignore_index, chunk_size, mean, need_h, need_w,
          group, vocab_start, vocab_valid, compute_dtype, stats_fn, grad_fn, acc_fn=_torch_accumulate,
          reduce_grad_hidden=True):
    """The chunk loop; returns ``(loss fp32 scalar, grad_hidden | None, grad_weight fp32 | None)``.
    ``acc_fn(acc, a, b)`` adds ``a @ b`` into the fp32 weight gradient."""
    n, h_dim = hidden.shape
    w = weight.to(compute_dtype)
    valid_all = target != ignore_index
    n_valid = valid_all.sum().to(torch.float32)
    scale = 1.0 / n_valid if mean else torch.ones((), device=hidden.device)
    need_grad = need_h or need_w
    grad_h = torch.empty(n, h_dim, dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device) if need_w else None
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        h = hidden[start:end].to(compute_dtype)
        valid = valid_all[start:end]
        tl = target[start:end] - vocab_start
        here = valid & (tl >= 0) & (tl < vocab_valid)
        tl = torch.where(here, tl, torch.full_like(tl, -1))
        logits = _chunk_logits(h, w)
        m, s, zt = stats_fn(logits, tl, vocab_valid)
        if group is not None:  # functional collectives: traceable by torch.compile
            gm = all_reduce_no_grad(m, group, "max")
            s = all_reduce_no_grad(s * torch.exp(m - gm), group, "sum")
            zt = all_reduce_no_grad(zt, group, "sum")
            m = gm
        lse = m + torch.log(s)
        loss = loss + torch.where(valid, lse - zt, torch.zeros_like(lse)).sum()
        if need_grad:
            row_scale = torch.where(valid, scale.expand_as(lse), torch.zeros_like(lse))
            g = grad_fn(logits, lse, tl, vocab_valid, row_scale)
            if need_h:
                grad_h[start:end] = g @ w
            if need_w:
                acc_fn(grad_w, g.t(), h)
            del g
        del logits
    if need_h and group is not None and reduce_grad_hidden:
        grad_h = all_reduce_no_grad(grad_h, group, "sum")
    loss = loss / n_valid if mean else loss
    return loss, grad_h, grad_w


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: forward runs the chunk loop and keeps the gradients; backward scales them.

    ``use_ext`` selects the CUDA extension (through the custom ops above) instead of the torch
    backend; a plain bool, so dynamo never sees the extension module. With it and no process
    group the whole loop runs in C++ (``shardformer::linear_ce_forward``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, chunk_size, mean, group,
                vocab_start, vocab_valid, compute_dtype, use_ext, reduce_grad_hidden=True):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            if use_ext and group is None and vocab_start == 0:  # the C++ loop has no vocab offset
                loss, gh, gw = _linear_ce_forward(
                    hidden, weight.to(compute_dtype), target, ignore_index, chunk_size, mean,
                    vocab_valid, need_h, need_w)
                gh = gh if need_h else None
                gw = gw if need_w else None
            else:
                stats_fn = _ce_chunk_stats if use_ext else ce_chunk_stats
                grad_fn = _ext_chunk_grad if use_ext else ce_chunk_grad
                acc_fn = _addmm_fp32_ if use_ext else _torch_accumulate
                loss, gh, gw = _loop(hidden, weight, target, ignore_index, chunk_size, mean, need_h,
                                     need_w, group, vocab_start, vocab_valid, compute_dtype,
                                     stats_fn, grad_fn, acc_fn, reduce_grad_hidden)
        ctx.save_for_backward(
            gh.to(hidden.dtype) if gh is not None else None,
            gw.to(weight.dtype) if gw is not None else None,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = ctx.saved_tensors
        gh = gh * grad_out.to(gh.dtype) if gh is not None else None
        gw = gw * grad_out.to(gw.dtype) if gw is not None else None
        return gh, gw, None, None, None, None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    process_group=None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    use_cuda: bool = False,
    reduce_grad_hidden: bool = True,
) -> torch.Tensor:
    """``F.cross_entropy((hidden @ weight.T).float(), target)`` without the full logits.

    ``hidden [N, H]``, ``weight [V_local, H]``, ``target [N]``; ``reduction`` is ``"mean"`` or
    ``"sum"`` (``"none"`` cannot be fused: the weight gradient is pre-summed). Under autocast the
    matmul runs in the autocast dtype, as ``lm_head`` would. See the module docstring for the
    vocab-parallel arguments. ``use_cuda`` selects the CUDA kernels (``ops.linear_cross_entropy``
    sets it when the tensors are on CUDA and the extension loads). ``reduce_grad_hidden=False``
    leaves ``hidden``'s gradient partial over ``process_group`` (its caller reduces it, e.g. a
    sequence-parallel gather's reduce-scatter).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or target.dim() != 1 or target.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"linear_cross_entropy: expected hidden [N, H], weight [V, H], target [N]; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(target.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden size {hidden.shape[1]} != weight.shape[1] {weight.shape[1]}")
    n, h_dim = hidden.shape
    v_local = weight.shape[0]
    if vocab_size is None:
        vocab_valid = v_local
    else:
        vocab_valid = max(0, min(v_local, vocab_size - vocab_start))
    if chunk_size is None:
        world = dist.get_world_size(process_group) if process_group is not None else 1
        chunk_size = default_chunk_size(n, h_dim, v_local * world)
    chunk_size = max(1, int(chunk_size))
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        compute_dtype = torch.get_autocast_dtype(dev)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return LinearCrossEntropyFunction.apply(
        hidden, weight, target.long(), ignore_index, chunk_size, reduction == "mean", process_group,
        vocab_start, vocab_valid, compute_dtype, use_cuda, reduce_grad_hidden)
