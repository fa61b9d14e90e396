"""The `mpi` transport's broadcast into live models, under mpiexec, through every code path:
shared memory within a node, MPI_Bcast between (virtual) nodes, the same dtype received in
place, another dtype cast on arrival, chunks smaller than a tensor."""

import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, perturbed_copy, subprocess_env
from tests.runtime.helpers import run_command

pytestmark = pytest.mark.mpi
CHECK = Path(__file__).with_name("transport_check.py")
LARGE_CHECK = Path(__file__).with_name("large_transport_check.py")


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from cqd_mpi.engines.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("transport")
    live = build_tiny_llama(root / "live", seed=1, hidden_size=32, num_layers=2, num_heads=2)
    source = perturbed_copy(live, root / "source", seed=7, scale=0.1)
    model = AutoModelForCausalLM.from_pretrained(source).to(torch.bfloat16)
    model.save_pretrained(root / "source-bf16")
    return {"live": live, "source": source, "source_bf16": root / "source-bf16"}


ON_CUDA = pytest.mark.cuda


@pytest.mark.parametrize(("source", "live_dtype", "ranks_per_node", "chunk", "device"), [
    ("source", "float32", None, 4096, "cpu"),
    ("source", "float32", "1", 4096, "cpu"),
    ("source", "float32", "2", 1 << 20, "cpu"),
    ("source_bf16", "bfloat16", None, 1000, "cpu"),
    ("source_bf16", "float32", "2", 4096, "cpu"),
    pytest.param("source", "float32", None, 4096, "cuda", marks=ON_CUDA),
    pytest.param("source_bf16", "bfloat16", "1", 1000, "cuda", marks=ON_CUDA),
    pytest.param("source_bf16", "float32", "2", 4096, "cuda", marks=ON_CUDA),
])
def test_every_worker_ends_with_the_sent_weights(bf16_pair, source, live_dtype, ranks_per_node, chunk, device):
    if chunk % 8:
        chunk += 8 - chunk % 8
    env = subprocess_env(**({"CQD_MPI_RANKS_PER_NODE": ranks_per_node} if ranks_per_node else {}))
    result = run_command(["mpiexec", "-n", "3", sys.executable, "-m", "mpi4py", str(CHECK), str(bf16_pair[source]),
                          str(bf16_pair["live"]), live_dtype, str(chunk), device], env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transport ok on 3 ranks" in result.stdout


@pytest.mark.slow
def test_a_tensor_of_more_than_2_31_bytes_arrives_whole():
    """MPI counts are C ints: a 2.1 GB tensor must travel in bounded chunks, through the
    shared-memory window on one node and MPI_Bcast to the other."""
    elements = 2**30 + 2**19 + 3
    assert elements * 2 > 2**31
    env = subprocess_env(CQD_MPI_RANKS_PER_NODE="2")
    result = run_command(["mpiexec", "-n", "3", sys.executable, "-m", "mpi4py", str(LARGE_CHECK), str(elements)],
                         env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "large transport ok on 3 ranks" in result.stdout
