"""The report: environment, JSON output, MFU and ratios to the peers, the issue's targets, printed tables."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import tempfile

import torch
import transformers

import shardformer as sf

from .common import GIB, PEAK_TFLOPS_BF16, PEERS, REPO_ROOT, VARIANTS, log


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except Exception:  # noqa: BLE001 - a copy without .git, no git binary: just unknown
        return None


def _dist_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def environment(args) -> dict:
    now = _dt.datetime.now(_dt.timezone.utc)
    env = {"date": now.strftime("%Y-%m-%d"), "time_utc": now.isoformat(timespec="seconds"), "device": args.device,
           "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
           "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "triton": _dist_version("triton"), "liger_kernel": _dist_version("liger-kernel"),
           "shardformer": getattr(sf, "__version__", None), "shardformer_commit": _git_commit()}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu_memory_gib": round(props.total_memory / GIB, 1), "gpu_sm_count": props.multi_processor_count}
    return env


def results_path(env: dict) -> str:
    if env["device"] == "cuda":
        return os.path.join(REPO_ROOT, "benchmarks", "results", f"{_slug(env['gpu'])}-{env['date']}.json")
    return os.path.join(tempfile.gettempdir(), f"shardformer-benchmark-cpu-{env['date']}.json")


def save(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def add_ratios(variants: dict, matmul: dict | None) -> None:
    """MFU against 989 and against the measured matmul rate; ratios to the best peer; loss agreement."""
    ok = {n: v for n, v in variants.items() if v.get("status") == "ok"}
    peers = {n: ok[n] for n in PEERS if n in ok}
    fastest = max(peers, key=lambda n: peers[n]["tokens_per_s"]) if peers else None
    with_mem = {n: p for n, p in peers.items() if p.get("peak_mem_gib")}
    leanest = min(with_mem, key=lambda n: with_mem[n]["peak_mem_gib"]) if with_mem else None
    ref_loss = ok.get("hf_eager", {}).get("loss_first")
    for v in ok.values():
        v["mfu_vs_989"] = v["model_tflops"] / PEAK_TFLOPS_BF16
        v["mfu_vs_measured_matmul"] = v["model_tflops"] / matmul["tflops"] if matmul else None
        v["best_peer_tokens"], v["best_peer_mem"] = fastest, leanest
        v["tokens_vs_best_peer"] = v["tokens_per_s"] / peers[fastest]["tokens_per_s"] if fastest else None
        v["peak_mem_vs_best_peer"] = (v["peak_mem_gib"] / with_mem[leanest]["peak_mem_gib"]
                                      if leanest and v.get("peak_mem_gib") else None)
        v["loss_first_rel_diff_vs_hf_eager"] = abs(v["loss_first"] - ref_loss) / abs(ref_loss) if ref_loss else None


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_model_table(variants: dict) -> None:
    head = (f"{'variant':<23} {'status':<11} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU/989':>7} {'MFU/mm':>6} "
            f"{'peak GiB':>8} {'tok/peer':>8} {'mem/peer':>8} {'breaks':>6} {'loss@1':>8} {'loss@end':>8}")
    log(head)
    log("-" * len(head))
    for name in [n for n in VARIANTS if n in variants]:
        v = variants[name]
        if v.get("status") != "ok":
            log(f"{name:<23} {v.get('status', '?'):<11} {v.get('reason') or v.get('error', '')}"[:300])
            continue
        log(f"{name:<23} {'ok':<11} {v['tokens_per_s']:>9.0f} {v['model_tflops']:>8.1f} "
            f"{fmt(v.get('mfu_vs_989'), '.3f'):>7} {fmt(v.get('mfu_vs_measured_matmul'), '.3f'):>6} "
            f"{fmt(v.get('peak_mem_gib'), '.2f'):>8} {fmt(v.get('tokens_vs_best_peer'), '.3f'):>8} "
            f"{fmt(v.get('peak_mem_vs_best_peer'), '.3f'):>8} {fmt(v.get('graph_breaks'), 'd'):>6} "
            f"{v['loss_first']:>8.4f} {v['loss_last']:>8.4f}")
    for name, v in variants.items():
        if name.startswith("sf_") and "shardformer_ops_per_step" in v:
            log(f"  {name}: shardformer ops per step {v['shardformer_ops_per_step'] or '{} (none ran)'}; "
                f"modules {v.get('fused_modules')}")
        if v.get("recompiled_while_timed"):
            log(f"  {name}: RECOMPILED during the timed steps (the timing includes compilation)")
        for r in v.get("graph_break_reasons", []):
            log(f"  {name}: graph break x{r['count']}: {r['reason'][:160]}")


def print_profile_table(variants: dict) -> None:
    """GPU ms per step by kind of kernel (one profiled step each), then the heaviest kernels of the
    fastest shardformer variant and of the best peer."""
    rows = {n: v for n, v in variants.items() if v.get("gpu_ms_by_kind")}
    if not rows:
        return
    kinds = sorted({k for v in rows.values() for k in v["gpu_ms_by_kind"]} - {"total"}) + ["total"]
    log(f"{'GPU ms per step':<23} " + " ".join(f"{k:>11}" for k in kinds))
    for name, v in rows.items():
        log(f"{name:<23} " + " ".join(f"{fmt(v['gpu_ms_by_kind'].get(k), '.1f'):>11}" for k in kinds))
    sf_rows = [n for n in rows if n.startswith("sf_")]
    shown = [max(sf_rows, key=lambda n: rows[n].get("tokens_per_s", 0))] if sf_rows else []
    shown += [p for p in {rows[n].get("best_peer_tokens") for n in rows} if p in rows]
    for name in shown:
        log(f"  {name}: heaviest kernels")
        for k in rows[name].get("gpu_top_kernels", [])[:10]:
            log(f"    {k['ms']:>8.2f} ms {k['calls']:>5}x {k['kind']:<11} {k['name'][:110]}")


def print_kernel_table(report: dict) -> None:
    if report.get("copy", {}).get("gb_per_s"):
        log(f"device copy: {report['copy']['gb_per_s']:.0f} GB/s ({report['copy']['buffer_gib']:.2f} GiB buffer)")
    for kind, k in report["kernels"].items():
        if k.get("status") in ("failed", "skipped"):
            log(f"{kind}: {k['status']}: {(k.get('error') or k.get('reason', ''))[:200]}")
            continue
        shape = "x".join(map(str, k["shape"]))
        log(f"{kind} [{shape}] {k['dtype']} fwd+bwd (shardformer: {k.get('shardformer_backend')})")
        for impl, r in k["impls"].items():
            if r.get("status") != "ok":
                log(f"  {impl:<12} {r['status']}: {(r.get('reason') or r.get('error', ''))[:200]}")
            else:
                rate = (f"{r['gb_per_s']:>7.0f} GB/s {fmt(r['vs_copy'], '.3f'):>6} x copy" if "gb_per_s" in r
                        else f"{r['tflops']:>7.1f} TFLOP/s {fmt(r['vs_matmul'], '.3f'):>6} x matmul")
                mem = f"  +{r['extra_peak_mem_gib']:.2f} GiB peak" if r["extra_peak_mem_gib"] is not None else ""
                log(f"  {impl:<12} {r['ms']:>8.3f} ms {rate}{mem}")


def targets(report: dict) -> dict:
    """Issue 3's acceptance numbers, read off this run (None: not measured in this run)."""
    v = report["variants"]
    sf_ok = [v[n] for n in ("sf_fused", "sf_fused_compile", "sf_fused_compile_custom") if v.get(n, {}).get("status") == "ok"]
    best = max(sf_ok, key=lambda r: r["tokens_per_s"]) if sf_ok else {}
    liger = v.get("hf_liger", {})
    rms = report["kernels"].get("rmsnorm", {}).get("impls", {}).get("shardformer", {})
    sf_mem = best.get("peak_mem_gib")  # the same (fastest) shardformer variant for speed and memory
    liger_mem = liger.get("peak_mem_gib") if liger.get("status") == "ok" else None
    return {
        "sf_tokens_vs_best_peer (>= 1.15)": best.get("tokens_vs_best_peer"),
        "sf_peak_mem_vs_liger (<= 1.0)": sf_mem / liger_mem if sf_mem and liger_mem else None,
        "sf_rmsnorm_vs_copy (>= 0.85)": rms.get("vs_copy") if rms.get("status") == "ok" else None,
        "sf_compiled_graph_breaks": v.get("sf_fused_compile", {}).get("graph_breaks"),
    }
