"""Ulysses sequence parallelism on the sp axis (`sp_mode="all_to_all"`, DeepSpeed-Ulysses).

Every rank of the sp group holds a chunk of the sequence everywhere except inside attention,
where an all-to-all trades the sequence split for a head split and back. It composes with tp
(heads split by tp, then by sp) and with dp. No HF forward is touched; the seams are:
  * a forward pre-hook on each decoder layer: it reads the true sequence length S from the
    layer's `position_embeddings` / `position_ids` argument and cuts `position_embeddings`
    (cos, sin) to this rank's chunk; on the first layer it splits the hidden states
    (`comm.split_seq`, zero-padded to a multiple of sp);
  * with pipeline parallelism, stages pass each other their sequence chunks (`SequenceChunks`):
    a later stage's HF forward gets `inputs_embeds` of the whole length S with the received chunk
    at its own positions and zeros elsewhere (`place`, local), so transformers builds the
    positions, rotary embeddings and mask of the whole sequence; the first layer of each stage
    takes the chunk back (`take`, local: no communication, and no gradient scaling, the chunk's
    gradient already follows the convention below). The whole-length tensor is a transient
    O(S x hidden) per microbatch (its backward too), as on the first stage; with transformers
    versions whose checkpointed layer runs its hooks inside the checkpoint (5.17), gradient
    checkpointing keeps it for the stage's first layer until that layer's backward;
  * transformers' attention registry: the model's attention implementation (sdpa, eager, ...)
    is wrapped by `ulysses_attention` under a new name ("sf_ulysses_<inner>", with the inner
    one's mask function): q, k, v [B, heads, S/sp, D] -> all-to-all -> [B, heads/sp, S, D]
    (padding cut off, so the inner attention sees exactly S tokens and HF's own mask), the
    inner attention, then the inverse all-to-all of the output. When a rank would hold fewer
    than one KV head, KV heads are repeated before the all-to-all instead of refusing;
  * the loss (see `sequence_parallel/loss.py`): labels are shifted on the whole sequence, then
    each rank computes the loss of its own tokens divided by the count of the whole batch, and
    the ranks' parts are summed.
Gradient convention: a gradient entering the split region from a computation every sp rank
repeats is multiplied by sp (the loss sum, an output gather), and the split at the first layer
divides it by sp on the way out; so the gradient reducer's mean over dp x sp is the sum over
sp of each rank's partial gradient (see `data_parallel/reducer.py`).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from ..comm import all_to_all, gather_from_group, pad_to_multiple, split_seq
from ..mesh import ParallelGroups
from .common import SequenceLength, layer_paths, resolve_final_norm, sequence_length, with_hidden_states
from .ring import DEVICES as RING_DEVICES, make_ring_attention, no_mask, zigzag_chunk, zigzag_split

SEQ_DIM = 1  # hidden states [batch, sequence, hidden]
_HEADS, _ATTN_SEQ = 1, 2  # q, k, v as attention functions take them: [batch, heads, sequence, dim]


@dataclass
class UlyssesPlan:
    """What an sp-axis mode installs; `mode` is "all_to_all" or "ring" (which shares everything
    here but the attention function and the zig-zag placement, see `ring.py`)."""

    mode: str
    layers: list[str]
    attentions: list[str]
    sp: int
    kv_repeat: int  # repeat each local KV head this many times before the all-to-all
    groups_after: int  # query heads per KV head once heads are split over sp
    stage_starts: set[int] = field(default_factory=lambda: {0})  # layers that cut their input to the chunk


@dataclass(frozen=True)
class SequenceChunks:
    """This rank's part of the sequence under an sp-axis mode: a contiguous 1/sp of it (zero-padded
    to a multiple of sp), or with `zigzag` (ring) chunks r and 2sp-1-r of 2 sp. `take` and `place`
    are local, differentiable and inverse to each other on the true positions (padding positions
    come back as zeros: attention never reads them and the loss ignores them)."""

    sp: int
    rank: int
    zigzag: bool = False

    def length(self, full: int) -> int:
        """The chunk's length for a sequence of `full` tokens."""
        multiple = 2 * self.sp if self.zigzag else self.sp
        return -(-full // multiple) * multiple // self.sp

    def cut(self, x: torch.Tensor, dim: int = SEQ_DIM) -> torch.Tensor:
        """This rank's chunk of the whole sequence `x` (backward: zeros elsewhere), a view where
        it can be (rotary cos / sin: no gradient, nothing saved)."""
        return (zigzag_chunk if self.zigzag else _chunk)(x, dim, self.sp, self.rank)

    def take(self, x: torch.Tensor, dim: int = SEQ_DIM) -> torch.Tensor:
        """`cut`, in storage of its own: a view would keep the whole sequence alive as long as a
        layer keeps its chunk."""
        part = self.cut(x, dim)
        return part if part._base is None else part.clone()

    def place(self, chunk: torch.Tensor, full: int, dim: int = SEQ_DIM) -> torch.Tensor:
        """A whole sequence of `full` tokens holding `chunk` at this rank's positions, zeros elsewhere
        (backward: the gradient's chunk)."""
        dim = dim % chunk.dim()
        pieces = chunk.chunk(2, dim=dim) if self.zigzag else (chunk,)
        blocks = 2 * self.sp if self.zigzag else self.sp
        at = (self.rank, blocks - 1 - self.rank) if self.zigzag else (self.rank,)
        step = pieces[0].shape[dim]
        zeros = chunk.new_zeros(chunk.shape[:dim] + (step,) + chunk.shape[dim + 1:])
        whole = [pieces[at.index(b)] if b in at else zeros for b in range(blocks)]
        return torch.cat(whole, dim=dim).narrow(dim, 0, full)


def plan_ulysses(model: nn.Module, policy, tp_plan, config) -> UlyssesPlan:
    """Validate Ulysses against the model (no collective): query heads must split over tp x sp;
    KV heads are repeated where a rank would hold less than one."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    tp, sp = config.tp_size, config.sp_size
    if policy.whole_sequence_output:
        raise policy.entry_error("whole_sequence_output", True, f"(the base model reshapes its final hidden states to "
                                 f"the whole sequence) is not supported with ShardConfig.sp_mode={config.sp_mode!r} "
                                 "yet, which keeps them a sequence chunk; use sp_mode='split_gather'")
    inner = model.config._attn_implementation or "eager"
    layers = layer_paths(model, tp_plan)
    if tp_plan.head_path is None:
        resolve_final_norm(model, policy, tp_plan, f"for sp_mode={config.sp_mode!r} on a model without an LM head")
    if config.sp_mode == "ring":  # heads stay whole over sp; ring runs its own block op
        window = getattr(model.config, "sliding_window", None)
        if window is not None and getattr(model.config, "use_sliding_window", True):
            raise ValueError(f"ShardConfig.sp_mode='ring' runs full causal attention; model.config.sliding_window="
                             f"{window} asks for a sliding window (use sp_mode='all_to_all')")
        device = next((p.device.type for p in model.parameters()), "cpu")
        if device not in RING_DEVICES + ("meta",):
            raise ValueError(f"ShardConfig.sp_mode='ring' has a block attention op on {RING_DEVICES}; the model's "
                             f"parameters are on {device} (use sp_mode='all_to_all')")
        return UlyssesPlan("ring", layers, list(tp_plan.attention_attrs), sp, 1, 0)
    if "flash" in inner or inner not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"ShardConfig.sp_mode='all_to_all' wraps the model's attention, which must be 'sdpa', "
                         f"'eager' or another implementation with a mask function; got "
                         f"model.config._attn_implementation={inner!r} (flash-attn variants are not supported yet)")
    heads = getattr(model.config, policy.num_heads_attr)
    kv_heads = getattr(model.config, policy.num_kv_heads_attr, None) or heads
    if heads % (tp * sp):
        raise ValueError(f"ShardConfig.tp_size={tp} x ShardConfig.sp_size={sp} does not divide "
                         f"model.config.{policy.num_heads_attr}={heads} (sp_mode='all_to_all' splits heads by both)")
    q_local = heads // tp
    kv_local = max(1, kv_heads // tp)
    kv_repeat = sp // math.gcd(kv_local, sp)
    if not policy.attention_local_attrs:
        raise policy.entry_error("attention_local_attrs", dict(policy.attention_local_attrs),
                                 "must name the attention's per-rank head attributes for sp_mode='all_to_all'")
    return UlyssesPlan("all_to_all", layers, list(tp_plan.attention_attrs), sp, kv_repeat,
                       (q_local // sp) // (kv_local * kv_repeat // sp))


def _chunk(x: torch.Tensor, dim: int, sp: int, rank: int) -> torch.Tensor:
    """This rank's chunk of x along dim after zero padding to a multiple of sp (local; backward:
    zeros outside the chunk)."""
    return pad_to_multiple(x, dim, sp).chunk(sp, dim=dim)[rank]


def _layer_pre_hook(length: SequenceLength, group, chunks: SequenceChunks, first: bool, stage_start: bool, mode: str):
    """`first`: the model's first layer (splits its input); `stage_start`: the first layer of a later
    pipeline stage (its input is a received chunk placed in a whole sequence: takes it back)."""
    split = zigzag_split if mode == "ring" else split_seq

    def hook(module, args, kwargs):
        length.full = sequence_length(kwargs, mode)
        kwargs = dict(kwargs)
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None:
            kwargs["position_embeddings"] = tuple(chunks.cut(t, -2) for t in cos_sin)
        if first:
            return with_hidden_states(args, kwargs, lambda h: split(h, SEQ_DIM, group, 1.0 / chunks.sp))
        if stage_start:
            return with_hidden_states(args, kwargs, chunks.take)
        return args, kwargs

    return hook


def make_ulysses_attention(inner_name: str):
    """The attention function registered for models whose attention was `inner_name`; the sp
    group, its size and the call's sequence length come from the attention module (set by
    `apply_ulysses`), so models of any layout share it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def ulysses_attention(module, query, key, value, attention_mask, **kwargs):
        inner = ALL_ATTENTION_FUNCTIONS[inner_name] if inner_name in ALL_ATTENTION_FUNCTIONS else \
            sys.modules[type(module).__module__].eager_attention_forward
        group, sp, full = module.sf_sp_group, module.sf_sp, module.sf_sequence_length.full
        repeat = module.sf_kv_repeat
        if repeat > 1:
            key = key.repeat_interleave(repeat, dim=_HEADS)
            value = value.repeat_interleave(repeat, dim=_HEADS)
        q, k, v = (all_to_all(t, _HEADS, _ATTN_SEQ, group).narrow(_ATTN_SEQ, 0, full) for t in (query, key, value))
        out, weights = inner(module, q, k, v, attention_mask, **kwargs)  # out: [B, S, heads/sp, D]
        out = all_to_all(pad_to_multiple(out, 1, sp), 1, 2, group)  # -> [B, S_pad/sp, heads, D]
        if weights is not None:  # [B, heads/sp, S, S] -> every head of this tp rank
            weights = gather_from_group(weights, 1, group)
        return out, weights

    return ulysses_attention


