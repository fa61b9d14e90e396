"""TransformersEngine: in-place weight swaps, batch-invariant greedy generation, stop strings, chat templates."""

import types

import pytest
import torch
from safetensors import safe_open

from cqd_mpi.engines.base import cut_at_stop
from cqd_mpi.engines.devices import local_rank, resolve_device, resolve_dtype
from cqd_mpi.engines.hf import TransformersEngine, TransformersSettings
from cqd_mpi.engines.templates import CHAT_TEMPLATES, INSTRUCTION_RESPONSE
from cqd_mpi.errors import ConfigError, WeightsError

PROMPTS = [
    "def add(a, b):",
    "Write a python function to find the minimum of a list of numbers.\n",
    "x",
    "assert similar_elements((3, 4, 5, 6), (5, 7, 4, 10)) == (4, 5)\nfor i in range(",
    "import math\n",
    "class Solution:\n    def reverse_words(self, s):\n",
    "while True:",
]


def checkpoint_stream(model_dir):
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            yield name, handle.get_tensor(name)


def live_storage(model):
    return {name: param.data_ptr() for name, param in model.model.named_parameters()}


@pytest.fixture
def live_b(tiny_dirs):
    return TransformersEngine(tiny_dirs["b"], device="cpu")


def test_batched_generation_equals_unbatched(live_a):
    before = live_a.tokens_generated
    one_by_one = [live_a.generate([p], max_new_tokens=24)[0] for p in PROMPTS]
    unbatched_tokens = live_a.tokens_generated - before
    assert 0 < unbatched_tokens <= 24 * len(PROMPTS)
    for batch_size in (2, 3, 16):
        before = live_a.tokens_generated
        assert live_a.generate(PROMPTS, max_new_tokens=24, batch_size=batch_size) == one_by_one
        assert live_a.tokens_generated - before == unbatched_tokens
    reordered = PROMPTS[::-1]
    assert live_a.generate(reordered, max_new_tokens=24, batch_size=4) == one_by_one[::-1]
    assert len(set(one_by_one)) == len(PROMPTS)
    assert all(one_by_one)


def test_in_place_weights_generate_like_a_fresh_load(tiny_dirs, live_b):
    fresh_b = live_b.generate(PROMPTS, max_new_tokens=16)
    live = TransformersEngine(tiny_dirs["a"], device="cpu")
    before_a = live.generate(PROMPTS, max_new_tokens=16)
    assert before_a != fresh_b
    module, storage = live.model, live_storage(live)

    copied = live.load_weights(checkpoint_stream(tiny_dirs["b"]))

    assert copied == len(live.required_names())
    assert live.model is module
    assert live_storage(live) == storage
    assert live.generate(PROMPTS, max_new_tokens=16) == fresh_b
    live.load_weights(checkpoint_stream(tiny_dirs["a"]))
    assert live.generate(PROMPTS, max_new_tokens=16) == before_a


def test_load_dir_reads_an_hf_dir(tiny_dirs, live_b):
    live = TransformersEngine(tiny_dirs["a"], device="cpu")
    live.update_from_dir(tiny_dirs["b"])
    for (name, got), (_, want) in zip(live.model.state_dict().items(), live_b.model.state_dict().items()):
        assert torch.equal(got, want), name


def test_names_with_or_without_the_base_prefix(tiny_dirs, live_b):
    live = TransformersEngine(tiny_dirs["a"], device="cpu")
    renamed = ((name.removeprefix("model."), tensor) for name, tensor in checkpoint_stream(tiny_dirs["b"]))
    live.load_weights(renamed)
    assert live.generate(PROMPTS[:2], max_new_tokens=8) == live_b.generate(PROMPTS[:2], max_new_tokens=8)


def test_weights_cast_to_the_live_dtype(tiny_dirs, live_b):
    live = TransformersEngine(tiny_dirs["a"], device="cpu")
    halves = ((name, tensor.to(torch.bfloat16)) for name, tensor in checkpoint_stream(tiny_dirs["b"]))
    live.load_weights(halves)
    embed = live.model.get_input_embeddings().weight
    assert embed.dtype == torch.float32
    want = live_b.model.get_input_embeddings().weight.to(torch.bfloat16).float()
    assert torch.equal(embed, want)


