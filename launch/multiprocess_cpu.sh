#!/usr/bin/env bash
# N processes on this machine, each with D simulated CPU devices, joined by JAX's
# distributed runtime into one N*D-device mesh: the multi-host code path (process 0
# coordinates, per-process data shards, collective checkpoints) without a cluster.
#
#   launch/multiprocess_cpu.sh [-n N] [-d D] CONFIG WORKDIR [--config.KEY=VALUE ...]
#
#   python -m neva_jax.data synth --out /tmp/neva_synth --n-train 512 --n-eval 64
#   launch/multiprocess_cpu.sh -n 2 -d 4 configs/tiny.py:stage1,data_dir=/tmp/neva_synth \
#       /tmp/mp_run --config.mesh.data=4 --config.mesh.tensor=2
#
# Defaults: N=2 processes, D=4 devices each. The coordinator listens on 127.0.0.1 at a
# free port; each process gets --config.distributed.{coordinator_address,num_processes,
# process_id}. Output lines are prefixed [pI]. If one process fails the others are
# stopped and the script exits with its status; SIGTERM/SIGINT to the script is passed
# to every process (they agree on a step, save a checkpoint there and exit 0).
set -euo pipefail
n=2
d=4
while getopts "n:d:" opt; do
  case $opt in
    n) n=$OPTARG ;;
    d) d=$OPTARG ;;
    *) sed -n '2,16p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ $# -lt 2 ]]; then
  sed -n '2,16p' "$0" >&2
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
port=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$d"
export TOKENIZERS_PARALLELISM=false

pids=()
stop_all() {
  # `|| true`: a peer that already exited is no error (set -e would end the script
  # here, with status 1 and the other processes left running).
  for pid in "${pids[@]}"; do [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true; done
  return 0
}
trap 'stop_all' TERM INT
for ((i = 0; i < n; i++)); do
  "$PYTHON" -m neva_jax.main --config="$config" --workdir="$workdir" \
    --config.distributed.coordinator_address="127.0.0.1:$port" \
    --config.distributed.num_processes="$n" --config.distributed.process_id="$i" \
    "$@" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done

# Poll: the first process to fail stops the others (they would wait in a collective).
status=0
failed_at=0
while :; do
  running=0
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -z "$pid" ]] && continue
    if kill -0 "$pid" 2>/dev/null; then running=1; continue; fi
    rc=0
    wait "$pid" || rc=$?
    pids[$i]=""
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
      status=$rc
      echo "multiprocess_cpu: process $i exited with status $rc; stopping the others" >&2
      failed_at=$SECONDS
      stop_all
    fi
  done
  [[ $running -eq 1 ]] || break
  if [[ $status -ne 0 && $((SECONDS - failed_at)) -gt 30 ]]; then
    # Peers of a dead process can block in a collective: SIGTERM is not enough.
    for pid in "${pids[@]}"; do [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true; done
  fi
  sleep 0.5
done
exit $status
