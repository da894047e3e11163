#!/usr/bin/env bash
# The whole DPT pipeline on the embedded MNIST-5k data set (stage 0 -> 1 -> 2 -> 3 -> report).
# Extra key=value arguments override configs/mnist5k.yaml, e.g. `bash scripts/demo.sh seed=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m dpt run --config configs/mnist5k.yaml "$@"
