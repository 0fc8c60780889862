"""Pipeline parallelism: every schedule reproduces the unsharded model (fp32, 1e-5 relative):
the loss, every gradient (with clipping active) and every weight after AdamW steps; checkpoints
from every layout load with plain `from_pretrained`; memory, balance, errors and failures."""
import copy

import pytest
import torch
import torch.distributed as dist

import shardformer as sf

from .models import batch, build, capture_logs, grad_errors, rel_err
from .test_equivalence import ADAMW, TOL

CLIP = 0.05  # well below the gradient norm of these batches (~2-4): clipping is active


def check_pipeline(pp, schedule, microbatches, tied, tp=1, layers=4, rows_per_rank=8, steps=2, seq=12,
                   save_to=None, stage_layers=None, checkpointing=False, sp_mode=None, family="llama", sp=1):
    """Shard a copy of the reference with pp (x sp x tp x dp), train `steps` AdamW steps with clipping
    on this dp rank's rows, compare loss, gradients and weights with the reference on all rows."""
    ref = build(family, tied=tied, num_hidden_layers=layers)
    cfg = sf.ShardConfig(pp_size=pp, tp_size=tp, sp_size=sp, pp_schedule=schedule, num_microbatches=microbatches,
                         pp_stage_layers=stage_layers, gradient_checkpointing=checkpointing, sp_mode=sp_mode)
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


@pytest.mark.parametrize("schedule,seq", [("1f1b", 12), ("zbv", 11)])
def test_pipeline_with_split_gather_sequence_parallelism(pools, schedule, seq):
    """pp 2 x tp 2 with sp_mode='split_gather' (the sequence split inside each stage, whole between
    stages), a length the split divides and one it does not."""
    worst = pools(4).run(check_pipeline, 2, schedule, 4, False, 2, 4, 8, 2, seq, None, None, False, "split_gather")
    assert max(worst) <= TOL


def test_pipeline_with_gradient_checkpointing(pools):
    assert max(pools(2).run(check_pipeline, 2, "1f1b", 2, False, 1, 4, 8, 1, 12, None, None, True)) <= TOL


def check_in_flight(schedule, microbatches):
    """The most microbatches whose activations each stage held at once during one step, and the
    setup log line (rank 0)."""
    with capture_logs() as logs:
        model = sf.shard_model(build("llama", num_hidden_layers=4),
                               config=sf.ShardConfig(pp_size=dist.get_world_size(), pp_schedule=schedule,
                                                     num_microbatches=microbatches))
    ids, labels = batch(microbatches, seq=8)
    model.forward_backward(input_ids=ids, labels=labels)
    assert all(m.in_flight == 0 for m in model.sf_pipeline.modules)  # every activation released
    return model.sf_pipeline.peak_in_flight(), logs.messages


def test_activation_memory_1f1b_vs_gpipe(pools):
    """1F1B: a stage never holds more than pp microbatches' activations; GPipe holds all of them."""
    pp, n = 4, 8
    one_f_one_b = pools(pp).run(check_in_flight, "1f1b", n)
    gpipe = pools(pp).run(check_in_flight, "gpipe", n)
    peaks_1f1b = {s: p for peaks, _ in one_f_one_b for s, p in peaks.items()}
    peaks_gpipe = {s: p for peaks, _ in gpipe for s, p in peaks.items()}
    print(f"microbatches in flight per stage, pp={pp}, {n} microbatches: 1f1b {peaks_1f1b}, gpipe {peaks_gpipe}")
    assert max(peaks_1f1b.values()) <= pp and peaks_1f1b[0] == pp, peaks_1f1b
    assert set(peaks_gpipe.values()) == {n}, peaks_gpipe
    line = one_f_one_b[0][1]
    assert len(line) == 1 and all(not logs for _, logs in one_f_one_b[1:]), line
    for part in ("pp 4 x dp 1 x sp 1 x tp 1", "pipeline 1f1b, 8 microbatches", "stage 0 (pp rank 0): layers 0-0",
                 "stage 3 (pp rank 3): layers 3-3"):
        assert part in line[0], (part, line[0])


