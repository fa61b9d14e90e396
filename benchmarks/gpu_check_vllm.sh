#!/usr/bin/env bash
# Issue #20's checks on one GPU node, with the CUDA build of vLLM in its own venv
# (python -m venv V && V/bin/pip install '.[vllm,llm,mpich]' pytest): the in-place suite on
# cuda, the engine benchmark (8B shape, MBPP+ prompts, 512 new tokens, 50 updates) and the
# cost of a generation at paper scale. Logs go to OUT_DIR (default .bench/gpu-vllm).
#
#   CQD_VLLM_PYTHON=V/bin/python bash benchmarks/gpu_check_vllm.sh [OUT_DIR]
set -u
out=${1:-.bench/gpu-vllm}
py=${CQD_VLLM_PYTHON:?set CQD_VLLM_PYTHON to the python of the vLLM venv}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{ date -u; nvidia-smi -L; lscpu | grep -E '^(Model name|CPU\(s\))'
  "$py" -c "import torch, transformers, vllm
print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
} 2>&1 | tee "$out/versions.log"

CQD_VLLM_DEVICE=cuda timeout 900 "$py" -m pytest -p no:cacheprovider -ra -v tests/engines/vllm_suite.py 2>&1 \
    | tee "$out/suite.log"
timeout 3600 "$py" benchmarks/bench_engines.py --shape llama-3-8b --device cuda --prompts 164 --new-tokens 512 \
    --updates 50 2>&1 | tail -12 | tee "$out/bench_engines.log"
timeout 7200 "$py" benchmarks/bench_paper_scale.py --shape llama-3-8b --device cuda 2>&1 | tail -20 \
    | tee "$out/bench_paper_scale.log"
date -u | tee -a "$out/versions.log"
