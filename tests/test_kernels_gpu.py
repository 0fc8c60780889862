"""CUDA kernels against their PyTorch references (``shardformer.kernels.reference``), on the GPU.

Tolerances (relative to the largest magnitude of the expected tensor):
- fp32: 1e-5.
- bf16/fp16: 2e-2. bf16 keeps 8 mantissa bits (one rounding = up to 3.9e-3 relative); the eager
  reference rounds after every op (e.g. ``q*cos``, ``rotate_half(q)*sin`` and their sum are three
  roundings) while the kernels compute in fp32 and round once, and reductions (dw, dW, dh) sum
  thousands of rounded terms in a different order, so a few ulps of disagreement are expected.
Every test is marked ``gpu`` and skipped without CUDA. With ``SHARDFORMER_GPU_TESTS_ON_CPU=1`` the
file's own code runs on the CPU against the mocked extension of ``test_kernels_cpu`` instead (the
CPU suite does so, ``test_gpu_tests_dry_run.py``), so that a lent GPU session never finds a bug in
the tests themselves; the CUDA memory statistics test is skipped then.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from shardformer.kernels import cross_entropy, cuda, ops, reference

DRY_RUN = os.environ.get("SHARDFORMER_GPU_TESTS_ON_CPU") == "1"
pytestmark = [pytest.mark.gpu] + ([] if DRY_RUN else [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])

DEV = "cpu" if DRY_RUN else "cuda"


@pytest.fixture(autouse=True)
def _mocked_extension_on_cpu(monkeypatch):
    if DRY_RUN:
        from tests.test_kernels_cpu import _FakeExt

        monkeypatch.setattr(cuda, "load", lambda: _FakeExt)
        monkeypatch.setattr(ops, "_use_cuda", lambda *t: all(x.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                                            for x in t))
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _check(got, want, dtype):
    tol = TOL[dtype]
    scale = max(want.detach().abs().max().item(), 1e-6) if want.numel() else 1.0
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)


def _grads(out, inputs, cot):
    return torch.autograd.grad(out, inputs, cot)


def test_extension_loads():
    assert cuda.available(), "the CUDA extension failed to build or load (see the warning)"


def test_every_kernel_passes_its_self_check():
    """The check that runs when the extension loads (`selfcheck.run`: odd shapes, fp32 and bf16,
    forward and every gradient against the reference) passes for every kernel on this device."""
    from shardformer.kernels import selfcheck

    verdict = selfcheck.run(DEV)
    assert all(reason is None for reason in verdict.values()), verdict


# --------------------------------------------------------------------------- RMSNorm
RMS_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
              (torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("shape", [(5, 123), (3, 7, 4096), (2, 1000), (1, 3, 8192)])
@pytest.mark.parametrize("xdt,wdt", RMS_DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm(shape, xdt, wdt, residual):
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEV, dtype=xdt, requires_grad=True)
    r = torch.randn(shape, device=DEV, dtype=xdt, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEV)).to(wdt).requires_grad_()
    inputs = [x, r, w] if residual else [x, w]
    if residual:
        got, want = ops.rms_norm_residual(x, r, w, 1e-6), reference.rms_norm_residual(x, r, w, 1e-6)
    else:
        got, want = (ops.rms_norm(x, w, 1e-6),), (reference.rms_norm(x, w, 1e-6),)
    cots = [torch.randn_like(t) for t in want]
    dt = torch.float32 if xdt == wdt == torch.float32 else torch.bfloat16  # any half dtype: 2e-2
    for g, wv in zip(got, want):
        _check(g, wv, dt)
    for g, wv in zip(_grads(got, inputs, cots), _grads(want, inputs, cots)):
        _check(g, wv, dt)


# --------------------------------------------------------------------------- rotary
@pytest.mark.parametrize("b,hq,hk,s,d", [(1, 1, 1, 5, 6), (2, 3, 1, 7, 64), (2, 32, 8, 9, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["hf", "contiguous", "unsqueeze2"])
def test_rotary(b, hq, hk, s, d, dtype, layout):
    torch.manual_seed(1)
    if layout == "hf":  # [B, S, H*D] projection output viewed and transposed, as in LlamaAttention
        q = torch.randn(b, s, hq * d, device=DEV, dtype=dtype).view(b, s, hq, d).transpose(1, 2)
        k = torch.randn(b, s, hk * d, device=DEV, dtype=dtype).view(b, s, hk, d).transpose(1, 2)
    elif layout == "contiguous":
        q, k = (torch.randn(b, h, s, d, device=DEV, dtype=dtype) for h in (hq, hk))
    else:
        q, k = (torch.randn(b, s, h, d, device=DEV, dtype=dtype) for h in (hq, hk))
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    ang = torch.randn(1, s, d, device=DEV)  # batch 1: broadcast over b, as HF position_ids often are
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    dim = 2 if layout == "unsqueeze2" else 1
    got, want = ops.apply_rotary(q, k, cos, sin, dim), reference.apply_rotary(q, k, cos, sin, dim)
    cots = [torch.randn_like(t) for t in want]
    for g, wv in zip(got, want):
        _check(g, wv, dtype)
    for g, wv in zip(_grads(got, [q, k], cots), _grads(want, [q, k], cots)):
        _check(g, wv, dtype)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_rotary_autocast_dtypes_use_the_kernel(low, monkeypatch):
    """HF under bf16 autocast: q/k bf16, cos/sin fp32 (outputs promoted to fp32). The kernel must
    run (no fallback); forward within fp32 1e-5 of the reference; gradients in ``low`` within one
    rounding (``finfo(low).eps`` relative) of the fp32 gradient."""
    calls = []
    real = ops._rotary
    monkeypatch.setattr(ops, "_rotary", lambda *a: calls.append(a[4:]) or real(*a))
    torch.manual_seed(2)
    b, hq, hk, s, d = 2, 8, 2, 33, 64
    q = torch.randn(b, s, hq * d, device=DEV, dtype=low).view(b, s, hq, d).transpose(1, 2).detach().requires_grad_()
    k = torch.randn(b, s, hk * d, device=DEV, dtype=low).view(b, s, hk, d).transpose(1, 2).detach().requires_grad_()
    ang = torch.randn(b, s, d, device=DEV)
    cos, sin = ang.cos(), ang.sin()
    got, want = ops.apply_rotary(q, k, cos, sin), reference.apply_rotary(q, k, cos, sin)
    for g, wv in zip(got, want):
        _check(g, wv, torch.float32)
    cots = [torch.randn_like(t) for t in want]
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    truth = _grads(reference.apply_rotary(q32, k32, cos, sin), [q32, k32], cots)
    eps = torch.finfo(low).eps
    for g, t in zip(_grads(got, [q, k], cots), truth):
        assert g.dtype == low
        torch.testing.assert_close(g.float(), t, rtol=eps, atol=1e-6)
    assert calls == [(False, torch.float32), (True, low)]


# --------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("shape", [(5, 123), (4, 8192), (3, 7, 37)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu(shape, dtype):
    torch.manual_seed(2)
    g = (3 * torch.randn(shape, device=DEV)).to(dtype).requires_grad_()
    u = torch.randn(shape, device=DEV, dtype=dtype, requires_grad=True)
    got, want = ops.swiglu(g, u), reference.swiglu(g, u)
    _check(got, want, dtype)
    cot = torch.randn_like(want)
    for a, b in zip(_grads(got, [g, u], cot), _grads(want, [g, u], cot)):
        _check(a, b, dtype)


# --------------------------------------------------------------------------- linear + cross-entropy
def _ce_inputs(n, h, v, dtype, n_ignored=5):
    gen = torch.Generator(device=DEV).manual_seed(3)
    hidden = torch.randn(n, h, device=DEV, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=DEV, generator=gen) / math.sqrt(h)).to(dtype).requires_grad_()
    target = torch.randint(0, v, (n,), device=DEV, generator=gen)
    target[:n_ignored] = -100
    return hidden, weight, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n,h,v,chunk", [(37, 123, 1001, 8), (64, 256, 4099, 64), (5, 17, 33, None)])
def test_linear_cross_entropy(dtype, reduction, n, h, v, chunk):
    hidden, weight, target = _ce_inputs(n, h, v, dtype, n_ignored=min(5, n - 1))
    got = ops.linear_cross_entropy(hidden, weight, target, reduction=reduction, chunk_size=chunk)
    want = F.cross_entropy((hidden @ weight.t()).float(), target, reduction=reduction)
    _check(got, want, dtype)
    for a, b in zip(torch.autograd.grad(got * 1.5, [hidden, weight]), torch.autograd.grad(want * 1.5, [hidden, weight])):
        _check(a, b, dtype)


def test_linear_cross_entropy_autocast_fp32_weights():
    hidden, weight, target = _ce_inputs(33, 64, 515, torch.float32)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        got = ops.linear_cross_entropy(hidden, weight, target, chunk_size=16)
        want = F.cross_entropy((hidden @ weight.t()).float(), target)
    _check(got, want, torch.bfloat16)
    for a, b in zip(torch.autograd.grad(got, [hidden, weight]), torch.autograd.grad(want, [hidden, weight])):
        _check(a, b, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_chunk_kernels_with_padding(dtype):
    """The per-chunk kernels used by the vocab-parallel loop, with padded columns and absent targets."""
    ext = cuda.load()
    torch.manual_seed(4)
    logits = torch.randn(13, 301, device=DEV).to(dtype)
    tl = torch.randint(0, 290, (13,), device=DEV)
    tl[::3] = -1
    got, want = ext.ce_chunk_stats(logits, tl, 290), cross_entropy.ce_chunk_stats(logits, tl, 290)
    for a, b in zip(got, want):
        _check(a, b, torch.float32)
    lse = want[0] + want[1].log()
    scale = torch.rand(13, device=DEV)
    g_want = cross_entropy.ce_chunk_grad(logits, lse, tl, 290, scale)
    g_got = ext.ce_chunk_grad_(logits.clone(), lse, tl, 290, scale)
    _check(g_got, g_want, dtype)


@pytest.mark.parametrize("chunk", [256, None])  # None: the default chunking (N/4 rows here)
def test_linear_cross_entropy_peak_memory(chunk):
    """The full [N, V] fp32 logits (N*V*4 bytes) are never allocated."""
    if DRY_RUN:
        pytest.skip("CUDA memory statistics")
    n, h, v = 4096, 256, 32000
    hidden, weight, target = _ce_inputs(n, h, v, torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = ops.linear_cross_entropy(hidden, weight, target, chunk_size=chunk)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    full_logits = n * v * 4
    print(f"peak extra {peak / 2**20:.1f} MiB vs full fp32 logits {full_logits / 2**20:.1f} MiB")
    assert peak < full_logits / 4


# --------------------------------------------------------------------------- end to end + compile
def _tiny_llama_pair():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama as ml

    from shardformer.kernels import FusedRMSNorm, FusedSwiGLUMLP

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=211, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ref = LlamaForCausalLM(cfg).to(DEV)
    fused = LlamaForCausalLM(cfg).to(DEV)
    fused.load_state_dict(ref.state_dict())
    for name, mod in list(fused.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, ml.LlamaRMSNorm):
                setattr(mod, child_name, FusedRMSNorm.from_hf(child))
            elif isinstance(child, ml.LlamaMLP):
                setattr(mod, child_name, FusedSwiGLUMLP.from_hf(child))
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in ref.named_parameters()]
    return ref, fused


def test_tiny_llama_with_fused_modules_matches_hf():
    from shardformer.kernels import disable_fused_rotary, enable_fused_rotary

    ref, fused = _tiny_llama_pair()
    ids = torch.randint(0, 211, (2, 17), device=DEV)
    loss_ref = ref(input_ids=ids, labels=ids).loss
    loss_ref.backward()
    enable_fused_rotary(fused)
    try:
        loss = fused(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        disable_fused_rotary()
    _check(loss, loss_ref, torch.float32)
    for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)  # fp32 through 2 layers


def test_tiny_llama_fused_under_bf16_autocast(monkeypatch):
    """The benchmark's precision (bf16 autocast over fp32 weights): every fused kernel runs (no
    fallback) and loss/gradients agree with HF under the same autocast. Tolerance 2e-2 relative
    to each tensor's largest entry: both sides run the same bf16 matmuls, but HF rounds SwiGLU's
    silu and product to bf16 separately and the kernels once, and that compounds over 2 layers."""
    from shardformer.kernels import disable_fused_rotary, enable_fused_rotary

    calls = {}
    for name in ("_rmsnorm_fwd", "_rotary", "_swiglu_fwd"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, _n=name: calls.__setitem__(_n, calls.get(_n, 0) + 1) or _r(*a))
    ref, fused = _tiny_llama_pair()
    ids = torch.randint(0, 211, (2, 17), device=DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        loss_ref = ref(input_ids=ids, labels=ids).loss
    loss_ref.backward()
    enable_fused_rotary(fused)
    try:
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = fused(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        disable_fused_rotary()
    assert calls == {"_rmsnorm_fwd": 5, "_rotary": 4, "_swiglu_fwd": 2}, calls  # norms: 2 per layer + final; rotary: fwd + bwd
    _check(loss, loss_ref, torch.bfloat16)
    for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        _check(p.grad, q.grad, torch.bfloat16)


@pytest.mark.parametrize("policy", ["custom", "inductor"])  # custom ops in the graph, or Inductor's kernels
def test_fused_ops_compile_without_graph_breaks(policy, monkeypatch):
    monkeypatch.setattr(ops, "COMPILED_KERNELS", policy)
    assert cuda.available()  # load outside of tracing
    torch.manual_seed(6)
    x = torch.randn(4, 9, 64, device=DEV, requires_grad=True)
    w = torch.ones(64, device=DEV, requires_grad=True)
    q = torch.randn(4, 2, 9, 16, device=DEV, requires_grad=True)
    cos, sin = torch.randn(4, 9, 16, device=DEV), torch.randn(4, 9, 16, device=DEV)

    def f(x, w, q):
        y = ops.rms_norm(x, w, 1e-6)
        z = ops.swiglu(y, 2 * x)  # distinct gate and up (dynamo refuses one tensor twice into an autograd.Function)
        qo, ko = ops.apply_rotary(q, q[:, :1] * 3, cos, sin)  # distinct q, k (as in attention)
        return z.sum() + qo.sum() + ko.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    got, want = compiled(x, w, q), f(x, w, q)
    _check(got, want, torch.float32)
    for a, b in zip(torch.autograd.grad(got, [x, w, q]), torch.autograd.grad(want, [x, w, q])):
        _check(a, b, torch.float32)


def test_linear_cross_entropy_compiles_fullgraph():
    """The fused loss reaches the extension only through custom ops: one graph, same result."""
    assert cuda.available()  # load outside of tracing
    torch.manual_seed(7)
    h = torch.randn(37, 64, device=DEV, requires_grad=True)
    w = torch.randn(1000, 64, device=DEV, requires_grad=True)
    t = torch.randint(0, 1000, (37,), device=DEV)

    def f(h, w):
        return ops.linear_cross_entropy(h, w, t, chunk_size=16)

    torch._dynamo.reset()
    got, want = torch.compile(f, fullgraph=True)(h, w), f(h, w)
    _check(got, want, torch.float32)
    for a, b in zip(torch.autograd.grad(got, [h, w]), torch.autograd.grad(want, [h, w])):
        _check(a, b, torch.float32)


def test_custom_ops_opcheck():
    """torch.library.opcheck on every custom op with the real extension: schema (mutation and
    aliasing as declared), fake kernels against the real outputs (shapes, dtypes, strides), and
    AOT dispatch. Inputs take no gradient: autograd is the wrappers' job, not the ops'."""
    from torch.library import opcheck

    from shardformer.kernels import cross_entropy as ce

    torch.manual_seed(8)
    bf, f32 = torch.bfloat16, torch.float32
    x = torch.randn(6, 40, device=DEV, dtype=bf)
    w = torch.randn(40, device=DEV, dtype=f32)
    q = torch.randn(2, 5, 3, 8, device=DEV, dtype=bf).transpose(1, 2)  # HF's transposed view
    k = torch.randn(2, 1, 5, 8, device=DEV, dtype=bf)
    cos, sin = torch.randn(2, 5, 8, device=DEV), torch.randn(2, 5, 8, device=DEV)
    logits = torch.randn(4, 30, device=DEV, dtype=bf)
    tl = torch.tensor([3, -1, 27, 0], device=DEV)  # local targets: -1 or < vocab_valid (28)
    lse, scale = torch.logsumexp(logits.float(), 1), torch.full((4,), 0.25, device=DEV)
    hidden, head = torch.randn(9, 40, device=DEV, dtype=bf), torch.randn(30, 40, device=DEV, dtype=bf)
    target = torch.randint(0, 30, (9,), device=DEV)
    cases = [
        (ops._rmsnorm_fwd, (x, None, w, 1e-6)),
        (ops._rmsnorm_fwd, (x, torch.randn_like(x), w, 1e-6)),
        (ops._rmsnorm_bwd, (torch.randn(6, 40, device=DEV), x, w, torch.rand(6, device=DEV), None, True)),
        (ops._rotary, (q, k, cos, sin, False, f32)),
        (ops._rotary, (q.float(), k.float(), cos, sin, True, bf)),
        (ops._swiglu_fwd, (x, torch.randn_like(x))),
        (ops._swiglu_bwd, (torch.randn_like(x), x, torch.randn_like(x))),
        (ce._ce_chunk_stats, (logits, tl, 28)),
        (ce._ce_chunk_grad_, (logits.clone(), lse, tl, 28, scale)),
        (ce._addmm_fp32_, (torch.randn(30, 40, device=DEV), logits.t(), hidden[:4])),
        (ce._linear_ce_forward, (hidden, head, target, -100, 4, True, 30, True, True)),
        (ce._linear_ce_forward, (hidden, head, target, -100, 4, False, 30, False, True)),
    ]
    for op, args in cases:
        opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_python_loop_on_the_extension(dtype):
    """A vocab shard without a process group runs the Python chunk loop over the extension's ops
    (ce_chunk_stats, ce_chunk_grad_, addmm_fp32_), as tensor parallelism does: same as the torch loop."""
    torch.manual_seed(9)
    hidden = torch.randn(37, 64, device=DEV, dtype=dtype, requires_grad=True)
    weight = (0.05 * torch.randn(300, 64, device=DEV, dtype=dtype)).requires_grad_()
    target = torch.randint(0, 590, (37,), device=DEV)
    kw = dict(chunk_size=16, vocab_start=300, vocab_size=590)
    got = ops.linear_cross_entropy(hidden, weight, target, **kw)
    want = cross_entropy.linear_cross_entropy(hidden, weight, target, **kw)  # torch ops only
    _check(got, want, torch.float32)
    for a, b in zip(torch.autograd.grad(got, [hidden, weight]), torch.autograd.grad(want, [hidden, weight])):
        _check(a, b, dtype)
