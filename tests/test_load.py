"""`sf.load_pretrained`: an HF checkpoint saved from one layout loads into another, each rank
reading only its own slices; the model equals plain `from_pretrained` (fp32, 1e-5)."""
import copy

import pytest
import torch
import torch.distributed as dist

import shardformer as sf

from .models import batch, build, rel_err
from .test_equivalence import TOL


def check_save(directory, tied):
    """Save a tp = 2 model (two ranks) as an HF directory."""
    ref = build("llama", tied=tied, num_hidden_layers=4)
    model = sf.shard_model(copy.deepcopy(ref), config=sf.ShardConfig(tp_size=2))
    sf.save_pretrained(model, directory)
    return True


def check_load(directory, layout):
    """Load into `layout` counting the bytes read from the safetensors files; compare with plain
    from_pretrained. Returns (relative error, bytes read, this rank's parameter bytes, largest
    tensor's bytes in the checkpoint)."""
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
    mine = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
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
    """Saved at tp = 2; loaded at tp = 4, pp = 2 (and pp 2 x tp 2) and tp = 1: the same logits (or
    loss, for the pipeline); each rank reads its shard's bytes (+- one tensor)."""
    directory = str(tmp_path / "ckpt")
    pools(2).run(check_save, directory, tied)
    for world, layout in [(4, dict(tp_size=4)), (2, dict(pp_size=2)), (4, dict(pp_size=2, tp_size=2)),
                          (1, dict())]:
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
    """The same seed gives bit-identical full weights at tp 1, tp 2, tp 4 and pp 2 (every tensor,
    norms at one, the padding row of the embedding at zero)."""
    one = pools(1).run(check_init, dict(), tied)[0]
    assert torch.equal(one["model.layers.0.input_layernorm.weight"], torch.ones(64))
    assert float(one["model.embed_tokens.weight"].std()) == pytest.approx(0.02, rel=0.1)
    for world, layout in [(2, dict(tp_size=2)), (4, dict(tp_size=4)), (2, dict(pp_size=2))]:
        other = pools(world).run(check_init, layout, tied)[0]
        assert other.keys() >= {k for k in one if not (tied and k == "lm_head.weight")}, layout
        for name, tensor in one.items():
            if name in other:
                assert torch.equal(other[name], tensor), (layout, name)