def apply_ulysses(model: nn.Module, plan: UlyssesPlan, groups: ParallelGroups, chunks: SequenceChunks) -> list:
    """Install the hooks and the attention function (local: no collective); `chunks`: this rank's
    part of the sequence (also what pipeline stages pass). Returns the per-layer sequence-length
    holders (the last one serves the final norm)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    group, sp = groups.sp, plan.sp
    inner = model.config._attn_implementation or "eager"
    if plan.mode == "ring":  # its own causal block op: no mask (padding is refused by SequenceCalls.validate)
        name = "sf_ring"
        ALL_ATTENTION_FUNCTIONS.register(name, make_ring_attention())
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, no_mask)
    else:
        name = f"sf_ulysses_{inner}"
        ALL_ATTENTION_FUNCTIONS.register(name, make_ulysses_attention(inner))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    lengths = [SequenceLength() for _ in plan.layers]
    for i, path in enumerate(plan.layers):
        hook = _layer_pre_hook(lengths[i], group, chunks, i == 0, i in plan.stage_starts, plan.mode)
        model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True)
    for i, path in enumerate(plan.attentions):
        attention = model.get_submodule(path)
        attention.sf_sequence_length, attention.sf_kv_repeat = lengths[i], plan.kv_repeat
        attention.sf_sp_group, attention.sf_sp = group, sp
        if plan.groups_after and hasattr(attention, "num_key_value_groups"):
            attention.num_key_value_groups = plan.groups_after
    model.config._attn_implementation = name
    return lengths
