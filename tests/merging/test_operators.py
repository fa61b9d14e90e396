"""cqd_mpi.merging.operators: streamed crossover, mutation and aggregation equal the dense DESIGN.md formulas."""

from __future__ import annotations

import warnings

import pytest
import torch

from cqd_mpi import cpu
from cqd_mpi.errors import ConfigError, WeightsError
from cqd_mpi.merging.mutation import MutationSpec
from cqd_mpi.merging.operators import (
    aggregate_stream,
    crossover_stream,
    model_similarity,
    randomized_svd,
    tensor_generator,
)
from cqd_mpi.merging.weights import ModelDir, write_hf_dir
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
            sketch = None if mutation.sketch is None else tau.to(mutation.sketch)
            u, s, v = randomized_svd(
                tau, mutation.rank, niter=mutation.niter, generator=generator, sketch=sketch
            )
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


def test_bf16_sketch_mutation_is_a_bounded_rank_r_update_of_the_crossover(fp32):
    """The tiny models' task vectors have flat spectra, so their top-4 subspaces move with
    float32 rounding once the sketch rounds to bf16: a bit-level match with a dense reference
    (which sums in another order) is not defined here. What the stream must give is the
    formula's shape: each mutated matrix changes by U diag(w s) V^T of rank 4, within
    w_max of the task vector's projection, and nothing else changes."""
    base, p1, p2 = dirs(fp32, "base", "p1", "p2")
    mutation = MutationSpec(kind="svd", rank=4, w_max=0.3, sketch_dtype="bfloat16")
    ours = streamed(
        crossover_stream(base=base, parent1=p1, parent2=p2, w1=W1, w2=W2, mutation=mutation, seed=5)
    )
    child, theta_base = dense_crossover(fp32)
    for name, theta in child.items():
        delta = ours[name] - theta
        if not is_mutated_matrix(name, theta):
            torch.testing.assert_close(ours[name], theta, rtol=1e-6, atol=1e-7, msg=name)
            continue
        singular = torch.linalg.svdvals(delta)
        tau_top = torch.linalg.svdvals(theta - theta_base[name])[0]
        assert float(singular[0]) > 1e-3 * float(tau_top), name
        assert float(singular[4]) < 1e-4 * float(singular[0]), name
        assert float(singular[0]) <= 0.3 * float(tau_top) * (1 + 1e-4), name


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


