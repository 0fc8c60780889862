"""`sf.load_pretrained`: an HF checkpoint saved from one layout loads into another, each rank
reading only its own slices; the model equals plain `from_pretrained` (fp32, 1e-5)."""
import copy

import pytest
import torch
import torch.distributed as dist

import shardformer as sf
from shardformer.sharding import local

from .models import assert_within, batch, build, rel_err, step_and_compare_weights
from .test_equivalence import ADAMW, TOL


def check_save(directory, tied):
    """Save a tp = 2 model (two ranks) as an HF directory."""
    ref = build("llama", tied=tied, num_hidden_layers=4)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=2))
    sf.save_pretrained(model, directory)
    return True


def _tied(model) -> bool:
    """The LM head and the input embedding are one parameter (at ZeRO-3: one DTensor)."""
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def check_load(directory, layout):
    """Load into `layout` counting the bytes read from the safetensors files; compare with plain
    from_pretrained (a tied checkpoint stays tied, also at ZeRO-3). Returns (relative error, bytes
    read, this rank's parameter bytes (at ZeRO-3 its dp chunks), largest tensor's bytes in the
    checkpoint)."""
    import safetensors
    from transformers import AutoModelForCausalLM

    read = [0]
    original = safetensors.safe_open

    class Counting:  # wraps safe_open: every slice or tensor read is counted
        def __init__(self, *args, **kwargs):
            self.inner = original(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, key):
            part = self.inner.get_slice(key)

            class Slice:
                def get_shape(self):
                    return part.get_shape()

                def __getitem__(self, index):
                    tensor = part[index]
                    read[0] += tensor.numel() * tensor.element_size()
                    return tensor

            return Slice()

    safetensors.safe_open = Counting
    try:
        model = sf.load_pretrained(directory, config=sf.ShardConfig(**layout))
    finally:
        safetensors.safe_open = original
    ref = AutoModelForCausalLM.from_pretrained(directory)
    largest = max(p.numel() * p.element_size() for p in ref.parameters())
    mine = sum(local(p).numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    if layout.get("pp_size", 1) == 1:
        assert _tied(model) == ref.config.tie_word_embeddings
    ids, labels = batch(4, seq=10)
    if layout.get("pp_size", 1) > 1:
        loss = model.forward_loss(input_ids=ids, labels=labels)
        with torch.no_grad():
            err = rel_err(loss, ref(input_ids=ids, labels=labels).loss)
    else:
        with torch.no_grad():
            err = rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits)
        model.train()
        model.forward_backward(input_ids=ids, labels=labels)  # trains: the reducer sees real parameters
    return err, read[0], mine, largest


@pytest.mark.parametrize("tied", [False, True])
def test_save_at_tp2_load_anywhere(pools, tmp_path, tied):
    """Saved at tp = 2; loaded at tp = 4, pp = 2 (and pp 2 x tp 2), tp = 1, and ZeRO-3 at dp 2,
    tp 2 x dp 2 and pp 2 x dp 2: the same logits (or loss, for the pipeline); each rank reads its shard's bytes
    (+- one tensor; at ZeRO-3 its dp chunk of its tensor-parallel piece)."""
    directory = str(tmp_path / "ckpt")
    pools(2).run(check_save, directory, tied)
    for world, layout in [(4, dict(tp_size=4)), (2, dict(pp_size=2)), (4, dict(pp_size=2, tp_size=2)),
                          (1, dict()), (2, dict(zero_stage=3)), (4, dict(tp_size=2, zero_stage=3)),
                          (4, dict(pp_size=2, zero_stage=3))]:
        results = pools(world).run(check_load, directory, layout)
        for err, read, mine, largest in results:
            assert err <= TOL, (layout, err)
            assert abs(read - mine) <= largest, (layout, read, mine, largest)
        print(f"{layout}: bytes read per rank {[r[1] for r in results]}, shard bytes {[r[2] for r in results]}")


