"""Pipeline parallelism: every schedule reproduces the unsharded model (fp32, 1e-5 relative):
the loss, every gradient (with clipping active) and every weight after AdamW steps; checkpoints
from every layout load with plain `from_pretrained`; memory, balance, errors and failures."""
import copy

import pytest
import torch
import torch.distributed as dist

import shardformer as sf

from .models import batch, build, grad_errors, rel_err
from .test_equivalence import ADAMW, TOL

CLIP = 0.05  # well below the gradient norm of these batches (~2-4): clipping is active


def check_pipeline(pp, schedule, microbatches, tied, tp=1, layers=4, rows_per_rank=8, steps=2, seq=12,
                   save_to=None, stage_layers=None):
    """Shard a copy of the reference with pp (x tp x dp), train `steps` AdamW steps with clipping
    on this dp rank's rows, compare loss, gradients and weights with the reference on all rows."""
    ref = build("llama", tied=tied, num_hidden_layers=layers)
    cfg = sf.ShardConfig(pp_size=pp, tp_size=tp, pp_schedule=schedule, num_microbatches=microbatches,
                         pp_stage_layers=stage_layers)
    model = sf.shard_model(copy.deepcopy(ref), config=cfg)
    plan, mesh = model.sf_pipeline.plan, model.sf_mesh
    mine_stages = plan.stages_of(mesh.get_local_rank("pp"))
    real = [i for i, layer in enumerate(model.model.layers) if not isinstance(layer, sf.pipeline.AbsentLayer)]
    assert real == [i for s in mine_stages for i in plan.layer_range(s)], real  # only its own layers
    dp, dp_rank = mesh["dp"].size(), mesh.get_local_rank("dp")
    mine = slice(rows_per_rank * dp_rank, rows_per_rank * (dp_rank + 1))
    ref_opt = torch.optim.AdamW(ref.parameters(), **ADAMW)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    errs, norms = {}, []
    for step in range(steps):
        ids, labels = batch(rows_per_rank * dp, seq=seq, seed=step + 1)
        ref_loss = ref(input_ids=ids, labels=labels).loss
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        loss = model.forward_backward(input_ids=ids[mine], labels=labels[mine])
        norm = model.clip_grad_norm_(CLIP)
        norms.append(float(ref_norm))
        errs[f"step{step}/loss"] = rel_err(loss, ref_loss.detach())
        errs[f"step{step}/norm"] = rel_err(norm, ref_norm)
        errs |= {f"step{step}/grad/{name}": err for name, err in grad_errors(model, ref).items()}
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
        full = sf.full_state_dict(model)
        ref_state = ref.state_dict()
        errs |= {f"step{step}/weight/{name}": rel_err(t, ref_state[name]) for name, t in full.items()}
    assert min(norms) > CLIP  # clipping really acted
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"
    held = [None] * dist.get_world_size()  # every tensor of the model lives on some stage
    dist.all_gather_object(held, sorted(sf.full_state_dict(model)))
    assert set().union(*held) == set(ref.state_dict()), set(ref.state_dict()) - set().union(*held)
    eval_ids, eval_labels = batch(rows_per_rank * dp, seq=seq, seed=99)
    eval_loss = model.forward_loss(input_ids=eval_ids[mine], labels=eval_labels[mine])
    with torch.no_grad():
        ref_eval = ref(input_ids=eval_ids, labels=eval_labels).loss
    assert rel_err(eval_loss, ref_eval) <= TOL, (eval_loss, ref_eval)
    if save_to is not None:
        check_saved(model, ref, save_to)
    return max(errs.values())


def check_saved(model, ref, directory):
    from transformers import AutoModelForCausalLM

    sf.save_pretrained(model, directory)
    dist.barrier()
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    ref_state, state = ref.state_dict(), loaded.state_dict()
    assert set(state) == set(ref_state)
    for name, tensor in ref_state.items():
        assert rel_err(state[name], tensor) <= TOL, name


@pytest.mark.parametrize("pp,schedule,microbatches,tied", [
    (2, "gpipe", 1, True), (2, "gpipe", 2, False), (2, "1f1b", 2, True), (2, "1f1b", 8, False),
    (4, "gpipe", 8, False), (4, "1f1b", 4, True),
    (2, "interleaved", 4, True), (2, "interleaved", 2, False), (2, "zbv", 4, False), (2, "zbv", 8, True),
])
def test_pipeline_matches_unsharded(pools, tmp_path, pp, schedule, microbatches, tied):
    """...and the checkpoint it saves loads with plain from_pretrained, every tensor in it."""
    worst = pools(pp).run(check_pipeline, pp, schedule, microbatches, tied, save_to=str(tmp_path / "ckpt"))
    assert max(worst) <= TOL


@pytest.mark.parametrize("schedule,tp", [("1f1b", 2), ("1f1b", 1), ("zbv", 2), ("interleaved", 1)])
def test_pipeline_with_tensor_or_data_parallel(pools, tmp_path, schedule, tp):
    """World of 4: pp 2 x tp 2 (dp 1), or pp 2 x dp 2 (the data-parallel reduction after the
    last microbatch); the checkpoint of each loads with from_pretrained."""
    worst = pools(4).run(check_pipeline, 2, schedule, 4, True, tp, save_to=str(tmp_path / "ckpt"))
    assert max(worst) <= TOL
