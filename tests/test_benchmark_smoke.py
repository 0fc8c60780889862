"""The benchmark script runs end to end on CPU (tiny model) and writes its JSON; on CPU its
timings mean nothing, this only keeps the script from rotting between GPU sessions."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "examples" / "benchmark.py"), "--tiny", "--device", "cpu", "--dtype", "fp32",
           "--steps", "1", "--warmup", "1", "--only", "hf_eager,sf_fused", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    variants = json.loads(out.read_text())["variants"]
    for name in ("hf_eager", "sf_fused"):
        assert variants[name]["status"] == "ok", variants[name]
        assert variants[name]["tokens_per_s"] > 0
    eager, sharded = variants["hf_eager"], variants["sf_fused"]
    for key in ("loss_first", "loss_last"):  # same model, same batch: the same training curve
        assert abs(sharded[key] - eager[key]) <= 1e-5 * abs(eager[key]), (key, sharded[key], eager[key])
