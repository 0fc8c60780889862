"""The memory planner (`python -m shardformer.plan`): per-rank bytes from the real sharded shapes,
without a GPU or a process group."""
import os
import subprocess
import sys

import torch

import shardformer as sf
from shardformer.data_parallel import per_rank_bytes
from shardformer.planner import hf_config_of, report, stage_memory

from .models import batch, build
from .test_equivalence import ADAMW


def check_real_bytes(layout):
    """What a real gloo run of the tiny config holds after one ZeRO step, on this rank."""
    import torch.distributed as dist

    model = sf.shard_model(build("llama", num_hidden_layers=2), config=sf.ShardConfig(**layout))
    zero = sf.ZeroOptimizer(torch.optim.AdamW(model.parameters(), **ADAMW), model)
    dp = model.sf_mesh["dp"].size()
    ids, labels = batch(2 * dp, seq=12)
    rank = model.sf_mesh.get_local_rank("dp")
    model.forward_backward(input_ids=ids[2 * rank:2 * rank + 2], labels=labels[2 * rank:2 * rank + 2])
    zero.step()
    held = per_rank_bytes(zero)
    return dist.get_rank(), held["weights"], held["master_weights"] + held["optimizer_state"]


def test_planner_matches_a_real_run(pools):
    """Tiny LLaMA (fp32): the planner's parameter and optimizer bytes for the first rank of each
    stage equal what that rank of a real gloo run allocates."""
    config = hf_config_of("tiny")
    config.pad_token_id = 0
    for world, layout in [(2, dict(zero_stage=1)), (2, dict(zero_stage=2)),
                          (4, dict(tp_size=2, pp_size=2, zero_stage=1))]:
        planned = stage_memory(config, sf.ShardConfig(**layout), world, batch=4, seq=12, dtype_bytes=4)
        real = {rank: (w, o) for rank, w, o in pools(world).run(check_real_bytes, layout)}
        per_stage = world // layout.get("pp_size", 1)
        for stage in planned:
            weights, optimizer = real[stage.stage * per_stage]
            assert (stage.parameters, stage.optimizer) == (weights, optimizer), (layout, stage, weights, optimizer)


def test_planner_65b_on_32_gpus():
    """65B on 32 x 80 GB: tp 8 x pp 4 with ZeRO-1 fits; plain data parallelism (ZeRO-1 over 32
    ranks) does not, and the verdict names the part that does not fit. Nothing is allocated."""
    config = hf_config_of("65b")
    budget = 80 * 2 ** 30
    fits, text = report("3d", stage_memory(config, sf.ShardConfig(tp_size=8, pp_size=4, zero_stage=1,
                                                                  sp_mode="split_gather"), 32, 8, 2048), budget)
    print(text)
    assert fits and "fits" in text
    fits, text = report("dp", stage_memory(config, sf.ShardConfig(zero_stage=1), 32, 8, 2048), budget)
    print(text)
    assert not fits and "does not fit" in text and "largest part is parameters" in text


def test_planner_command_line():
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # a config name that is no preset is not looked up online
    run = subprocess.run([sys.executable, "-m", "shardformer.plan", "-c", "13b", "--gpus", "8", "--tp", "4",
                          "--pp", "2", "--zero", "1", "-b", "8", "-l", "1024", "--gpu-memory", "80GB"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0 and "fits" in run.stdout and "Warning" not in run.stderr, run.stdout + run.stderr
    found = subprocess.run([sys.executable, "-m", "shardformer.plan", "-c", "7b", "--gpus", "8", "--search",
                            "--gpu-memory", "40GB"], capture_output=True, text=True, timeout=300, env=env)
    assert found.returncode == 0 and "layouts of 8 GPUs that fit 40GB" in found.stdout, found.stdout + found.stderr
    assert len(found.stdout.strip().splitlines()) >= 2  # at least one layout listed
    bad = subprocess.run([sys.executable, "-m", "shardformer.plan", "-c", "nonexistent-config-name"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "-c/--config 'nonexistent-config-name'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_search_proposes_the_sequence_axis_with_pipelines():
    """At 64k tokens per sequence and 150 MiB per GPU, the tiny model's fastest-looking layout of 8
    GPUs splits the sequence on the sp axis (all_to_all) under a 2-stage pipeline; every layout
    listed fits the budget by its own stage memory, and splits heads evenly over tp x sp."""
    from shardformer.planner import search

    config, budget = hf_config_of("tiny"), 150 * 2 ** 20
    found = search(config, 8, 8, 65536, budget, top=100)
    assert found[0][1] == "tp 1 x sp 2 (all_to_all) x pp 2 x dp 2, zero 1", [f[1] for f in found[:3]]
    for _, name, layout in found:
        assert max(s.total for s in stage_memory(config, layout, 8, 8, 65536)) <= budget, name
        assert (layout.sp_mode == "all_to_all") == (layout.sp_size > 1), name
        assert config.num_attention_heads % (layout.tp_size * layout.sp_size) == 0, name
    assert not any(f[2].sp_size == 1 and f[2].tp_size == 1 and f[2].pp_size == 1 for f in found)  # dp alone: too big
