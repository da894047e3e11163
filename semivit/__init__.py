"""Semi-ViT: MAE self-pre-training, supervised fine-tuning, EMA-Teacher semi-supervised fine-tuning.

Rooms, from the bottom up (a module imports only from rooms below its own):

- ``errors``: every error class (a leaf); ``files``: atomic writes, JSON, safe weight files.
- ``config/``: the settings schema and its rules, loading with ``base:`` and overrides, smoke mode.
- ``runtime/``: the Accelerator, the one training loop, the run folder layout, the run lock, the
  command-line error policy.
- ``data/``: image sources, the labeled split, the views; ``models/``: ViT classifiers and the MAE.
- ``stages/``: pretrain, finetune, semi (with its losses in ``ssl``), evaluate, pseudo-label.
- ``cli``: the ``semivit`` command.
"""
