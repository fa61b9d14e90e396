"""`python -m cqd_mpi merge`: one crossover (+ mutation) or one aggregation, written as an HF dir.

Crossover weights are drawn from `numpy_rng(seed, 0, "crossover")` unless --w1/--w2 are
given; the mutation uses `derive_seed(seed, 0, "mutation")`. The same command line writes
byte-identical files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cqd_mpi.errors import ConfigError
from cqd_mpi.merging.mutation import MutationSpec
from cqd_mpi.merging.sparse import METHODS as SPARSE_METHODS
from cqd_mpi.qd.sampling import sample_crossover_weights, softmax

HELP = "merge models once: crossover of two parents (--parents) or aggregation of experts (--aggregate)"


def _rank(text: str):
    if text == "full":
        return "full"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'full' or a positive integer, got {text!r}"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected 'full' or a positive integer, got {text!r}")
    return value


def add_arguments(parser) -> None:
    parser.add_argument(
        "--base", required=True, help="the base model dir (tau = theta - theta_base)"
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--parents", nargs=2, metavar=("P1", "P2"), help="cross over these two models"
    )
    what.add_argument(
        "--aggregate",
        nargs="+",
        metavar="E",
        help="aggregate these models: theta_base + sum beta_k tau_k",
    )
    parser.add_argument(
        "--out", required=True, help="output dir (replaced atomically if it exists)"
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest output shard, e.g. 5GB or 500MB (default 5GB)",
    )

    cross = parser.add_argument_group("crossover (--parents)")
    cross.add_argument(
        "--seed", type=int, help="integer seed of all randomness (required with --parents)"
    )
    cross.add_argument("--w1", type=float, help="use this w1 instead of sampling (needs --w2)")
    cross.add_argument("--w2", type=float, help="use this w2 instead of sampling (needs --w1)")
    cross.add_argument("--mu", type=float, default=1.0, help="mean of w1, w2 (default 1.0)")
    cross.add_argument("--sigma", type=float, default=0.03, help="std of w1, w2 (default 0.03)")
    cross.add_argument(
        "--mutation",
        choices=("svd", "gaussian", "none"),
        default="svd",
        help="mutation after crossover (default svd)",
    )
    cross.add_argument(
        "--basis",
        choices=("child", "expert"),
        default="child",
        help="SVD basis: the child's own task vector (paper) or a cached one of --expert",
    )
    cross.add_argument(
        "--expert", help="with --basis expert: the expert whose task-vector SVD is the basis"
    )
    cross.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where expert bases are cached (default $XDG_CACHE_HOME/cqd_mpi/svd-basis, shared with runs)",
    )
    cross.add_argument(
        "--rank",
        type=_rank,
        default="full",
        help="SVD rank: full, or r for a truncated randomized SVD",
    )
    cross.add_argument(
        "--niter", type=int, default=2, help="subspace iterations of the truncated SVD (default 2)"
    )
    cross.add_argument(
        "--sketch-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="precision of the truncated SVD's range finder (default float32; bfloat16 is faster "
        "on CPUs with AVX512-BF16 or AMX)",
    )
    cross.add_argument(
        "--w-max",
        type=float,
        default=None,
        help="w ~ U[0, w_max] (default 0.3, or 0.1 with --basis expert)",
    )
    cross.add_argument(
        "--exclude", nargs="+", default=[], metavar="REGEX", help="tensor names not to mutate"
    )
    cross.add_argument(
        "--gaussian-sigma", type=float, default=MutationSpec.sigma,
        help=f"std of Gaussian mutation (default {MutationSpec.sigma}, as in a run's qd.mutation)"
    )

    agg = parser.add_argument_group("aggregation (--aggregate)")
    weights = agg.add_mutually_exclusive_group()
    weights.add_argument(
        "--scores",
        nargs="+",
        type=float,
        metavar="F",
        help="one score per model: beta = softmax(F / T)",
    )
    weights.add_argument(
        "--weights", nargs="+", type=float, metavar="B", help="explicit beta per model"
    )
    agg.add_argument(
        "--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)"
    )
    agg.add_argument(
        "--method",
        choices=("task-arithmetic", *SPARSE_METHODS),
        default="task-arithmetic",
        help="task-arithmetic (default: theta_base + sum beta_k tau_k), or a baseline that sparsifies "
        "the task vectors first: ties (trim by magnitude, elect signs), dare (random drop and "
        "rescale), dare-ties (random drop, elect signs); their weights default to 1/K",
    )
    agg.add_argument(
        "--density", type=float, default=0.2,
        help="ties / dare: the fraction of each task vector kept (default 0.2)",
    )
    agg.add_argument(
        "--scale", type=float, default=1.0, help="ties / dare: lambda, the merged vector's scale (default 1)"
    )


def run(args) -> int:
    from cqd_mpi import seeding
    from cqd_mpi.merging import operators, weights

    sparse = args.aggregate and args.method in SPARSE_METHODS
    seeded = args.method in ("dare", "dare-ties")
    if args.aggregate and (args.w1 is not None or args.w2 is not None or (args.seed is not None and not seeded)):
        raise ConfigError("--seed, --w1 and --w2 apply to --parents, not to --aggregate "
                          "(but --seed does to --method dare and dare-ties)")
    if args.parents and (args.scores or args.weights):
        raise ConfigError("--scores and --weights apply to --aggregate, not to --parents")
    if args.parents and args.method != "task-arithmetic":
        raise ConfigError("--method applies to --aggregate, not to --parents")
    started = time.perf_counter()
    base = weights.ModelDir(args.base)
    basis = None
    if args.parents:
        stream, basis = _crossover(args, base, operators, seeding, weights)
    else:
        members = [weights.ModelDir(path) for path in args.aggregate]
        if args.scores is not None:
            _check_count("--scores", args.scores, members)
            betas = softmax(args.scores, args.temperature)
        elif args.weights is not None:
            _check_count("--weights", args.weights, members)
            betas = list(args.weights)
        else:
            betas = [1.0 / len(members)] * len(members)
        print("betas " + " ".join(f"{b:.6g}" for b in betas))
        if sparse:
            from cqd_mpi.merging.sparse import SparseMerge, sparse_merge_stream

            spec = SparseMerge(method=args.method, density=args.density, scale=args.scale,
                               weights=tuple(betas), seed=args.seed or 0).validate("--", len(members))
            stream = sparse_merge_stream(base=base, members=members, spec=spec)
        else:
            stream = operators.aggregate_stream(base=base, members=members, betas=betas)
    try:
        out = weights.write_hf_dir(stream, args.out, like=base, max_shard_size=args.max_shard_size)
    finally:
        if basis is not None:
            basis.close()
    print(f"wrote {out} in {time.perf_counter() - started:.2f} s")
    return 0


def _check_count(flag: str, values, members) -> None:
    if len(values) != len(members):
        raise ConfigError(
            f"{flag}: expected one value per --aggregate model ({len(members)}), got {len(values)}"
        )


def _crossover(args, base, operators, seeding, weights):
    if args.seed is None:
        raise ConfigError("--parents needs --seed")
    if (args.w1 is None) != (args.w2 is None):
        raise ConfigError("give both --w1 and --w2, or neither")
    parent1, parent2 = (weights.ModelDir(path) for path in args.parents)
    if args.w1 is None:
        w1, w2 = sample_crossover_weights(
            seeding.numpy_rng(args.seed, 0, "crossover"), args.mu, args.sigma
        )
    else:
        w1, w2 = args.w1, args.w2
        if abs(w1 + w2) < 1e-6:
            raise ConfigError(f"--w1 + --w2 must not be ~0, got {w1} + {w2}")
    w_max = args.w_max if args.w_max is not None else (0.1 if args.basis == "expert" else 0.3)
    mutation = MutationSpec(
        kind=args.mutation,
        basis=args.basis,
        rank=args.rank,
        w_max=w_max,
        sigma=args.gaussian_sigma,
        exclude=tuple(args.exclude),
        niter=args.niter,
        sketch_dtype=args.sketch_dtype,
    )
    basis = None
    if args.mutation == "svd" and args.basis == "expert":
        from cqd_mpi import locations
        from cqd_mpi.merging.basis import ExpertBasis, ensure_expert_basis

        if not args.expert:
            raise ConfigError(
                "--basis expert needs --expert, the model whose task-vector SVD is the basis"
            )
        path = ensure_expert_basis(
            base=base,
            expert=weights.ModelDir(args.expert),
            rank=args.rank,
            cache_dir=locations.basis_cache(args.cache_dir),
            exclude=args.exclude,
            niter=args.niter,
            sketch_dtype=args.sketch_dtype,
        )
        print(f"expert basis {path}")
        basis = ExpertBasis(path)
    elif args.expert:
        raise ConfigError("--expert is used only with --mutation svd --basis expert")
    print(f"w1 {w1:.6f} w2 {w2:.6f}")
    stream = operators.crossover_stream(
        base=base,
        parent1=parent1,
        parent2=parent2,
        w1=w1,
        w2=w2,
        mutation=mutation,
        seed=seeding.derive_seed(args.seed, 0, "mutation"),
        basis=basis,
    )
    return stream, basis
