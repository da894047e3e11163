# Sourced by the stage scripts. `launch MODULE ARGS...` runs one step of the pipeline on
# $NPROC processes: GPUs when there are any, else real CPU ranks (gloo).
# ACCELERATE_CONFIG=configs/accelerate/<file>.yaml selects a launch config (multi-GPU, multi-node).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# DPT_BIN: the folder of python and accelerate to use ("" = from PATH); default: the project's .venv
if [ -n "${DPT_BIN+x}" ]; then BIN=$DPT_BIN
elif [ -x .venv/bin/python ]; then BIN=.venv/bin/; else BIN=""; fi

launch() {
  local module=$1; shift
  if [ -n "${ACCELERATE_CONFIG:-}" ]; then
    "${BIN}accelerate" launch --config_file "$ACCELERATE_CONFIG" -m "$module" "$@"
  elif [ "${NPROC:-1}" -le 1 ]; then
    "${BIN}python" -m "$module" "$@"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${BIN}accelerate" launch --multi_gpu --num_processes "$NPROC" -m "$module" "$@"
  else
    ACCELERATE_USE_CPU=1 "${BIN}accelerate" launch --multi_gpu --num_processes "$NPROC" -m "$module" "$@"
  fi
}

usage_check() {
  if [ $# -lt 1 ] || [ ! -f "$1" ]; then
    echo "usage: $0 CONFIG.yaml [NPROC] [key=value ...]   (config '${1:-}' not found)" >&2
    exit 2
  fi
}
