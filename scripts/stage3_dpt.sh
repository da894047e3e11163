#!/usr/bin/env bash
# Stage 3 of DPT: Semi-ViT retrained with real labeled + synthetic images, then the report
# (top-1 of every classifier, FID and class accuracy of the synthetic set).
# usage: scripts/stage3_dpt.sh configs/mnist5k.yaml [NPROC] [key=value ...]
source "$(dirname "$0")/_launch.sh"
usage_check "$@"
CONFIG=$1; shift
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NPROC=$1; shift; fi
launch dpt retrain --allow-unread --config "$CONFIG" "$@"
launch dpt run --config "$CONFIG" "$@"   # stages 0-3 are done by now: this trains the judge if missing and reports