def test_unknown_tensor_name_is_a_clear_error(live_a):
    with pytest.raises(WeightsError, match=r"'model.layers.0.mlp.gate.weight' does not exist.*closest"):
        live_a.load_weights([("model.layers.0.mlp.gate.weight", torch.zeros(2, 2))], strict=False)


def test_shape_mismatch_names_tensor_and_shapes(live_a):
    with pytest.raises(WeightsError, match=r"'model.norm.weight': expected shape \(64,\).*got \(65,\)"):
        live_a.load_weights([("model.norm.weight", torch.ones(65))], strict=False)


def test_incomplete_stream_is_refused_when_strict(tiny_dirs):
    live = TransformersEngine(tiny_dirs["a"], device="cpu")
    partial = [(n, t) for n, t in checkpoint_stream(tiny_dirs["b"]) if "layers.1." not in n]
    with pytest.raises(WeightsError, match=r"left 9 tensor\(s\) of the live model unset: model.layers.1"):
        live.load_weights(partial)
    assert live.load_weights(partial, strict=False) == len(partial)


def test_tied_embeddings_take_one_tensor_and_refuse_two_different(tiny_dirs, tmp_path):
    live = TransformersEngine(tiny_dirs["tied"], device="cpu")
    head = live.model.get_output_embeddings().weight
    embed = live.model.get_input_embeddings().weight
    assert head.data_ptr() == embed.data_ptr()
    stream = dict(checkpoint_stream(tiny_dirs["tied"]))
    assert "lm_head.weight" not in stream
    new_embed = torch.randn(embed.shape, generator=torch.Generator().manual_seed(7))
    stream["model.embed_tokens.weight"] = new_embed
    live.load_weights(stream.items())
    assert torch.equal(head, new_embed)

    stream["lm_head.weight"] = new_embed.clone()
    live.load_weights(stream.items())
    stream["lm_head.weight"] = new_embed + 1
    with pytest.raises(WeightsError, match=r"'lm_head.weight' is tied to 'model.embed_tokens.weight'"):
        live.load_weights(stream.items())


def test_stop_strings_cut_the_completion(live_a):
    full = live_a.generate(PROMPTS, max_new_tokens=24)
    stops = [text[5:7] for text in full]
    for prompt, text, stop in zip(PROMPTS, full, stops):
        got = live_a.generate([prompt], max_new_tokens=24, stop=[stop, "never-generated"])[0]
        assert got == cut_at_stop(text, [stop])
        assert len(got) <= 5
    batched = live_a.generate(PROMPTS, max_new_tokens=24, stop=stops[:1])
    assert batched == [cut_at_stop(text, stops[:1]) for text in full]


def test_generation_ends_at_eos(tiny_dirs):
    live = TransformersEngine(tiny_dirs["a"], device="cpu")
    full = live.generate(PROMPTS, max_new_tokens=24)
    eos = live.tokenizer.eos_token_id
    first_token = live.tokenizer(full[0], add_special_tokens=False)["input_ids"][2]
    head = dict(checkpoint_stream(tiny_dirs["a"]))["lm_head.weight"].clone()
    head[eos] = head[first_token] * 50
    live.load_weights([("lm_head.weight", head)], strict=False)
    ended = live.generate(PROMPTS, max_new_tokens=24)
    assert len(ended[0]) < len(full[0])
    assert full[0].startswith(ended[0])
    assert all("</s>" not in text for text in ended)


def test_instruction_response_template_and_prefill(tiny_dirs):
    live = TransformersEngine(tiny_dirs["a"], device="cpu", settings=TransformersSettings(chat_template=INSTRUCTION_RESPONSE))
    conversation = [
        {"role": "system", "content": "You are a coder. "},
        {"role": "user", "content": "Add two numbers."},
    ]
    assert live.render_chat(conversation) == (
        "You are a coder.\n\n@@ Instruction:\nAdd two numbers.\n\n@@ Response:\n"
    )
    prefilled = [*conversation, {"role": "assistant", "content": "Here:\n```python\n"}]
    prompt = live.render_chat(prefilled)
    assert prompt.endswith("@@ Response:\nHere:\n```python\n")
    replies = live.chat([conversation, prefilled], max_new_tokens=12)
    assert replies == live.generate([live.render_chat(c) for c in (conversation, prefilled)], max_new_tokens=12)


