"""cqd_mpi.merging.weights: reading validated safetensors model dirs, streaming HF dirs out."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cqd_mpi.errors import WeightsError
from cqd_mpi.merging.weights import (
    INDEX_FILE,
    MappedFile,
    ModelDir,
    SafetensorsFile,
    TensorReader,
    TensorStream,
    check_compatible,
    write_hf_dir,
    write_safetensors,
)
from tests.tiny_llama import logits, save_tiny_llama, state_dict


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = save_tiny_llama(root / "base", seed=0, dtype=torch.bfloat16, tokenizer=True)
    return {
        "base": base,
        "sharded": save_tiny_llama(
            root / "sharded", seed=1, dtype=torch.bfloat16, like=base, max_shard_size="20KB"
        ),
        "sharded3": save_tiny_llama(
            root / "sharded3", seed=2, dtype=torch.bfloat16, like=base, max_shard_size="12KB"
        ),
        "fp32": save_tiny_llama(root / "fp32", seed=3, dtype=torch.float32),
        "wider": save_tiny_llama(
            root / "wider", seed=4, dtype=torch.bfloat16, intermediate_size=64
        ),
    }


def copy_dir(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_single_file_dir_lists_tensors_in_file_order_with_specs(models):
    model = ModelDir(models["base"])
    reference = state_dict(models["base"])
    assert sorted(model.names) == sorted(reference)
    starts = [model.spec(name).start for name in model.names]
    assert starts == sorted(starts)
    for name, tensor in reference.items():
        spec = model.spec(name)
        assert spec.shape == tuple(tensor.shape) and spec.dtype == torch.bfloat16
        assert spec.file == models["base"] / "model.safetensors"
        assert spec.nbytes == tensor.numel() * 2
    assert model.config["hidden_size"] == 32
    assert model.nbytes == sum(t.numel() * 2 for t in reference.values())
    layout = model.layout()
    assert list(layout) == model.names
    assert layout == {name: (tuple(t.shape), torch.bfloat16) for name, t in reference.items()}


def test_sharded_dir_reads_every_tensor_exactly(models):
    model = ModelDir(models["sharded"])
    assert len(model.files) == 2
    reference = state_dict(models["sharded"])
    seen = dict(model.tensors())
    assert list(seen) == model.names
    assert set(seen) == set(reference)
    for name, tensor in seen.items():
        assert torch.equal(tensor, reference[name])
    subset = [model.names[3], model.names[0]]
    assert [name for name, _ in model.tensors(subset)] == [model.names[0], model.names[3]]


def test_tensors_are_zero_copy_views_of_the_file(models):
    shard = MappedFile(SafetensorsFile(models["base"] / "model.safetensors"))
    try:
        name = "model.embed_tokens.weight"
        tensor = shard.get(name)
        with open("/proc/self/maps") as maps:
            mapped = [
                line
                for line in maps
                if line.rstrip().endswith(str(models["base"] / "model.safetensors"))
            ]
        low, high = (int(x, 16) for x in mapped[0].split()[0].split("-"))
        assert low <= tensor.data_ptr() < high
    finally:
        shard.close()


def _rss_file_kb() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


def test_dropping_pages_lowers_resident_memory(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"big": torch.ones(16 * 2**20 // 4)}, str(path))
    shard = MappedFile(SafetensorsFile(path))
    try:
        tensor = shard.get("big")
        before = _rss_file_kb()
        assert float(tensor.sum()) == tensor.numel()
        touched = _rss_file_kb()
        assert touched - before > 12_000
        assert shard.drop(tensor)
        assert _rss_file_kb() - before < 1_000
        assert float(tensor.sum()) == tensor.numel()
        assert not shard.drop(torch.ones(10))
    finally:
        shard.close()


@pytest.fixture
def safe_open_calls(monkeypatch):
    """Records which files safetensors' safe_open opened and closed (the real function runs)."""
    import safetensors

    calls = {"opened": [], "closed": []}
    real = safetensors.safe_open

    class Recorder:
        def __init__(self, path, framework):
            self.path = path
            self.inner = real(path, framework=framework)

        def __enter__(self):
            calls["opened"].append(self.path)
            return self.inner.__enter__()

        def __exit__(self, *exc):
            calls["closed"].append(self.path)
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(safetensors, "safe_open", Recorder)
    return calls


def test_reader_follows_first_models_order_and_opens_each_shard_once(models, safe_open_calls):
    base, one, two = (
        ModelDir(models["base"]),
        ModelDir(models["sharded"]),
        ModelDir(models["sharded3"]),
    )
    assert len(two.files) > len(one.files) > len(base.files)
    assert one.names != base.names
    check_compatible(base, [one, two])
    reference = [state_dict(models[key]) for key in ("base", "sharded", "sharded3")]
    order = []
    for name, tensors in TensorReader(models=[base, one, two]):
        order.append(name)
        for tensor, ref in zip(tensors, reference):
            assert torch.equal(tensor, ref[name])
    assert order == base.names
    expected = sorted(str(f.path) for m in (base, one, two) for f in m.files)
    assert sorted(safe_open_calls["opened"]) == expected
    assert sorted(safe_open_calls["closed"]) == expected


