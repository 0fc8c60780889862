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