def check_init(layout, tied):
    """A model initialised from its config alone as shards: its full weights, and one training step."""
    from transformers import LlamaConfig

    from .models import DIMS

    hf_config = LlamaConfig(**{**DIMS, "num_hidden_layers": 4, "tie_word_embeddings": tied})
    model = sf.init_model(hf_config, config=sf.ShardConfig(**layout), seed=7)
    if layout.get("pp_size", 1) == 1:
        assert _tied(model) == tied
    full = sf.full_state_dict(model)
    ids, labels = batch(4, seq=10)
    loss = model.forward_backward(input_ids=ids, labels=labels)
    assert torch.isfinite(loss)
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, full)
    merged = {}
    for part in held:
        merged.update(part)
    return merged


@pytest.mark.parametrize("tied", [False, True])
def test_init_as_shards_is_layout_independent(pools, tied):
    """The same seed gives bit-identical full weights at tp 1, tp 2, tp 4, pp 2, and ZeRO-3 at dp 2,
    tp 2 x dp 2 and pp 2 x dp 2 (every tensor, norms at one, the padding row of the embedding at zero)."""
    one = pools(1).run(check_init, dict(), tied)[0]
    assert torch.equal(one["model.layers.0.input_layernorm.weight"], torch.ones(64))
    assert float(one["model.embed_tokens.weight"].std()) == pytest.approx(0.02, rel=0.1)
    for world, layout in [(2, dict(tp_size=2)), (4, dict(tp_size=4)), (2, dict(pp_size=2)),
                          (2, dict(zero_stage=3)), (4, dict(tp_size=2, zero_stage=3)), (4, dict(pp_size=2, zero_stage=3))]:
        other = pools(world).run(check_init, layout, tied)[0]
        assert other.keys() >= {k for k in one if not (tied and k == "lm_head.weight")}, layout
        for name, tensor in one.items():
            if name in other:
                assert torch.equal(other[name], tensor), (layout, name)


def check_init_trains(layout, tied, steps=2):
    """init_model at ZeRO-3, then AdamW steps through sf.ZeroOptimizer: every step's loss, and the
    weights after it, equal the unsharded model built from the same full weights (fp32, 1e-5)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .models import DIMS

    hf_config = LlamaConfig(**{**DIMS, "num_hidden_layers": 4, "tie_word_embeddings": tied})
    model = sf.init_model(hf_config, config=sf.ShardConfig(**layout), seed=7)
    assert all(hasattr(p, "to_local") for p in model.parameters())  # FSDP2's DTensors over dp
    ref = LlamaForCausalLM(hf_config).float()
    held = [None] * dist.get_world_size()  # a pipeline stage holds its own tensors
    dist.all_gather_object(held, sf.full_state_dict(model))
    ref.load_state_dict({k: v for part in held for k, v in part.items()})
    zero = sf.ZeroOptimizer(torch.optim.AdamW(model.parameters(), **ADAMW), model)
    ref_opt = torch.optim.AdamW(ref.parameters(), **ADAMW)
    dp, rank = model.sf_mesh["dp"].size(), model.sf_mesh.get_local_rank("dp")
    mine = slice(2 * rank, 2 * rank + 2)
    errs = {}
    for step in range(steps):
        ids, labels = batch(2 * dp, seq=10, seed=step + 3)
        ref_loss = ref(input_ids=ids, labels=labels).loss
        ref_loss.backward()
        loss = model.forward_backward(input_ids=ids[mine], labels=labels[mine])
        errs[f"step{step}/loss"] = rel_err(loss, ref_loss.detach())
        step_and_compare_weights(errs, step, model, ref, (ref_opt, zero))
    return assert_within(errs, TOL)


@pytest.mark.parametrize("world,layout,tied", [(2, dict(zero_stage=3), False),
                                               (4, dict(tp_size=2, zero_stage=3), True),
                                               (4, dict(pp_size=2, zero_stage=3), True)])
def test_init_at_zero_stage_3_trains(pools, world, layout, tied):
    """A model initialised as shards at ZeRO-3 (dp 2; tp 2 x dp 2; pp 2 x dp 2, the tied embedding
    a copy on each end stage) trains like the unsharded model
    with the same weights: the same losses and weights over two AdamW steps."""
    assert max(pools(world).run(check_init_trains, layout, tied)) <= TOL