def test_default_partition_balances_llama3_8b():
    """Llama-3-8B's shape on the meta device at pp = 4: the most loaded stage carries at most
    1.15x the mean estimated cost (embedding and the 128256-word head weigh like layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardformer.pipeline import plan_pipeline
    from shardformer.tensor_parallel import plan_tensor_parallel

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    policy = sf.policies.get_policy(model)
    for schedule in ("1f1b", "zbv"):
        plan = plan_pipeline(model, policy, plan_tensor_parallel(model, policy, 1),
                             sf.ShardConfig(pp_size=4, pp_schedule=schedule))
        ratio = max(plan.costs) / (sum(plan.costs) / len(plan.costs))
        print(f"Llama-3-8B, pp=4 {schedule}: layers per stage {plan.split}, max / mean cost {ratio:.3f}")
        assert sum(plan.split) == 32 and ratio <= 1.15, (plan.split, ratio)
        assert plan.split[0] < plan.split[1] and plan.split[-1] < plan.split[1]  # embedding, head weigh
    uniform = plan_pipeline(model, policy, plan_tensor_parallel(model, policy, 1),
                            sf.ShardConfig(pp_size=4, pp_stage_layers=(8, 8, 8, 8)))
    assert max(uniform.costs) / (sum(uniform.costs) / 4) > 1.15  # what the balancing avoids


def check_bad_pipeline_input():
    """Each raises ValueError on every rank, before any collective of the model, naming the field."""
    model = sf.shard_model(build("llama", num_hidden_layers=4),
                           config=sf.ShardConfig(pp_size=2, num_microbatches=4))
    ids, labels = batch(6, seq=8)
    with pytest.raises(ValueError, match="does not divide by ShardConfig.num_microbatches=4"):
        model.forward_backward(input_ids=ids, labels=labels)
    with pytest.raises(ValueError, match="forward_backward"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model.forward_backward(inputs_embeds=torch.zeros(4, 8, 64), input_ids=ids[:4], labels=labels[:4])
    assert all(p.grad is None for p in model.parameters())
    return True


def _setup_error(config, layers=4, **build_kwargs):
    from shardformer.pipeline import plan_pipeline
    from shardformer.tensor_parallel import plan_tensor_parallel

    model = build("llama", num_hidden_layers=layers, **build_kwargs)
    policy = sf.policies.get_policy(model)
    with pytest.raises(ValueError) as raised:
        plan_pipeline(model, policy, plan_tensor_parallel(model, policy, config.tp_size), config)
    return str(raised.value)


def test_bad_pipeline_layouts_raise_at_setup():
    msg = _setup_error(sf.ShardConfig(pp_size=8), layers=4)
    assert "ShardConfig.pp_size=8" in msg and "model.config.num_hidden_layers=4" in msg, msg
    msg = _setup_error(sf.ShardConfig(pp_size=4, pp_schedule="interleaved"), layers=6)
    assert "ShardConfig.pp_size=4" in msg and "8 stages" in msg and "num_hidden_layers=6" in msg, msg
    msg = _setup_error(sf.ShardConfig(pp_size=2, pp_schedule="zbv"), layers=3)
    assert "4 stages" in msg and "zbv" in msg, msg
    msg = _setup_error(sf.ShardConfig(pp_size=2, pp_stage_layers=(1, 2)), layers=4)
    assert "ShardConfig.pp_stage_layers=(1, 2)" in msg and "num_hidden_layers=4" in msg, msg
    msg = _setup_error(sf.ShardConfig(pp_size=2, pp_stage_layers=(1, 1, 2)), layers=4)
    assert "ShardConfig.pp_stage_layers" in msg, msg
    msg = _setup_error(sf.ShardConfig(pp_size=4, pp_schedule="1f1b", num_microbatches=2), layers=4)
    assert "ShardConfig.num_microbatches=2" in msg, msg


def test_bad_pipeline_batches_raise_on_every_rank(pools):
    assert pools(2).run(check_bad_pipeline_input) == [True, True]


def check_failure_inside_a_stage():
    """Rank 1's stage raises in its second microbatch's forward: every rank fails within
    ShardConfig.pipeline_timeout_s (+ a margin) with the original error in its message."""
    import time

    model = sf.shard_model(build("llama", num_hidden_layers=4),
                           config=sf.ShardConfig(pp_size=2, num_microbatches=2, pipeline_timeout_s=5.0))
    calls = []

    def fail(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in a decoder layer")

    if dist.get_rank() == 1:
        model.model.layers[2].register_forward_pre_hook(fail, with_kwargs=True)
    ids, labels = batch(4, seq=8)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="injected failure in a decoder layer") as raised:
        model.forward_backward(input_ids=ids, labels=labels)
    elapsed = time.monotonic() - start
    assert elapsed < 5.0 + 30, elapsed
    return elapsed, str(raised.value)[:200]


def test_failure_inside_a_stage_stops_every_rank(pools):
    results = pools(2).run(check_failure_inside_a_stage)
    print(results)


def check_accumulation_and_inputs():
    """Tied embeddings on two stages: two forward_backward calls without zero_grad (the second
    under no_sync, then a synchronised third) accumulate exactly like the unsharded model; a
    [1, S] position_ids row is taken for every row; a model cast after sharding still runs."""
    ref = build("llama", tied=True, num_hidden_layers=4)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(pp_size=2, num_microbatches=2))
    for seed in (1, 2, 3):
        ids, labels = batch(4, seq=10, seed=seed)
        ref(input_ids=ids, labels=labels).loss.backward()
        if seed == 2:
            with model.no_sync():
                model.forward_backward(input_ids=ids, labels=labels)
        else:
            model.forward_backward(input_ids=ids, labels=labels)
    errs = grad_errors(model, ref)
    assert max(errs.values()) <= TOL, errs
    ids, labels = batch(4, seq=10, seed=4)
    positions = torch.arange(10).unsqueeze(0)
    loss = model.forward_loss(input_ids=ids, labels=labels, position_ids=positions)
    with torch.no_grad():
        expect = ref(input_ids=ids, labels=labels, position_ids=positions).loss
    assert rel_err(loss, expect) <= TOL
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model.forward_backward(input_ids=ids, labels=labels[:, :8])
    model.double(), ref.double()
    loss = model.forward_loss(input_ids=ids, labels=labels)
    with torch.no_grad():
        expect = ref(input_ids=ids, labels=labels).loss
    assert loss.dtype == torch.float32 and rel_err(loss, expect.float()) <= TOL
    return max(errs.values())


def test_pipeline_accumulation_inputs_and_casts(pools):
    assert max(pools(2).run(check_accumulation_and_inputs)) <= TOL