def test_reader_closes_each_shard_after_its_last_tensor(models, safe_open_calls):
    model = ModelDir(models["sharded"])
    first, second = (str(f.path) for f in model.files)
    last_of_first = model.files[0].names[-1]
    for name, _ in model.tensors():
        if name == model.files[1].names[0]:
            assert safe_open_calls["closed"] == [first]
        if name == last_of_first:
            assert safe_open_calls["closed"] == []
    assert safe_open_calls["closed"] == [first, second]


def test_reader_closes_shards_when_abandoned(models, safe_open_calls):
    reader = ModelDir(models["sharded"]).tensors()
    next(reader)
    assert safe_open_calls["closed"] == []
    reader.close()
    assert safe_open_calls["closed"] == safe_open_calls["opened"] != []


def test_missing_directory_and_missing_weights(tmp_path):
    with pytest.raises(WeightsError, match=r"does not exist"):
        ModelDir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        WeightsError, match=r"has neither model.safetensors nor model.safetensors.index.json"
    ):
        ModelDir(tmp_path / "empty")


def test_pytorch_bin_only_checkpoint_is_refused(tmp_path):
    directory = tmp_path / "pickle"
    directory.mkdir()
    torch.save({"w": torch.zeros(2)}, directory / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"non-safetensors checkpoint \(pytorch_model.bin\)"):
        ModelDir(directory)


def test_truncated_shard_names_the_file(models, tmp_path):
    broken = copy_dir(models["sharded"], tmp_path / "m")
    shard = broken / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(
        WeightsError,
        match=r"model-00002-of-00002.safetensors is truncated: its header needs \d+ bytes, the file has \d+",
    ):
        ModelDir(broken)
    shard.write_bytes(data[:5])
    with pytest.raises(WeightsError, match=r"model-00002-of-00002.safetensors is truncated"):
        ModelDir(broken)


def test_corrupt_header_names_the_file(tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    header = b"{not json"
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(WeightsError, match=r"model.safetensors has a corrupt safetensors header"):
        ModelDir(directory)
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(WeightsError, match=r"its header claims 1000000 bytes"):
        ModelDir(directory)
    bad = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(bad)) + bad + bytes(8))
    with pytest.raises(
        WeightsError,
        match=r"tensor 'w' in .*: shape \[2, 2\] F32 needs 16 bytes, but data_offsets \[0, 8\] span 8",
    ):
        ModelDir(directory)


