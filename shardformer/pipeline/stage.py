"""One pipeline stage of an unmodified HF model, run through HF's own forward.

`cut_model` keeps on this rank only the layers of its stages: every other decoder layer becomes
an `AbsentLayer` (no parameters; it hands its input back), the embedding an `AbsentEmbedding`
unless this rank holds the first stage, the final norm and the LM head `PassThrough`s unless it
holds the last. Parameter names stay the HF model's, so this rank's state dict holds exactly its
stages' tensors under their HF keys.

`StageModule` runs one stage: a view of the (cut) model whose other local layers are absent too
(a rank holds two stages under interleaved / zbv), shallow copies sharing every parameter. The
first stage feeds `input_ids` to HF's forward; later ones feed the received hidden states as
`inputs_embeds`, so HF computes the rotary embeddings and the mask itself where they are used.
Every stage but the last calls the base model (final norm absent) and returns its last hidden
state; the last calls the whole model with the labels through `call_model` (the sharded model's own
call: tensor-parallel output handling and the fused loss included) and returns the loss, which is the sum of
the microbatch's token losses divided by the count of the whole batch (`num_items_in_batch`),
so that the microbatches' losses add up to the batch mean.

With a sequence split on the sp axis (`sequence`: all_to_all, ring), stages pass each other
this rank's chunk of the sequence instead of all of it: a later stage gives HF the chunk placed at
its positions in a whole-length sequence (`sequence.place`, local), so that transformers builds
the positions, rotary embeddings and mask of the whole sequence; the sequence parallelism's hook
on the stage's first layer takes the chunk back.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class AbsentLayer(nn.Module):
    """A decoder layer held by another pipeline stage: returns the hidden states unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class AbsentEmbedding(nn.Module):
    """The input embedding on a rank without the first stage (never called: later stages get
    `inputs_embeds`)."""

    def forward(self, input_ids):
        raise RuntimeError("this pipeline stage holds no input embedding (it receives hidden states)")


class PassThrough(nn.Module):
    """The final norm / LM head of a stage that is not the last: hands its input on."""

    def forward(self, x):
        return x


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of `module` sharing its parameters, buffers and children, with its own child table."""
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    return twin


def view_with(root: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A view of `root` in which the submodules at the dotted paths of `replacements` are
    replaced; every ancestor of a replaced path is a shallow copy, everything else is shared."""
    copies = {"": _shallow(root)}

    def copy_of(path: str) -> nn.Module:
        if path not in copies:
            parent, _, name = path.rpartition(".")
            twin = _shallow(copy_of(parent)._modules[name])
            copy_of(parent)._modules[name] = twin
            copies[path] = twin
        return copies[path]

    for path, module in replacements.items():
        parent, _, name = path.rpartition(".")
        copy_of(parent)._modules[name] = module
    return copies[""]


def _layers_keeping(layers: nn.ModuleList, keep) -> nn.ModuleList:
    return nn.ModuleList([layer if i in keep else AbsentLayer() for i, layer in enumerate(layers)])


def cut_model(model: nn.Module, plan, stages: list[int]) -> None:
    """Drop from `model` (in place) everything not in `stages` (see module docstring)."""
    keep = {i for s in stages for i in plan.layer_range(s)}
    parent_path, _, name = plan.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, _layers_keeping(model.get_submodule(plan.layers_path), keep))
    if 0 not in stages:
        _set(model, plan.embedding_path, AbsentEmbedding())
    if plan.stages - 1 not in stages:
        _set(model, plan.final_norm_path, PassThrough())
        _set(model, plan.head_path, PassThrough())


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


class StageModule(nn.Module):
    """Stage `index` of `plan` over the cut `model` (see module docstring). `in_flight` /
    `peak_in_flight` count the microbatches whose forward ran and whose backward has not."""

    def __init__(self, model: nn.Module, plan, index: int, call_model, sequence=None):
        super().__init__()
        self.index, self.first, self.last = index, index == 0, index == plan.stages - 1
        keep = set(plan.layer_range(index))
        replacements = {plan.layers_path: _layers_keeping(model.get_submodule(plan.layers_path), keep)}
        if not self.first:  # later stages get inputs_embeds; the rank's first stage may hold the embedding
            replacements[plan.embedding_path] = AbsentEmbedding()
        if not self.last:
            replacements[plan.final_norm_path] = PassThrough()
            replacements[plan.head_path] = PassThrough()
        self.view = view_with(model, replacements)  # holds exactly the parameters this stage runs
        self.base_path = plan.layers_path.rpartition(".")[0]
        self.call_model = call_model  # (view, kwargs) -> the HF output of the whole model
        self.num_items = None  # the whole batch's target count, set before each step
        self.sequence = sequence  # the sequence split of the hidden states between stages, or None: whole
        self.length = 0  # the step's sequence length, set before each step
        self.in_flight = self.peak_in_flight = 0

    def forward(self, x, **kwargs):
        call = dict(kwargs, use_cache=False)
        if x.requires_grad:  # its gradient is sent to the previous stage: point-to-point needs it dense
            x.register_hook(torch.Tensor.contiguous)
        if self.first:
            call["input_ids"] = x
        else:
            call["inputs_embeds"] = x if self.sequence is None else self.sequence.place(x, self.length)
        if self.last:
            call["num_items_in_batch"] = self.num_items
            out = self.call_model(self.view, call).loss
        else:
            call.pop("labels", None)
            base = self.view.get_submodule(self.base_path) if self.base_path else self.view
            out = base(**call).last_hidden_state
        if out._base is not None:  # a view (e.g. a gathered sequence cut to length): the zero-bubble
            out = out.clone()  # schedule detaches stage outputs in place, which a view refuses
        if out.requires_grad:  # released when its gradient arrives (the stage's backward starts)
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            out.register_hook(self._release)
        return out

    def _release(self, grad):
        self.in_flight -= 1
