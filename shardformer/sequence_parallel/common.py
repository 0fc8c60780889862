"""What the sequence-parallel modes share: the true sequence length of the call a decoder layer
is running (their hooks pad the sequence to a multiple of the split and cut it back to this
length), and the planning of the modules they hook."""
from __future__ import annotations


class SequenceLength:
    """Set by a decoder layer's pre-hook just before its body runs (also when gradient
    checkpointing re-runs it), read by the layer's sequence ops."""

    full = 0


def sequence_length(kwargs: dict, mode: str) -> int:
    """S from the decoder layer's `position_embeddings` (cos [.., S, D]) or `position_ids`."""
    position_embeddings = kwargs.get("position_embeddings")
    if position_embeddings is not None:
        return position_embeddings[0].shape[-2]
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        return position_ids.shape[-1]
    raise RuntimeError(f"sp_mode={mode!r} reads the sequence length from the decoder layer's "
                       "position_embeddings or position_ids argument; this model passes neither")


def with_hidden_states(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    """A decoder layer's (args, kwargs) with `fn` applied to its hidden states (the first
    positional argument, or the `hidden_states` keyword)."""
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    return args, dict(kwargs, hidden_states=fn(kwargs["hidden_states"]))


def layer_paths(model, tp_plan) -> list[str]:
    """The decoder layers' paths in `model`."""
    return [f"{tp_plan.layers_path}.{i}" for i in range(len(model.get_submodule(tp_plan.layers_path)))]


def resolve_final_norm(model, policy, tp_plan, why: str) -> str:
    """The path of the base model's final norm, or a ValueError naming `Policy.final_norm`."""
    if not policy.final_norm:
        raise policy.entry_error("final_norm", policy.final_norm, f"must name the base model's final norm {why}")
    base = model.get_submodule(tp_plan.base_path.rstrip(".")) if tp_plan.base_path else model
    policy.resolve(base, policy.final_norm, type(base).__name__, "final_norm")
    return tp_plan.base_path + policy.final_norm