def test_bos_is_added_once_whether_or_not_the_template_writes_it(live_a):
    bos = live_a.tokenizer.bos_token_id
    assert live_a.tokenizer("def f():")["input_ids"][0] == bos
    assert live_a.prompts.encode_rendered("def f():").count(bos) == 1
    assert live_a.prompts.encode_rendered("<s>def f():").count(bos) == 1


def test_chat_template_from_tokenizer_or_jinja_string(tmp_path):
    from cqd_mpi.engines.tiny import build_tiny_llama

    jinja = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"
    model_dir = build_tiny_llama(tmp_path / "m", seed=4, chat_template=jinja)
    own = TransformersEngine(model_dir, device="cpu")
    assert own.render_chat([{"role": "user", "content": "hi"}]) == "<user>hi<bot>"
    given = TransformersEngine(model_dir, device="cpu", settings=TransformersSettings(chat_template=CHAT_TEMPLATES[INSTRUCTION_RESPONSE]))
    assert given.render_chat([{"role": "user", "content": "hi"}]) == "@@ Instruction:\nhi\n\n@@ Response:\n"


def test_chat_without_any_template_says_how_to_give_one(live_a):
    with pytest.raises(ConfigError, match=r"has no chat template.*instruction-response"):
        live_a.chat([[{"role": "user", "content": "hi"}]], max_new_tokens=4)


def test_bad_settings_are_config_errors(tiny_dirs, tmp_path):
    with pytest.raises(ConfigError, match=r"chat_template: expected one of 'instruction-response'"):
        TransformersEngine(tiny_dirs["a"], device="cpu", settings=TransformersSettings(chat_template="alpaca"))
    with pytest.raises(ConfigError, match="dtype: expected 'auto' or one of"):
        resolve_dtype("float64", checkpoint_dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(WeightsError, match=r"expected config\.json"):
        TransformersEngine(tmp_path, device="cpu")


def test_device_and_dtype_resolution(monkeypatch):
    for variable in ("LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                     "MV2_COMM_WORLD_LOCAL_RANK", "PMI_LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    assert local_rank() == 0
    monkeypatch.setenv("MPI_LOCALRANKID", "3")
    assert local_rank() == 3
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert local_rank() == 5
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_dtype("auto", checkpoint_dtype=torch.bfloat16, device=cpu) == torch.float32
    assert resolve_dtype("auto", checkpoint_dtype=torch.bfloat16, device=cuda) == torch.bfloat16
    assert resolve_dtype("bf16", checkpoint_dtype=torch.float32, device=cpu) == torch.bfloat16


def test_half_precision_checkpoint_runs_in_float32_on_cpu(tmp_path):
    from cqd_mpi.engines.tiny import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "half", seed=5, dtype=torch.bfloat16)
    live = TransformersEngine(model_dir, device="cpu")
    assert live.dtype == torch.float32
    assert next(live.model.parameters()).dtype == torch.float32
    explicit = TransformersEngine(model_dir, device="cpu", dtype="bfloat16")
    assert next(explicit.model.parameters()).dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for _, t in checkpoint_stream(model_dir))


@pytest.mark.cuda
def test_cuda_forward_and_greedy_generation_match_the_cpu(tiny_dirs, live_a):
    on_gpu = TransformersEngine(tiny_dirs["a"], device="cuda", dtype="float32")
    assert on_gpu.device == torch.device("cuda", 0)
    assert {p.device for p in on_gpu.model.parameters()} == {torch.device("cuda", 0)}
    batch = live_a.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        cpu_logits = live_a.model(**batch).logits
        gpu_logits = on_gpu.model(**{k: v.cuda() for k, v in batch.items()}).logits.cpu()
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-4, atol=1e-4)
    expected = live_a.generate(PROMPTS, max_new_tokens=24)
    assert on_gpu.generate(PROMPTS, max_new_tokens=24, batch_size=3) == expected
    assert on_gpu.generate(PROMPTS, max_new_tokens=24, batch_size=16) == expected


