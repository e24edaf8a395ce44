#!/usr/bin/env bash
# Train, evaluate or plan on ONE host: one process drives every local device (GPUs, or
# the CPU). Multi-host runs use launch/slurm.sbatch; several processes on one machine
# (a test of the multi-host path) launch/multiprocess_cpu.sh.
#
#   launch/local.sh CONFIG WORKDIR [--mode train|eval|plan] [--config.KEY=VALUE ...]
#
#   launch/local.sh configs/tiny.py:stage1,data_dir=/tmp/neva_synth /tmp/tiny_stage1
#   launch/local.sh configs/llava_v15.py:stage2,data_dir=/data/llava,init=/runs/s1 /runs/s2 \
#       --config.mesh.data=1 --config.mesh.fsdp=8
#   launch/local.sh configs/llava_v15.py:stage2,size=13b /tmp/plan --mode plan \
#       --config.plan.num_devices=8 --config.mesh.data=1 --config.mesh.fsdp=8 \
#       --config.plan.device_memory_gb=141
#
# A rerun with the same WORKDIR resumes from its newest complete checkpoint;
# `kill PID` (SIGTERM) saves a checkpoint at the current step and exits 0.
#
# Environment (each can be overridden):
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.95   JAX preallocates 75% of GPU memory by default;
#                                         stage 2 needs most of it (see --mode plan)
#   XLA_FLAGS += --xla_gpu_enable_latency_hiding_scheduler=true
#                                         overlap collectives/copies with compute
#   JAX_COMPILATION_CACHE_DIR=WORKDIR/../.jax_cache   a restart skips compilation
#   PYTHON                                interpreter (default .venv/bin/python, else python3)
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
# WORKDIR is taken from the current directory; CONFIG's file from the repository root
# (the script runs there), so give a data_dir= inside CONFIG as an absolute path.
[[ $workdir == /* ]] || workdir="$PWD/$workdir"
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
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(dirname "$workdir")/.jax_cache}
export TOKENIZERS_PARALLELISM=false

exec "$PYTHON" -m neva_jax.main --config="$config" --workdir="$workdir" "$@"
