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
        prefix = getattr(self.model, "base_model_prefix", "") or ""
        if prefix:
            if f"{prefix}.{name}" in self.targets:
                return f"{prefix}.{name}"
            if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in self.targets:
                return name[len(prefix) + 1 :]
        close = difflib.get_close_matches(name, list(self.targets), n=3)
        hint = f"; closest live names: {', '.join(close)}" if close else ""
        raise WeightsError(f"tensor {name!r} does not exist in the live model {self.model_dir}{hint}")

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
