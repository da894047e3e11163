#!/usr/bin/env bash
# Stage 1 of DPT: Semi-ViT. MAE self-pre-training, supervised fine-tuning, EMA-Teacher
# semi-supervised fine-tuning, pseudo-labels for every training image. MAE pre-training runs only
# when fine-tuning would start from it (model.init=auto); it is skipped when model.init names
# weights (a file or folder) or is none, in the config or on the command line.
# usage: scripts/stage1_semivit.sh configs/mnist5k.yaml [NPROC] [key=value ...]
source "$(dirname "$0")/_launch.sh"
usage_check "$@"
CONFIG=$1; shift
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then NPROC=$1; shift; fi
INIT=$("${BIN}python" -c 'import sys
from semivit.config.load import load_config
print(load_config(sys.argv[1], sys.argv[2:]).model.init)' "$CONFIG" "$@")
case "$INIT" in
  ""|auto) STEPS="pretrain finetune semi pseudo-label" ;;
  *) echo "model.init=$INIT: MAE pre-training skipped, fine-tuning starts from these weights" >&2
     STEPS="finetune semi pseudo-label" ;;
esac
for step in $STEPS; do
  launch semivit "$step" --allow-unread --config "$CONFIG" "$@"  # each step reads its own keys of "$@"
done
