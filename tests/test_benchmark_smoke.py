"""The benchmark script runs end to end on CPU (tiny model) and writes its JSON; on CPU its
timings mean nothing, this only keeps the script from rotting between GPU sessions (where a
failure costs scarce device time): the variants, the kernel micro-benchmarks, the time budget and
the partial report written when `timeout` sends SIGTERM."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "benchmark.py")
TINY = [sys.executable, SCRIPT, "--tiny", "--device", "cpu", "--dtype", "fp32"]


def _run(args, out):
    proc = subprocess.run(TINY + args + ["--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_benchmark_runs_on_cpu(tmp_path):
    proc, report = _run(["--steps", "1", "--warmup", "1", "--only", "hf_eager,sf_fused"], tmp_path / "bench.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["complete"] and "interrupted" not in report
    variants = report["variants"]
    for name in ("hf_eager", "sf_fused"):
        assert variants[name]["status"] == "ok", variants[name]
        assert variants[name]["tokens_per_s"] > 0 and variants[name]["model_tflops"] > 0
    eager, sharded = variants["hf_eager"], variants["sf_fused"]
    for key in ("loss_first", "loss_last"):  # same model, same batch: the same training curve
        assert abs(sharded[key] - eager[key]) <= 1e-5 * abs(eager[key]), (key, sharded[key], eager[key])
    assert report["flops"]["params_N"] == report["flops"]["params_unique"]  # tied: the matrix counted once
    assert set(report["kernels"]) == {"rmsnorm", "swiglu", "rotary", "linear_ce", "attention"}
    for kind, k in report["kernels"].items():
        for impl in ("eager", "shardformer") if kind != "attention" else ("eager",):
            assert k["impls"][impl]["status"] == "ok", (kind, impl, k["impls"][impl])
        if kind != "attention":
            assert k["impls"]["liger"]["status"] == "skipped"  # CUDA only
    assert set(report["kernels"]["attention"]["impls"]) == {"eager", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"}


def test_time_budget_skips_stages(tmp_path):
    proc, report = _run(["--time-budget", "0", "--only", "hf_eager,sf_fused_compile", "--kernels", "rmsnorm"],
                        tmp_path / "bench.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["complete"]
    assert {v["status"] for v in report["variants"].values()} == {"skipped"}
    assert report["kernels"]["rmsnorm"]["status"] == "skipped"
    assert "time budget" in report["variants"]["sf_fused_compile"]["reason"]


def test_sigterm_writes_partial_report(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.Popen(TINY + ["--only", "hf_eager,sf_fused", "--kernels", "none", "--warmup", "0",
                                    "--steps", "100000", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # wait until hf_eager's timed steps run
            if out.exists() and "ceilings" in json.loads(out.read_text())["stage_seconds"]:
                break
            time.sleep(0.2)
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stdout[-3000:]
    report = json.loads(out.read_text())
    assert not report["complete"]
    assert report["interrupted"]["stage"] == "variant hf_eager", report["interrupted"]
    assert report["variants"]["hf_eager"]["status"] == "interrupted"
    assert "PARTIAL" in stdout


def test_profile_step_sorts_gpu_time_by_kind(monkeypatch, capsys):
    """The CUDA branch of the profiled step (run here on fake events: no GPU in CI) and its table."""
    import contextlib
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    from bench import profile as bench_profile
    from bench.report import print_profile_table

    def event(name, us, device=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [event("shardformer::rmsnorm_fwd", 0, DeviceType.CPU), event("shardformer::rmsnorm_fwd", 0, DeviceType.CPU),
              event("aten::mm", 0, DeviceType.CPU),
              event("void sf::(anonymous namespace)::rmsnorm_fwd_kernel<float>(...)", 300.0),
              event("void sf::(anonymous namespace)::rmsnorm_fwd_kernel<float>(...)", 200.0),
              event("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", 4000.0),
              event("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", 1500.0),
              event("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 700.0),
              event("triton_per_fused_add_mul_0", 250.0), event("Memcpy DtoD (Device -> Device)", 50.0),
              event("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add>", 100.0)]
    ran = []
    fake = contextlib.contextmanager(lambda activities: iter([SimpleNamespace(events=lambda: events)]))
    monkeypatch.setattr(bench_profile, "profile", fake)
    out = bench_profile.profile_step(lambda: ran.append(1), "cuda")
    assert ran == [1]
    assert out["shardformer_ops_per_step"] == {"shardformer::rmsnorm_fwd": 2}
    assert out["gpu_ms_by_kind"] == {"total": 7.1, "gemm": 4.0, "attention": 1.5, "optimizer": 0.7,
                                     "shardformer": 0.5, "triton": 0.25, "other": 0.1, "copy": 0.05}
    assert list(out["gpu_ms_by_kind"]) == ["total", "gemm", "attention", "optimizer", "shardformer", "triton",
                                           "other", "copy"]
    top = out["gpu_top_kernels"]
    assert [k["kind"] for k in top[:3]] == ["gemm", "attention", "optimizer"]
    assert top[3] == {"kind": "shardformer", "calls": 2, "ms": 0.5,
                      "name": "void sf::(anonymous namespace)::rmsnorm_fwd_kernel<float>(...)"}
    assert "gpu_ms_by_kind" not in bench_profile.profile_step(lambda: None, "cpu")

    print_profile_table({"hf_compile": {"tokens_per_s": 1.0, "best_peer_tokens": "hf_compile", **out},
                         "sf_fused": {"tokens_per_s": 2.0, "best_peer_tokens": "hf_compile", **out},
                         "hf_eager": {"status": "failed"}})
    printed = capsys.readouterr().out
    assert "hf_eager" not in printed and printed.count("heaviest kernels") == 2
    assert "sm90_xmma_gemm" in printed and "7.1" in printed
