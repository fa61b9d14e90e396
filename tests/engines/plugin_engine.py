"""An engine written outside the package, as a user would write one in one file.

It holds a transformers model, but takes every child's weights only through `load_weights`
(it offers no receive buffer), has settings of its own, and writes one line per update to
`settings.log` (rank, tensors taken, torch threads) so tests can see how weights arrived.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from cqd_mpi.engines.base import Engine, TextGeneration
from cqd_mpi.engines.hf import TransformersEngine, TransformersSettings


@dataclasses.dataclass
class PluginSettings:
    batch_size: int = 16
    log: str | None = None


class PluginEngine(Engine, TextGeneration):
    kind = "plugin"
    Settings = PluginSettings

    def __init__(self, model_dir, *, device="auto", dtype="auto", settings: PluginSettings | None = None):
        self.settings = settings or PluginSettings()
        self.inner = TransformersEngine(model_dir, device=device, dtype=dtype,
                                        settings=TransformersSettings(batch_size=self.settings.batch_size))
        self.taken = 0

    def required_names(self):
        return self.inner.required_names()

    def load_weights(self, tensors):
        def counted():
            for name, tensor in tensors:
                self.taken += 1
                yield name, tensor

        return self.inner.load_weights(counted())

    def finish_update(self):
        if self.settings.log:
            rank = os.environ.get("PMI_RANK", "0")
            with open(self.settings.log, "a") as log:
                log.write(f"{rank} {self.taken} {torch.get_num_threads()}\n")
        self.taken = 0

    def generate(self, prompts, *, max_new_tokens, stop=()):
        return self.inner.generate(prompts, max_new_tokens=max_new_tokens, stop=stop)

    def chat(self, conversations, *, max_new_tokens, stop=()):
        return self.inner.chat(conversations, max_new_tokens=max_new_tokens, stop=stop)


class SilentEngine(Engine):
    """An engine without text generation (as a mask predictor would be)."""

    kind = "silent"

    def __init__(self, model_dir, *, device="auto", dtype="auto", settings=None):
        self.names = []

    def required_names(self):
        return []

    def load_weights(self, tensors):
        return sum(1 for _ in tensors)
