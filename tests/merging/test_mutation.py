"""MutationSpec: the one definition of the mutation's settings, and its checks."""

import pytest
import torch

from cqd_mpi.errors import ConfigError
from cqd_mpi.merging.mutation import MutationSpec
from cqd_mpi.run.config import QDConfig


def test_mutation_spec_rejects_bad_values():
    with pytest.raises(
        ConfigError, match=r"mutation.kind: expected 'svd', 'gaussian' or 'none', got 'big'"
    ):
        MutationSpec(kind="big").validate()
    with pytest.raises(
        ConfigError, match=r"mutation.basis: expected 'child' or 'expert', got 'parent'"
    ):
        MutationSpec(basis="parent").validate()
    for rank in (0, -3, "half", True, 2.5):
        with pytest.raises(
            ConfigError, match=r"mutation.rank: expected 'full' or a positive integer"
        ):
            MutationSpec(rank=rank).validate()
    with pytest.raises(ConfigError, match=r"mutation.w_max: expected a number >= 0, got -0.1"):
        MutationSpec(w_max=-0.1).validate()
    with pytest.raises(ConfigError, match=r"mutation.sigma"):
        MutationSpec(sigma=-1.0).validate()
    with pytest.raises(ConfigError, match=r"mutation.exclude\[0\]: invalid regular expression '\('"):
        MutationSpec(exclude=("(",)).validate()
    with pytest.raises(
        ConfigError, match=r"mutation.sketch_dtype: expected 'float32' or 'bfloat16', got 'float16'"
    ):
        MutationSpec(sketch_dtype="float16").validate()


def test_a_low_precision_sketch_exists_only_for_a_truncated_svd():
    assert MutationSpec(rank=4, sketch_dtype="bfloat16").sketch == torch.bfloat16
    assert MutationSpec(rank="full", sketch_dtype="bfloat16").sketch is None
    assert MutationSpec(rank=4).sketch is None


def test_the_config_and_the_operators_share_one_mutation_default():
    assert QDConfig(generations=1).mutation == MutationSpec()
    assert MutationSpec().sigma == 0.001
