#!/usr/bin/env bash
# The checks that need a GPU, on one GPU node: the `cuda` tests (live model, transport into
# CUDA parameters, a whole MPI run with GPU workers) and the transfer/overhead benchmark with
# the workers' live models on the GPU. Logs go to OUT_DIR (default .bench/gpu).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -u
out=${1:-.bench/gpu}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{ date -u; nvidia-smi -L; lscpu | grep -E '^(Model name|CPU\(s\))'
  python3 -c "import torch, transformers, mpi4py; from mpi4py import MPI
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__,
      '| mpi4py', mpi4py.__version__, '|', MPI.Get_library_version().splitlines()[0])"
} 2>&1 | tee "$out/versions.log"

timeout 240 python3 -m pytest -m cuda -p no:cacheprovider -ra -v \
    tests/engines/test_hf.py tests/runtime/test_transport.py tests/runtime/test_mpi.py 2>&1 | tee "$out/pytest.log"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$out/pytest.log"

timeout 40 mpiexec -n 3 python3 -m cqd_mpi doctor 2>&1 | tee "$out/doctor.log"

timeout 240 python3 benchmarks/bench_runtime.py --device cuda --skip-demo --generations 4 \
    --work .bench/runtime-gpu 2>&1 | tee "$out/bench_runtime.log"
timeout 120 python3 benchmarks/generate_probe.py .bench/merge/models/base cuda 1 16 64 128 2>&1 | tail -3 \
    | tee "$out/generate.log"
tar czf "$out/runtime-logs.tgz" -C .bench/runtime-gpu logs 2>/dev/null || true
date -u | tee -a "$out/versions.log"
