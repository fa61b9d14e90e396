"""`python -m cqd_mpi similarity A B --base BASE`: the paper's model-similarity metric."""

from __future__ import annotations

HELP = "mean cosine similarity of the singular values of two models' task vectors"


def add_arguments(parser) -> None:
    parser.add_argument("a", help="first model dir")
    parser.add_argument("b", help="second model dir")
    parser.add_argument(
        "--base", required=True, help="the base model dir both task vectors are taken against"
    )
    parser.add_argument(
        "--exclude", nargs="+", default=[], metavar="REGEX", help="tensor names to leave out"
    )


def run(args) -> int:
    from cqd_mpi.merging.operators import model_similarity
    from cqd_mpi.merging.weights import ModelDir

    base, a, b = ModelDir(args.base), ModelDir(args.a), ModelDir(args.b)
    print(f"{model_similarity(base=base, a=a, b=b, exclude=args.exclude):.6f}")
    return 0
