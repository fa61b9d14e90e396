"""cqd_mpi.operators: streamed crossover, mutation and aggregation equal the dense DESIGN.md formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cqd_mpi.errors import ConfigError, WeightsError
from cqd_mpi.operators import (
    MutationSpec,
    aggregate_stream,
    crossover_stream,
    model_similarity,
    randomized_svd,
    sample_crossover_weights,
    softmax,
    tensor_generator,
)
from cqd_mpi.weights import ModelDir, write_hf_dir
from tests.tiny_llama import (
    W1,
    W2,
    assert_matches,
    dense_crossover,
    family,
    logits,
    model_with,
    save_tiny_llama,
    state_dict,
    streamed,
)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return family(tmp_path_factory.mktemp("fp32"), torch.float32)


def dirs(models, *keys):
    return [ModelDir(models[key]) for key in keys]


def is_mutated_matrix(name, tensor, exclude=()):
    return tensor.ndim == 2 and not any(__import__("re").search(p, name) for p in exclude)


def test_sample_crossover_weights_is_seeded_and_resamples_near_zero_sums():
    assert sample_crossover_weights(np.random.default_rng(5)) == sample_crossover_weights(
        np.random.default_rng(5)
    )
    w1, w2 = sample_crossover_weights(np.random.default_rng(5), 1.0, 0.03)
    assert 0.8 < w1 < 1.2 and 0.8 < w2 < 1.2
    rng, raw = np.random.default_rng(11), np.random.default_rng(11)
    rejected = 0
    for _ in range(100):
        w1, w2 = sample_crossover_weights(rng, 0.0, 1e-6)
        assert abs(w1 + w2) >= 1e-6
        while True:
            a, b = raw.normal(0.0, 1e-6, size=2)
            if abs(a + b) >= 1e-6:
                break
            rejected += 1
        assert (a, b) == (w1, w2)
    assert rejected > 10


def test_lerp_on_16_bit_tensors_is_float32_lerp_rounded_once():
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(100_000, generator=generator).to(dtype)
        b = (a.float() + 0.01 * torch.randn(100_000, generator=generator)).to(dtype)
        for weight in (-0.2, 0.3, 0.5, 0.7, 1.3):
            assert torch.equal(
                torch.lerp(a, b, weight), torch.lerp(a.float(), b.float(), weight).to(dtype)
            )


@pytest.mark.parametrize("dtype_family", ["bf16", "fp32"])
def test_crossover_without_mutation_equals_dense_formula(dtype_family, request):
    models = request.getfixturevalue(dtype_family)
    dtype = torch.bfloat16 if dtype_family == "bf16" else torch.float32
    base, p1, p2 = dirs(models, "base", "p1", "p2")
    ours = streamed(
        crossover_stream(base=base, parent1=p1, parent2=p2, w1=W1, w2=W2, chunk_elements=100)
    )
    assert list(ours) == base.names
    child, _ = dense_crossover(models)
    assert_matches(ours, child, dtype)


def mutated_dense(models, mutation: MutationSpec, seed: int):
    """The dense DESIGN.md SVD mutation: tau = U S V^T, w ~ U[0, w_max]^r, tau += U diag(w s) V^T."""
    child, base = dense_crossover(models)
    for name, theta in child.items():
        if not is_mutated_matrix(name, theta, mutation.exclude):
            continue
        tau = theta - base[name]
        generator = tensor_generator(seed, name)
        if mutation.rank == "full":
            u, s, vh = torch.linalg.svd(tau, full_matrices=False)
            v = vh.mT
        else:
            u, s, v = randomized_svd(tau, mutation.rank, niter=mutation.niter, generator=generator)
        w = torch.rand(s.shape[0], generator=generator) * mutation.w_max
        child[name] = base[name] + tau + u @ torch.diag(w * s) @ v.mT
    return child


@pytest.mark.parametrize("rank", ["full", 4])
@pytest.mark.parametrize("dtype_family", ["bf16", "fp32"])
def test_svd_mutation_with_child_basis_equals_dense_formula(dtype_family, rank, request):
    models = request.getfixturevalue(dtype_family)
    dtype = torch.bfloat16 if dtype_family == "bf16" else torch.float32
    base, p1, p2 = dirs(models, "base", "p1", "p2")
    mutation = MutationSpec(kind="svd", rank=rank, w_max=0.3, exclude=("embed_tokens",))
    ours = streamed(
        crossover_stream(
            base=base,
            parent1=p1,
            parent2=p2,
            w1=W1,
            w2=W2,
            mutation=mutation,
            seed=7,
            chunk_elements=64,
        )
    )
    assert_matches(ours, mutated_dense(models, mutation, seed=7), dtype)
    plain, _ = dense_crossover(models)
    for name, theta in plain.items():
        changed = not torch.allclose(ours[name].float(), theta, rtol=2.0**-6, atol=1e-6)
        assert changed == is_mutated_matrix(name, theta, mutation.exclude), name


def test_svd_mutation_scales_each_principal_component_by_one_plus_w(fp32):
    base, p1, p2 = dirs(fp32, "base", "p1", "p2")
    mutation = MutationSpec(kind="svd", rank="full", w_max=0.3)
    ours = streamed(
        crossover_stream(base=base, parent1=p1, parent2=p2, w1=W1, w2=W2, mutation=mutation, seed=3)
    )
    child, theta_base = dense_crossover(fp32)
    name = "model.layers.1.mlp.down_proj.weight"
    s_before = torch.linalg.svdvals(child[name] - theta_base[name])
    s_after = torch.linalg.svdvals(ours[name] - theta_base[name])
    ratio = s_after / s_before
    assert float(ratio.min()) >= 1.0 - 1e-4 and float(ratio.max()) <= 1.3 + 1e-4
    assert float(ratio.std()) > 0.01


def test_truncated_svd_is_torch_svd_lowrank_with_an_explicit_generator():
    generator = torch.Generator().manual_seed(0)
    for shape in ((40, 24), (24, 40)):
        matrix = torch.randn(shape, generator=generator)
        torch.manual_seed(123)
        expected = torch.svd_lowrank(matrix, q=6, niter=2)
        ours = randomized_svd(matrix, 6, niter=2, generator=torch.Generator().manual_seed(123))
        for a, b in zip(ours, expected):
            assert torch.equal(a, b)


def test_gaussian_mutation_equals_dense_formula(bf16):
    base, p1, p2 = dirs(bf16, "base", "p1", "p2")
    mutation = MutationSpec(kind="gaussian", sigma=0.01, exclude=("norm",))
    ours = streamed(
        crossover_stream(base=base, parent1=p1, parent2=p2, w1=W1, w2=W2, mutation=mutation, seed=5)
    )
    child, _ = dense_crossover(bf16)
    for name, theta in child.items():
        if "norm" not in name:
            child[name] = theta + 0.01 * torch.randn(
                theta.shape, generator=tensor_generator(5, name)
            )
    assert_matches(ours, child, torch.bfloat16)


@pytest.mark.parametrize(
    "mutation",
    [
        MutationSpec(kind="none"),
        MutationSpec(kind="svd", rank=3),
        MutationSpec(kind="svd", rank="full"),
        MutationSpec(kind="gaussian"),
    ],
    ids=["none", "svd-r3", "svd-full", "gaussian"],
)
def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(bf16, tmp_path, mutation):
    base, p1, p2 = dirs(bf16, "base", "p1", "p2")

    def write(seed, name):
        stream = crossover_stream(
            base=base, parent1=p1, parent2=p2, w1=W1, w2=W2, mutation=mutation, seed=seed
        )
        return (write_hf_dir(stream, tmp_path / name, like=base) / "model.safetensors").read_bytes()

    first, again, other = write(1, "a"), write(1, "b"), write(2, "c")
    assert first == again
    assert (first != other) == (mutation.kind != "none")


def test_result_does_not_depend_on_how_the_base_is_sharded(bf16, tmp_path):
    resharded = save_tiny_llama(
        tmp_path / "base-resharded", seed=0, dtype=torch.bfloat16, max_shard_size="8KB"
    )
    same = state_dict(resharded)
    assert all(torch.equal(t, same[n]) for n, t in state_dict(bf16["base"]).items())
    p1, p2 = dirs(bf16, "p1", "p2")
    mutation = MutationSpec(kind="svd", rank=3)
    one = streamed(
        crossover_stream(
            base=ModelDir(bf16["base"]),
            parent1=p1,
            parent2=p2,
            w1=W1,
            w2=W2,
            mutation=mutation,
            seed=9,
        )
    )
    other_base = ModelDir(resharded)
    assert other_base.names != ModelDir(bf16["base"]).names
    two = streamed(
        crossover_stream(
            base=other_base, parent1=p1, parent2=p2, w1=W1, w2=W2, mutation=mutation, seed=9
        )
    )
    assert one.keys() == two.keys()
    assert all(torch.equal(one[n], two[n]) for n in one)


def test_written_child_loads_with_transformers_and_gives_the_dense_logits(fp32, bf16, tmp_path):
    mutation = MutationSpec(kind="svd", rank="full")
    base, p1, p2 = dirs(fp32, "base", "p1", "p2")
    out = write_hf_dir(
        crossover_stream(
            base=base, parent1=p1, parent2=p2, w1=W1, w2=W2, mutation=mutation, seed=4
        ),
        tmp_path / "child",
        like=base,
        max_shard_size="20KB",
    )
    dense = model_with(fp32["base"], mutated_dense(fp32, mutation, seed=4))
    torch.testing.assert_close(logits(out), logits(dense), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(out), logits(fp32["base"]), atol=1e-3)

    base, p1, p2 = dirs(bf16, "base", "p1", "p2")
    out = write_hf_dir(
        crossover_stream(base=base, parent1=p1, parent2=p2, w1=W1, w2=W2),
        tmp_path / "child16",
        like=base,
    )
    child, _ = dense_crossover(bf16)
    dense = model_with(bf16["base"], {n: t.bfloat16() for n, t in child.items()})
    torch.testing.assert_close(logits(out), logits(dense), rtol=0.02, atol=0.02)


def test_mutation_spec_rejects_bad_values():
    with pytest.raises(
        ConfigError, match=r"mutation.kind: expected 'svd', 'gaussian' or 'none', got 'big'"
    ):
        MutationSpec(kind="big")
    with pytest.raises(
        ConfigError, match=r"mutation.basis: expected 'child' or 'expert', got 'parent'"
    ):
        MutationSpec(basis="parent")
    for rank in (0, -3, "half", True, 2.5):
        with pytest.raises(
            ConfigError, match=r"mutation.rank: expected 'full' or a positive integer"
        ):
            MutationSpec(rank=rank)
    with pytest.raises(ConfigError, match=r"mutation.w_max: expected a number >= 0, got -0.1"):
        MutationSpec(w_max=-0.1)
    with pytest.raises(ConfigError, match=r"mutation.sigma"):
        MutationSpec(sigma=-1.0)
    with pytest.raises(ConfigError, match=r"mutation.exclude: '\(' is not a valid regex"):
        MutationSpec(exclude=("(",))


def test_crossover_rejects_bad_inputs(bf16, fp32):
    base, p1, p2 = dirs(bf16, "base", "p1", "p2")
    with pytest.raises(ValueError, match=r"must not sum to ~0"):
        crossover_stream(base=base, parent1=p1, parent2=p2, w1=1.0, w2=-1.0)
    with pytest.raises(ConfigError, match=r"no expert basis was given"):
        crossover_stream(
            base=base, parent1=p1, parent2=p2, w1=W1, w2=W2, mutation=MutationSpec(basis="expert")
        )
    with pytest.raises(
        WeightsError,
        match=r"has shape .* BF16 in .*bf16-family\d*/base/model.safetensors but shape .* F32 in .*fp32",
    ):
        crossover_stream(base=base, parent1=p1, parent2=ModelDir(fp32["p2"]), w1=W1, w2=W2)


def test_softmax():
    assert softmax([0.0, 0.0]) == [0.5, 0.5]
    betas = softmax([0.2, 0.5, 0.9], temperature=0.5)
    expected = np.exp(np.array([0.2, 0.5, 0.9]) / 0.5)
    np.testing.assert_allclose(betas, expected / expected.sum(), rtol=1e-12)
    assert softmax([1000.0, 1000.0]) == [0.5, 0.5]
    with pytest.raises(ConfigError, match=r"temperature: expected a number > 0"):
        softmax([1.0], temperature=0.0)
    with pytest.raises(ConfigError, match=r"scores must be finite"):
        softmax([1.0, math.nan])


@pytest.mark.parametrize("betas", [[0.2, 0.3, 0.5], [1 / 3] * 3, [0.7, 0.6, -0.1]])
def test_aggregation_equals_dense_formula(bf16, betas):
    base = ModelDir(bf16["base"])
    members = dirs(bf16, "p1", "p2", "p3")
    ours = streamed(aggregate_stream(base=base, members=members, betas=betas, chunk_elements=50))
    theta = {k: state_dict(bf16[k]) for k in ("base", "p1", "p2", "p3")}
    dense = {}
    for name, b in theta["base"].items():
        b = b.float()
        dense[name] = b + sum(
            beta * (theta[k][name].float() - b) for beta, k in zip(betas, ("p1", "p2", "p3"))
        )
    assert_matches(ours, dense, torch.bfloat16)


def test_naive_average_is_the_mean_of_the_experts(fp32):
    members = dirs(fp32, "p1", "p2", "p3")
    ours = streamed(
        aggregate_stream(base=ModelDir(fp32["base"]), members=members, betas=[1 / 3] * 3)
    )
    theta = [state_dict(fp32[k]) for k in ("p1", "p2", "p3")]
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, sum(t[name] for t in theta) / 3, rtol=1e-6, atol=1e-7)


def test_aggregation_rejects_bad_inputs(bf16):
    base, p1 = dirs(bf16, "base", "p1")
    with pytest.raises(ConfigError, match=r"2 member models but 1 weights"):
        aggregate_stream(base=base, members=[p1, p1], betas=[1.0])
    with pytest.raises(ConfigError, match=r"at least one member"):
        aggregate_stream(base=base, members=[], betas=[])


def test_model_similarity_equals_dense_metric(bf16):
    base, p1, p2 = dirs(bf16, "base", "p1", "p2")
    theta = {k: state_dict(bf16[k]) for k in ("base", "p1", "p2")}
    cosines = []
    for name, b in theta["base"].items():
        if b.ndim != 2:
            continue
        s_a = torch.linalg.svdvals(theta["p1"][name].float() - b.float()).double()
        s_b = torch.linalg.svdvals(theta["p2"][name].float() - b.float()).double()
        cosines.append(float(s_a @ s_b / (s_a.norm() * s_b.norm())))
    value = model_similarity(base=base, a=p1, b=p2)
    assert value == pytest.approx(sum(cosines) / len(cosines), rel=1e-6)
    assert value == pytest.approx(model_similarity(base=base, a=p2, b=p1), rel=1e-12)
    assert model_similarity(base=base, a=p1, b=p1) == pytest.approx(1.0, abs=1e-9)
    assert 0.5 < value < 1.0
    assert model_similarity(base=base, a=base, b=p1) == 0.0
    assert model_similarity(base=base, a=base, b=base) == 1.0


def test_integer_tensors_are_copied_from_the_base(tmp_path):
    from safetensors.torch import save_file

    dirs_ = []
    for i, name in enumerate(("base", "a", "b")):
        (tmp_path / name).mkdir()
        tensors = {"w": torch.full((4, 3), float(i)).bfloat16(), "ids": torch.arange(5) + 10 * i}
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        dirs_.append(ModelDir(tmp_path / name))
    base, a, b = dirs_
    child = streamed(crossover_stream(base=base, parent1=a, parent2=b, w1=1.0, w2=3.0))
    assert torch.equal(child["ids"], torch.arange(5))
    assert torch.equal(child["w"], torch.full((4, 3), 1.75).bfloat16())
    mean = streamed(aggregate_stream(base=base, members=[a, b], betas=[0.5, 0.5]))
    assert torch.equal(mean["ids"], torch.arange(5))
    assert torch.equal(mean["w"], torch.full((4, 3), 1.5).bfloat16())
