"""The kernels check themselves when the extension loads (`shardformer/kernels/selfcheck.py`),
tested with a stand-in extension on the CPU (`tests/standin_ext.py`): a kernel that returns
wrong numbers or raises is switched off with a warning and the model still trains exactly; the
verdict is cached per build and device and invalidated by a changed source; the report runs
without CUDA."""
import os
import shutil
import subprocess
import sys
import warnings

import pytest

from shardformer.kernels import cuda, selfcheck

from . import standin_ext
from .test_equivalence import TOL, check_equivalence


def check_bad_kernel_switched_off(bad: dict):
    """With one kernel wrong (or raising): it is off with a one-line warning naming it and the
    shape, the others stay on and run, and tp = 2 with fused kernels equals the unsharded model."""
    kernel = next(iter(bad.values()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with standin_ext.installed(**bad):
            off = [str(w.message) for w in caught if "switched off" in str(w.message)]
            assert len(off) == 1 and f"kernel {kernel!r}" in off[0] and "[" in off[0], off
            assert {k for k in cuda.KERNELS if not cuda.enabled(k)} == {kernel}
            before = dict(standin_ext.calls)
            worst = check_equivalence("llama", 2, fused=True, steps=2)
            used = {name for name, n in standin_ext.calls.items() if n > before.get(name, 0)}
    assert worst <= TOL, worst
    ran = {standin_ext.KERNEL_OF[name] for name in used}
    assert ran == set(cuda.KERNELS) - {kernel}, ran  # every other kernel ran in training; the bad one never
    return off[0]


@pytest.mark.parametrize("bad", [dict(wrong="swiglu"), dict(wrong="cross_entropy"), dict(raising="rotary")])
def test_bad_kernel_is_switched_off_and_training_stays_exact(pools, bad):
    messages = pools(2).run(check_bad_kernel_switched_off, bad)
    print("\n" + messages[0])


def test_verdict_is_cached_and_a_changed_source_invalidates_it(tmp_path, monkeypatch):
    sources = tmp_path / "csrc"
    shutil.copytree(cuda.CSRC, sources)
    monkeypatch.setattr(cuda, "CSRC", str(sources))
    monkeypatch.setattr(cuda, "SOURCES", [str(sources / os.path.basename(p)) for p in cuda.SOURCES])
    cache = str(tmp_path / "cache")
    runs = selfcheck.runs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with standin_ext.installed(wrong="swiglu", cache_dir=cache):
            assert not cuda.enabled("swiglu")
        assert selfcheck.runs == runs + 1
        with standin_ext.installed(wrong="swiglu", cache_dir=cache):  # same build and device: the cached verdict
            assert not cuda.enabled("swiglu") and cuda.enabled("rmsnorm")
        assert selfcheck.runs == runs + 1
        assert sum("'swiglu' switched off" in str(w.message) for w in caught) == 2  # said again from the cache
        with open(sources / "swiglu.cu", "a") as f:
            f.write("\n// changed\n")
        with standin_ext.installed(wrong="swiglu", cache_dir=cache):  # a new source: checked again
            assert not cuda.enabled("swiglu")
        assert selfcheck.runs == runs + 2
    assert len(os.listdir(os.path.join(cache, "selfcheck"))) == 2


def test_modes(monkeypatch):
    """trust skips the check (the wrong kernel stays on), off loads nothing, another value is an error."""
    runs = selfcheck.runs
    monkeypatch.setenv("SHARDFORMER_KERNELS", "trust")
    with standin_ext.installed(wrong="swiglu"):
        assert cuda.enabled("swiglu") and selfcheck.runs == runs
    monkeypatch.setenv("SHARDFORMER_KERNELS", "off")
    cuda.reset()
    assert cuda.load() is None and "SHARDFORMER_KERNELS=off" in cuda._state["why"]
    monkeypatch.setenv("SHARDFORMER_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="SHARDFORMER_KERNELS='sometimes'"):
        cuda.mode()
    cuda.reset()


def test_report_without_cuda():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "shardformer.kernels"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], proc.stdout
    print("\n" + lines[0])


def check_substitution():
    import shardformer as sf
    from shardformer.fusion import fused_loss_pays
    from shardformer.kernels import FusedRMSNorm, FusedSwiGLUMLP

    from .models import build

    assert not cuda.available()
    plain = sf.shard_model(build("llama"), config=sf.ShardConfig(tp_size=2))
    layer = plain.model.layers[0]
    assert not isinstance(layer.mlp, FusedSwiGLUMLP) and not isinstance(layer.input_layernorm, FusedRMSNorm)
    saved = os.environ.pop("SHARDFORMER_FUSED_LOSS", None)
    try:
        assert not fused_loss_pays()  # the default: no chunked loss without the extension
        assert not sf.shard_model(build("llama"), config=sf.ShardConfig(tp_size=2)).sf_fused_lm_loss
        os.environ["SHARDFORMER_FUSED_LOSS"] = "always"
        assert sf.shard_model(build("llama"), config=sf.ShardConfig(tp_size=2)).sf_fused_lm_loss
    finally:
        os.environ.pop("SHARDFORMER_FUSED_LOSS", None)
        if saved is not None:
            os.environ["SHARDFORMER_FUSED_LOSS"] = saved
    with standin_ext.installed():
        fused = sf.shard_model(build("llama"), config=sf.ShardConfig(tp_size=2))
        assert isinstance(fused.model.layers[0].mlp, FusedSwiGLUMLP) and fused.sf_fused_lm_loss
    return True


def test_modules_substituted_only_where_the_extension_runs(pools):
    """Where no kernel runs, `enable_fused_kernels=True` (the default) leaves HF's modules in place
    (their PyTorch references gain nothing and cost step time) and, unless
    SHARDFORMER_FUSED_LOSS=always, the chunked loss too; with the (stand-in) extension they are
    substituted."""
    pools(2).run(check_substitution)
