#!/usr/bin/env bash
# Stage 2 of DPT: a class-conditional diffusion model trained on the stage-1 pseudo-labels,
# then a labeled synthetic data set sampled from it with classifier-free guidance.
# usage: scripts/stage2_diffusion.sh configs/mnist5k.yaml [NPROC] [key=value ...]
source "$(dirname "$0")/_launch.sh"
usage_check "$@"
CONFIG=$1; shift
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NPROC=$1; shift; fi
launch dpt train-diffusion --allow-unread --config "$CONFIG" "$@"
launch dpt generate --allow-unread --config "$CONFIG" "$@"