def decaying_matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A float32 m x n matrix with singular values 1, 0.9, 0.81, ... and random vectors."""
    generator = torch.Generator().manual_seed(seed)
    k = min(m, n)
    left = torch.linalg.qr(torch.randn(m, k, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(n, k, generator=generator)).Q
    return left @ torch.diag(0.9 ** torch.arange(k, dtype=torch.float32)) @ right.mT


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_bf16_sketch_keeps_float32_factors_and_finds_the_same_subspace(shape):
    matrix = decaying_matrix(*shape)
    rank = 10
    full = randomized_svd(matrix, rank, niter=2, generator=torch.Generator().manual_seed(4))
    u, s, v = randomized_svd(
        matrix,
        rank,
        niter=2,
        generator=torch.Generator().manual_seed(4),
        sketch=matrix.to(torch.bfloat16),
    )
    assert u.dtype == s.dtype == v.dtype == torch.float32
    assert u.shape == (shape[0], rank) and v.shape == (shape[1], rank)
    assert not torch.equal(u, full[0])
    eye = torch.eye(rank)
    torch.testing.assert_close(u.mT @ u, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(v.mT @ v, eye, atol=1e-5, rtol=0)
    tall = shape[0] >= shape[1]
    projection = u @ (u.mT @ matrix) if tall else (matrix @ v) @ v.mT
    torch.testing.assert_close(u @ torch.diag(s) @ v.mT, projection, atol=1e-5, rtol=0)
    best = float((torch.linalg.svdvals(matrix)[:rank] ** 2).sum())
    captured, captured32 = float((s**2).sum()), float((full[1] ** 2).sum())
    assert captured > 0.97 * best
    assert abs(captured - captured32) < 1e-3 * best
    with pytest.raises(ValueError, match=r"sketch: expected shape \(300, 120\), got \(120, 300\)"):
        randomized_svd(
            decaying_matrix(300, 120),
            rank,
            generator=torch.Generator().manual_seed(4),
            sketch=decaying_matrix(120, 300).to(torch.bfloat16),
        )


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
        MutationSpec(kind="svd", rank=3, sketch_dtype="bfloat16"),
        MutationSpec(kind="svd", rank="full"),
        MutationSpec(kind="gaussian"),
    ],
    ids=["none", "svd-r3", "svd-r3-bf16-sketch", "svd-full", "gaussian"],
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


@pytest.fixture
def torch_threads_restored():
    """The test sets torch's thread count (4 is past operators.FEW_CORES, so whole-matrix
    passes run threaded); this puts the count back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threaded_matrix_passes_give_the_serial_bytes_and_the_dense_formula(
    bf16, torch_threads_restored
):
    base, p1, p2 = dirs(bf16, "base", "p1", "p2")

    def child(mutation, threads):
        torch.set_num_threads(threads)
        return streamed(
            crossover_stream(
                base=base, parent1=p1, parent2=p2, w1=W1, w2=W2, mutation=mutation, seed=4
            )
        )

    gaussian = MutationSpec(kind="gaussian")
    serial, threaded = child(gaussian, 1), child(gaussian, 4)
    assert all(torch.equal(serial[name], threaded[name]) for name in serial)
    svd = MutationSpec(kind="svd", rank=4, w_max=0.3)
    assert_matches(child(svd, 4), mutated_dense(bf16, svd, seed=4), torch.bfloat16)


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


@pytest.mark.parametrize("native", [False, True, None])
@pytest.mark.parametrize("sketch_dtype", ["bfloat16", "float32"])
def test_a_bf16_sketch_on_a_cpu_without_bf16_instructions_warns(
    bf16, monkeypatch, native, sketch_dtype
):
    """On a 2-core AVX2 host the bf16 sketch made a rank-64 merge 770 s instead of 19 s."""
    monkeypatch.setattr(cpu, "native_bf16_matmul", lambda: native)
    base, p1, p2 = dirs(bf16, "base", "p1", "p2")
    mutation = MutationSpec(kind="svd", rank=3, sketch_dtype=sketch_dtype)
    slow = slow_sketch_warnings(base, p1, p2, mutation)
    if native is False and sketch_dtype == "bfloat16":
        assert len(slow) == 1 and slow[0].category is RuntimeWarning
        assert "mutation.sketch_dtype is 'bfloat16'" in str(slow[0].message)
        assert "Use sketch_dtype: float32" in str(slow[0].message)
    else:
        assert slow == []


def slow_sketch_warnings(base, p1, p2, mutation):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        crossover_stream(base=base, parent1=p1, parent2=p2, w1=W1, w2=W2, mutation=mutation)
    return [w for w in caught if "no bf16 dot-product instructions" in str(w.message)]


@pytest.mark.parametrize("kind", ["none", "gaussian"])
def test_no_slow_sketch_warning_where_the_child_gets_no_randomized_svd(bf16, monkeypatch, kind):
    monkeypatch.setattr(cpu, "native_bf16_matmul", lambda: False)
    base, p1, p2 = dirs(bf16, "base", "p1", "p2")
    mutation = MutationSpec(kind=kind, rank=3, sketch_dtype="bfloat16")
    assert mutation.sketch == torch.bfloat16
    assert slow_sketch_warnings(base, p1, p2, mutation) == []


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
        match=r"has dtype BF16 in .*bf16-family\d*/base/model.safetensors but dtype F32 in .*fp32",
    ):
        crossover_stream(base=base, parent1=p1, parent2=ModelDir(fp32["p2"]), w1=W1, w2=W2)


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
