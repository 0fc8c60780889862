"""Tiny model configs shared by the tests: GQA with 2 KV heads, a vocab (250) that no tp divides
evenly into a multiple of 4, 8 query heads so tp in {1, 2, 4} all divide them. A FAMILIES entry
may carry a third element: config fields of that family on top of DIMS."""
import torch
from transformers import (
    BertConfig, BertForMaskedLM, BertForSequenceClassification, MixtralConfig, MixtralForCausalLM,
    Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel,
    LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel,
    MistralConfig, MistralForCausalLM, Olmo2Config, Olmo2ForCausalLM, Olmo3Config, Olmo3ForCausalLM, OlmoeConfig,
    OlmoeForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
    Qwen3Config, Qwen3ForCausalLM,
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
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(bos_token_id=1, eos_token_id=2)),
    # eager attention: soft-capping runs there on every transformers version (5.17 defaults to sdpa,
    # which ignores it); a 4-token window on 12-token sequences; soft caps near the logits' size
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(head_dim=8, sliding_window=4, attn_implementation="eager",
                                                     attn_logit_softcapping=0.02, final_logit_softcapping=0.1)),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(head_dim=8, sliding_window=4, attn_implementation="eager",
                                                         sliding_window_pattern=2)),  # sliding, full, ...
    # multi-head attention (GPT-2 has no KV-head setting); dropout off so that runs compare
    "gpt2": (GPT2Config, GPT2LMHeadModel, dict(n_inner=96, num_key_value_heads=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                               bos_token_id=1, eos_token_id=2)),
    # 4 experts, 2 per token; experts_implementation stays HF's default (grouped_mm, eager on 5.17)
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
    # q_norm / k_norm over all heads (split_norms); OLMo 3 with a 4-token window (HF's layer pattern:
    # 3 sliding layers of 4, so all sliding at 2 layers, the 4th full at 4)
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, dict(bos_token_id=1, eos_token_id=2)),
    "olmo3": (Olmo3Config, Olmo3ForCausalLM, dict(bos_token_id=1, eos_token_id=2, sliding_window=4)),
    "olmoe": (OlmoeConfig, OlmoeForCausalLM, dict(bos_token_id=1, eos_token_id=2, num_experts=4,
                                                  num_experts_per_tok=2)),
    # multi-head encoder; dropout off so that runs compare
    "bert": (BertConfig, BertForMaskedLM, dict(num_key_value_heads=None, hidden_dropout_prob=0.0,
                                               attention_probs_dropout_prob=0.0)),
    "bert-seqcls": (BertConfig, BertForSequenceClassification, dict(
        num_key_value_heads=None, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)),
}


def _randomize(suffix: str, mean: float = 0.0):
    """Parameters HF initialises to a constant 0 (Gemma's (1 + weight) norm weights, GPT-2's
    biases) sit at about +-lr after one AdamW step, where the relative weight comparison would
    measure Adam's conditioning instead of the sharding: start those ending in `suffix` at random
    values (from the seeded stream: the same on every rank)."""

    def prepare(model) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(suffix):
                    p.normal_(mean, 0.1)

    return prepare


def _bert(model) -> None:
    """Random biases (as GPT-2's), and the attention's key biases frozen: their gradient is zero in
    exact arithmetic (softmax over the keys ignores a shift shared by every key), so both models'
    are fp32 rounding noise of about 1e-9 and a relative comparison would measure only that."""
    _randomize("bias")(model)
    for name, p in model.named_parameters():
        if name.endswith("attention.self.key.bias"):
            p.requires_grad_(False)


# OLMo's q / k norm weights (ones at init) start apart, so a piece cut from the wrong place shows
_OLMO = _randomize("_norm.weight", mean=1.0)
PREPARE = {"olmo2": _OLMO, "olmo3": _OLMO, "olmoe": _OLMO, "gemma2": _randomize("norm.weight"), "gemma3": _randomize("norm.weight"), "gpt2": _randomize(".bias"),
           "bert": _bert, "bert-seqcls": _bert}


def build(family: str, tied: bool = False, seed: int = 0, **overrides):
    """The same fp32 model on every rank (seeded init)."""
    config_cls, model_cls, *extra = FAMILIES[family]
    config = config_cls(**{**DIMS, **(extra[0] if extra else {}), "tie_word_embeddings": tied, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float()
    if family in PREPARE:
        PREPARE[family](model)
    return model


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
    """rel_err of each sharded parameter's gathered gradient against the unsharded `ref`'s (in fp32);
    a parameter with no gradient (frozen, or unused by the forward: untied BERT's
    `cls.predictions.bias`) must have none in `ref` either."""
    from shardformer.sharding import gather_full
    from shardformer.sharding import sharded_parameters

    group, ref_params = model.sf_mesh.get_group("tp"), dict(ref.named_parameters(remove_duplicate=False))
    unused = {name for name, p, _ in sharded_parameters(model) if p.grad is None}  # frozen, or not in the forward
    assert all(ref_params[name].grad is None for name in unused), sorted(unused)
    return {name: rel_err(gather_full(p.grad, spec, group).float(), ref_params[name].grad.float())
            for name, p, spec in sharded_parameters(model) if name not in unused}


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


def masked_step_errors(model, ref, ids, mask, labels) -> tuple[list, torch.Tensor]:
    """One forward_backward of the sharded `model` with an attention mask against the unsharded
    `ref`: ([loss error, every gradient's error], ref's loss)."""
    ref_loss = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_loss.backward()
    errs = [rel_err(model.forward_backward(input_ids=ids, attention_mask=mask, labels=labels), ref_loss.detach())]
    return errs + list(grad_errors(model, ref).values()), ref_loss.detach()
