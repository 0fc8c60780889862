"""The PyTorch fallbacks of the fused kernels equal the HF code they replace (fp32, 1e-6).

Oracles: ``LlamaRMSNorm``, ``apply_rotary_pos_emb``, ``LlamaMLP`` from transformers, and
``F.cross_entropy`` on the full fp32 logits. Forward and every gradient, on odd shapes.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama as ml

from shardformer.kernels import (FusedRMSNorm, FusedSwiGLUMLP, cross_entropy, disable_fused_rotary,
                                 enable_fused_rotary, ops)

TOL = dict(rtol=1e-6, atol=1e-6)
SHAPES = [(5, 123), (2, 3, 64), (1, 7, 257)]


def _close(a, b, tol=TOL):
    torch.testing.assert_close(a, b, **tol)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=False)


# --------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_matches_hf(shape):
    torch.manual_seed(0)
    hf = ml.LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        hf.weight.normal_()
    fused = FusedRMSNorm.from_hf(hf)
    assert fused.weight is hf.weight and fused.variance_epsilon == hf.variance_epsilon
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in hf.named_parameters()]
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    want, got = hf(x), fused(x)
    _close(got, want)
    _close(_grads((got * dy).sum(), [x, hf.weight]), _grads((want * dy).sum(), [x, hf.weight]))


def test_rmsnorm_low_precision_input_same_dtype_rules():
    """bf16 input, fp32 weight: output fp32 exactly as HF (cast to bf16, then times weight)."""
    torch.manual_seed(1)
    hf = ml.LlamaRMSNorm(123)
    x = torch.randn(5, 123).to(torch.bfloat16)
    got, want = FusedRMSNorm.from_hf(hf)(x), hf(x)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_residual_matches_hf_pattern(shape):
    torch.manual_seed(2)
    hf = ml.LlamaRMSNorm(shape[-1])
    with torch.no_grad():
        hf.weight.normal_()
    x = torch.randn(shape, requires_grad=True)
    r = torch.randn(shape, requires_grad=True)
    dy, ds = torch.randn(shape), torch.randn(shape)
    s_want = r + x
    y_want = hf(s_want)
    y_got, s_got = FusedRMSNorm.from_hf(hf).forward_with_residual(x, r)
    _close(y_got, y_want)
    _close(s_got, s_want)
    inputs = [x, r, hf.weight]
    _close(_grads((y_got * dy).sum() + (s_got * ds).sum(), inputs),
           _grads((y_want * dy).sum() + (s_want * ds).sum(), inputs))


def test_rmsnorm_refuses_other_norms():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    norm = GemmaRMSNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
    with pytest.raises(ValueError, match="GemmaRMSNorm"):
        FusedRMSNorm.from_hf(norm)


# --------------------------------------------------------------------------- rotary
@pytest.mark.parametrize("b,hq,hk,s,d", [(1, 1, 1, 5, 123), (2, 3, 1, 5, 6), (2, 4, 2, 9, 64)])
def test_rotary_matches_hf(b, hq, hk, s, d):
    torch.manual_seed(3)
    q = torch.randn(b, hq, s, d, requires_grad=True)
    k = torch.randn(b, hk, s, d, requires_grad=True)
    cos = torch.randn(b, s, d, requires_grad=True)
    sin = torch.randn(b, s, d, requires_grad=True)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    want = ml.apply_rotary_pos_emb(q, k, cos, sin)
    got = ops.apply_rotary(q, k, cos, sin)
    _close(got, want)
    inputs = [q, k, cos, sin]
    _close(_grads((got[0] * dq).sum() + (got[1] * dk).sum(), inputs),
           _grads((want[0] * dq).sum() + (want[1] * dk).sum(), inputs))


def test_rotary_unsqueeze_dim_2():
    torch.manual_seed(4)
    q, k = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 1, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    _close(ops.apply_rotary(q, k, cos, sin, 2), ml.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2))


def _tiny_llama(**kw):
    cfg = dict(vocab_size=97, hidden_size=48, intermediate_size=37, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(kw)
    torch.manual_seed(5)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def test_enable_fused_rotary_routes_llama_attention(monkeypatch):
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 11))
    want = model(input_ids=ids).logits
    calls = []
    real = ops.apply_rotary
    monkeypatch.setattr(ops, "apply_rotary", lambda *a, **k: calls.append(1) or real(*a, **k))
    other = _tiny_llama()  # another model of the family in the same process: never routed
    try:
        assert "transformers.models.llama.modeling_llama" in enable_fused_rotary(model)
        assert enable_fused_rotary(model) == ["transformers.models.llama.modeling_llama"]  # idempotent
        got = model(input_ids=ids).logits
        assert len(calls) == model.config.num_hidden_layers
        _close(other(input_ids=ids).logits, want)
        assert len(calls) == model.config.num_hidden_layers  # the other model kept HF's function
    finally:
        disable_fused_rotary()
    assert ml.apply_rotary_pos_emb.__module__ == ml.__name__  # restored
    _close(got, want)
    model(input_ids=ids)
    assert len(calls) == model.config.num_hidden_layers  # unscoped after disable


# --------------------------------------------------------------------------- SwiGLU MLP
@pytest.mark.parametrize("hidden,inter,rows", [(123, 37, 5), (64, 160, 12)])
def test_swiglu_mlp_matches_hf(hidden, inter, rows):
    torch.manual_seed(6)
    mlp = ml.LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu",
                                      num_attention_heads=1, num_key_value_heads=1, head_dim=4))
    fused = FusedSwiGLUMLP.from_hf(mlp)
    assert fused.gate_proj is mlp.gate_proj and fused.down_proj is mlp.down_proj
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in mlp.named_parameters()]
    x = torch.randn(rows, hidden, requires_grad=True)
    dy = torch.randn(rows, hidden)
    want, got = mlp(x), fused(x)
    _close(got, want)
    inputs = [x] + list(mlp.parameters())
    _close(_grads((got * dy).sum(), inputs), _grads((want * dy).sum(), inputs))


def test_swiglu_op_matches_silu_product():
    torch.manual_seed(7)
    g = torch.randn(5, 123, requires_grad=True)
    u = torch.randn(5, 123, requires_grad=True)
    got, want = ops.swiglu(g, u), ml.ACT2FN["silu"](g) * u
    _close(got, want)
    _close(_grads(got.sum(), [g, u]), _grads(want.sum(), [g, u]))


def test_swiglu_refuses_other_activations():
    mlp = ml.LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=8, hidden_act="gelu",
                                      num_attention_heads=1, num_key_value_heads=1, head_dim=4))
    with pytest.raises(ValueError, match="config.hidden_act"):
        FusedSwiGLUMLP.from_hf(mlp)


# --------------------------------------------------------------------------- linear + cross-entropy
def _ce_case(n, h, v, n_ignored, seed=8):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / math.sqrt(h)).requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.randperm(n, generator=gen)[:n_ignored]] = -100
    return hidden, weight, target


def _ce_oracle(hidden, weight, target, reduction, vocab=None):
    logits = (hidden @ weight.t()).float()
    if vocab is not None:
        logits = logits[:, :vocab]
    return F.cross_entropy(logits, target, ignore_index=-100, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 4, 16, 37, 100, None])
def test_linear_ce_matches_full_logits(reduction, chunk, monkeypatch):
    hidden, weight, target = _ce_case(37, 23, 101, n_ignored=6)
    rows = []
    real = cross_entropy._chunk_logits
    monkeypatch.setattr(cross_entropy, "_chunk_logits", lambda h, w: rows.append(h.shape[0]) or real(h, w))
    got = ops.linear_cross_entropy(hidden, weight, target, reduction=reduction, chunk_size=chunk) * 2.5
    want = _ce_oracle(hidden, weight, target, reduction) * 2.5
    _close(got, want)
    _close(_grads(got, [hidden, weight]), _grads(want, [hidden, weight]))
    step = chunk or cross_entropy.default_chunk_size(37, 23, 101)
    assert sum(rows) == 37 and max(rows) <= step and len(rows) == math.ceil(37 / step)
    if chunk is None or chunk < 37:
        assert max(rows) < 37  # the full [N, V] logits never exist (the default: at most N/4 rows)


def test_linear_ce_all_ignored_is_nan_like_torch():
    hidden, weight, target = _ce_case(5, 7, 11, n_ignored=5)
    got = ops.linear_cross_entropy(hidden, weight, target, chunk_size=2)
    want = _ce_oracle(hidden, weight, target, "mean")
    assert torch.isnan(got) and torch.isnan(want)
    assert all(torch.all(g == 0) for g in _grads(got, [hidden, weight]))


def test_linear_ce_padded_vocab_excluded():
    hidden, weight, target = _ce_case(9, 5, 13, n_ignored=2)
    target = target.clamp(max=9)
    got = ops.linear_cross_entropy(hidden, weight, target, chunk_size=4, vocab_size=10)
    want = _ce_oracle(hidden, weight, target, "mean", vocab=10)
    _close(got, want)
    gh, gw = _grads(got, [hidden, weight])
    wh, ww = _grads(want, [hidden, weight])
    _close(gh, wh)
    _close(gw, ww)
    assert torch.all(gw[10:] == 0)


def test_linear_ce_autocast_bf16_matches_lm_head_under_autocast():
    hidden, weight, target = _ce_case(11, 16, 29, n_ignored=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.linear_cross_entropy(hidden, weight, target, chunk_size=3)
        want = F.cross_entropy((hidden @ weight.t()).float(), target)
    assert want.dtype == torch.float32
    _close(got, want, dict(rtol=1e-5, atol=1e-5))  # same bf16 logits; only fp32 summation order differs
    for g, w in zip(_grads(got, [hidden, weight]), _grads(want, [hidden, weight])):
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)  # bf16 matmuls in both


def test_linear_ce_rejects_reduction_none():
    hidden, weight, target = _ce_case(4, 3, 5, n_ignored=0)
    with pytest.raises(ValueError, match="reduction"):
        ops.linear_cross_entropy(hidden, weight, target, reduction="none")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 20), v=st.integers(2, 30), chunk=st.integers(1, 25), ign=st.integers(0, 5),
       mean=st.booleans())
def test_linear_ce_property(n, v, chunk, ign, mean):
    reduction = "mean" if mean else "sum"
    hidden, weight, target = _ce_case(n, 6, v, n_ignored=min(ign, n - 1), seed=n * 31 + v)
    got = ops.linear_cross_entropy(hidden, weight, target, reduction=reduction, chunk_size=chunk)
    want = _ce_oracle(hidden, weight, target, reduction)
    _close(got, want)
    _close(_grads(got, [hidden, weight]), _grads(want, [hidden, weight]))


def _vocab_parallel_case(vocab_true):
    """On a pool rank (gloo WORLD of 2): (hidden, full weight, target, this rank's weight shard,
    its first vocabulary row) of a 26-row head (padded to divide by 2) with `vocab_true` real rows."""
    import torch.distributed as dist

    rank, world, v = dist.get_rank(), dist.get_world_size(), 26
    hidden, weight, target = _ce_case(13, 7, v, n_ignored=3)
    target = target.clamp(max=vocab_true - 1)
    shard = v // world
    w_local = weight.detach()[rank * shard:(rank + 1) * shard].clone().requires_grad_()
    return hidden, weight, target, w_local, rank * shard


def _vocab_parallel_check(reduction):
    import torch.distributed as dist

    vocab_true = 23
    hidden, weight, target, w_local, start = _vocab_parallel_case(vocab_true)
    got = ops.linear_cross_entropy(hidden, w_local, target, reduction=reduction, chunk_size=4,
                                   process_group=dist.group.WORLD, vocab_start=start, vocab_size=vocab_true)
    want = _ce_oracle(hidden, weight, target, reduction, vocab=vocab_true)
    _close(got, want)
    gh, gw = _grads(got, [hidden, w_local])
    wh, ww = _grads(want, [hidden, weight])
    _close(gh, wh)
    _close(gw, ww[start:start + w_local.shape[0]])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_ce_vocab_parallel_gloo(reduction, pools):
    pools(2).run(_vocab_parallel_check, reduction)


# --------------------------------------------------------------------------- CUDA wrappers, mocked
class _FakeExt:
    """The C++ extension's API re-implemented with the kernels' explicit formulas (not autograd).

    Lets the CPU suite check ops.py's autograd/custom-op wiring and the hand-derived backward
    formulas that csrc/ implements, against HF's autograd.
    """

    @staticmethod
    def rmsnorm_fwd(x, residual, w, eps):
        s = (x.float() + residual.float()).to(x.dtype) if residual is not None else x
        rstd = torch.rsqrt(s.float().pow(2).mean(-1) + eps)
        y = (s.float() * rstd[:, None]).to(x.dtype).float() * w.float()
        out = y.to(torch.promote_types(x.dtype, w.dtype))
        return out, (s if residual is not None else x.new_empty(0)), rstd

    @staticmethod
    def rmsnorm_bwd(dy, xs, w, rstd, ds, need_dw):
        g = (dy.float() * w.float()).to(xs.dtype).float()
        xh = xs.float() * rstd[:, None]
        c = (g * xh).mean(-1, keepdim=True)
        dx = rstd[:, None] * (g - xh * c) + (ds.float() if ds is not None else 0)
        dw = (dy.float() * xh.to(xs.dtype).float()).sum(0).to(w.dtype)
        return dx.to(xs.dtype), dw

    @staticmethod
    def rotary(q, k, cos, sin, backward, out_dtype):
        def one(x):  # fp32 math, one rounding to out_dtype, as the kernel does
            h = x.shape[-1] // 2
            x1, x2 = x[..., :h].float(), x[..., h:].float()
            c, s = cos[:, None].float(), sin[:, None].float()
            c1, c2, s1, s2 = c[..., :h], c[..., h:], s[..., :h], s[..., h:]
            if backward:
                val = torch.cat((x1 * c1 + x2 * s2, x2 * c2 - x1 * s1), -1)
            else:
                val = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), -1)
            return torch.empty_like(x, dtype=out_dtype).copy_(val)  # x's strides, as at::empty_like
        return one(q), one(k)

    @staticmethod
    def swiglu_fwd(g, u):
        return g * torch.sigmoid(g) * u

    @staticmethod
    def swiglu_bwd(dy, g, u):
        s = torch.sigmoid(g)
        return dy * u * s * (1 + g * (1 - s)), dy * g * s

    @staticmethod
    def ce_chunk_stats(logits, tl, vocab_valid):  # three fresh tensors, as the C++ returns
        return tuple(t.clone() for t in cross_entropy.ce_chunk_stats(logits, tl, vocab_valid))

    @staticmethod
    def ce_chunk_grad_(logits, lse, tl, vocab_valid, row_scale):
        logits.copy_(cross_entropy.ce_chunk_grad(logits, lse, tl, vocab_valid, row_scale))
        return logits

    @staticmethod
    def addmm_fp32_(acc, a, b):
        acc += (a.float() @ b.float())

    @staticmethod
    def linear_ce_forward(hidden, weight, target, ignore_index, chunk, mean, vocab_valid, need_h, need_w):
        loss, gh, gw = cross_entropy._loop(hidden, weight, target, ignore_index, chunk, mean, need_h, need_w,
                                           None, 0, vocab_valid, weight.dtype, _FakeExt.ce_chunk_stats,
                                           _FakeExt.ce_chunk_grad_)
        empty = hidden.new_empty(0, dtype=torch.float32)
        return loss, gh if gh is not None else empty, gw if gw is not None else empty


@pytest.fixture
def fake_cuda(monkeypatch):
    from shardformer.kernels import cuda

    monkeypatch.setattr(cuda, "load", lambda: _FakeExt)
    monkeypatch.setattr(ops, "_use_cuda", lambda *t: True)


@pytest.mark.parametrize("shape", SHAPES)
def test_wrappers_rmsnorm_via_fake_ext(fake_cuda, shape):
    test_rmsnorm_matches_hf(shape)
    test_rmsnorm_residual_matches_hf_pattern(shape)


def test_wrappers_rotary_and_swiglu_via_fake_ext(fake_cuda):
    torch.manual_seed(9)
    q = torch.randn(2, 5, 12, requires_grad=True)  # HF layout: [B, S, H*D] -> [B, H, S, D] view
    k = torch.randn(2, 5, 4, requires_grad=True)
    qv, kv = q.view(2, 5, 3, 4).transpose(1, 2), k.view(2, 5, 1, 4).transpose(1, 2)
    cos, sin = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    got, want = ops.apply_rotary(qv, kv, cos, sin), ml.apply_rotary_pos_emb(qv, kv, cos, sin)
    _close(got, want)
    cots = [torch.randn_like(t) for t in want]
    _close(torch.autograd.grad(got, [q, k], cots), torch.autograd.grad(want, [q, k], cots))
    q4, k4 = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 1, 4)
    _close(ops.apply_rotary(q4, k4, cos, sin, 2), ml.apply_rotary_pos_emb(q4, k4, cos, sin, unsqueeze_dim=2))
    test_swiglu_op_matches_silu_product()


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_wrappers_rotary_mixed_dtypes_via_fake_ext(fake_cuda, low):
    """Under autocast HF's q/k are bf16 while cos/sin are fp32: the kernel path is taken (no
    fallback), its outputs are fp32 like HF's promoted ones, and the gradients return in q's dtype.
    Forward: fp32, 1e-6. Gradients: the kernel rounds the fp32 gradient to ``low`` once, so it
    must be within one rounding (relative ``finfo(low).eps``) of the fp32 gradient; HF rounds each
    product term to ``low`` and sums in ``low`` (up to three roundings), so it is only required to
    be no closer to the fp32 gradient than the kernel."""
    calls = []
    real = _FakeExt.rotary
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_FakeExt, "rotary", staticmethod(lambda *a: calls.append(a[4:]) or real(*a)))
        torch.manual_seed(11)
        q = torch.randn(2, 3, 6, 8, dtype=low).transpose(1, 2).requires_grad_()  # [B, H, S, D] view
        k = torch.randn(2, 1, 3, 8, dtype=low, requires_grad=True)
        cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
        got, want = ops.apply_rotary(q, k, cos, sin), ml.apply_rotary_pos_emb(q, k, cos, sin)
        assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.float32] * 2
        _close(got, want)
        cots = [torch.randn_like(t) for t in want]
        g_got, g_want = torch.autograd.grad(got, [q, k], cots), torch.autograd.grad(want, [q, k], cots)
        assert [g.dtype for g in g_got] == [low, low]
        q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
        truth = torch.autograd.grad(ml.apply_rotary_pos_emb(q32, k32, cos, sin), [q32, k32], cots)
        eps = torch.finfo(low).eps
        for g, h, t in zip(g_got, g_want, truth):
            _close(g.float(), t, tol=dict(rtol=eps, atol=1e-6))
            assert (g.float() - t).abs().max() <= (h.float() - t).abs().max()
    assert calls == [(False, torch.float32), (True, low)]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_wrappers_linear_ce_via_fake_ext(fake_cuda, reduction, monkeypatch):
    test_linear_ce_matches_full_logits(reduction, 5, monkeypatch)


def _count_calls(mp, names):
    """Wrap ``_FakeExt.<name>`` for each name; returns the list the wrappers append names to."""
    calls = []
    for name in names:
        real = getattr(_FakeExt, name)
        mp.setattr(_FakeExt, name, staticmethod(lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a)))
    return calls


def _recording_backend(seen: set):
    """aot_eager, after adding the ``shardformer::`` ops of dynamo's graph to ``seen`` (autograd
    Functions are traced into submodules, so every submodule's graph is read)."""
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs):
        for mod in gm.modules():
            seen.update(str(n.target) for n in mod.graph.nodes if "shardformer" in str(n.target))
        return aot_eager(gm, example_inputs)

    return backend


