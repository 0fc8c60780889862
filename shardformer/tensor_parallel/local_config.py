"""A per-rank view of a model's config, for attention modules that read head counts from their
`config` in forward (Phi-3 slices its fused q/k/v output at `config.num_attention_heads *
head_dim`): with heads split over tp that count must be this rank's.

`LocalConfig(model, {"num_attention_heads": 4})` answers those attributes with the given values
and every other attribute from `model.config` as it is at the time of the read (not a copy:
later changes such as the attention implementation set by sequence parallelism, which may give
the model a config object of its own, are seen). Setting an attribute that is not overridden
sets it on the model's config. Nothing else of HF's is changed.
"""
from __future__ import annotations

import weakref


class LocalConfig:
    """The model's config with a few attributes replaced by per-rank values (see module docstring)."""

    def __init__(self, model, overrides: dict):
        object.__setattr__(self, "_sf_model", weakref.ref(model))
        object.__setattr__(self, "_sf_overrides", tuple(overrides))
        for name, value in overrides.items():
            object.__setattr__(self, name, value)

    @property
    def sf_base(self):
        """The model's config now."""
        return object.__getattribute__(self, "_sf_model")().config

    def __getattr__(self, name):  # only reached for attributes not overridden
        if name.startswith("__") or "_sf_model" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.sf_base, name)

    def __setattr__(self, name, value):
        if name in self._sf_overrides:
            object.__setattr__(self, name, value)
        else:
            setattr(self.sf_base, name, value)

    def __repr__(self) -> str:
        local = ", ".join(f"{name}={getattr(self, name)}" for name in self._sf_overrides)
        return f"LocalConfig({local}) over {type(self.sf_base).__name__}"
