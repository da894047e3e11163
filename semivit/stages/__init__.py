"""The Semi-ViT stages: MAE pre-training, supervised fine-tuning, the EMA-Teacher semi stage (its
loss math in ``ssl``), evaluation and pseudo-labeling, with what they share (``common``,
``class_checks``)."""
