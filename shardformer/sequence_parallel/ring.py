"""Ring attention on the sp axis (`sp_mode="ring"`), causal, with zig-zag placement.

The sequence (zero-padded to a multiple of 2 x sp) is cut into 2 x sp chunks; rank r holds chunks
r and 2sp-1-r, so that under the causal mask every rank does the same work. Everything outside
attention runs on those two chunks, exactly as in Ulysses (`ulysses.py`: the same layer hooks,
loss and gradient convention, with the zig-zag split instead of the contiguous one). Inside
attention, the ranks pass K/V blocks around the ring (point-to-point send/recv, sp - 1 hops)
and merge the partial results with their log-sum-exp; each block runs aten's flash-attention op
that returns the log-sum-exp. With zig-zag chunks a block is one of three shapes: this rank's own
K/V (causal), an earlier rank's (every query against the block's first chunk) or a later rank's
(the second query chunk against the whole block). Backward passes K/V around again together with
their accumulating gradients, each block's gradients from the flash backward op given the merged
output and log-sum-exp, and hands the gradients back to their owners.
Forward and backward are two custom ops (`shardformer::ring_attention[_backward]`), so
torch.compile records one opaque call per layer instead of breaking the graph at the
point-to-point traffic; the zig-zag split and gather are a local reorder around the functional
sequence split / gather of `comm.py`.
The block op returns the log-sum-exp: aten's flash attention on the CPU, aten's memory-efficient
attention on CUDA (every dtype, fp32 included; its log-sum-exp rows come padded to a multiple of 32,
cut here and padded back for its backward); other devices are refused at setup (`plan_ulysses`).
flash-attn is not used (it is installed on none of the machines this project is tested on).
Causal training; a padding mask only as right padding the loss ignores (`calls.py`: then no real
token sees a padded one, and the outputs at padded positions count nowhere); a sliding window is
refused.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.distributed_c10d import _resolve_process_group

from ..comm import gather_seq, pad_to_multiple, split_seq

_SEQ = 2  # q, k, v as attention functions take them: [batch, heads, sequence, dim]


# ---------------------------------------------------------------------------- zig-zag placement
def zigzag_chunk(x: torch.Tensor, dim: int, sp: int, rank: int) -> torch.Tensor:
    """This rank's two chunks (r and 2sp-1-r) of x along dim, zero-padded to a multiple of 2 sp."""
    chunks = pad_to_multiple(x, dim, 2 * sp).chunk(2 * sp, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * sp - 1 - rank]], dim=dim)


def _zigzag_order(x: torch.Tensor, dim: int, sp: int) -> torch.Tensor:
    """x (a multiple of 2 sp long on dim) with its chunks reordered 0, 2sp-1, 1, 2sp-2, ...: rank
    r's zig-zag chunks become the r-th contiguous 1/sp of it (a local, differentiable op)."""
    chunks = x.chunk(2 * sp, dim=dim)
    return torch.cat([chunks[i] for r in range(sp) for i in (r, 2 * sp - 1 - r)], dim=dim)


def _natural_order(x: torch.Tensor, dim: int, sp: int) -> torch.Tensor:
    """The inverse of `_zigzag_order`."""
    pairs = [pair.chunk(2, dim=dim) for pair in x.chunk(sp, dim=dim)]
    return torch.cat([pairs[r][0] for r in range(sp)] + [pairs[sp - 1 - i][1] for i in range(sp)], dim=dim)


def zigzag_split(x, dim, group, grad_scale=1.0):
    """This rank's zig-zag chunks (the sequence zero-padded to a multiple of 2 sp); backward
    all-gathers the gradient (times grad_scale). Functional collectives: compiles."""
    sp = dist.get_world_size(group)
    return split_seq(_zigzag_order(pad_to_multiple(x, dim, 2 * sp), dim, sp), dim, group, grad_scale)


def zigzag_gather(x, dim, full, group, grad_scale=1.0):
    """The whole sequence (cut to `full`) from every rank's zig-zag chunks; backward keeps this
    rank's chunks (times grad_scale)."""
    sp = dist.get_world_size(group)
    ordered = gather_seq(x, dim, x.shape[dim] * sp, group, reduce_grad=False, grad_scale=grad_scale)
    return _natural_order(ordered, dim, sp).narrow(dim, 0, full)


# ---------------------------------------------------------------------------- the ring
DEVICES = ("cpu", "cuda")  # where a block op exists
_LSE_ROWS = 32  # aten's memory-efficient attention pads each head's log-sum-exp to a multiple of this


def _block(q, k, v, causal, scale):
    """(output [B, H, Lq, D], log-sum-exp [B, H, Lq] fp32) of one block; q, k, v contiguous."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=None,
                                                                         scale=scale)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                      scale=scale)[:2]
    return out, lse[..., :q.shape[_SEQ]]


def _block_backward(grad, q, k, v, out, lse, causal, scale):
    """(dq, dk, dv) of one block given the merged `out` and `lse` of its query rows."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, causal, attn_mask=None, scale=scale)
    lse = F.pad(lse, (0, -lse.shape[-1] % _LSE_ROWS)).contiguous()  # the layout its forward returns
    unused = torch.empty((), dtype=torch.int64)  # dropout 0: the random seed and offset are not read
    return torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        grad, q, k, v, None, out, lse, unused, unused, 0.0, [True, True, True, False], causal, scale=scale)[:3]


