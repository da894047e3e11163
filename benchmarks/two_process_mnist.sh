#!/usr/bin/env bash
# The whole MNIST-5k pipeline on N real CPU ranks (gloo), against the 1-process run of the same seed.
#
#   bash benchmarks/two_process_mnist.sh [SEED] [NPROC]        # defaults: seed 0, 2 processes
#
# Batch sizes in the configs are per process. To train the same recipe (same global batch, same
# number of optimizer steps, same lr schedule) on N ranks, each per-process batch is divided by N
# here. Runs go to runs/bench/two_process_mnist/mnist5k_${NPROC}proc_seed$SEED; the 1-process run is runs/mnist5k_seed$SEED
# (made with `python -m dpt run --config configs/mnist5k.yaml seed=$SEED output_dir=runs/mnist5k_seed$SEED`).
set -euo pipefail
cd "$(dirname "$0")/.."
SEED=${1:-0}
NPROC=${2:-2}
BIN=""; [ -x .venv/bin/python ] && BIN=.venv/bin/
OUT=runs/bench/two_process_mnist/mnist5k_${NPROC}proc_seed$SEED
if ! [[ "$NPROC" =~ ^[0-9]+$ ]] || [ "$NPROC" -lt 1 ] || [ $(( 16 % NPROC )) -ne 0 ]; then
  echo "NPROC '$NPROC': must divide the config's batch sizes (16, 32, 128): use 1, 2, 4, 8 or 16" >&2
  exit 2
fi
per_proc() { echo $(( $1 / NPROC )); }
start=$(date +%s)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ACCELERATE_USE_CPU=1 "${BIN}accelerate" launch --multi_gpu \
  --num_processes "$NPROC" -m dpt run --config configs/mnist5k.yaml seed="$SEED" output_dir="$OUT" \
  pretrain.batch_size="$(per_proc 128)" finetune.batch_size="$(per_proc 32)" \
  semi.batch_size="$(per_proc 16)" diffusion.batch_size="$(per_proc 32)"
echo "wall time: $(( ($(date +%s) - start) / 60 )) min"
"${BIN}python" -m benchmarks.summarize_runs "runs/mnist5k_seed$SEED" "$OUT"