def _compiled_ce_matches_eager(f, hidden, weight, tol=dict(rtol=1e-5, atol=0.0)):
    """``torch.compile(f, fullgraph=True)`` gives f's loss and hidden/weight gradients; returns the
    compiled loss and the ``shardformer::`` ops in dynamo's graph (the fake extension is plain
    Python that dynamo would inline: only these nodes show the extension is behind custom ops)."""
    ops_seen = set()
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend=_recording_backend(ops_seen))(hidden, weight)
    want = f(hidden, weight)
    _close(got, want, tol)
    _close(_grads(got, [hidden, weight]), _grads(want, [hidden, weight]), tol)
    return got, ops_seen


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_ce_compile_fullgraph_via_fake_ext(fake_cuda, reduction):
    """The CUDA path of ``ops.linear_cross_entropy`` is one graph through the
    ``shardformer::linear_ce_forward`` custom op (fake kernel); same loss and gradients as eager."""
    hidden, weight, target = _ce_case(37, 23, 101, n_ignored=6)

    def f(h, w):
        return ops.linear_cross_entropy(h, w, target, reduction=reduction, chunk_size=5) * 2.5

    with pytest.MonkeyPatch.context() as mp:
        calls = _count_calls(mp, ["linear_ce_forward"])
        got, seen = _compiled_ce_matches_eager(f, hidden, weight)
    assert seen == {"shardformer.linear_ce_forward.default"}, seen
    assert calls == ["linear_ce_forward"] * 2  # compiled, then eager: the extension path both times
    _close(got, _ce_oracle(hidden, weight, target, reduction) * 2.5)


