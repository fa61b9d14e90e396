"""cqd_mpi.merging.basis: the cached expert SVD basis and the `basis: expert` mutation that reads it."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from cqd_mpi import cpu
from cqd_mpi.errors import ConfigError, WeightsError
from cqd_mpi.merging.basis import ExpertBasis, basis_names, ensure_expert_basis, expert_basis_path
from cqd_mpi.merging.mutation import MutationSpec
from cqd_mpi.merging.operators import (
    crossover_stream,
    randomized_svd,
    tensor_generator,
)
from cqd_mpi.merging.weights import ModelDir, SafetensorsFile
from tests.tiny_llama import (
    W1,
    W2,
    assert_matches,
    dense_crossover,
    save_tiny_llama,
    state_dict,
    streamed,
)


def expert_tau(models, name, expert="p3"):
    return state_dict(models[expert])[name].float() - state_dict(models["base"])[name].float()


def test_full_rank_basis_is_the_svd_of_the_expert_task_vector(bf16, tmp_path):
    base, expert = ModelDir(bf16["base"]), ModelDir(bf16["p3"])
    path = ensure_expert_basis(base=base, expert=expert, rank="full", cache_dir=tmp_path)
    with ExpertBasis(path) as basis:
        assert basis.rank == "full"
        assert basis.names == sorted(basis_names(base))
        assert "model.norm.weight" not in basis.names
        for name in basis.names:
            tau = expert_tau(bf16, name)
            u, s, v = basis.factors(name)
            assert u.dtype == v.dtype == torch.bfloat16 and s.dtype == torch.float32
            torch.testing.assert_close(s, torch.linalg.svdvals(tau), rtol=1e-5, atol=1e-6)
            reconstructed = u.float() @ torch.diag(s) @ v.float().mT
            torch.testing.assert_close(
                reconstructed, tau, rtol=0, atol=float(tau.abs().max()) * 2**-6
            )


def test_truncated_basis_is_the_seeded_randomized_svd_in_float32(bf16, tmp_path):
    base, expert = ModelDir(bf16["base"]), ModelDir(bf16["p3"])
    path = ensure_expert_basis(
        base=base, expert=expert, rank=3, cache_dir=tmp_path, exclude=("lm_head",)
    )
    full_size = os.path.getsize(
        ensure_expert_basis(base=base, expert=expert, rank="full", cache_dir=tmp_path)
    )
    assert os.path.getsize(path) < full_size / 2
    with ExpertBasis(path) as basis:
        assert basis.rank == 3
        assert "lm_head.weight" not in basis.names and "model.embed_tokens.weight" in basis.names
        for name in basis.names:
            expected = randomized_svd(
                expert_tau(bf16, name), 3, niter=2, generator=tensor_generator(0, name)
            )
            for ours, theirs in zip(basis.factors(name), expected):
                assert ours.dtype == torch.float32
                assert torch.equal(ours, theirs)


def test_a_bf16_sketch_basis_is_cached_apart_and_sketched_in_bf16(bf16, tmp_path):
    base, expert = ModelDir(bf16["base"]), ModelDir(bf16["p3"])
    plain = ensure_expert_basis(base=base, expert=expert, rank=3, cache_dir=tmp_path)
    path = ensure_expert_basis(
        base=base, expert=expert, rank=3, cache_dir=tmp_path, sketch_dtype="bfloat16"
    )
    assert path != plain
    assert SafetensorsFile(path).metadata["sketch_dtype"] == "bfloat16"
    assert SafetensorsFile(plain).metadata["sketch_dtype"] == "float32"
    full = expert_basis_path(base=base, expert=expert, rank="full", cache_dir=tmp_path)
    assert full == expert_basis_path(
        base=base, expert=expert, rank="full", cache_dir=tmp_path, sketch_dtype="bfloat16"
    )
    name = "model.layers.0.mlp.up_proj.weight"
    tau = expert_tau(bf16, name)
    expected = randomized_svd(
        tau, 3, niter=2, generator=tensor_generator(0, name), sketch=tau.to(torch.bfloat16)
    )
    with ExpertBasis(path) as basis, ExpertBasis(plain) as other:
        for ours, theirs in zip(basis.factors(name), expected):
            assert torch.equal(ours, theirs)
        assert not torch.equal(basis.factors(name)[0], other.factors(name)[0])
    with pytest.raises(ConfigError, match=r"mutation\.sketch_dtype: expected .float32. or .bfloat16., got .fp8."):
        expert_basis_path(base=base, expert=expert, rank=3, cache_dir=tmp_path, sketch_dtype="fp8")


def test_a_bf16_sketch_basis_warns_once_when_built_not_when_read_from_cache_or_used(
    bf16, tmp_path, monkeypatch
):
    monkeypatch.setattr(cpu, "native_bf16_matmul", lambda: False)
    base, expert = ModelDir(bf16["base"]), ModelDir(bf16["p3"])
    with pytest.warns(RuntimeWarning, match=r"no bf16 dot-product instructions"):
        path = ensure_expert_basis(
            base=base, expert=expert, rank=3, cache_dir=tmp_path, sketch_dtype="bfloat16"
        )
    assert SafetensorsFile(path).metadata["sketch_dtype"] == "bfloat16"
    mutation = MutationSpec(kind="svd", basis="expert", rank=3, sketch_dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ensure_expert_basis(
            base=base, expert=expert, rank=3, cache_dir=tmp_path, sketch_dtype="bfloat16"
        )
        with ExpertBasis(path) as basis:
            crossover_stream(
                base=base,
                parent1=ModelDir(bf16["p1"]),
                parent2=ModelDir(bf16["p2"]),
                w1=W1,
                w2=W2,
                mutation=mutation,
                basis=basis,
            )


def test_basis_is_cached_and_rebuilt_when_the_expert_changes(bf16, tmp_path):
    base = ModelDir(bf16["base"])
    expert_dir = save_tiny_llama(
        tmp_path / "expert", seed=5, dtype=torch.bfloat16, like=bf16["base"]
    )
    path = ensure_expert_basis(
        base=base, expert=ModelDir(expert_dir), rank=2, cache_dir=tmp_path / "cache"
    )
    stamp = path.stat().st_mtime_ns
    assert (
        ensure_expert_basis(
            base=base, expert=ModelDir(expert_dir), rank=2, cache_dir=tmp_path / "cache"
        )
        == path
    )
    assert path.stat().st_mtime_ns == stamp
    other_rank = ensure_expert_basis(
        base=base, expert=ModelDir(expert_dir), rank=3, cache_dir=tmp_path / "cache"
    )
    assert other_rank != path
    save_tiny_llama(expert_dir, seed=6, dtype=torch.bfloat16, like=bf16["base"])
    changed = expert_basis_path(
        base=base, expert=ModelDir(expert_dir), rank=2, cache_dir=tmp_path / "cache"
    )
    assert changed != path and not changed.exists()
    assert (
        ensure_expert_basis(
            base=base, expert=ModelDir(expert_dir), rank=2, cache_dir=tmp_path / "cache"
        )
        == changed
    )
    name = "model.layers.0.mlp.up_proj.weight"
    with ExpertBasis(changed) as basis:
        tau = state_dict(expert_dir)[name].float() - state_dict(bf16["base"])[name].float()
        expected = randomized_svd(tau, 2, niter=2, generator=tensor_generator(0, name))
        assert torch.equal(basis.factors(name)[1], expected[1])


def test_a_corrupt_cache_file_is_rebuilt(bf16, tmp_path):
    base, expert = ModelDir(bf16["base"]), ModelDir(bf16["p3"])
    path = ensure_expert_basis(base=base, expert=expert, rank=2, cache_dir=tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    assert ensure_expert_basis(base=base, expert=expert, rank=2, cache_dir=tmp_path) == path
    assert path.read_bytes() == good


@pytest.mark.parametrize("rank", ["full", 3])
def test_expert_basis_mutation_equals_dense_formula(bf16, tmp_path, rank):
    base, p1, p2, expert = (ModelDir(bf16[k]) for k in ("base", "p1", "p2", "p3"))
    mutation = MutationSpec(kind="svd", basis="expert", rank=rank, w_max=0.1, exclude=("embed",))
    path = ensure_expert_basis(base=base, expert=expert, rank=rank, cache_dir=tmp_path)
    with ExpertBasis(path) as basis:
        ours = streamed(
            crossover_stream(
                base=base,
                parent1=p1,
                parent2=p2,
                w1=W1,
                w2=W2,
                mutation=mutation,
                seed=8,
                basis=basis,
            )
        )
        child, _ = dense_crossover(bf16)
        for name, theta in child.items():
            if theta.ndim == 2 and "embed" not in name:
                u, s, v = (f.float() for f in basis.factors(name))
                w = torch.rand(s.shape[0], generator=tensor_generator(8, name)) * 0.1
                child[name] = theta + u @ torch.diag(w * s) @ v.mT
    assert_matches(ours, child, torch.bfloat16)
    plain, _ = dense_crossover(bf16)
    name = "model.layers.1.self_attn.o_proj.weight"
    assert not torch.allclose(ours[name].float(), plain[name], rtol=2.0**-6, atol=1e-6)


def test_basis_must_match_the_mutation_and_the_model(bf16, tmp_path):
    base, p1, p2, expert = (ModelDir(bf16[k]) for k in ("base", "p1", "p2", "p3"))
    path = ensure_expert_basis(
        base=base, expert=expert, rank=2, cache_dir=tmp_path, exclude=("lm_head",)
    )
    with ExpertBasis(path) as basis:
        with pytest.raises(
            ConfigError, match=r"mutation.rank is 4, but the expert basis .* has rank 2"
        ):
            crossover_stream(
                base=base,
                parent1=p1,
                parent2=p2,
                w1=W1,
                w2=W2,
                mutation=MutationSpec(basis="expert", rank=4),
                basis=basis,
            )
        with pytest.raises(
            WeightsError, match=r"expert basis .* has no factors for tensor 'lm_head.weight'"
        ):
            crossover_stream(
                base=base,
                parent1=p1,
                parent2=p2,
                w1=W1,
                w2=W2,
                mutation=MutationSpec(basis="expert", rank=2),
                basis=basis,
            )
    wider = save_tiny_llama(tmp_path / "wider", seed=1, dtype=torch.bfloat16, intermediate_size=64)
    wider_path = ensure_expert_basis(
        base=ModelDir(wider), expert=ModelDir(wider), rank=2, cache_dir=tmp_path
    )
    with (
        ExpertBasis(wider_path) as basis,
        pytest.raises(
            WeightsError,
            match=r"factors of 'model.layers.0.mlp.down_proj.weight' are for a 32x64 matrix, but .* has 32x48",
        ),
    ):
        crossover_stream(
            base=base,
            parent1=p1,
            parent2=p2,
            w1=W1,
            w2=W2,
            mutation=MutationSpec(basis="expert", rank=2),
            basis=basis,
        )


def test_other_files_are_not_mistaken_for_a_basis(bf16):
    with pytest.raises(WeightsError, match=r"is not an expert basis file"):
        ExpertBasis(bf16["base"] / "model.safetensors")
    assert SafetensorsFile(bf16["base"] / "model.safetensors").metadata == {"format": "pt"}


def test_basis_of_a_model_without_matrices_is_refused(tmp_path):
    from safetensors.torch import save_file

    for name in ("base", "expert"):
        (tmp_path / name).mkdir()
        save_file({"bias": torch.zeros(4)}, str(tmp_path / name / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"has no 2-D floating-point matrices"):
        ensure_expert_basis(
            base=ModelDir(tmp_path / "base"),
            expert=ModelDir(tmp_path / "expert"),
            rank=2,
            cache_dir=tmp_path,
        )
