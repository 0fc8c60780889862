"""Vocab-parallel embedding, built from an existing `nn.Embedding`.

The table [V, H] is split on V (rows), zero-padded to a multiple of tp; rank r holds the rows of
tokens [vocab_start, vocab_start + V_pad / tp). Token ids outside that range look up zeros.
    forward: all-reduce (sum) of the partial lookups over the tp group
    backward: identity on dL/dy, no collective (each rank's rows get the gradient of their tokens)
With `scale` (Gemma's scaled word embedding) the sum is multiplied by it, in the output's dtype
as HF does (`embed_scale.to(weight.dtype)`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import reduce_from_group
from ..sharding import ShardSpec, record_specs, split_parameter


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary split over the tp group (see module docstring).

    `padding_idx` keeps nn.Embedding's meaning: that row receives no gradient.
    """

    def __init__(self, weight: nn.Parameter, spec: ShardSpec, group, tp_rank: int, padding_idx: int | None,
                 scale: float | None = None):
        super().__init__()
        self.weight, self.group, self.scale = weight, group, scale
        # HF multiplies by an fp32 buffer cast to the weight's dtype: the same number, per dtype
        self._scales = {} if scale is None else {
            dtype: torch.tensor(scale).to(dtype).item() for dtype in (torch.float32, torch.float64, torch.bfloat16,
                                                                       torch.float16)}
        self.vocab_start = spec.start(tp_rank)
        self.num_embeddings, self.embedding_dim = spec.full, weight.shape[1]
        self.padding_idx = padding_idx
        local_pad = None if padding_idx is None else padding_idx - self.vocab_start
        self._local_padding_idx = local_pad if local_pad is not None and 0 <= local_pad < spec.local else None
        record_specs(self, weight=spec)

    @staticmethod
    def check_supported(emb: nn.Embedding, path: str) -> None:
        """ValueError for nn.Embedding options the vocab split cannot reproduce."""
        for attr, default in (("max_norm", None), ("scale_grad_by_freq", False), ("sparse", False)):
            if getattr(emb, attr) != default:
                raise ValueError(
                    f"vocab-parallel embedding does not support model.{path}.{attr}={getattr(emb, attr)!r}; "
                    "set ShardConfig.tp_size=1 for this model"
                )

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, spec: ShardSpec, group, tp_rank: int, scale: float | None = None):
        """`scale`: the fp32 number HF multiplies the lookup by (None: none)."""
        return cls(split_parameter(emb.weight, spec, tp_rank), spec, group, tp_rank, emb.padding_idx, scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # nn.Embedding raises on an out-of-range id; a vocab slice would silently look up zeros.
        # _assert_async: raises at once on CPU, a device-side assert on CUDA, no host sync.
        torch._assert_async(((input_ids >= 0) & (input_ids < self.num_embeddings)).all(),
                            f"input id out of range for an embedding of {self.num_embeddings} tokens")
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight, self._local_padding_idx)
        out = reduce_from_group(out.masked_fill(outside.unsqueeze(-1), 0.0), self.group)
        if self.scale is None:
            return out
        return out * self._scales[out.dtype]

    def extra_repr(self) -> str:
        scale = "" if self.scale is None else f", scale={self.scale:g}"
        return f"{self.weight.shape[0]} of {self.num_embeddings} rows from {self.vocab_start}, dim={self.embedding_dim}{scale}"
