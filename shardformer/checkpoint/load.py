"""`load_pretrained`: an HF checkpoint straight into a layout, each rank reading only its slices.

The model is built on the meta device (no memory), sharded by `shard_model` (tensor, sequence
and pipeline parallelism see only shapes), then materialised empty on the device, parameter by
parameter (tied parameters stay one tensor), and each local parameter is filled from the
safetensors files with `safe_open(...).get_slice`: a tensor-parallel piece reads only its rows
or columns (`ShardSpec.runs`: one block, or one per part of a packed tensor; vocabulary
padding stays zero), a pipeline rank only its stages' tensors. With `ShardConfig(zero_stage=3)` FSDP2 shards the meta model too; it is
materialised with FSDP2's `to_empty` (parameter objects and ties kept) and each parameter's
`to_local()` reads only its block: the dp (or dp x sp) chunk of the tensor-parallel piece's
first dimension (`zero3.local_region`), crossed with the piece's rows or columns. So a rank's
host memory while loading is its shard plus at most one tensor's slice. Non-persistent buffers
(rotary frequencies) are recomputed by the model's own `_init_weights`; the gradient reducer is
rebuilt on the real parameters (at ZeRO-3 without dp buckets: FSDP2 reduces over dp).
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch import nn

from ..sharding import local, sharded_parameters

_WEIGHTS, _INDEX = "model.safetensors", "model.safetensors.index.json"


def _weight_files(path: str) -> dict[str, str]:
    """{tensor name: file} of an HF checkpoint directory (sharded with an index, or one file)."""
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, _WEIGHTS)
    if not os.path.exists(single):
        raise ValueError(f"sf.load_pretrained: {path!r} holds neither {_WEIGHTS} nor {_INDEX}")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def _model_class(hf_config):
    import transformers

    for name in getattr(hf_config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModelForCausalLM.from_config  # a config without architectures: a causal LM


def _materialize(model: nn.Module, device: torch.device) -> dict[int, torch.Tensor]:
    """Replace every meta parameter and buffer by an empty one on `device` (shared ones once);
    returns {id(old): new}."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                if id(b) not in made:
                    made[id(b)] = torch.empty_like(b, device=device)
                module._buffers[name] = made[id(b)]
    return made


