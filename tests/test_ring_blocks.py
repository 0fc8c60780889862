"""Ring attention's block op on one process (`sequence_parallel/ring.py`: `_block`,
`_block_backward`, `_merge`, `_expand`, `_fold`), on the CPU (aten's flash attention) and on CUDA
(aten's memory-efficient attention, marked `gpu`): the three block shapes the zig-zag ring uses,
merged by their log-sum-exp, must give causal attention over the whole sequence, and each block's
backward, given the merged output and log-sum-exp, must sum to its gradients. The reference is
`F.scaled_dot_product_attention` in float64 on the CPU.

Tolerances, relative to the largest magnitude of the expected tensor: fp32 1e-5; bf16 2e-2 (the
inputs are the same bf16 values, but the kernels round their probabilities and outputs to bf16,
8 significant bits, 3.9e-3 per rounding, and the merge adds one more rounding per block)."""
import pytest
import torch
import torch.nn.functional as F

from shardformer.sequence_parallel.ring import _block, _block_backward, _expand, _fold, _merge

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rel(a, b):
    return ((a.double().cpu() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("half", [13, 32])
def test_ring_blocks_merge_to_causal_attention(device, dtype, half):
    """K/V of 2 x `half` tokens in two blocks A (first half) and B: rows [0, half) see A causally,
    rows [half, 2 half) see all of A and B causally: the ring's own, earlier-rank and later-rank
    block shapes. 4 query heads on 2 KV heads (GQA), head size 16."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 2 * half, 16, generator=gen).to(dtype) for h in (4, 2, 2))
    grad = torch.randn(2, 4, 2 * half, 16, generator=gen).to(dtype)
    scale = 16 ** -0.5
    ref_q, ref_k, ref_v = (t.double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(ref_q, _expand(ref_k, 2), _expand(ref_v, 2), is_causal=True, scale=scale)
    ref.backward(grad.double())

    q, k, v, grad = (t.to(device).contiguous() for t in (q, k, v, grad))
    first, second, a, b = slice(0, half), slice(half, None), slice(0, half), slice(half, None)
    blocks = [(first, a, True), (second, a, False), (second, b, True)]  # (query rows, keys, causal)
    out = torch.zeros(q.shape, dtype=torch.float32, device=device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=device)
    for rows, keys, causal in blocks:
        block_out, block_lse = _block(q[:, :, rows].contiguous(), _expand(k[:, :, keys], 2).contiguous(),
                                      _expand(v[:, :, keys], 2).contiguous(), causal, scale)
        assert block_lse.shape == q[:, :, rows].shape[:-1]
        _merge(out, lse, rows, block_out.float(), block_lse.float())
    out = out.to(dtype)
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=device) for t in (q, k, v))
    for rows, keys, causal in blocks:
        gq, gk, gv = _block_backward(grad[:, :, rows].contiguous(), q[:, :, rows].contiguous(),
                                     _expand(k[:, :, keys], 2).contiguous(), _expand(v[:, :, keys], 2).contiguous(),
                                     out[:, :, rows].contiguous(), lse[:, :, rows].contiguous(), causal, scale)
        dq[:, :, rows] += gq.float()
        dk[:, :, keys] += _fold(gk.float(), 2)
        dv[:, :, keys] += _fold(gv.float(), 2)
    errors = {"out": _rel(out, ref.detach()), "dq": _rel(dq, ref_q.grad), "dk": _rel(dk, ref_k.grad),
              "dv": _rel(dv, ref_v.grad)}
    assert max(errors.values()) <= TOL[dtype], errors
