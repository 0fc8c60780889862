"""Checkpoints as plain HF directories (config.json, *.safetensors, index) from any layout.

`save_pretrained` walks the model's state dict one tensor at a time: every split parameter is
all-gathered over its tp group (`sharding.gather_full` drops replicated pieces and vocabulary
padding; at ZeRO-3 the dp shards are gathered first, and fp32 master shards cast to the model's
dtype) and handed to a writer, which appends it to its current safetensors file and starts a
new file once `max_shard_size` is reached. So a writer holds at most `max_shard_size` plus one
tensor, never the whole model. The writer is rank 0, or with pipeline parallelism each stage's
first rank (dp, sp and tp index 0), which writes only its stages' tensors. A tied LM head is
written once, as the input embedding (as HF does). At the end rank 0 numbers every file HF's
way (`model-00001-of-0000N.safetensors` with one index mapping every tensor to its file, or a
single `model.safetensors`) and writes config.json (the model's dtype: `model.sf_param_dtype`
at ZeRO-3) and the generation config, so the directory loads with `from_pretrained` and no
shardformer. Weight files of an earlier save in the same directory stay untouched until every
writer has written its files in full (under temporary names): only then are they replaced, so a
save that fails part-way (a full disk, a killed job) leaves the earlier checkpoint loadable and
removes its own temporary files.

It succeeds on every rank or raises on every rank: rank 0 first checks that it can write the
directory, a writer that fails part-way keeps taking part in the gathers, and the ranks agree
on the outcome at the end (`comm.all_or_none` / `agree_on_failure`).
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from ..comm import agree_on_failure, all_or_none
from ..sharding import full as whole_over_dp, gather_full, sharded_parameters

_WEIGHTS, _INDEX, _TMP = "model.safetensors", "model.safetensors.index.json", ".safetensors.tmp"


def _weight_file_names(directory, suffixes) -> list[str]:
    """Names in `directory` of weight files (model*) ending with one of `suffixes`."""
    return [name for name in os.listdir(directory) if name.startswith("model") and name.endswith(suffixes)]


@torch.no_grad()
def _full_tensors(model: torch.nn.Module, keep: bool = True):
    """Yield (name, unsharded tensor on its device, first name of the same tensor) for the model's
    state dict, one tensor at a time (a collective over the tp group, and over dp at ZeRO-3). A
    tied name (a tensor already yielded under `first`) yields None and costs no collective; so
    does every name on a rank with `keep=False`, which still takes part in the gathers. Nothing is
    held between steps."""
    group = model.sf_mesh.get_group("tp")
    specs = {name: spec for name, _, spec in sharded_parameters(model)}
    dtype = getattr(model, "sf_param_dtype", None)  # ZeRO-3: the model's dtype (its shards may be fp32 masters)
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            yield name, None, first[id(tensor)]
            continue
        first[id(tensor)] = name
        spec = specs.get(name)
        whole = whole_over_dp(tensor.detach())  # ZeRO-3: the whole tensor over dp first
        if dtype is not None and name in specs and whole.is_floating_point():
            whole = whole.to(dtype)
        gathered = whole if spec is None else gather_full(whole, spec, group)
        yield name, (gathered if keep else None), name  # on its device: the caller moves it to the CPU


def full_state_dict(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The unsharded model's state dict (a collective over the tp group, one tensor at a time);
    tied weights stay one tensor. A rank with `keep=False` takes part in the gathers but keeps
    nothing (returns {})."""
    full = {}
    for name, tensor, first in _full_tensors(model, keep):
        if keep:
            full[name] = full[first] if tensor is None else tensor.cpu()
    return full


