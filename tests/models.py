"""Tiny model configs shared by the tests: GQA with 2 KV heads, a vocab (250) that no tp divides
evenly into a multiple of 4, 8 query heads so tp in {1, 2, 4} all divide them."""
import torch
from transformers import (
    LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel,
    MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

DIMS = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "llama-model": (LlamaConfig, LlamaModel),
    "llama-seqcls": (LlamaConfig, LlamaForSequenceClassification),
}


def build(family: str, tied: bool = False, seed: int = 0, **overrides):
    """The same fp32 model on every rank (seeded init)."""
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(**{**DIMS, "tie_word_embeddings": tied, **overrides})
    torch.manual_seed(seed)
    return model_cls(config).float()


def batch(n: int, seq: int = 12, vocab: int = 250, seed: int = 1):
    """input_ids and labels (a few -100s at the same positions in every row)."""
    ids = torch.randint(1, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, 3] = -100
    labels[:, 7] = -100
    return ids, labels


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (0 when both are all-zero or empty)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.numel() == 0:
        return 0.0
    denom = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff if denom == 0 else diff / denom


def grad_errors(model, ref) -> dict[str, float]:
    """rel_err of each sharded parameter's gathered gradient against the unsharded `ref`'s (in fp32)."""
    from shardformer.sharding import gather_full
    from shardformer.sharding import sharded_parameters

    group, ref_params = model.sf_mesh.get_group("tp"), dict(ref.named_parameters(remove_duplicate=False))
    return {name: rel_err(gather_full(p.grad, spec, group).float(), ref_params[name].grad.float())
            for name, p, spec in sharded_parameters(model)}


def step_and_compare_weights(errs: dict, step: int, model, ref, optimizers) -> None:
    """Step and zero every optimizer, then record each full weight's rel_err against `ref`'s in `errs`."""
    import shardformer as sf

    for o in optimizers:
        o.step()
        o.zero_grad()
    full, ref_state = sf.full_state_dict(model), ref.state_dict()
    errs |= {f"step{step}/weight/{name}": rel_err(t, ref_state[name]) for name, t in full.items()}


def assert_within(errs: dict, tol: float) -> float:
    """Every error at most `tol` (naming those above); returns the worst."""
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return max(errs.values())


class capture_logs:
    """Context manager: the messages logged by the "shardformer" logger (INFO and up) inside it."""

    def __enter__(self):
        import logging

        self.records, self.handler = [], logging.Handler()
        self.handler.emit = self.records.append
        self.logger = logging.getLogger("shardformer")
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]