def _vocab_parallel_compile_check(reduction, vocab_true):
    """On a pool rank (gloo WORLD of 2): the vocab-parallel loop over the ce_chunk_* custom ops
    compiles to one graph and matches eager and the full-logits oracle."""
    import torch.distributed as dist
    from shardformer.kernels import cuda

    hidden, weight, target, w_local, start = _vocab_parallel_case(vocab_true)

    def f(h, w):
        return ops.linear_cross_entropy(h, w, target, reduction=reduction, chunk_size=4,
                                        process_group=dist.group.WORLD, vocab_start=start,
                                        vocab_size=vocab_true)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cuda, "load", lambda: _FakeExt)
        mp.setattr(ops, "_use_cuda", lambda *t: True)
        calls = _count_calls(mp, ["ce_chunk_stats", "ce_chunk_grad_", "addmm_fp32_", "linear_ce_forward"])
        got, seen = _compiled_ce_matches_eager(f, hidden, w_local)
        torch._dynamo.reset()
    assert seen == {f"shardformer.{op}.default" for op in ("ce_chunk_stats", "ce_chunk_grad_", "addmm_fp32_")}, seen
    assert sorted(set(calls)) == ["addmm_fp32_", "ce_chunk_grad_", "ce_chunk_stats"], calls
    _close(got, _ce_oracle(hidden, weight, target, reduction, vocab=vocab_true))
    want_gw = _grads(_ce_oracle(hidden, weight, target, reduction, vocab=vocab_true), [weight])[0]
    _close(_grads(f(hidden, w_local), [w_local])[0], want_gw[start:start + w_local.shape[0]])
    return len(calls)