class _Reader:
    """Reads slices from the checkpoint's files, counting the bytes it read."""

    def __init__(self, files: dict[str, str]):
        from safetensors import safe_open

        self.files, self.bytes_read, self._open = files, 0, {}
        self._safe_open = safe_open

    def _handle(self, file):
        if file not in self._open:
            self._open[file] = self._safe_open(file, framework="pt")
        return self._open[file]

    def read(self, key: str, region: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Tensor `key`, or only its block at (start, length) per dimension."""
        part = self._handle(self.files[key]).get_slice(key)
        if region is None or [(0, size) for size in part.get_shape()] == list(region):
            tensor = part[:]
        else:
            tensor = part[_index(region)]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


def _piece_runs(param: torch.Tensor, spec, tp_rank: int) -> tuple[torch.Tensor, list]:
    """Where this rank's values of `param` come from: (the local tensor to write, and per
    contiguous run of real entries (`ShardSpec.runs`: one for a plain split, one per part of a
    packed tensor) a pair (block of the local tensor, block of the unsharded tensor), each a
    (start, length) per dimension). Entries no run covers are
    vocabulary padding (zero). The local tensor is the parameter itself, or at ZeRO-3 its
    `to_local()` (this rank's dp chunk of the tensor-parallel piece, `zero3.local_region`)."""
    from ..data_parallel.zero3 import local_region

    region = local_region(param)  # in the tensor-parallel piece
    if not spec.split:
        return local(param), [([(0, n) for _, n in region], region)]
    first, length = region[spec.dim]
    pairs = []
    for offset, start, n in spec.runs(tp_rank, first, length):
        mine = [(0, size) for _, size in region]
        mine[spec.dim] = (offset, n)
        theirs = list(region)
        theirs[spec.dim] = (start, n)
        pairs.append((mine, theirs))
    return local(param), pairs


def _index(region) -> tuple[slice, ...]:
    return tuple(slice(start, start + length) for start, length in region)


@torch.no_grad()
def _fill(model: nn.Module, reader: _Reader) -> None:
    tp_rank = model.sf_mesh.get_local_rank("tp")
    dtype = getattr(model, "sf_param_dtype", None)  # ZeRO-3: fp32 masters hold values of the model's dtype
    for name, param, spec in sharded_parameters(model):
        key = name if name in reader.files else _tied_key(model, name, reader)
        target, pairs = _piece_runs(param, spec, tp_rank)
        if spec.split and sum(mine[spec.dim][1] for mine, _ in pairs) < target.shape[spec.dim]:
            target.zero_()  # vocabulary padding
        for mine, theirs in pairs:
            if all(n for _, n in theirs):
                values = reader.read(key, theirs)
                target[_index(mine)].copy_(values if dtype is None else values.to(dtype))
    for name, buffer in model.named_buffers():
        if name in reader.files:
            buffer.copy_(reader.read(name))


def _tied_key(model, name: str, reader: _Reader) -> str:
    """The checkpoint key of a parameter absent under its own name: a tied LM head stored as the
    input embedding (HF writes tied tensors once)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for candidate, module in model.named_modules():
        if module is embedding and f"{candidate}.weight" in reader.files:
            return f"{candidate}.weight"
    for candidate in reader.files:
        if candidate.endswith("embed_tokens.weight"):
            return candidate
    raise ValueError(f"sf.load_pretrained: the checkpoint has no tensor for parameter {name}")


def sharded_on_meta(cls, hf_config, config, policy, dtype):
    """`cls(hf_config)` built on the meta device and sharded by `config` (no memory; at ZeRO-3
    FSDP2's `fully_shard` too accepts meta modules)."""
    from ..api import shard_model
    from ..config import ShardConfig

    config = ShardConfig() if config is None else config
    with torch.device("meta"):
        model = cls(hf_config)
    if dtype is not None:
        model.to(dtype)
    return shard_model(model, policy, config)


def materialize_sharded(model: nn.Module, device) -> None:
    """Give a meta-built sharded model empty real parameters on `device` (default: this rank's GPU
    under NCCL, else the CPU; the CPU with ZeRO-3's `cpu_offload`) and rebuild what held the meta
    ones (the reducer's hooks, the pipeline's tied copy). Values are filled by the caller; then
    call `init_buffers`. At ZeRO-3 FSDP2 owns the parameters (DTensors over dp): the model is
    materialised by FSDP2's documented `to_empty`, which keeps every parameter object (ties
    included) and re-pads FSDP's own shard storage."""
    from ..data_parallel import GradReducer
    from ..data_parallel.zero3 import fsdp_roots
    from ..mesh import device_type

    stage3 = model.sf_config.zero_stage == 3
    if stage3 and model.sf_config.cpu_offload:
        device = torch.device("cpu")  # FSDP2's CPUOffloadPolicy wants the shards there
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if device_type() == "cuda" else torch.device("cpu")
    if stage3:  # each FSDP2 root (the model, or with pipelines each stage module: it holds what it runs)
        for root in fsdp_roots(model):
            root.to_empty(device=torch.device(device))
        made = {}
    else:
        made = _materialize(model, torch.device(device))
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"materialize_sharded left {len(meta)} tensors on the meta device, e.g. {meta[0]}")
    runner = model.sf_pipeline
    if runner is not None and runner.tied_param is not None:
        runner.tied_param = made.get(id(runner.tied_param), runner.tied_param)
    model.sf_grad_reducer.remove()
    model.sf_grad_reducer = GradReducer(model, model.sf_groups, reduce_data=not stage3)


def init_buffers(model: nn.Module, persistent: bool = False) -> None:
    """Fill buffers by the model's own `_init_weights`: the non-persistent ones (rotary
    frequencies) and, with `persistent`, the ones a checkpoint would hold too (GLM-4.5's
    `e_score_correction_bias`), zeroed first so that one `_init_weights` leaves alone is alike
    on every rank. The module's parameters are swapped for meta stand-ins meanwhile, so their
    values (shards, already filled) are left untouched."""
    for module in model.modules():
        names = [n for n, b in module.named_buffers(recurse=False) if b is not None
                 and (persistent or n in getattr(module, "_non_persistent_buffers_set", ()))]
        if not names:
            continue
        for n in names:
            if n not in module._non_persistent_buffers_set:
                getattr(module, n).zero_()
        held = dict(module._parameters)
        module._parameters.update({n: nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                                   for n, p in held.items() if p is not None})
        try:
            model._init_weights(module)
        finally:
            module._parameters.update(held)


@torch.no_grad()
def load_weights(model: nn.Module, path: str) -> int:
    """Fill a sharded `model` (any layout) in place from the HF checkpoint directory `path`, each
    rank reading only its own slices of each tensor (buffers stored there are copied too).
    Returns the bytes this rank read. No collective."""
    reader = _Reader(_weight_files(path))
    _fill(model, reader)
    return reader.bytes_read


def load_pretrained(path: str, config=None, policy=None, dtype: torch.dtype | None = None, device=None):
    """Build the model of the HF checkpoint at `path` sharded by `config` (a `ShardConfig`), each
    rank reading only its own slices (see module docstring). `dtype`: the parameters' dtype
    (default torch's default, fp32); `device`: default this rank's GPU under NCCL, else the CPU.
    Every rank must call it."""
    from transformers import AutoConfig, GenerationConfig

    if not os.path.isdir(path):
        raise ValueError(f"sf.load_pretrained: {path!r} is not a checkpoint directory")
    hf_config = AutoConfig.from_pretrained(path)
    _weight_files(path)  # no weights: a ValueError before the model is built
    model = sharded_on_meta(_model_class(hf_config), hf_config, config, policy, dtype)
    materialize_sharded(model, device)
    model.sf_load_bytes = load_weights(model, path)
    init_buffers(model)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    dist.barrier()
    return model