def test_missing_shard_named(models, tmp_path):
    broken = copy_dir(models["sharded"], tmp_path / "m")
    (broken / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(
        WeightsError,
        match=r"shard .*model-00001-of-00002.safetensors listed in index .* is missing",
    ):
        ModelDir(broken)


def _rewrite_index(directory: Path, change) -> None:
    index = json.loads((directory / INDEX_FILE).read_text())
    change(index)
    (directory / INDEX_FILE).write_text(json.dumps(index))


def test_bad_index_entries(models, tmp_path):
    broken = copy_dir(models["sharded"], tmp_path / "m")
    (broken / INDEX_FILE).write_text("{ nope")
    with pytest.raises(
        WeightsError, match=r"index .*model.safetensors.index.json cannot be parsed"
    ):
        ModelDir(broken)
    (broken / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(WeightsError, match=r"expected a non-empty 'weight_map'"):
        ModelDir(broken)
    (broken / INDEX_FILE).write_text((models["sharded"] / INDEX_FILE).read_text())
    _rewrite_index(
        broken,
        lambda index: index["weight_map"].update({"model.norm.weight": "../elsewhere.safetensors"}),
    )
    with pytest.raises(
        WeightsError, match=r"tensor 'model.norm.weight' maps to '../elsewhere.safetensors'"
    ):
        ModelDir(broken)


def test_index_and_files_disagree(models, tmp_path):
    broken = copy_dir(models["sharded"], tmp_path / "m")
    _rewrite_index(
        broken,
        lambda index: index["weight_map"].update(
            {"model.extra.weight": "model-00001-of-00002.safetensors"}
        ),
    )
    with pytest.raises(
        WeightsError,
        match=r"tensor 'model.extra.weight' is listed in index .* for .*model-00001-of-00002.safetensors, but that file does not contain it",
    ):
        ModelDir(broken)
    _rewrite_index(broken, lambda index: index["weight_map"].pop("model.extra.weight"))
    _rewrite_index(broken, lambda index: index["weight_map"].pop("lm_head.weight"))
    with pytest.raises(
        WeightsError,
        match=r"tensor 'lm_head.weight' is stored in .*, but index .* does not list it",
    ):
        ModelDir(broken)


def test_compatibility_errors_name_tensor_and_both_files(models, tmp_path):
    base = ModelDir(models["base"])
    with pytest.raises(
        WeightsError,
        match=r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \[32, 48\] BF16 in .*base/model.safetensors but shape \[32, 64\] BF16 in .*wider/model.safetensors",
    ):
        check_compatible(base, [ModelDir(models["wider"])])
    with pytest.raises(
        WeightsError,
        match=r"tensor '[\w.]+' has dtype BF16 in .*base/model.safetensors but dtype F32 in .*fp32/model.safetensors "
              r"\(same shape \[\d+(, \d+)?\]\); \d+ more tensors differ in dtype; every model must have the base's dtypes",
    ):
        check_compatible(base, [ModelDir(models["fp32"])])
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    tensors = state_dict(models["base"])
    tensors.pop("model.norm.weight")
    save_file(tensors, str(fewer / "model.safetensors"))
    with pytest.raises(
        WeightsError,
        match=r"tensor 'model.norm.weight' of .*base/model.safetensors is missing from .*fewer",
    ):
        check_compatible(base, [ModelDir(fewer)])
    with pytest.raises(
        WeightsError,
        match=r"tensor 'model.norm.weight' of .*base/model.safetensors is not in the base model .*fewer",
    ):
        check_compatible(ModelDir(fewer), [base])


def test_write_single_file_round_trip_copies_config_and_tokenizer(models, tmp_path):
    base = ModelDir(models["base"])
    out = write_hf_dir(base.tensors(), tmp_path / "out", like=base)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "model.safetensors",
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    assert (out / "model.safetensors").read_bytes() != b""
    written, reference = state_dict(out), state_dict(models["base"])
    assert written.keys() == reference.keys()
    assert all(torch.equal(written[n], reference[n]) for n in reference)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (models["base"] / name).read_bytes()
    assert torch.equal(logits(out), logits(models["base"]))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("abc")["input_ids"] == [3, 4, 5]
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]


def test_written_models_keep_every_non_weight_file_of_the_base(models, tmp_path):
    """A processor config (SAM), a chat template, a README travel with every child; weights of
    other formats, hidden files and sub-directories do not."""
    import shutil

    source = tmp_path / "base"
    shutil.copytree(models["base"], source)
    extras = {"preprocessor_config.json": '{"do_resize": true}', "chat_template.jinja": "{{ messages }}",
              "README.md": "# base\n", "special_tokens_map.json": "{}"}
    for name, text in extras.items():
        (source / name).write_text(text)
    for name in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", ".hidden", "model.safetensors.index.json.bak"):
        (source / name).write_bytes(b"x")
    (source / "original").mkdir()
    (source / "original" / "consolidated.00.pth").write_bytes(b"x")
    base = ModelDir(source)
    out = write_hf_dir(base.tensors(), tmp_path / "out", like=base)
    for name, text in extras.items():
        assert (out / name).read_text() == text, name
    assert not (out / "pytorch_model.bin").exists() and not (out / "tf_model.h5").exists()
    assert not (out / "flax_model.msgpack").exists() and not (out / ".hidden").exists()
    assert not (out / "original").exists()
    assert (out / "model.safetensors.index.json.bak").exists()


def test_write_sharded_like_transformers(models, tmp_path):
    base = ModelDir(models["base"])
    out = write_hf_dir(base.tensors(), tmp_path / "out", like=base, max_shard_size="10KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    assert [p.name for p in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    assert all(p.stat().st_size <= 10_000 + 4096 for p in shards)
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == base.nbytes
    assert set(index["weight_map"]) == set(base.names)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert torch.equal(logits(out), logits(models["base"]))
    reread = ModelDir(out)
    assert all(torch.equal(t, state_dict(models["base"])[n]) for n, t in reread.tensors())


def _failing_stream(base: ModelDir, after: int):
    for i, (name, tensor) in enumerate(base.tensors()):
        if i == after:
            raise RuntimeError("stream broke")
        yield name, tensor


def test_write_is_atomic_and_replaces_only_on_success(models, tmp_path):
    base = ModelDir(models["base"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("old")
    with pytest.raises(RuntimeError, match=r"stream broke"):
        write_hf_dir(_failing_stream(base, 5), out, like=base)
    assert (out / "marker").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    write_hf_dir(base.tensors(), out, like=base)
    assert not (out / "marker").exists()
    assert (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_rejects_incomplete_or_wrong_streams(models, tmp_path):
    base = ModelDir(models["base"])
    tensors = dict(base.tensors())
    missing = {n: t for n, t in tensors.items() if n != "model.norm.weight"}
    with pytest.raises(
        WeightsError, match=r"the stream ended without writing all of tensor 'model.norm.weight'"
    ):
        write_hf_dir(missing.items(), tmp_path / "a", like=base)
    with pytest.raises(
        WeightsError, match=r"produced tensor 'bogus', which the output layout does not have"
    ):
        write_hf_dir([("bogus", torch.zeros(2))], tmp_path / "b", like=base)
    with pytest.raises(
        WeightsError,
        match=r"tensor 'model.norm.weight': expected shape \[32\], the stream produced \[31\]",
    ):
        write_hf_dir(
            [("model.norm.weight", torch.zeros(31, dtype=torch.bfloat16))],
            tmp_path / "c",
            like=base,
        )
    with pytest.raises(
        WeightsError,
        match=r"tensor 'model.norm.weight': expected dtype BF16, the stream produced torch.float32",
    ):
        write_hf_dir([("model.norm.weight", torch.zeros(32))], tmp_path / "d", like=base)
    twice = [("model.norm.weight", tensors["model.norm.weight"])] * 2
    with pytest.raises(WeightsError, match=r"more data for tensor 'model.norm.weight'"):
        write_hf_dir(twice, tmp_path / "e", like=base)
    assert not list(tmp_path.iterdir())
    (tmp_path / "file").write_text("x")
    with pytest.raises(WeightsError, match=r"exists and is not a directory"):
        write_hf_dir(base.tensors(), tmp_path / "file", like=base)


def _chunked_stream(base: ModelDir, chunk: int, stable: int) -> TensorStream:
    layout = {n: (base.spec(n).shape, base.spec(n).dtype) for n in base.names}

    def chunks():
        ring = [torch.empty(chunk, dtype=torch.bfloat16) for _ in range(stable + 1)]
        turn = 0
        for name, tensor in base.tensors():
            flat = tensor.reshape(-1)
            for start in range(0, flat.numel(), chunk):
                piece = flat[start : start + chunk]
                turn = (turn + 1) % len(ring)
                out = ring[turn][: piece.numel()]
                out.copy_(piece)
                yield name, start, out

    return TensorStream(layout=layout, chunks=chunks(), stable_chunks=stable)


@pytest.mark.parametrize("stable", [1, 3])
def test_chunked_streams_write_and_iterate_the_same_tensors(models, tmp_path, stable):
    base = ModelDir(models["base"])
    reference = state_dict(models["base"])
    out = write_hf_dir(_chunked_stream(base, 100, stable), tmp_path / "out", like=base)
    assert (out / "model.safetensors").read_bytes() == (
        write_hf_dir(base.tensors(), tmp_path / "plain", like=base) / "model.safetensors"
    ).read_bytes()
    collected = dict(_chunked_stream(base, 100, stable))
    assert list(collected) == base.names
    assert all(torch.equal(collected[n], reference[n]) for n in reference)
    stream = _chunked_stream(base, 100, stable)
    list(stream)
    with pytest.raises(RuntimeError, match=r"consumed once"):
        list(stream)


def test_write_safetensors_file_with_metadata(tmp_path):
    layout = {"a": ((2, 3), torch.float32), "b": ((5,), torch.bfloat16)}
    values = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.arange(5.0).bfloat16()}
    chunks = ((n, 0, values[n]) for n in layout)
    path = write_safetensors(
        TensorStream(layout=layout, chunks=chunks), tmp_path / "x.safetensors", metadata={"k": "v"}
    )
    parsed = SafetensorsFile(path)
    assert parsed.metadata == {"format": "pt", "k": "v"}
    from safetensors.torch import load_file

    loaded = load_file(path)
    assert all(torch.equal(loaded[n], values[n]) for n in values)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_output_dir_is_readable_by_safetensors_and_keeps_permissions(models, tmp_path):
    from safetensors import safe_open

    base = ModelDir(models["base"])
    out = write_hf_dir(base.tensors(), tmp_path / "out", like=base, max_shard_size="20KB")
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert all(handle.get_tensor(k).dtype == torch.bfloat16 for k in handle.keys())  # noqa: SIM118 (safe_open is not iterable)
        assert os.stat(shard).st_mode & 0o777 == 0o644
    assert os.stat(out).st_mode & 0o777 == 0o755


def test_a_file_given_as_a_model_dir_is_named_as_a_file(models, tmp_path):
    with pytest.raises(WeightsError, match=r"base/model.safetensors is a file, not a model directory"):
        ModelDir(models["base"] / "model.safetensors")
    with pytest.raises(WeightsError, match=r"model directory .*/absent does not exist"):
        ModelDir(tmp_path / "absent")