@pytest.mark.parametrize("vocab_true", [23, 13])  # 13: rank 1's shard is all padding (vocab_valid 0)
def test_linear_ce_vocab_parallel_compile_fullgraph_via_fake_ext(pools, vocab_true):
    """tp=2 vocab-parallel fused loss on the mocked CUDA path: one graph, same as eager (2 gloo ranks)."""
    counts = pools(2).run(_vocab_parallel_compile_check, "mean", vocab_true)
    assert counts[0] == counts[1] > 0


def _elementwise_chain(x, w, cos, sin):
    """rms_norm -> swiglu -> rotary on x [3, 5, 16]: (the swiglu output, a scalar of both rotary outputs)."""
    y = ops.swiglu(ops.rms_norm(x, w, 1e-6), x)
    q = y.view(3, 5, 2, 8).transpose(1, 2)
    qo, ko = ops.apply_rotary(q, q[:, :1] * 3, cos, sin)  # distinct tensors (dynamo needs that)
    return y, qo.sum() + 2 * ko.sum()


@pytest.mark.parametrize("policy", ["custom", "inductor"])
def test_wrappers_compile_fullgraph_via_fake_ext(fake_cuda, monkeypatch, policy):
    """The custom ops' fake kernels let torch.compile trace rms_norm/swiglu/rotary in one graph
    ("custom"); by default ("inductor") the graph holds their reference formulas instead, for
    Inductor to fuse. Same values and gradients either way."""
    monkeypatch.setattr(ops, "COMPILED_KERNELS", policy)
    seen = set()
    torch.manual_seed(10)
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    cos, sin = torch.randn(3, 5, 8), torch.randn(3, 5, 8)

    def f(x, w):
        return _elementwise_chain(x, w, cos, sin)[1]

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend=_recording_backend(seen))(x, w)
    want = f(x, w)
    _close(got, want)
    _close(torch.autograd.grad(got, [x, w]), torch.autograd.grad(want, [x, w]))
    custom = {f"shardformer.{op}.default" for op in ("rmsnorm_fwd", "rmsnorm_bwd", "swiglu_fwd", "swiglu_bwd", "rotary")}
    assert seen == (custom if policy == "custom" else set()), seen