def parse_shard_size(size) -> int:
    """`max_shard_size` in bytes: an int, or a string as HF writes it ("5GB" = 5e9, "5GiB" = 5 * 2**30)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9,
             "TB": 10 ** 12, "B": 1}
    text = str(size).strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                value = float(text[: -len(unit)])
            except ValueError:
                break
            if value > 0:
                return int(value * factor)
    raise ValueError(f"sf.save_pretrained(max_shard_size={size!r}): expected a positive size such as '5GB' or 500000000")


def save_pretrained(model: torch.nn.Module, save_directory: str | os.PathLike, max_shard_size="5GB") -> None:
    """Write the unsharded model as a plain HF directory, from any layout (see module docstring).
    Every rank must call it. A failure on any rank (say rank 0 cannot create the directory, or a
    writer runs out of disk) raises on every rank."""
    if not hasattr(model, "sf_mesh"):
        raise ValueError("sf.save_pretrained expects a model returned by sf.shard_model")
    limit = parse_shard_size(max_shard_size)
    mesh, runner = model.sf_mesh, model.sf_pipeline
    if runner is not None:
        writer = all(mesh.get_local_rank(axis) == 0 for axis in ("dp", "sp", "tp"))
        stage, skip = mesh.get_local_rank("pp"), {runner.plan.head_path + ".weight"} if runner.plan.tied else set()
    else:
        writer, stage, skip = dist.get_rank() == 0, 0, set()
    with all_or_none(None, "sf.save_pretrained"):
        if dist.get_rank() == 0:
            os.makedirs(save_directory, exist_ok=True)
            for old in _weight_file_names(save_directory, _TMP):  # left by a save that was killed part-way
                os.remove(os.path.join(save_directory, old))
    dist.barrier()
    files = _ShardWriter(save_directory, stage, limit) if writer else None
    for name, tensor, _ in _full_tensors(model, keep=writer):  # the writer joins every gather, error or not
        if tensor is not None and name not in skip and files.error is None:  # a tied weight goes once
            try:
                files.add(name, tensor.cpu())
            except Exception as err:  # noqa: BLE001 - host memory, say: every rank raises it after the gathers
                files.error = err
    error = files.close() if writer else None
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, files.parts if writer and error is None else None)
    try:
        agree_on_failure(error, None, "sf.save_pretrained")
    except Exception:
        if writer:  # the earlier save stays as it was; this one's files go
            for tmp, _ in files.parts:
                if os.path.exists(os.path.join(save_directory, tmp)):
                    os.remove(os.path.join(save_directory, tmp))
        raise
    with all_or_none(None, "sf.save_pretrained"):
        if dist.get_rank() == 0:
            _name_files(model, save_directory, [p for entry in parts if entry for p in entry])


class _ShardWriter:
    """One writer's files: tensors appended until `limit` bytes, then a new file (temporary names,
    numbered by `_name_files`). An error is kept, not raised, so the writer still joins every
    gather; `close` returns it."""

    def __init__(self, directory, stage: int, limit: int):
        self.directory, self.stage, self.limit = directory, stage, limit
        self.parts: list[tuple[str, dict[str, int]]] = []  # (temporary file name, {tensor: bytes})
        self.pending: dict[str, torch.Tensor] = {}
        self.size, self.error = 0, None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self._flush()
        self.pending[name], self.size = tensor, self.size + nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"model-stage{self.stage:05d}-part{len(self.parts):05d}{_TMP}"
        if self.error is None:
            try:
                save_file({k: v.contiguous() for k, v in self.pending.items()}, os.path.join(self.directory, name),
                          metadata={"format": "pt"})
            except Exception as err:  # noqa: BLE001 - every rank raises it after the gathers
                self.error = err
        self.parts.append((name, {k: v.numel() * v.element_size() for k, v in self.pending.items()}))
        self.pending, self.size = {}, 0

    def close(self):
        if self.pending:
            self._flush()
        return self.error


def _name_files(model, directory, parts) -> None:
    """Rank 0: give the writers' files HF's names (stage and part order), write the index (when
    more than one file), config.json and the generation config."""
    parts = sorted(parts)
    names = [_WEIGHTS] if len(parts) == 1 else [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
                                                  for i in range(len(parts))]
    weight_map, total = {}, 0
    for (tmp, sizes), final in zip(parts, names):
        os.replace(os.path.join(directory, tmp), os.path.join(directory, final))
        for key, size in sizes.items():
            weight_map[key], total = final, total + size
    for old in _weight_file_names(directory, (".safetensors", ".safetensors.index.json")):
        if old not in names:  # an earlier save's files would shadow or mix with these
            os.remove(os.path.join(directory, old))
    if len(parts) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(directory, _INDEX), "w") as f:
            json.dump(index, f, indent=2)
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]  # ZeRO-3: FSDP2 renames the class
    floating = getattr(model, "sf_param_dtype", None) or next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if floating is not None:  # what from_pretrained(dtype="auto") restores, as HF's save writes it
        model.config.dtype = floating
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
