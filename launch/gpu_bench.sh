#!/usr/bin/env bash
# LLaVA-1.5-7B train-step MFU on ONE lent GPU (an H200), random weights, no downloads.
#
#   launch/gpu_bench.sh                       # the default matrix, under 5 minutes
#   launch/gpu_bench.sh --batch 1             # if stage 2 runs out of memory at batch 2
#   launch/gpu_bench.sh --configs 2:cudnn:selective --steps 10
#   NEVA_JAX_GPU_PARITY=0 launch/gpu_bench.sh   # the benchmark alone
#
# Then runs the parity tests (tests/model, generation, loss, the CUDA lowering tests)
# on the GPU, fp32 matmuls at full precision (JAX_DEFAULT_MATMUL_PRECISION=highest).
#
# Runs `python -m neva_jax.bench.gpu` (see its docstring): Vicuna-7B + CLIP-L/14-336 +
# mlp2x_gelu, bf16 compute with fp32 master weights and Adam moments, scan over
# layers, packed rows of 2048 tokens. Configs (stage:attention:remat):
#   1:cudnn:selective  stage 1 (projector only; the LLM and vision tower frozen)
#   2:cudnn:full       stage 2, cuDNN flash attention, full remat per layer
#   2:cudnn:selective  stage 2, cuDNN, keep matmul outputs (recompute the rest)
#   2:xla:full         stage 2, XLA attention (vs cuDNN at the same remat)
# Each prints one JSON line: model TFLOP/s, MFU vs the 790 TFLOP/s measured bf16
# peak of an H200 (docs/REFERENCE.md "Measured peaks"), tokens/s (all and real), compile time,
# the program's memory and the device's peak memory; then a table and the MFU
# targets (stage 2 >= 50%, stage 1 >= 55%).
#
# XLA flags (the MaxText anchor of docs/REFERENCE.md "Measured peaks"; single-GPU subset):
#   --xla_gpu_enable_latency_hiding_scheduler=true
#       schedule asynchronous work (copies, collectives) to overlap compute.
#   --xla_gpu_enable_triton_gemm=false
#       GEMMs through cuBLAS(Lt) instead of Triton-generated kernels (MaxText and
#       JAX-Toolbox LLM recipes); our matmuls are large, plain bf16 GEMMs.
#   --xla_gpu_enable_command_buffer=
#       no CUDA graphs: MaxText's GPU recipes disable them; the step is one big
#       program where graph capture buys little.
# Multi-GPU recipes add the collective flags (--xla_gpu_enable_pipelined_all_gather,
# --xla_gpu_enable_pipelined_reduce_scatter, --xla_gpu_all_gather_combine_threshold_bytes,
# ...); with one GPU there is nothing to overlap, so they are left out.
# An unknown flag makes XLA abort at start-up, and flags come and go between
# releases: the flags are probed first and, if rejected, only the first is kept.
#
# Environment:
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.95  stage 2 keeps ~110 GB of fp32 weights and
#                                        Adam moments of the 141 GB (default 0.75)
#   JAX_COMPILATION_CACHE_DIR            a rerun skips compilation (minutes -> seconds)
#   PYTHON                               interpreter (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# A caching allocator for every process (neva_jax/allocator.py: the mimalloc wheel, else
# tcmalloc / jemalloc / tuned glibc; NEVA_JAX_ALLOCATOR=system opts out), exported here
# so that each process starts under it instead of re-executing itself.
allocator_env=$("$PYTHON" -m neva_jax.allocator --env) || exit 2
eval "$allocator_env"

FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false --xla_gpu_enable_command_buffer="
if ! XLA_FLAGS="$FLAGS" "$PYTHON" -c "import jax; jax.devices()" >/dev/null 2>&1; then
  echo "gpu_bench: XLA rejected '$FLAGS'; using --xla_gpu_enable_latency_hiding_scheduler=true only" >&2
  FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"
fi
export XLA_FLAGS="${XLA_FLAGS:-} $FLAGS"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/neva_jax_compile_cache}
export TOKENIZERS_PARALLELISM=false

backend=$("$PYTHON" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none)
if [[ "$backend" != "gpu" ]]; then
  echo "gpu_bench: JAX sees no GPU (backend '$backend'); install the CUDA build: pip install -e '.[cuda]'" >&2
  exit 2
fi
echo "gpu_bench: XLA_FLAGS=$XLA_FLAGS" >&2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader >&2 || true
"$PYTHON" -m neva_jax.bench.gpu "$@"

# Then the parity tests on the GPU (model vs transformers in fp32, generation, attention
# forms; about 2 minutes): fp32 matmuls at full precision, not TF32, for the 1e-4 bars.
# NEVA_JAX_GPU_PARITY=0 skips them; they need the test extra (pip install -e '.[test]').
if [[ "${NEVA_JAX_GPU_PARITY:-1}" == 0 ]]; then exit 0; fi
if ! "$PYTHON" -c "import pytest, torch, transformers" >/dev/null 2>&1; then
  echo "gpu_bench: parity tests skipped: pytest/torch/transformers missing (pip install torch==2.13.0 && pip install -e '.[test]')" >&2
  exit 0
fi
echo "gpu_bench: parity tests on the GPU" >&2
JAX_DEFAULT_MATMUL_PRECISION=highest "$PYTHON" -m pytest -q -p no:cacheprovider \
  tests/model tests/eval/test_generate.py tests/eval/test_loss.py tests/test_gpu_lowering.py
