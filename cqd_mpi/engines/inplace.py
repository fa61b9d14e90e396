"""Weights copied into a live torch module in place: the receive side of every torch engine.

A worker's engine builds its model once; each child's tensors are copied into the existing
parameters and buffers, by checkpoint name, one tensor at a time, so no second copy of the
model is ever held. Shared by the transformers and SAM engines.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import torch

from cqd_mpi.engines.base import NamedTensors
from cqd_mpi.errors import WeightsError


def _unwrapped(name: str) -> str:
    """A name without its wrapper modules' components (`model`, `language_model`): the checkpoint's
    `language_model.model.layers.0...` and the live `model.language_model.layers.0...` agree."""
    return ".".join(part for part in name.split(".") if part not in ("model", "language_model"))


class InPlaceWeights:
    """The live tensors of `model` by name, and in-place loading of checkpoint tensors into them.

    Names are accepted as the checkpoint spells them or as in state_dict (the model's
    `_checkpoint_conversion_mapping` and `base_model_prefix` are applied).
    """

    def __init__(self, model: torch.nn.Module, model_dir: str | Path):
        from cqd_mpi.merging.weights import ModelDir

        self.model = model
        self.model_dir = Path(model_dir)
        self.targets: dict[str, torch.Tensor] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self.targets[name] = param
        for name, buffer in model.named_buffers(remove_duplicate=False):
            self.targets.setdefault(name, buffer)
        self.checkpoint_names = ModelDir(self.model_dir).names

    def resolve(self, name: str) -> str:
        """The live name of checkpoint tensor `name`, or WeightsError with the closest live names."""
        if name in self.targets:
            return name
        mapping = getattr(self.model, "_checkpoint_conversion_mapping", None) or {}
        for pattern, replacement in mapping.items():
            converted, count = re.subn(pattern, replacement, name)
            if count and converted in self.targets:
                return converted
        for pattern, replacement in self._renamings():
            converted, count = re.subn(pattern, replacement, name)
            if count and converted in self.targets:
                return converted
        if self._renamings():
            match = self._wrapped().get(_unwrapped(name))
            if match is not None:
                return match
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        if prefix:
            if f"{prefix}.{name}" in self.targets:
                return f"{prefix}.{name}"
            if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in self.targets:
                return name[len(prefix) + 1 :]
        close = difflib.get_close_matches(name, list(self.targets), n=3)
        hint = f"; closest live names: {', '.join(close)}" if close else ""
        raise WeightsError(f"tensor {name!r} does not exist in the live model {self.model_dir}{hint}")

    def _renamings(self) -> list[tuple[str, str]]:
        """transformers' checkpoint renamings of the model's type (transformers >= 5 keeps them apart
        from the model: a LLaVA checkpoint's `language_model.model.*` is `model.language_model.*` live)."""
        if not hasattr(self, "_renaming_rules"):
            self._renaming_rules: list[tuple[str, str]] = []
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            try:
                from transformers.conversion_mapping import get_checkpoint_conversion_mapping

                rules = get_checkpoint_conversion_mapping(model_type) if model_type else None
            except ImportError:
                rules = None
            for rule in rules or []:
                sources, targets = getattr(rule, "source_patterns", None), getattr(rule, "target_patterns", None)
                if isinstance(sources, list) and isinstance(targets, list) and len(sources) == len(targets):
                    self._renaming_rules.extend(zip(sources, targets))
        return self._renaming_rules

    def _wrapped(self) -> dict[str, str]:
        """Live names by their `_unwrapped` form, where that form is unique."""
        if not hasattr(self, "_by_unwrapped"):
            seen: dict[str, list[str]] = {}
            for live in self.targets:
                seen.setdefault(_unwrapped(live), []).append(live)
            self._by_unwrapped = {key: names[0] for key, names in seen.items() if len(names) == 1}
        return self._by_unwrapped

    def target(self, name: str) -> torch.Tensor:
        """The live parameter or buffer that checkpoint tensor `name` is copied into."""
        return self.targets[self.resolve(name)]

    @torch.no_grad()
    def load(self, tensors: NamedTensors, *, strict: bool = True) -> int:
        """Copy each (name, tensor) into its live tensor, cast to its dtype and device.

        Tied aliases must receive equal values and count once. With `strict`, every persistent
        tensor of the model must be written. Returns the number of tensors copied.
        """
        written: dict[int, str] = {}
        count = 0
        for name, tensor in tensors:
            target = self.target(name)
            if tuple(target.shape) != tuple(tensor.shape):
                raise WeightsError(
                    f"tensor {name!r}: expected shape {tuple(target.shape)} (live model {self.model_dir}), "
                    f"got {tuple(tensor.shape)}"
                )
            key = target.data_ptr()
            if key in written:
                if not torch.equal(target, tensor.to(device=target.device, dtype=target.dtype)):
                    raise WeightsError(
                        f"tensor {name!r} is tied to {written[key]!r} in the live model, "
                        "but the stream gives them different values"
                    )
                continue
            target.copy_(tensor, non_blocking=False)
            written[key] = name
            count += 1
        if strict:
            missing = [n for n in self.model.state_dict() if self.targets[n].data_ptr() not in written]
            if missing:
                shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                raise WeightsError(
                    f"the weight stream left {len(missing)} tensor(s) of the live model unset: {shown}"
                )
        return count
