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
The block op is aten's CPU flash attention; on other devices ring refuses (not tested there yet).
Causal training without padding only: a padding mask is refused.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm import pad_to_multiple

_SEQ = 2  # q, k, v as attention functions take them: [batch, heads, sequence, dim]


# ---------------------------------------------------------------------------- zig-zag placement
def zigzag_chunk(x: torch.Tensor, dim: int, sp: int, rank: int) -> torch.Tensor:
    """This rank's two chunks (r and 2sp-1-r) of x along dim, zero-padded to a multiple of 2 sp."""
    chunks = pad_to_multiple(x, dim, 2 * sp).chunk(2 * sp, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * sp - 1 - rank]], dim=dim)


def _unzigzag(pieces: list[torch.Tensor], dim: int, full: int) -> torch.Tensor:
    """The whole sequence (cut to `full`) from every rank's two chunks, in rank order."""
    sp = len(pieces)
    halves = [p.chunk(2, dim=dim) for p in pieces]
    ordered = [halves[r][0] for r in range(sp)] + [halves[sp - 1 - i][1] for i in range(sp)]
    return torch.cat(ordered, dim=dim).narrow(dim, 0, full)


def _all_pieces(x: torch.Tensor, group) -> list[torch.Tensor]:
    pieces = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return pieces


class _ZigzagSplit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, grad_scale):
        ctx.dim, ctx.group, ctx.full, ctx.grad_scale = dim, group, x.shape[dim], grad_scale
        return zigzag_chunk(x, dim, dist.get_world_size(group), dist.get_rank(group))

    @staticmethod
    def backward(ctx, grad):
        whole = _unzigzag(_all_pieces(grad, ctx.group), ctx.dim, ctx.full)
        return whole * ctx.grad_scale, None, None, None


class _ZigzagGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, full, group, grad_scale):
        ctx.dim, ctx.group, ctx.grad_scale = dim, group, grad_scale
        return _unzigzag(_all_pieces(x, group), dim, full)

    @staticmethod
    def backward(ctx, grad):
        sp, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return zigzag_chunk(grad, ctx.dim, sp, rank) * ctx.grad_scale, None, None, None, None


def zigzag_split(x, dim, group, grad_scale=1.0):
    """This rank's zig-zag chunks; backward all-gathers the gradient (times grad_scale)."""
    return _ZigzagSplit.apply(x, dim, group, grad_scale)


def zigzag_gather(x, dim, full, group, grad_scale=1.0):
    """The whole sequence from every rank's zig-zag chunks; backward keeps this rank's chunks."""
    return _ZigzagGather.apply(x, dim, full, group, grad_scale)


# ---------------------------------------------------------------------------- the ring
def _block(q, k, v, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=None,
                                                                     scale=scale)


def _block_backward(grad, q, k, v, out, lse, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, causal, attn_mask=None, scale=scale)


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


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale):
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
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale = group, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
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
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def ring_attention(q, k, v, group, scale):
    """Causal attention of zig-zag-placed q [B, H, 2L, D] and k, v [B, H_kv, 2L, D] over the ring
    (K/V travel with their own heads; each block repeats them for GQA)."""
    if q.device.type != "cpu":
        raise NotImplementedError("sp_mode='ring' runs its blocks with aten's CPU flash-attention op; "
                                  f"{q.device.type} is not supported yet")
    return _RingAttention.apply(q, k, v, group, scale)


def make_ring_attention():
    """The attention function registered for ring models (group and length from the module)."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if attention_mask is not None:
            raise ValueError("sp_mode='ring' supports causal attention without a padding mask")
        if dropout and module.training:
            raise ValueError("sp_mode='ring' does not support attention dropout")
        out = ring_attention(query, key, value, module.sf_sp_group, scaling)
        return out.transpose(1, 2).contiguous(), None

    return attention
