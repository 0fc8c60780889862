"""One call of a tensor-parallel model: HF's forward, then its outputs made whole.

`run_forward(model, hf_forward, args, kwargs)` is what the sharded model's `forward` runs:
  * fused loss: in training with `labels` (grad enabled, `return_dict` not False,
    `logits_to_keep` 0) and a policy with `fused_lm_loss` (and none of its `logit_transforms`
    set, none of its `loss_terms` true in the model's config), the loss arguments are taken out of
    the call (so transformers computes no loss), the vocab-parallel LM head returns its input
    for this one call, and `fused_causal_lm_loss(hidden, head, labels, ...)` computes the loss
    from it chunk by chunk; the output has `loss` set and `logits=None`.
  * logits: without labels (inference, `generate`) they are gathered to the full vocabulary;
    with labels they stay this rank's vocab slice (training never gathers them).
  * attentions (`output_attentions=True`): each rank computed its own query heads; they are
    gathered over tp on the head dimension, giving HF's shape.
  * `return_dict=False` (or `config.return_dict=False`): HF is asked for its output object and
    the tuple is made from it after the steps above, so tuples and objects agree.
"""
from __future__ import annotations

import inspect

import torch

from ..comm import gather_from_group
from .loss import fused_causal_lm_loss

_LOSS_ARGS = ("labels", "shift_labels", "num_items_in_batch", "ignore_index")


def _wants_tuple(model, kwargs) -> bool:
    requested = kwargs.get("return_dict")
    return (requested if requested is not None else getattr(model.config, "return_dict", True)) is False


def accepts_return_dict(fn) -> bool:
    """Whether `fn` (an HF forward) takes `return_dict` (by name or through **kwargs)."""
    params = inspect.signature(fn).parameters
    return "return_dict" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _fused_loss_applies(model, head, kwargs) -> bool:
    return (head is not None and model.sf_fused_lm_loss and kwargs.get("labels") is not None
            and model.training and torch.is_grad_enabled() and not _wants_tuple(model, kwargs)
            and kwargs.get("logits_to_keep", 0) == 0
            and all(getattr(model.config, attr, None) is None for attr in model.sf_policy.logit_transforms)
            and not any(getattr(model.config, attr, False) for attr in model.sf_policy.loss_terms))


def run_forward(model, hf_forward, args: tuple, kwargs: dict, takes_return_dict: bool = True, sequence=None):
    """HF's `hf_forward(model, *args, **kwargs)` with the output handling of the module docstring;
    `takes_return_dict`: `accepts_return_dict(hf_forward)`, computed once by the caller;
    `sequence`: the sp axis's per-call handling (`sequence_parallel.SequenceCalls`), or None."""
    head, group = model.sf_lm_head, model.sf_mesh.get_group("tp")
    full = None
    if sequence is not None:
        kwargs, full = sequence.prepare(kwargs, args)
    hidden_states = kwargs.get("output_hidden_states")
    if hidden_states is None:
        hidden_states = getattr(model.config, "output_hidden_states", False)
    if model.sf_config.sp_mode is not None and hidden_states:
        raise ValueError(f"output_hidden_states=True (or model.config.output_hidden_states) is not supported with "
                         f"ShardConfig.sp_mode={model.sf_config.sp_mode!r} yet (the layers' hidden states are "
                         "sequence chunks); use sp_mode=None to inspect them")
    as_tuple = takes_return_dict and _wants_tuple(model, kwargs)
    call = {k: v for k, v in kwargs.items() if not k.startswith("sf_")}  # sf_*: shardformer's own notes
    if as_tuple:
        call["return_dict"] = True
    fused = _fused_loss_applies(model, head, kwargs)
    if fused:
        loss_args = {name: call.pop(name) for name in _LOSS_ARGS if name in call}
        head.returns_hidden = True
        try:
            out = hf_forward(model, *args, **call)
        finally:
            head.returns_hidden = False
        loss = fused_causal_lm_loss(out.logits, head, **loss_args)
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        out = type(out)(loss=loss, logits=None, **fields)
    else:
        out = hf_forward(model, *args, **call)
    if isinstance(out, tuple):  # a model that returns tuples by itself: logits first without labels
        if head is not None and kwargs.get("labels") is None and out and out[0] is not None:
            out = (head.gather_logits(out[0]),) + out[1:]
        return out
    if head is not None and kwargs.get("labels") is None and getattr(out, "logits", None) is not None:
        out.logits = head.gather_logits(out.logits)
    if getattr(out, "attentions", None) is not None:
        out.attentions = tuple(None if a is None else gather_from_group(a, 1, group) for a in out.attentions)
    if sequence is not None:
        out = sequence.finish(out, kwargs, full)
    return out.to_tuple() if as_tuple else out
