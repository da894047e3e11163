"""Smoke mode (``smoke=true``): the whole config, end to end, on a few images and a few steps.

A smoke run is a check before a long run: it proves that a config's models, weight files,
precision and data layout work together through every stage, and that every file a real run
writes gets written, in minutes on one machine instead of GPU-days.

What smoke KEEPS (everything that decides whether a run can work):
  * the models: model.name, global_pool, drop_path, model.init (the user's MAE weights), the
    diffusion model (dit/unet, width, depth, heads, patch size), MAE's decoder;
  * the resolution and channels: data.image_size, data.channels, diffusion.image_size, the
    augmentation recipe (data.transforms, RandAugment, random erasing, flips, crop padding);
  * the precision: pretrain/finetune/semi/diffusion .amp, and grad_accum (the accumulation path;
    one derived from a global batch is capped at SMOKE_MAX_ACCUM) and the lr the launch derived;
  * the user's files: diffusion.vae, fid.inception_weights, fid.classifier, the data set;
  * the method: fid.features, the noise schedule and prediction type, the sampler and guidance
    scale, the EMA settings, mixup/cutmix, pseudo mixup, tau, dist_align, the label count;
  * the files it writes: every file a real run writes, into ``<output_dir>_smoke`` (unless the
    folder's name already ends in "smoke"), never into a real run's folder.

What smoke SHRINKS (only the amount of work):
  * data: the first few training images of each class (the labeled ones plus
    SMOKE_UNLABELED_PER_CLASS unlabeled ones, so the semi stage has images to pseudo-label) and
    SMOKE_TEST_PER_CLASS held-out images per class; no loader worker processes;
  * training: one epoch per stage (pretrain, finetune, semi, judge, diffusion) with per-process
    batches of SMOKE_BATCH, semi.mu <= SMOKE_MU and SMOKE_SEMI_STEPS steps per semi epoch;
    warm-up shortened to fit in that epoch, no evaluation during training (the final one runs);
  * generation: SMOKE_GENERATE_PER_CLASS images per class with SMOKE_SAMPLER_STEPS sampler steps;
    stage 3 uses all of them; FID and class accuracy are computed on those few images.

The numbers a smoke run reports mean nothing; its files and its exit status are the result.
The split of the labeled images from a CSV (data.label_csv) indexes the full data set, so a smoke
run draws the same number of labels per class instead. The stages themselves (not this module)
stop each training stage after a couple of optimizer steps when ``cfg.smoke`` is set.
"""

from __future__ import annotations

import copy

from semivit.config.schema import Config, DataConfig

# per-process batch of every stage: even, so timm Mixup/CutMix and pseudo mixup still apply
SMOKE_BATCH = 2
SMOKE_MU = 2  # unlabeled batch = mu x batch: enough for a teacher/student step, small enough for ViT-H
SMOKE_SEMI_STEPS = 2
# unlabeled images kept per class: the semi stage needs mu x batch unlabeled images per step
SMOKE_UNLABELED_PER_CLASS = 3
SMOKE_TEST_PER_CLASS = 2
SMOKE_GENERATE_PER_CLASS = 2
SMOKE_SAMPLER_STEPS = 2
# warm-up as a share of the single smoke epoch: half warm-up, half cosine, so both run
SMOKE_WARMUP_EPOCHS = 0.5
SMOKE_WARMUP_STEPS = 1
# the largest per-class cap smoke looks at when a label percentage must leave unlabeled images
_MAX_SMOKE_PER_CLASS = 1000


def apply_smoke(cfg: Config) -> Config:
    """A copy of ``cfg`` shrunk to a smoke run; ``cfg`` itself unchanged, the same copy when
    ``cfg.smoke`` is false. Applying it twice gives what applying it once gives."""
    out = copy.deepcopy(cfg)
    if not cfg.smoke:
        return out
    _shrink_data(out)
    _shrink_classifier_stages(out)
    _shrink_diffusion(out)
    _shrink_generation(out)
    out.stop_after_epoch = 0  # the single smoke epoch must finish
    out.output_dir = smoke_output_dir(cfg.output_dir)
    return out


def smoke_output_dir(output_dir: str) -> str:
    """A smoke run never writes into a real run's folder (its checkpoints of other settings would
    be dropped and its results replaced): ``runs/x`` becomes ``runs/x_smoke``; a folder whose name
    already ends in ``smoke`` is kept."""
    path = str(output_dir).rstrip("/")
    return path if path.lower().endswith("smoke") else path + "_smoke"


def train_images_per_class(data: DataConfig) -> int:
    """The per-class cap that leaves every class its labeled images plus
    SMOKE_UNLABELED_PER_CLASS unlabeled ones under the config's labeling rule."""
    if data.label_percent <= 0:
        return max(1, data.labels_per_class) + SMOKE_UNLABELED_PER_CLASS
    # the split labels max(1, round(n * percent / 100)) of a class of n images (semivit.data)
    for n in range(1 + SMOKE_UNLABELED_PER_CLASS, _MAX_SMOKE_PER_CLASS + 1):
        if n - _labeled_of(n, data.label_percent) >= SMOKE_UNLABELED_PER_CLASS:
            return n
    return _MAX_SMOKE_PER_CLASS  # ~100 % labeled: no cap leaves unlabeled images; the config says so


