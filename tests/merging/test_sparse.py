"""cqd_mpi.merging.sparse: streamed TIES and DARE equal a dense reference of the published formulas."""

from __future__ import annotations

import pytest
import torch

from cqd_mpi.errors import ConfigError
from cqd_mpi.merging.operators import aggregate_stream
from cqd_mpi.merging.sparse import SparseMerge, mask_generator, sparse_merge_stream
from cqd_mpi.merging.weights import ModelDir
from tests.tiny_llama import assert_matches, family, state_dict, streamed

MEMBERS = ("p1", "p2", "p3")


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return family(tmp_path_factory.mktemp("fp32-sparse"), torch.float32)


def dense_sparse_merge(models, spec: SparseMerge) -> dict[str, torch.Tensor]:
    """The papers' formulas on whole float32 tensors, written independently of the streamed code:
    TIES (Yadav et al. 2023, trim by sorting, elect sign, disjoint mean) and DARE (Yu et al.
    2024, drop with probability 1 - density and rescale), then theta_base + scale * merged."""
    base = state_dict(models["base"])
    experts = [state_dict(models[m]) for m in MEMBERS]
    weights = spec.member_weights(len(experts))
    out = {}
    for name, theta in base.items():
        if not theta.dtype.is_floating_point:
            out[name] = theta
            continue
        b = theta.float()
        taus = []
        for k, expert in enumerate(experts):
            tau = (expert[name].float() - b).reshape(-1)
            if spec.method == "ties":
                m = int(spec.density * tau.numel())
                ordered = tau.abs().sort(descending=True).values
                tau = torch.where(tau.abs() >= ordered[m - 1], tau, torch.zeros_like(tau)) if m else tau * 0
            else:
                draw = torch.rand(tau.numel(), generator=mask_generator(spec.seed, name, k))
                tau = torch.where(draw < spec.density, tau / spec.density, torch.zeros_like(tau))
            taus.append(tau)
        stacked = torch.stack(taus)
        w = torch.tensor(weights).unsqueeze(1)
        if spec.method in ("ties", "dare-ties"):
            gamma = torch.sign((w * stacked).sum(0))
            agree = (torch.sign(stacked) == gamma) & (stacked != 0)
            total = (w * agree).sum(0)
            merged = torch.where(total > 0, (w * stacked * agree).sum(0) / total.clamp_min(1e-30), 0.0)
        else:
            merged = (w * stacked).sum(0)
        out[name] = (b.reshape(-1) + spec.scale * merged).reshape(theta.shape)
    return out


def stream(models, spec, **kwargs):
    return streamed(sparse_merge_stream(base=ModelDir(models["base"]),
                                        members=[ModelDir(models[m]) for m in MEMBERS], spec=spec, **kwargs))


@pytest.mark.parametrize("spec", [
    SparseMerge(method="ties", density=0.2),
    SparseMerge(method="ties", density=0.5, scale=1.3, weights=(0.5, 1.0, 2.0)),
    SparseMerge(method="dare", density=0.3, seed=7),
    SparseMerge(method="dare-ties", density=0.4, seed=2, weights=(1.0, 1.0, 0.5)),
], ids=["ties", "ties-weighted", "dare", "dare-ties"])
@pytest.mark.parametrize("dtype_family", ["fp32", "bf16"])
def test_streamed_merge_equals_the_dense_reference(spec, dtype_family, request):
    models = request.getfixturevalue(dtype_family)
    dtype = torch.float32 if dtype_family == "fp32" else torch.bfloat16
    ours = stream(models, spec)
    assert_matches(ours, dense_sparse_merge(models, spec), dtype)


def test_ties_keeps_the_density_of_each_task_vector_and_elects_signs(fp32):
    spec = SparseMerge(method="ties", density=0.25)
    ours = stream(fp32, spec)
    base = state_dict(fp32["base"])
    name = "model.layers.0.mlp.up_proj.weight"
    changed = (ours[name] != base[name]).float().mean().item()
    assert 0.25 <= changed <= 0.75
    experts = [state_dict(fp32[m])[name] - base[name] for m in MEMBERS]
    delta = ours[name] - base[name]
    moved = delta != 0
    positive = sum(torch.clamp(e, min=0) for e in experts)
    negative = sum(torch.clamp(e, max=0) for e in experts)
    assert torch.all(torch.sign(delta[moved]) != 0)
    assert moved.sum() > 0 and positive.abs().sum() > 0 and negative.abs().sum() > 0


def test_dare_keeps_about_the_density_and_rescales(fp32):
    spec = SparseMerge(method="dare", density=0.3, weights=(1.0, 0.0, 0.0), seed=4)
    ours = stream(fp32, spec)
    base, expert = state_dict(fp32["base"]), state_dict(fp32["p1"])
    name = "model.layers.1.mlp.down_proj.weight"
    tau = expert[name] - base[name]
    delta = ours[name] - base[name]
    kept = delta != 0
    assert 0.25 < kept.float().mean().item() < 0.35
    torch.testing.assert_close(delta[kept], tau[kept] / 0.3, rtol=1e-5, atol=1e-6)


def test_dare_at_density_one_is_the_naive_average(fp32):
    ours = stream(fp32, SparseMerge(method="dare", density=1.0))
    average = streamed(aggregate_stream(base=ModelDir(fp32["base"]),
                                        members=[ModelDir(fp32[m]) for m in MEMBERS], betas=[1 / 3] * 3))
    for name, tensor in average.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6)


def test_results_do_not_depend_on_the_chunk_size_and_repeat_exactly(bf16):
    spec = SparseMerge(method="dare-ties", density=0.3, seed=1)
    a = stream(bf16, spec)
    b = stream(bf16, spec, chunk_elements=97)
    c = stream(bf16, SparseMerge(method="dare-ties", density=0.3, seed=2))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize(("spec", "message"), [
    (SparseMerge(method="median"), "merge.method: expected one of ties, dare, dare-ties"),
    (SparseMerge(method="ties", density=0.0), "merge.density: expected a number in (0, 1]"),
    (SparseMerge(method="dare", weights=(1.0, 2.0)), "merge.weights: expected one weight per member model (3)"),
    (SparseMerge(method="dare", scale=float("nan")), "merge.scale: expected a finite number"),
])
def test_bad_settings_are_refused_naming_the_key(fp32, spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        stream(fp32, spec)