@pytest.mark.cuda
def test_cuda_bf16_checkpoint_runs_in_bf16_and_casts_streamed_weights_on_arrival(tiny_dirs, tmp_path):
    from cqd_mpi.engines.tiny import build_tiny_llama
    from cqd_mpi.merging.weights import ModelDir

    bf16_dir = build_tiny_llama(tmp_path / "bf16", seed=1, dtype=torch.bfloat16)
    live = TransformersEngine(bf16_dir, device="cuda")
    assert live.dtype == torch.bfloat16
    before = {name: p.data_ptr() for name, p in live.model.named_parameters()}
    assert live.update_from_dir(tiny_dirs["b"]) > 0
    assert {name: p.data_ptr() for name, p in live.model.named_parameters()} == before
    for name, tensor in ModelDir(tiny_dirs["b"]).tensors():
        got = live.receive_buffer(name)
        assert got.device.type == "cuda" and got.dtype == torch.bfloat16
        assert torch.equal(got.cpu(), tensor.to(torch.bfloat16)), name
    fresh = TransformersEngine(tiny_dirs["b"], device="cuda", dtype="bfloat16")
    assert live.generate(PROMPTS, max_new_tokens=16) == fresh.generate(PROMPTS, max_new_tokens=16)


@pytest.mark.cuda
def test_cuda_device_names_resolve_to_the_local_ranks_gpu(monkeypatch):
    count = torch.cuda.device_count()
    monkeypatch.setenv("LOCAL_RANK", str(count + 1))
    expected = torch.device("cuda", (count + 1) % count)
    assert resolve_device("auto") == expected
    assert resolve_device("cuda") == expected
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=rf"'cuda:{count}' was asked for, but this process sees {count} GPU"):
        resolve_device(f"cuda:{count}")


def test_a_prompt_past_the_context_is_that_items_result_and_the_others_are_generated(live_a, monkeypatch):
    """The contract's context rule (engines/base.py TextGeneration): a prompt with no room left is a
    ContextOverflow, its batch-mates are generated as alone, and a completion stops where the context ends."""
    from cqd_mpi.engines.base import ContextOverflow

    short, near = PROMPTS[0], PROMPTS[3]
    free = live_a.generate([short, near], max_new_tokens=24)
    context = len(live_a.prompts.encode(near)) + 3
    long = "x = 1\n" * context
    monkeypatch.setattr(live_a.model.config, "max_position_embeddings", context)
    assert live_a.context_length == context
    got = live_a.generate([short, long, near], max_new_tokens=24, batch_size=3)
    assert got[0] == free[0]
    assert isinstance(got[1], ContextOverflow) and got[1] == "" and got[1].context_length == context
    assert got[1].message == (f"the prompt has {len(live_a.prompts.encode(long))} tokens, which leaves no room "
                              f"for a reply within the model's context of {context}")
    assert free[1].startswith(got[2]) and len(got[2]) < len(free[1])
    assert isinstance(live_a.generate([long * 2], max_new_tokens=4)[0], ContextOverflow)
    assert live_a.max_length == context, "scoring reads the same context length"


def test_a_model_that_names_no_context_length(live_a, monkeypatch):
    """Neither config nor tokenizer names one: generation is unbounded, scoring uses HFLM's default."""
    from cqd_mpi.engines.hf import HFLM_DEFAULT_MAX_LENGTH, TOKENIZER_UNSET

    monkeypatch.setattr(live_a.model, "config", types.SimpleNamespace())  # a config with no context length
    monkeypatch.setattr(live_a.tokenizer, "model_max_length", 300)
    assert (live_a.context_length, live_a.max_length) == (300, 300)
    monkeypatch.setattr(live_a.tokenizer, "model_max_length", TOKENIZER_UNSET)
    assert (live_a.context_length, live_a.max_length) == (None, HFLM_DEFAULT_MAX_LENGTH)