def _shift(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Send to the next rank of the ring, receive from the previous one."""
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    to, frm = dist.get_global_rank(group, (rank + 1) % sp), dist.get_global_rank(group, (rank - 1) % sp)
    received = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, frm, group) for r in received]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


def _queries_and_keys(step_owner: int, rank: int, half: int):
    """(query slice, key/value slice, causal) of a block whose K/V come from `step_owner`."""
    if step_owner == rank:
        return slice(None), slice(None), True
    if step_owner < rank:  # every query against the owner's first (earlier) chunk
        return slice(None), slice(0, half), False
    return slice(half, None), slice(None), False  # the second query chunk against the whole block


def _merge(out, lse, rows, block_out, block_lse):
    """Fold a block's (output, log-sum-exp) into the running ones for the query rows `rows`."""
    old_out, old_lse = out[:, :, rows], lse[:, :, rows]
    new_lse = torch.logaddexp(old_lse, block_lse)
    out[:, :, rows] = old_out * torch.exp(old_lse - new_lse).unsqueeze(-1) + \
        block_out * torch.exp(block_lse - new_lse).unsqueeze(-1)
    lse[:, :, rows] = new_lse


def _expand(t: torch.Tensor, groups: int) -> torch.Tensor:
    """KV heads repeated for their query heads (GQA), for one block."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _fold(g: torch.Tensor, groups: int) -> torch.Tensor:
    """A block's gradient for the repeated KV heads, summed back onto the KV heads."""
    return g if groups == 1 else g.unflatten(1, (g.shape[1] // groups, groups)).sum(2)


def _ring_forward_impl(q, k, v, group, scale):
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    half, groups = q.shape[_SEQ] // 2, q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    kv = [k, v]
    for step in range(sp):
        owner = (rank - step) % sp
        rows, cols, causal = _queries_and_keys(owner, rank, half)
        block_out, block_lse = _block(q[:, :, rows], _expand(kv[0][:, :, cols], groups),
                                      _expand(kv[1][:, :, cols], groups), causal, scale)
        _merge(out, lse, rows, block_out.float(), block_lse.float())
        if step < sp - 1:
            kv = _shift(kv, group)
    return out.to(q.dtype), lse


def _ring_backward_impl(grad, q, k, v, out, lse, group, scale):
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    half, groups = q.shape[_SEQ] // 2, q.shape[1] // k.shape[1]
    grad = grad.contiguous()
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    travelling = [k, v, torch.zeros(k.shape, dtype=torch.float32, device=k.device),
                  torch.zeros(v.shape, dtype=torch.float32, device=v.device)]
    for step in range(sp):
        owner = (rank - step) % sp
        rows, cols, causal = _queries_and_keys(owner, rank, half)
        kb, vb, dk, dv = travelling
        gq, gk, gv = _block_backward(grad[:, :, rows], q[:, :, rows].contiguous(),
                                     _expand(kb[:, :, cols], groups).contiguous(),
                                     _expand(vb[:, :, cols], groups).contiguous(), out[:, :, rows].contiguous(),
                                     lse[:, :, rows].contiguous(), causal, scale)
        dq[:, :, rows] += gq.float()
        dk[:, :, cols] += _fold(gk.float(), groups)
        dv[:, :, cols] += _fold(gv.float(), groups)
        travelling = _shift(travelling, group)  # after sp hops each block is home with its gradients
    _, _, dk, dv = travelling
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# The ring as two custom ops: torch.compile treats each as one opaque call (its point-to-point
# traffic stays outside the graph) instead of breaking the graph at every layer; the process
# group travels by name.
@torch.library.custom_op("shardformer::ring_attention", mutates_args=())
def _ring_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_name: str,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _ring_forward_impl(q, k, v, _resolve_process_group(group_name), scale)


@_ring_op.register_fake
def _(q, k, v, group_name, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("shardformer::ring_attention_backward", mutates_args=())
def _ring_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, group_name: str,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ring_backward_impl(grad, q, k, v, out, lse, _resolve_process_group(group_name), scale)


@_ring_backward_op.register_fake
def _(grad, q, k, v, out, lse, group_name, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, group_name, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.group_name, ctx.scale = group_name, scale


def _backward(ctx, grad, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _ring_backward_op(grad, q, k, v, out, lse, ctx.group_name, ctx.scale)
    return dq, dk, dv, None, None


_ring_op.register_autograd(_backward, setup_context=_setup_context)


def ring_attention(q, k, v, group, scale=None):
    """Causal attention of zig-zag-placed q [B, H, 2L, D] and k, v [B, H_kv, 2L, D] over the ring
    (K/V travel with their own heads; each block repeats them for GQA)."""
    if q.device.type not in DEVICES:  # plan_ulysses refuses the model's device at setup already
        raise ValueError(f"sp_mode='ring' has a block op on {DEVICES}, not on {q.device.type}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _ring_op(q.contiguous(), k.contiguous(), v.contiguous(), group.group_name, scale)[0]


def no_mask(*args, **kwargs):
    """The mask function registered with the ring attention: it is causal by construction and
    takes no mask (also under torch.compile, where transformers' sdpa one would build one)."""
    return None


def make_ring_attention():
    """The attention function registered for ring models (group and length from the module)."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if attention_mask is not None:
            raise ValueError("sp_mode='ring' got a mask: ring attention is causal and takes none (padding is "
                             "checked before the call)")
        if dropout and module.training:
            raise ValueError("sp_mode='ring' does not support attention dropout")
        out = ring_attention(query, key, value, module.sf_sp_group, scaling)
        return out.transpose(1, 2).contiguous(), None

    return attention