def test_link_flags_find_cudart(tmp_path):
    """torch's CUDA_HOME from a wrapper nvcc (/usr/local) has no libcudart: link against a toolkit's."""
    from shardformer.kernels import build

    toolkit, wrapper = tmp_path / "cuda-13.0", tmp_path / "local"
    (toolkit / "lib64").mkdir(parents=True)
    (toolkit / "lib64" / "libcudart.so").touch()
    (wrapper / "lib").mkdir(parents=True)
    assert build.link_flags(str(toolkit), [str(toolkit)]) == []
    assert build.link_flags(str(wrapper), [str(wrapper), str(toolkit)]) == [f"-L{toolkit / 'lib64'}"]
    assert build.link_flags(None, [str(toolkit)]) == [f"-L{toolkit / 'lib64'}"]
    assert build.link_flags(str(wrapper), [str(wrapper)]) == []


def test_setup_py_builds_the_jit_loaders_extension(monkeypatch):
    """`CUDA_EXT=1 pip install .` compiles the same sources with the same flags and link fix as the JIT loader."""
    import runpy

    import setuptools
    from torch.utils import cpp_extension

    from shardformer.kernels import build

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/nonexistent-cuda-home")
    monkeypatch.setattr(cpp_extension, "CUDAExtension", lambda name, sources, **kw: (name, sources, kw))
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.setenv("CUDA_EXT", "1")
    monkeypatch.chdir(root)
    runpy.run_path(os.path.join(root, "setup.py"), run_name="__main__")
    (name, sources, kw), = seen["ext_modules"]
    assert name == "shardformer._C"
    assert [os.path.join(root, s) for s in sources] == build.SOURCES and all(not os.path.isabs(s) for s in sources)
    assert kw["extra_compile_args"] == {"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS}
    assert kw["extra_link_args"] == build.link_flags("/nonexistent-cuda-home")


def test_wrappers_linear_ce_vocab_offset_without_group_via_fake_ext(fake_cuda):
    """A vocab shard (vocab_start > 0) with no process group must shift the targets on the extension
    path too (the C++ loop has no offset, so the Python loop over the custom ops runs)."""
    torch.manual_seed(12)
    hidden, weight = torch.randn(9, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    target = torch.randint(0, 12, (9,))
    got = ops.linear_cross_entropy(hidden, weight, target, chunk_size=4, vocab_start=6, vocab_size=12)
    want = cross_entropy.linear_cross_entropy(hidden, weight, target, chunk_size=4, vocab_start=6, vocab_size=12)
    _close(got, want)
    _close(torch.autograd.grad(got, [hidden, weight]), torch.autograd.grad(want, [hidden, weight]))


def test_wrappers_rotary_grid_limit_falls_back_via_fake_ext(fake_cuda, monkeypatch):
    """The kernel's grid has one y per head and one z per batch row (at most 65535 each): larger
    inputs take the PyTorch path, with the same result."""
    calls = []
    monkeypatch.setattr(_FakeExt, "rotary", staticmethod(lambda *a: calls.append(1)))
    q, k = torch.randn(65536, 1, 1, 2), torch.randn(65536, 1, 1, 2)
    cos, sin = torch.randn(1, 1, 2), torch.randn(1, 1, 2)
    _close(ops.apply_rotary(q, k, cos, sin), ml.apply_rotary_pos_emb(q, k, cos, sin))
    q = torch.randn(1, 65536, 1, 2)
    _close(ops.apply_rotary(q, k[:1], cos, sin), ml.apply_rotary_pos_emb(q, k[:1], cos, sin))
    assert calls == []


def test_attention_backend_selection(monkeypatch):
    """SDPA stays unless flash-attn is installed and the weights are half precision on CUDA; an
    explicit "eager" is kept; a refusal by transformers warns and keeps SDPA."""
    from shardformer.kernels import attention

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg)
    assert model.config._attn_implementation == "sdpa"
    asked = []
    monkeypatch.setattr(model, "set_attn_implementation", lambda impl: asked.append(impl))
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    assert attention.select_attention(model) == "sdpa" and asked == []
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    assert attention.select_attention(model) == "sdpa" and asked == []  # fp32 weights on CPU
    monkeypatch.setattr(attention, "_half_on_cuda", lambda m: True)
    attention.select_attention(model)
    assert asked == ["flash_attention_2"]

    def refuse(impl):
        raise ImportError("flash_attn is not usable here")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    with pytest.warns(UserWarning, match="keeping SDPA"):
        assert attention.select_attention(model) == "sdpa"
    eager = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "_attn_implementation": "eager"}))
    monkeypatch.setattr(eager, "set_attn_implementation", lambda impl: asked.append(impl))
    assert attention.select_attention(eager) == "eager" and asked == ["flash_attention_2"]


def test_wrappers_inductor_custom_ops_via_fake_ext(fake_cuda, monkeypatch):
    """Inductor (not only aot_eager) with every custom op in the graph: it checks each op's real
    output strides against its fake kernel (e.g. rotary's output keeps q's transposed layout)."""
    monkeypatch.setattr(ops, "COMPILED_KERNELS", "custom")
    torch.manual_seed(13)
    x, w = torch.randn(3, 5, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    cos, sin = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    head, target = torch.randn(50, 16, requires_grad=True), torch.randint(0, 50, (15,))

    def f(x, w, head):
        y, rotary_sum = _elementwise_chain(x, w, cos, sin)
        return rotary_sum + ops.linear_cross_entropy(y.reshape(15, 16), head, target, chunk_size=4)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="inductor")(x, w, head)
    want = f(x, w, head)
    _close(got, want)
    _close(torch.autograd.grad(got, [x, w, head]), torch.autograd.grad(want, [x, w, head]))
