"""`python -m cqd_mpi merge`: one-off crossovers and aggregations written as HF dirs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from cqd_mpi import seeding
from cqd_mpi.cli import main
from cqd_mpi.merging.mutation import MutationSpec
from cqd_mpi.merging.operators import (
    aggregate_stream,
    crossover_stream,
)
from cqd_mpi.merging.weights import ModelDir, write_hf_dir
from cqd_mpi.qd.sampling import sample_crossover_weights, softmax
from tests.runtime.helpers import run_cli
from tests.tiny_llama import logits, save_tiny_llama, state_dict


def merge(capsys, *args) -> tuple[int, str, str]:
    code = main(["merge", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def printed_weights(out: str) -> tuple[float, float]:
    match = re.search(r"w1 (\S+) w2 (\S+)", out)
    return float(match.group(1)), float(match.group(2))


def files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("sketch_dtype", ["float32", "bfloat16"])
def test_crossover_writes_the_seeded_child(bf16, tmp_path, capsys, sketch_dtype):
    out = tmp_path / "child"
    code, stdout, _ = merge(
        capsys,
        "--base",
        bf16["base"],
        "--parents",
        bf16["p1"],
        bf16["p2"],
        "--seed",
        3,
        "--rank",
        3,
        "--exclude",
        "lm_head",
        "--sketch-dtype",
        sketch_dtype,
        "--out",
        out,
    )
    assert code == 0
    assert f"wrote {out}" in stdout
    w1, w2 = sample_crossover_weights(seeding.numpy_rng(3, 0, "crossover"), 1.0, 0.03)
    assert printed_weights(stdout) == pytest.approx((w1, w2), abs=1e-6)
    base = ModelDir(bf16["base"])
    expected = write_hf_dir(
        crossover_stream(
            base=base,
            parent1=ModelDir(bf16["p1"]),
            parent2=ModelDir(bf16["p2"]),
            w1=w1,
            w2=w2,
            mutation=MutationSpec(
                kind="svd", rank=3, exclude=("lm_head",), sketch_dtype=sketch_dtype
            ),
            seed=seeding.derive_seed(3, 0, "mutation"),
        ),
        tmp_path / "expected",
        like=base,
    )
    assert files(out) == files(expected)
    assert sorted(files(out)) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_same_command_gives_identical_files_and_another_seed_differs(bf16, tmp_path, capsys):
    def run(seed, name):
        merge(
            capsys,
            "--base",
            bf16["base"],
            "--parents",
            bf16["p1"],
            bf16["p2"],
            "--seed",
            seed,
            "--mutation",
            "gaussian",
            "--out",
            tmp_path / name,
        )
        return files(tmp_path / name)

    assert run(1, "a") == run(1, "b")
    assert run(1, "a")["model.safetensors"] != run(2, "c")["model.safetensors"]


def test_explicit_weights_and_no_mutation(bf16, tmp_path, capsys):
    out = tmp_path / "child"
    code, stdout, _ = merge(
        capsys,
        "--base",
        bf16["base"],
        "--parents",
        bf16["p1"],
        bf16["p2"],
        "--seed",
        0,
        "--w1",
        0.5,
        "--w2",
        1.5,
        "--mutation",
        "none",
        "--out",
        out,
    )
    assert code == 0 and printed_weights(stdout) == (0.5, 1.5)
    theta = {k: state_dict(bf16[k]) for k in ("p1", "p2")}
    for name, tensor in state_dict(out).items():
        expected = (0.25 * theta["p1"][name].float() + 0.75 * theta["p2"][name].float()).bfloat16()
        torch.testing.assert_close(tensor.float(), expected.float(), rtol=2.0**-7, atol=1e-7)


def test_expert_basis_is_built_in_the_cache_dir(bf16, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, stdout, _ = merge(
        capsys,
        "--base",
        bf16["base"],
        "--parents",
        bf16["p1"],
        bf16["p2"],
        "--seed",
        2,
        "--basis",
        "expert",
        "--expert",
        bf16["p3"],
        "--rank",
        4,
        "--cache-dir",
        cache,
        "--out",
        tmp_path / "child",
    )
    assert code == 0
    (basis,) = cache.iterdir()
    assert f"expert basis {basis}" in stdout and basis.suffix == ".safetensors"
    assert not torch.equal(
        state_dict(tmp_path / "child")["model.layers.0.mlp.up_proj.weight"],
        state_dict(bf16["p1"])["model.layers.0.mlp.up_proj.weight"],
    )


def test_aggregation_with_scores_and_with_explicit_weights(bf16, tmp_path, capsys):
    members = [bf16[k] for k in ("p1", "p2", "p3")]
    code, stdout, _ = merge(
        capsys,
        "--base",
        bf16["base"],
        "--aggregate",
        *members,
        "--scores",
        0.2,
        0.5,
        0.4,
        "--temperature",
        0.1,
        "--out",
        tmp_path / "agg",
    )
    assert code == 0
    betas = softmax([0.2, 0.5, 0.4], temperature=0.1)
    assert stdout.startswith("betas " + " ".join(f"{b:.6g}" for b in betas))
    base = ModelDir(bf16["base"])
    expected = write_hf_dir(
        aggregate_stream(base=base, members=[ModelDir(m) for m in members], betas=betas),
        tmp_path / "expected",
        like=base,
    )
    assert files(tmp_path / "agg") == files(expected)

    code, stdout, _ = merge(
        capsys,
        "--base",
        bf16["base"],
        "--aggregate",
        *members[:2],
        "--weights",
        0.3,
        0.7,
        "--out",
        tmp_path / "weighted",
    )
    assert code == 0 and stdout.startswith("betas 0.3 0.7")
    code, stdout, _ = merge(
        capsys, "--base", bf16["base"], "--aggregate", *members[:2], "--out", tmp_path / "mean"
    )
    assert code == 0 and stdout.startswith("betas 0.5 0.5")
    mean = state_dict(tmp_path / "mean")
    name = "model.layers.1.mlp.gate_proj.weight"
    expected_mean = (
        state_dict(members[0])[name].float() + state_dict(members[1])[name].float()
    ) / 2
    torch.testing.assert_close(mean[name].float(), expected_mean, rtol=2.0**-7, atol=1e-7)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--parents needs --seed"),
        (["--seed", "1", "--w1", "1.0"], "give both --w1 and --w2, or neither"),
        (["--seed", "1", "--w1", "1.0", "--w2", "-1.0"], "--w1 + --w2 must not be ~0"),
        (["--seed", "1", "--basis", "expert"], "--basis expert needs --expert"),
        (
            ["--seed", "1", "--mutation", "none", "--expert", "x"],
            "--expert is used only with --mutation svd --basis expert",
        ),
        (["--seed", "1", "--scores", "1", "2"], "--scores and --weights apply to --aggregate"),
        (["--seed", "1", "--w-max", "-1"], "mutation.w_max: expected a number >= 0, got -1.0"),
        (["--seed", "1", "--exclude", "("], "mutation.exclude[0]: invalid regular expression '('"),
        (
            ["--seed", "1", "--max-shard-size", "huge"],
            "max_shard_size: expected a size such as '5GB' or '512MiB', got 'huge'",
        ),
    ],
)
def test_crossover_user_errors(bf16, tmp_path, capsys, extra, message):
    code, _, stderr = merge(
        capsys,
        "--base",
        bf16["base"],
        "--parents",
        bf16["p1"],
        bf16["p2"],
        *extra,
        "--out",
        tmp_path / "child",
    )
    assert code == 2
    assert message in stderr
    assert not (tmp_path / "child").exists()


def test_aggregation_user_errors(bf16, tmp_path, capsys):
    code, _, stderr = merge(
        capsys,
        "--base",
        bf16["base"],
        "--aggregate",
        bf16["p1"],
        bf16["p2"],
        "--scores",
        0.1,
        "--out",
        tmp_path / "agg",
    )
    assert code == 2 and "--scores: expected one value per --aggregate model (2), got 1" in stderr
    code, _, stderr = merge(
        capsys,
        "--base",
        bf16["base"],
        "--aggregate",
        bf16["p1"],
        "--seed",
        1,
        "--out",
        tmp_path / "agg",
    )
    assert code == 2 and "--seed, --w1 and --w2 apply to --parents" in stderr
    with pytest.raises(SystemExit):
        main(
            [
                "merge",
                "--base",
                str(bf16["base"]),
                "--parents",
                str(bf16["p1"]),
                "--out",
                str(tmp_path / "x"),
            ]
        )


def test_incompatible_or_missing_models_are_named(bf16, tmp_path, capsys):
    wider = save_tiny_llama(tmp_path / "wider", seed=1, dtype=torch.bfloat16, intermediate_size=64)
    code, _, stderr = merge(
        capsys,
        "--base",
        bf16["base"],
        "--parents",
        bf16["p1"],
        wider,
        "--seed",
        1,
        "--out",
        tmp_path / "child",
    )
    assert code == 2
    assert re.search(
        r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[32, 48\] BF16 in .*base/model.safetensors but shape \[32, 64\] BF16 in .*wider",
        stderr,
    )
    code, _, stderr = merge(
        capsys,
        "--base",
        tmp_path / "nowhere",
        "--parents",
        bf16["p1"],
        bf16["p2"],
        "--seed",
        1,
        "--out",
        tmp_path / "child",
    )
    assert code == 2 and "nowhere does not exist" in stderr


def test_entry_point_writes_shards_that_transformers_loads(bf16, tmp_path):
    out = tmp_path / "child"
    result = run_cli("merge", "--base", bf16["base"], "--parents", bf16["p1"], bf16["p2"], "--seed", 5,
                     "--mutation", "svd", "--rank", "full", "--max-shard-size", "20KB", "--out", out, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^w1 [\d.]+ w2 [\d.]+$", result.stdout, flags=re.MULTILINE)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert logits(out).shape == (1, 6, 48)
    assert not torch.allclose(logits(out), logits(bf16["p1"]))


@pytest.mark.parametrize(("method", "extra"), [("ties", ["--density", "0.3"]),
                                               ("dare", ["--density", "0.5", "--seed", "4"]),
                                               ("dare-ties", ["--density", "0.5", "--seed", "4",
                                                              "--weights", "1", "0.5", "2", "--scale", "0.8"])])
def test_ties_and_dare_baselines_write_the_sparse_merge(bf16, tmp_path, capsys, method, extra):
    from cqd_mpi.merging.sparse import SparseMerge, sparse_merge_stream

    members = [bf16[k] for k in ("p1", "p2", "p3")]
    code, _, err = merge(capsys, "--base", bf16["base"], "--aggregate", *members, "--method", method,
                           *extra, "--out", tmp_path / method)
    assert code == 0, err
    options = dict(zip(extra[::2], extra[1::2]))
    weights = [float(w) for w in extra[extra.index("--weights") + 1:][:3]] if "--weights" in extra else [1 / 3] * 3
    spec = SparseMerge(method=method, density=float(options["--density"]), seed=int(options.get("--seed", 0)),
                       scale=float(options.get("--scale", 1.0)), weights=tuple(weights))
    expected = dict(sparse_merge_stream(base=ModelDir(bf16["base"]), members=[ModelDir(m) for m in members],
                                        spec=spec))
    written = state_dict(tmp_path / method)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[n], expected[n]) for n in expected)


def test_sparse_merge_user_errors(bf16, tmp_path, capsys):
    members = [bf16[k] for k in ("p1", "p2")]
    code, _, err = merge(capsys, "--base", bf16["base"], "--aggregate", *members, "--method", "ties",
                         "--density", "1.5", "--out", tmp_path / "x")
    assert code == 2 and "--density: expected a number in (0, 1], got 1.5" in err
    code, _, err = merge(capsys, "--base", bf16["base"], "--aggregate", *members, "--method", "ties",
                         "--seed", "2", "--out", tmp_path / "x")
    assert code == 2 and "--seed, --w1 and --w2 apply to --parents" in err
    code, _, err = merge(capsys, "--base", bf16["base"], "--parents", *members, "--seed", "1",
                         "--method", "dare", "--out", tmp_path / "x")
    assert code == 2 and "--method applies to --aggregate" in err
    assert not (tmp_path / "x").exists()