def _labeled_of(n: int, percent: float) -> int:
    return max(1, int(round(n * percent / 100.0)))


def _shrink_data(cfg: Config) -> None:
    d = cfg.data
    if d.label_csv:
        # a split file indexes the whole data set, which smoke caps; draw as many labels per class
        d.label_csv = ""
        d.labels_per_class = max(1, d.labels_per_class)
    needed = train_images_per_class(d)
    # a larger cap set on the command line (more images for the smoke run) is kept
    d.max_train_per_class = max(needed, d.max_train_per_class)
    d.max_test_per_class = d.max_test_per_class or SMOKE_TEST_PER_CLASS
    # the per-class caps bound the work; a global cap on a class-sorted folder could empty classes
    d.max_train = 0
    d.max_test = 0
    d.num_workers = 0


def _shrink_classifier_stages(cfg: Config) -> None:
    for section in (cfg.pretrain, cfg.finetune, cfg.semi):
        section.epochs = 1
        section.batch_size = SMOKE_BATCH
        _keep_launch_layout(section)
        section.warmup_epochs = min(section.warmup_epochs, SMOKE_WARMUP_EPOCHS)
    cfg.finetune.eval_every = 0
    cfg.semi.eval_every = 0
    cfg.semi.mu = min(cfg.semi.mu, SMOKE_MU)
    cfg.semi.steps_per_epoch = SMOKE_SEMI_STEPS
    # two steps from a barely trained model say nothing about pseudo-label collapse
    cfg.semi.stop_on_collapse = False
    cfg.pseudo_label.batch_size = SMOKE_BATCH
    cfg.pipeline.judge_epochs = 1


SMOKE_MAX_ACCUM = 2  # a derived accumulation (a large global batch on one process) runs as 2 micro-batches


def _keep_launch_layout(section) -> None:
    """The lr the launch derived from global_batch / blr stays, and so does the accumulation path
    (a derived accumulation above SMOKE_MAX_ACCUM runs as SMOKE_MAX_ACCUM micro-batches: a global
    batch of 512 on one process would otherwise make every smoke step 8 micro-batches); the
    recipe's global batch is dropped so the smoke batch is not derived again from it."""
    if section.global_batch > 0:
        section.grad_accum = min(section.grad_accum, SMOKE_MAX_ACCUM)
    section.global_batch, section.blr, section.max_device_batch = 0, 0.0, 0


def _shrink_diffusion(cfg: Config) -> None:
    dc = cfg.diffusion
    dc.epochs = 1
    dc.batch_size = SMOKE_BATCH
    _keep_launch_layout(dc)
    dc.warmup_steps = min(dc.warmup_steps, SMOKE_WARMUP_STEPS)
    dc.sample_every = 0  # the sample grid at the end of training (VAE decode included)
    dc.checkpoint_every = 1  # resumable state saved every epoch, as a long run would


def _shrink_generation(cfg: Config) -> None:
    g = cfg.generate
    g.num_per_class = SMOKE_GENERATE_PER_CLASS
    g.steps = SMOKE_SAMPLER_STEPS
    g.batch_size = SMOKE_BATCH
    cfg.fid.batch_size = SMOKE_BATCH
    cfg.retrain.synthetic_per_class = 0  # all of the few generated images


def smoke_overrides(cfg: Config) -> list[str]:
    """The ``key=value`` settings that turn ``cfg`` into ``apply_smoke(cfg)``: what a smoke run
    changes, for its log, or to run the same shrunk pipeline by hand with plain overrides."""
    from semivit.config.schema import to_dict

    after = to_dict(apply_smoke(cfg))
    pairs = _flat_diff(to_dict(cfg), after)
    # a section whose global batch smoke drops keeps its derived lr and accumulation: state them,
    # or reading the file again would not derive them
    dropped = {key.split(".")[0] for key, _ in pairs if key.endswith((".global_batch", ".blr"))}
    pairs += [(f"{sec}.{k}", after[sec][k]) for sec in sorted(dropped) for k in ("lr", "grad_accum")
              if (f"{sec}.{k}", after[sec][k]) not in pairs]
    return [f"{key}={_yaml_value(value)}" for key, value in pairs]


def _flat_diff(before: dict, after: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, dict):
            out += _flat_diff(old or {}, value, f"{prefix}{key}.")
        elif value != old:
            out.append((f"{prefix}{key}", value))
    return out


def _yaml_value(value) -> str:
    """A value as the override parser reads it back (YAML): '' for an empty string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value == "" else str(value)
