#!/usr/bin/env bash
# Stage 1 of DPT: Semi-ViT. MAE self-pre-training, supervised fine-tuning, EMA-Teacher
# semi-supervised fine-tuning, pseudo-labels for every training image.
# usage: scripts/stage1_semivit.sh configs/mnist5k.yaml [NPROC] [key=value ...]
source "$(dirname "$0")/_launch.sh"
usage_check "$@"
CONFIG=$1; shift
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NPROC=$1; shift; fi
for step in pretrain finetune semi pseudo-label; do
  launch semivit "$step" --allow-unread --config "$CONFIG" "$@"  # each step reads its own keys of "$@"
done
