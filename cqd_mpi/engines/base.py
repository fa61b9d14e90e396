"""The model contract: what the runtime and the tasks need from a live model.

An engine holds one model on its process's device for the whole run; every model the
conductor sends replaces that model's weights in place, so the engine is built once.

The runtime's side, which every engine has:

- `required_names()`: the checkpoint tensor names a complete update must include;
- `load_weights(tensors)`: take `(name, tensor)` pairs, one at a time, in the checkpoint's
  own names (an engine that fuses or shards weights, as vLLM does, maps them itself);
  the stream is never materialised, so memory stays bounded by one tensor;
- `receive_buffer(name)`: optionally, a tensor whose storage the `mpi` transport may write
  `name`'s bytes into directly (zero-copy); engines without one get `load_weights`;
- `finish_update()`: called once after every complete update (synchronise a device,
  reset a prefix cache).

The tasks' side are capabilities: abstract mixins naming the calls a task makes. An engine
has a capability by subclassing it, and a task says which one it needs (`Task.requires`),
so a config that pairs them wrongly is refused when it is loaded.

To add an engine, write one module with a subclass of `Engine` and of the capabilities it
provides, with a `kind` and a `Settings` dataclass (the keys of `engine.settings:` in the
config, checked by cqd_mpi.schema), and name it in the config as
``engine: {kind: package.module:ClassName}``. tests/engines/plugin_engine.py is one.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from cqd_mpi.schema import NoSettings

if TYPE_CHECKING:
    import numpy as np
    import torch

NamedTensors = Iterable[tuple[str, "torch.Tensor"]]


class Capability(abc.ABC):
    """A family of calls that tasks make on a live model."""

    capability: ClassVar[str]


class TextGeneration(Capability):
    """Greedy text generation: completions of prompts, and replies to chat conversations.

    Both are batched; an item's output must not depend on which other items share its
    batch. Generation stops at the model's end-of-sequence token or `max_new_tokens`, and
    the text is cut before the earliest stop string (`cut_at_stop`), so every engine
    returns the same text for the same tokens.

    A prompt that leaves no room for one token within the model's context is not generated:
    its output is a `ContextOverflow` (empty text), which the task makes that item's result
    (AgentBench's AGENT_CONTEXT_LIMIT); the others of the batch are generated as usual, and a
    completion stops where the context ends.
    """

    capability = "text generation"

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy completions of `prompts` (the tokenizer adds its special tokens, e.g. BOS)."""

    @abc.abstractmethod
    def chat(self, conversations: Sequence[list[dict[str, str]]], *, max_new_tokens: int,
             stop: Sequence[str] = ()) -> list[str]:
        """Greedy replies to `conversations` rendered with the chat template; a conversation
        that ends with an assistant message is continued from that message's text."""


class LogLikelihoods(Capability):
    """Scoring: log-probabilities of continuations given contexts, token ids in, batched.

    What lm-evaluation-harness's `loglikelihood` requests need (tasks/lmeval/). Both sides
    are token ids of `tokenizer` (the engine's own, so the caller tokenizes exactly as the
    engine does); a pair longer than `max_length + 1` tokens loses tokens from the left, as
    lm-eval's HFLM does. A pair's result must not depend on which other pairs share its batch
    beyond the rounding of batched kernels.
    """

    capability = "log-likelihoods"
    tokenizer: Any
    """The Hugging Face tokenizer the engine encodes and decodes with."""

    @property
    @abc.abstractmethod
    def max_length(self) -> int:
        """The most tokens the model reads at once (its context length)."""

    @abc.abstractmethod
    def loglikelihoods(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids), both non-empty: the sum of the
        continuation tokens' log-probabilities given everything before them, and whether
        greedy decoding would have produced exactly those tokens."""

    @abc.abstractmethod
    def generate_ids(self, token_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                     stop: Sequence[str] = ()) -> list[str]:
        """Greedy completions of prompts given as token ids (used as they are: no special
        tokens added), cut before the earliest stop string as `TextGeneration` does."""


class ContextOverflow(str):
    """The output for a prompt longer than the model's context: empty text that says so."""

    def __new__(cls, *, prompt_tokens: int, context_length: int):
        text = super().__new__(cls, "")
        text.prompt_tokens, text.context_length = prompt_tokens, context_length
        return text

    @property
    def message(self) -> str:
        return (f"the prompt has {self.prompt_tokens} tokens, which leaves no room for a reply within the "
                f"model's context of {self.context_length}")


@dataclasses.dataclass(frozen=True)
class MaskPrompt:
    """What the model is told about the object in one image, in that image's pixel coordinates.

    `box` is (x0, y0, x1, y1); `points` are (x, y) with `labels` 1 (on the object) or 0 (off
    it); with neither, the mask decoder runs on the image alone.
    """

    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()

    def __post_init__(self):
        if len(self.points) != len(self.labels):
            raise ValueError(f"MaskPrompt: expected one label per point, got {len(self.points)} points "
                             f"and {len(self.labels)} labels")

    @property
    def kind(self) -> str:
        """'box', 'point', 'box+point' or 'none': prompts of one kind are batched together."""
        parts = [k for k, given in (("box", self.box is not None), ("point", bool(self.points))) if given]
        return "+".join(parts) or "none"


@dataclasses.dataclass(frozen=True)
class PredictedMask:
    """One image's predicted binary mask (bool, [height, width] of that image) and the model's
    own estimate of its IoU with the true mask."""

    mask: np.ndarray
    iou: float


class MaskPrediction(Capability):
    """Promptable binary segmentation: images and prompts in, one mask per image out.

    Batched; an image's mask must not depend on which other images share its batch beyond
    the rounding of batched kernels. Images are uint8 RGB arrays [height, width, 3] of any
    size, and every mask comes back at its image's size.
    """

    capability = "mask prediction"

    @abc.abstractmethod
    def predict_masks(self, images: Sequence[np.ndarray], prompts: Sequence[MaskPrompt]) -> list[PredictedMask]:
        """One PredictedMask per (image, prompt) pair, in order."""


class VisualQuestionAnswering(Capability):
    """Questions about images answered greedily: one image and one question in, one answer out.

    Batched; an item's answer must not depend on which other items share its batch beyond the
    rounding of batched kernels. Images are uint8 RGB arrays [height, width, 3] of any size;
    each question is the full user text (the task's prompt format applied), which the engine
    places after the image in its chat template. Answers are cut before the earliest stop
    string (`cut_at_stop`), as text generation's are.
    """

    capability = "visual question answering"

    @abc.abstractmethod
    def answer(self, images: Sequence[np.ndarray], questions: Sequence[str], *, max_new_tokens: int,
               stop: Sequence[str] = ()) -> list[str]:
        """One greedy answer per (image, question) pair, in order."""


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for marker in stop:
        if marker:
            index = text.find(marker)
            if 0 <= index < cut:
                cut = index
    return text[:cut]


class Engine(abc.ABC):
    """One live model on this process's device whose weights are replaced per child.

    Built as ``cls(model_dir, device=..., dtype=..., settings=cls.Settings(...))``:
    `model_dir` is the base model's Hugging Face directory, `device` and `dtype` come from
    the config's `engine.device` / `engine.dtype` ("auto" lets the engine choose).
    """

    kind: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings

    @abc.abstractmethod
    def required_names(self) -> list[str]:
        """Checkpoint tensor names that every update must include."""

    @abc.abstractmethod
    def load_weights(self, tensors: NamedTensors) -> int:
        """Copy each `(name, tensor)` into the live model, one tensor at a time; returns how many."""

    def receive_buffer(self, name: str) -> torch.Tensor | None:
        """A tensor the transport may write `name`'s bytes into in place, or None."""
        return None

    def finish_update(self) -> None:
        """Called once after every complete update, whichever way the tensors came."""

    def update(self, tensors: NamedTensors) -> int:
        """A complete update from a stream: `load_weights`, then `finish_update`."""
        count = self.load_weights(tensors)
        self.finish_update()
        return count

    def update_from_dir(self, path: str | os.PathLike) -> int:
        """A complete update from the Hugging Face dir `path`."""
        from cqd_mpi.merging.weights import ModelDir

        return self.update(ModelDir(path).tensors())

    def describe(self) -> str:
        """One line for logs and `doctor`."""
        return f"{type(self).__name__} ({self.kind or type(self).__module__})"

    def close(self) -> None:
        """Release the device and any engine processes."""


def capabilities(engine: type[Engine] | Engine) -> list[str]:
    """The capability names an engine class provides, in its method resolution order."""
    cls = engine if isinstance(engine, type) else type(engine)
    return [c.capability for c in cls.__mro__
            if isinstance(c, type) and issubclass(c, Capability) and c is not Capability and "capability" in vars(c)]

