"""Experiment configuration: one YAML file per experiment, overridable with ``key=value`` pairs.

Every stage reads its own section (``pretrain``, ``finetune``, ``semi`` ...) plus the shared
``data`` and ``model`` sections. The resolved config is saved next to each stage's results, so a
result can always be traced back to the exact settings that produced it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semivit.errors import ConfigError


@dataclass
class DataConfig:
    name: str = "mnist5k"  # mnist5k | digits | imagefolder | cifar10 | cifar100
    root: str = ""  # folder for imagefolder / cifar data sets
    image_size: int = 28  # side in pixels every image is resized to for the classifier stages
    channels: int = 0  # 0: the data set's own (1 for digits, 3 otherwise); 1 or 3 to force
    labels_per_class: int = 10  # labeled images per class (used when label_percent is 0)
    label_percent: float = 0.0  # percent of each class that is labeled, (0, 100] (>0 overrides labels_per_class)
    label_csv: str = ""  # load the labeled split from this CSV instead of drawing it (overrides both)
    unlabeled_includes_labeled: bool = False  # the labeled images join the unlabeled set too (Semi-ViT, ImageNet)
    # your own data (imagefolder): root/labeled/<class>/ + root/unlabeled/ (+ val/), or list files.
    # These images ARE the labeled set (no split is drawn, labels_per_class etc. are unused)
    labeled_csv: str = ""  # CSV 'path,label' (label = class name; paths relative to the CSV's folder)
    unlabeled: str = ""  # folder (any depth) or list file (one path per line) of unlabeled images
    val_csv: str = ""  # CSV 'path,label' of held-out images (instead of root/val/)
    skip_unreadable: bool = False  # leave out images that cannot be read (listed in <run>/skipped_images.txt)
    # subsets in source order; the per-class caps apply first, the class list never changes
    max_train: int = 0  # >0: use only the first N training images (quick experiments, tests)
    max_test: int = 0  # >0: use only the first N held-out images
    max_train_per_class: int = 0  # >0: the first N training images of each class (smoke runs)
    max_test_per_class: int = 0  # >0: the first N held-out images of each class
    # augmentation recipe, and which of the settings below it reads:
    #   small: for 28-32 px data. Weak: resize + random translation (crop_padding) + flip (hflip).
    #     Strong and labeled: weak + torchvision RandAugment (randaug_num_ops, randaug_magnitude on
    #     torchvision's 0-30 scale) + random erasing (random_erasing). Test: resize. Pre-training: weak.
    #   semivit: the published Semi-ViT views (ImageNet), bicubic throughout, crop_padding unused.
    #     Labeled and strong: RandomResizedCrop (scale 0.08-1) + flip (hflip) + timm RandAugment
    #     rand-m{randaug_magnitude}-n{randaug_num_ops}-mstd0.5-inc1 (timm's 0-10 scale; published m9 n2)
    #     + pixel random erasing (random_erasing). Weak: RandomResizedCrop + flip + ColorJitter 0.4.
    #     Test: resize to image_size/0.875 (up to 224 px; image_size above) + centre crop.
    #     Pre-training: MAE's RandomResizedCrop (scale 0.2-1) + flip.
    transforms: str = "small"
    hflip: bool = False  # never for digits
    crop_padding: int = 2  # small only: random translation by padding + random crop (pixels at image_size)
    randaug_num_ops: int = 2  # 0: no RandAugment
    randaug_magnitude: int = 10  # RandAugment strength (scale: see transforms above)
    random_erasing: float = 0.25  # probability; Semi-ViT's value differs by stage in some settings (see configs)
    num_workers: int = 0  # data-loader worker processes per rank (0: load in the training process)
    # the training set's size for `plan` where the data is not at hand (imagefolder); 0: count it
    train_images: int = 0
    train_classes: int = 0  # its classes (with train_images)


@dataclass
class ModelConfig:
    name: str = "vit_compact_patch4"  # a small ViT of this project or any timm model (vit_*, resnet18, convnext_atto, ...)
    drop_path: float = 0.1  # stochastic depth rate of the classifier (fine-tuning and semi stages)
    global_pool: str = "avg"  # Semi-ViT pools the patch tokens; ViTs: avg|token|max|avgmax|map, CNNs: avg|max|avgmax|catavgmax
    # ResNet / ConvNeXt stem: native (timm's, total stride 32) | small (stride-1 stem, total stride 8, for
    # 16-32 px images) | auto (small below 64 px). Other models ignore auto and native.
    stem: str = "auto"
    init: str = "auto"  # auto (stage-0 encoder of this run if present) | none | PATH to weights


@dataclass
class PretrainConfig:
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 5
    mask_ratio: float = 0.75  # share of patches MAE hides from the encoder
    decoder_dim: int = 96  # width of MAE's decoder (thrown away after pre-training)
    decoder_depth: int = 2  # transformer blocks of the decoder
    decoder_heads: int = 4  # attention heads of the decoder
    norm_pix_loss: bool = True  # reconstruct each patch normalised by its own mean and std (MAE's better target)
    amp: str = "no"  # no | fp16 | bf16
    grad_accum: int = 1
    # the launch-independent recipe (0: unset, batch_size / grad_accum / lr above are used as given):
    # global_batch = per-process batch x processes x accumulation; with it set, the per-process
    # batch and the accumulation are derived from the launch (semivit.config.scaling)
    global_batch: int = 0
    blr: float = 0.0  # > 0: lr = blr x global batch / 256 (the originals' rule), replacing lr
    max_device_batch: int = 0  # > 0: at most this many images per device per micro-batch (memory cap)


@dataclass
class FinetuneConfig:
    epochs: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    warmup_epochs: float = 5
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float = 0.999
    clip_grad: float = 0.0
    amp: str = "no"
    grad_accum: int = 1
    # the launch-independent recipe (0: unset, batch_size / grad_accum / lr above are used as given):
    # global_batch = per-process batch x processes x accumulation; with it set, the per-process
    # batch and the accumulation are derived from the launch (semivit.config.scaling)
    global_batch: int = 0
    blr: float = 0.0  # > 0: lr = blr x global batch / 256 (the originals' rule), replacing lr
    max_device_batch: int = 0  # > 0: at most this many images per device per micro-batch (memory cap)
    eval_every: int = 50  # epochs between evaluations on the held-out split (0: only at the end)


@dataclass
class SemiConfig:
    epochs: int = 15
    batch_size: int = 16  # labeled images per step (per process); the unlabeled batch is mu * batch_size
    mu: int = 5  # unlabeled images per labeled image in a step
    tau: float = 0.7  # confidence threshold: an unlabeled image counts only if the teacher's top probability reaches it
    lambda_u: float = 5.0  # weight of the unlabeled loss against the labeled one
    teacher: str = "ema"  # ema (EMA-Teacher) | student (FixMatch)
    ema_decay: float = 0.999  # 0.9999 at ImageNet scale; a few hundred steps need a faster teacher
    pseudo_mixup: bool = True  # probabilistic pseudo mixup: mix unlabeled pairs in the ratio of their confidences
    pseudo_mixup_cutmix_prob: float = 0.5  # pseudo mixup: share of pairs CutMix-ed (the others Mixup-ed)
    # distribution alignment of the teacher's probabilities: none | uniform | labeled (the labeled
    # set's class shares); counters pseudo-labels piling up on a few classes with 1-2 labels per class
    dist_align: str = "none"
    dist_align_momentum: float = 0.99  # running mean of the teacher's class shares that alignment divides by
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    warmup_epochs: float = 2
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    clip_grad: float = 0.0
    amp: str = "no"
    grad_accum: int = 1
    # the launch-independent recipe (0: unset, batch_size / grad_accum / lr above are used as given):
    # global_batch (labeled images) = per-process batch x processes x accumulation; with it set, the per-process
    # batch and the accumulation are derived from the launch (semivit.config.scaling)
    global_batch: int = 0
    blr: float = 0.0  # > 0: lr = blr x global batch / 256 (the originals' rule), replacing lr
    max_device_batch: int = 0  # > 0: at most this many images per device per micro-batch (memory cap)
    collapse_min_classes: float = 0.5  # warn when pseudo-labels cover fewer than this share of classes
    stop_on_collapse: bool = False  # end the stage with an error instead of a warning (collapse_min_classes)
    stop_on_nonfinite: bool = True  # a NaN/inf loss ends the stage with an error; false: the step is skipped
    eval_every: int = 5
    steps_per_epoch: int = 0  # 0: one pass over the unlabeled set


@dataclass
class PseudoLabelConfig:
    batch_size: int = 256
    use_ema: bool = True  # label with the EMA teacher of stage 1b (false: its student)


@dataclass
class PredictConfig:
    images: str = ""  # folder (any depth) or list file of the images to label
    out: str = ""  # CSV to write; empty: <output_dir>/predictions/<checkpoint folder name>.csv
    batch_size: int = 64
    use_ema: bool = True  # the EMA (teacher) weights when the folder has them


@dataclass
class ExportConfig:
    out: str = ""  # folder of the ImageFolder to write; empty: <output_dir>/pseudo_labeled
    mode: str = "link"  # link (symbolic links) | copy
    min_confidence: float = 0.0  # leave out pseudo-labels below this confidence
    include_labeled: bool = True  # the given labeled images too (confidence 1)


@dataclass
class DiffusionConfig:
    model: str = "dit"  # dit (DiTTransformer2DModel) | unet (UNet2DModel)
    image_size: int = 0  # the generator's resolution (pixel space) or the VAE's input size; 0: data.image_size
    patch_size: int = 4  # DiT: side of the square patches (tokens = (size / patch)^2)
    hidden_size: int = 128  # 128 x 4 blocks: trains + samples 1000 digits in ~12 min on 2 CPU cores
    depth: int = 4  # DiT: transformer blocks
    num_heads: int = 4  # DiT: attention heads
    unet_channels: list = field(default_factory=lambda: [64, 128, 128])  # UNet: channels per resolution level
    unet_layers_per_block: int = 1  # UNet: residual blocks per level
    unet_attention_levels: int = 1  # self-attention in the lowest N resolutions of the UNet
    vae: str = ""  # local AutoencoderKL folder: train in its latent space
    cache_latents: bool = True  # latent space: encode the training images once (both flips), reuse the cache
    # values stored in the latent cache (memory-mapped .npy shards on disk): float32 | float16 (half the disk
    # and page cache; the posterior mean and std round to ~3 significant digits)
    latent_dtype: str = "float32"
    labels: str = "auto"  # auto (this run's pseudo_labels.csv) | true | PATH to a labels CSV
    min_confidence: float = 0.0  # train only on pseudo-labels at least this confident
    max_per_class: int = 0  # >0: at most the N most confident images of each class
    p_uncond: float = 0.1  # share of training images whose class is dropped (classifier-free guidance)
    num_train_timesteps: int = 1000  # noise levels of the forward process
    beta_schedule: str = "squaredcos_cap_v2"  # noise schedule (diffusers' names; squaredcos_cap_v2 = cosine)
    prediction_type: str = "epsilon"  # the network's target: epsilon (the noise) | sample (clean image) | v_prediction
    # > 0: min-SNR-gamma loss weights (e.g. 5): nearly clean noise levels count as much as the
    # class-deciding noisy ones; 0: every noise level's MSE counts the same
    min_snr_gamma: float = 0.0
    epochs: int = 15
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200  # optimizer steps of linear lr warm-up
    ema_decay: float = 0.999
    ema_warmup: bool = True  # the EMA decay grows towards ema_decay over the first steps (diffusers' EMAModel warm-up)
    clip_grad: float = 1.0
    hflip: bool = False  # random horizontal flips of the training images (never for digits)
    amp: str = "no"
    grad_accum: int = 1
    # the launch-independent recipe (0: unset, batch_size / grad_accum / lr above are used as given):
    # global_batch = per-process batch x processes x accumulation; with it set, the per-process
    # batch and the accumulation are derived from the launch (semivit.config.scaling)
    global_batch: int = 0
    blr: float = 0.0  # > 0: lr = blr x global batch / 256 (the originals' rule), replacing lr
    max_device_batch: int = 0  # > 0: at most this many images per device per micro-batch (memory cap)
    # constant (DiT's published schedule: warm-up, then the lr throughout) | cosine (warm-up, then
    # cosine decay to a tenth of the lr)
    lr_schedule: str = "cosine"
    # dit: DiT's published initialisation (adaLN-Zero: every block's modulation and the final layer
    # start at zero, Xavier-uniform linear layers); diffusers: DiTTransformer2DModel's own (PyTorch's
    # defaults), which the MNIST-5k results in docs/results.md were measured with
    init: str = "dit"
    sample_every: int = 0  # steps between sample grids (0: at the end of each 10th epoch)
    checkpoint_every: int = 1  # epochs between resumable checkpoints (0: none)


@dataclass
class GenerateConfig:
    model: str = ""  # diffusers folder; default: this run's stage2/model
    out: str = ""  # default: this run's synthetic/
    num_per_class: int = 100  # images generated for each class
    classes: str = ""  # comma-separated class names or ids; empty: all
    guidance_scale: float = 2.0  # classifier-free guidance weight (1: no guidance)
    guidance_min_t: float = 0.0  # > 0: guide only steps with t >= this share of the timesteps (e.g. 0.3)
    sampler: str = "dpmsolver++"  # ddpm | ddim | dpmsolver++ | sde-dpmsolver++ (stochastic, as DDPM)
    steps: int = 25  # sampler steps per image
    batch_size: int = 250
    seed: int = 0  # each image's noise comes from (seed, class, index): any rank count makes the same images


@dataclass
class FIDConfig:
    real: str = ""  # folder of images, or "test" / "train" for the configured data set
    fake: str = ""  # folder of generated images (default: this run's synthetic/)
    features: str = "classifier"  # inception | classifier
    inception_weights: str = ""  # local file of the FID Inception-v3 weights
    classifier: str = ""  # classifier folder for in-domain features and synthetic class accuracy
    per_class: bool = False  # also FID per class (keeps every feature in memory: small data only)
    batch_size: int = 250
    out: str = ""  # JSON path; default next to the fake images
    # the reference set, when set in place of fid.real: train | val (the configured data set's splits) or
    # FILE.npz (statistics with arrays mu, sigma, e.g. ADM's VIRTUAL_imagenet256_labeled.npz)
    reference: str = ""
    reference_samples: int = 0  # images of the reference set, spread evenly over it; 0: all
    num_samples: int = 0  # generated images used, spread evenly over the set (50000 for ImageNet); 0: all
    # Inception input: shorter side to this size (bicubic), centre crop, then Inception's resize to 299;
    # 0: 299. 256 = the centre-cropped 256 px images of ADM/DiT reference batches
    image_size: int = 0
    stats_dir: str = ""  # where reference statistics (.npz) are stored and reused; "": <output_dir>/cache/fid
    inception_score: bool = False  # also the Inception Score (10 splits) of the generated images


@dataclass
class RetrainConfig:
    # how stage 3 trains: semi (Semi-ViT on real labeled + extra images, the unlabeled set as in
    # stage 1), supervised (fine-tuning on real labeled + extra images, no unlabeled images) or
    # probe (DPT's protocol: the encoder of retrain.init frozen, a multinomial logistic regression
    # on its features of the real labeled + extra images)
    mode: str = "semi"
    # the extra labeled images: synthetic (the generator's), pseudo-real (K real unlabeled images
    # per class with their stage-1 pseudo-labels: the self-training control), real (the same with
    # their true labels: the oracle control) or none (K = 0: real labeled images only)
    source: str = "synthetic"
    synthetic: str = ""  # synthetic data set folder (default: this run's synthetic/)
    synthetic_per_class: int = 0  # K, extra images per class (synthetic or real); 0: all
    synthetic_ratio: float = 0.5  # share of extra images in each labeled batch (semi, supervised)
    # > 0: keep an extra image only if the stage-1 classifier gives its label at least this probability
    filter_conf: float = 0.0
    init: str = "stage1"  # stage0 | stage1 | PATH
    synthetic_only: bool = False  # train on the extra images alone, by fine-tuning (probe mode: the probe); CAS
    probe_l2: str = "auto"  # probe: L2 penalty on the weights, or auto (cross-validated on the real labeled images)
    probe_folds: int = 5  # probe, probe_l2=auto: folds of the real labeled images


@dataclass
class PipelineConfig:
    judge: bool = True  # train a classifier on all true labels to judge synthetic class accuracy
    judge_epochs: int = 30  # fine-tuning epochs of the judge


@dataclass
class TrainConfig:
    """How every training stage runs on its device (not what it learns)."""

    compile: bool = False  # torch.compile the trained model (first steps slower while it compiles)
    tf32: bool = True  # CUDA: TF32 tensor cores for float32 matmuls and convolutions
    pin_memory: bool = True  # CUDA: page-locked loader batches, copied to the device without blocking
    # optimizer steps between reads of the on-device non-finite flag (one host sync each); the
    # flag is also read before every checkpoint and at the end, so a bad step is never saved
    nonfinite_every: int = 50


@dataclass
class Config:
    name: str = "mnist5k"  # the experiment's name (logs, reports)
    output_dir: str = "runs/mnist5k"  # the run folder every stage writes into
    seed: int = 0  # seeds the labeled split, initialisation and data order of every stage
    checkpoint: str = ""  # input of a stage that starts from a trained classifier (folder or file)
    resume: bool = True  # continue from the stage's last saved state when one exists
    tensorboard: bool = True  # TensorBoard logs in each stage's logs/ (when tensorboard is installed)
    stop_after_epoch: int = 0  # >0: end a training stage after this epoch as if interrupted (resumable)
    # smoke=true keeps the models, resolution, precision and weight files of the config and shrinks
    # only the work (a few images per class, ~2 optimizer steps per stage): a check before a long run
    smoke: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    fid: FIDConfig = field(default_factory=FIDConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir)


def validate(cfg: Config) -> None:
    """Every numeric and enum setting of every section against its allowed range, before any work:
    a wrong value fails here with the setting's name, not hours later in torch's words."""
    for key, spec in _RULES.items():
        _check_rule(key, _get(cfg, key), spec)
    _check_cross_settings(cfg)


def validate_data(d: DataConfig) -> None:
    """The rules of the ``data`` section alone, for a data section built in code (not by load_config)."""
    for key, spec in _RULES.items():
        if key.startswith("data."):
            _check_rule(key, getattr(d, key[5:]), spec)
    _check_data(d)


def _check_data(d: DataConfig) -> None:
    # RandAugment magnitudes are on torchvision's scale (31 levels) in 'small', on timm's (0-10) in 'semivit'
    top = 30 if d.transforms == "small" else 10
    if d.randaug_magnitude > top:
        scale = "timm's scale; the published Semi-ViT value is 9" if top == 10 else "torchvision's scale"
        _fail("data.randaug_magnitude", f"be in 0-{top} with data.transforms={d.transforms} ({scale})",
              d.randaug_magnitude)

# The allowed values of each setting: ">= 1", "> 0", an interval "[0, 1)", or a tuple of choices.
# Settings not listed here are free text (paths, names, class lists) or booleans; a new numeric
# or enum setting needs a line here (tests/test_reliability.py checks that every one has one).
_AMP = ("no", "fp16", "bf16")

_RULES: dict[str, str | tuple] = {
    "seed": ">= 0",
    "stop_after_epoch": ">= 0",
    "data.name": ("mnist5k", "digits", "imagefolder", "cifar10", "cifar100"),
    "data.image_size": ">= 1",
    "data.channels": (0, 1, 3),
    "data.labels_per_class": ">= 0",
    "data.label_percent": "[0, 100]",
    "data.max_train": ">= 0",
    "data.max_test": ">= 0",
    "data.max_train_per_class": ">= 0",
    "data.max_test_per_class": ">= 0",
    "data.transforms": ("small", "semivit"),
    "data.crop_padding": ">= 0",
    "data.randaug_num_ops": ">= 0",
    "data.randaug_magnitude": ">= 0",
    "data.random_erasing": "[0, 1]",
    "data.num_workers": ">= 0",
    "model.drop_path": "[0, 1)",
    "model.global_pool": ("avg", "token", "max", "avgmax", "map", "catavgmax"),
    "model.stem": ("auto", "native", "small"),
    "pretrain.epochs": ">= 1",
    "pretrain.batch_size": ">= 1",
    "pretrain.lr": "> 0",
    "pretrain.min_lr": ">= 0",
    "pretrain.weight_decay": ">= 0",
    "pretrain.warmup_epochs": ">= 0",
    "pretrain.mask_ratio": "(0, 1)",
    "pretrain.decoder_dim": ">= 1",
    "pretrain.decoder_depth": ">= 1",
    "pretrain.decoder_heads": ">= 1",
    "pretrain.amp": _AMP,
    "pretrain.grad_accum": ">= 1",
    "finetune.epochs": ">= 1",
    "finetune.batch_size": ">= 1",
    "finetune.lr": "> 0",
    "finetune.min_lr": ">= 0",
    "finetune.weight_decay": ">= 0",
    "finetune.layer_decay": "(0, 1]",
    "finetune.warmup_epochs": ">= 0",
    "finetune.label_smoothing": "[0, 1)",
    "finetune.mixup": ">= 0",
    "finetune.cutmix": ">= 0",
    "finetune.ema_decay": "[0, 1)",
    "finetune.clip_grad": ">= 0",
    "finetune.amp": _AMP,
    "finetune.grad_accum": ">= 1",
    "finetune.eval_every": ">= 0",
    "semi.epochs": ">= 1",
    "semi.batch_size": ">= 1",
    "semi.mu": ">= 1",
    "semi.tau": "[0, 1]",
    "semi.lambda_u": ">= 0",
    "semi.teacher": ("ema", "student"),
    "semi.ema_decay": "[0, 1)",
    "semi.pseudo_mixup_cutmix_prob": "[0, 1]",
    "semi.dist_align": ("none", "uniform", "labeled"),
    "semi.dist_align_momentum": "[0, 1)",
    "semi.lr": "> 0",
    "semi.min_lr": ">= 0",
    "semi.weight_decay": ">= 0",
    "semi.layer_decay": "(0, 1]",
    "semi.warmup_epochs": ">= 0",
    "semi.label_smoothing": "[0, 1)",
    "semi.mixup": ">= 0",
    "semi.cutmix": ">= 0",
    "semi.clip_grad": ">= 0",
    "semi.amp": _AMP,
    "semi.grad_accum": ">= 1",
    "semi.collapse_min_classes": "[0, 1]",
    "semi.eval_every": ">= 0",
    "semi.steps_per_epoch": ">= 0",
    "pseudo_label.batch_size": ">= 1",
    "predict.batch_size": ">= 1",
    "export.mode": ("link", "copy"),
    "export.min_confidence": "[0, 1]",
    "diffusion.model": ("dit", "unet"),
    "diffusion.image_size": ">= 0",
    "diffusion.patch_size": ">= 1",
    "diffusion.hidden_size": ">= 1",
    "diffusion.depth": ">= 1",
    "diffusion.num_heads": ">= 1",
    "diffusion.unet_layers_per_block": ">= 1",
    "diffusion.unet_attention_levels": ">= 0",
    "diffusion.min_confidence": "[0, 1]",
    "diffusion.latent_dtype": ("float32", "float16"),
    "diffusion.max_per_class": ">= 0",
    "diffusion.p_uncond": "[0, 1)",
    "diffusion.num_train_timesteps": ">= 2",
    "diffusion.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),
    "diffusion.prediction_type": ("epsilon", "v_prediction", "sample"),
    "diffusion.min_snr_gamma": ">= 0",
    "diffusion.epochs": ">= 1",
    "diffusion.batch_size": ">= 1",
    "diffusion.lr": "> 0",
    "diffusion.weight_decay": ">= 0",
    "diffusion.warmup_steps": ">= 0",
    "diffusion.ema_decay": "[0, 1)",
    "diffusion.clip_grad": ">= 0",
    "diffusion.amp": _AMP,
    "diffusion.grad_accum": ">= 1",
    "diffusion.sample_every": ">= 0",
    "diffusion.checkpoint_every": ">= 0",
    "generate.num_per_class": ">= 0",
    "generate.guidance_scale": ">= 0",
    "generate.guidance_min_t": "[0, 1)",
    "generate.sampler": ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++"),
    "generate.steps": ">= 1",
    "generate.batch_size": ">= 1",
    "generate.seed": ">= 0",
    "fid.features": ("inception", "classifier"),
    "fid.batch_size": ">= 1",
    "fid.reference_samples": ">= 0",
    "fid.num_samples": ">= 0",
    "fid.image_size": ">= 0",
    "retrain.mode": ("semi", "supervised", "probe"),
    "retrain.source": ("synthetic", "pseudo-real", "real", "none"),
    "retrain.filter_conf": "[0, 1]",
    "retrain.probe_folds": ">= 2",
    "retrain.synthetic_per_class": ">= 0",
    "retrain.synthetic_ratio": "[0, 1]",  # (0, 1) unless retrain.synthetic_only: see _check_cross_settings
    "pipeline.judge_epochs": ">= 1",
    "pretrain.global_batch": ">= 0",
    "pretrain.blr": ">= 0",
    "pretrain.max_device_batch": ">= 0",
    "finetune.global_batch": ">= 0",
    "finetune.blr": ">= 0",
    "finetune.max_device_batch": ">= 0",
    "semi.global_batch": ">= 0",
    "semi.blr": ">= 0",
    "semi.max_device_batch": ">= 0",
    "diffusion.global_batch": ">= 0",
    "diffusion.blr": ">= 0",
    "diffusion.max_device_batch": ">= 0",
    "diffusion.lr_schedule": ("cosine", "constant"),
    "diffusion.init": ("dit", "diffusers"),
    "data.train_images": ">= 0",
    "data.train_classes": ">= 0",
    "train.nonfinite_every": ">= 1",
}

# free-text settings: paths, keywords-or-paths, names; checked where they are used
FREE_TEXT = {
    "name", "output_dir", "checkpoint", "data.root", "data.label_csv", "model.name", "model.init",
    "diffusion.vae", "diffusion.labels", "generate.model", "generate.out", "generate.classes",
    "fid.real", "fid.fake", "fid.reference", "fid.stats_dir", "fid.inception_weights", "fid.classifier", "fid.out", "retrain.synthetic",
    "retrain.init", "retrain.probe_l2", "data.labeled_csv", "data.unlabeled", "data.val_csv",
    "predict.images", "predict.out", "export.out",
}


def _get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value)


def _fail(key: str, requirement: str, value: Any, hint: str = "") -> None:
    raise ConfigError(f"setting '{key}' must {requirement} (got {_show(value)}){hint}")


def _check_rule(key: str, value: Any, spec: str | tuple) -> None:
    if isinstance(spec, tuple):
        if value not in spec:
            _fail(key, f"be one of {', '.join(str(s) for s in spec)}", value)
        return
    if isinstance(value, float) and not math.isfinite(value):
        _fail(key, "be a finite number", value)
    if spec.startswith((">", "<")):
        op, bound = spec.split()
        ok = value >= float(bound) if op == ">=" else value > float(bound)
        if not ok:
            _fail(key, f"be {spec}", value)
        return
    low, high = (float(s) for s in spec[1:-1].split(","))
    above = value > low if spec[0] == "(" else value >= low
    below = value < high if spec[-1] == ")" else value <= high
    if not (above and below):
        _fail(key, f"lie in {spec}", value)


def model_patch_size(model_name: str) -> int | None:
    """The patch size a timm-style ViT name states (``vit_base_patch16_224`` -> 16), else None."""
    match = re.search(r"patch(\d+)", model_name)
    return int(match.group(1)) if match else None


def _check_cross_settings(cfg: Config) -> None:
    """Rules that involve two settings."""
    d = cfg.data
    _check_data(d)
    if d.labels_per_class < 1 and d.label_percent <= 0 and not d.label_csv:
        raise ConfigError("set data.labels_per_class >= 1, data.label_percent > 0 or data.label_csv")
    patch = model_patch_size(cfg.model.name)
    if patch and d.image_size % patch:
        _fail(
            "data.image_size", f"be divisible by {patch}, the patch size of model.name='{cfg.model.name}'",
            d.image_size, f"; e.g. data.image_size={max(patch, d.image_size // patch * patch)}",
        )
    for section in ("pretrain", "finetune", "semi"):
        sec = getattr(cfg, section)
        if sec.min_lr > sec.lr:
            _fail(f"{section}.min_lr", f"be <= {section}.lr={sec.lr:g} (the schedule decays to it)", sec.min_lr)
    if cfg.pretrain.decoder_dim % cfg.pretrain.decoder_heads:
        _fail("pretrain.decoder_dim", f"be a multiple of pretrain.decoder_heads={cfg.pretrain.decoder_heads}",
              cfg.pretrain.decoder_dim)
    _check_retrain(cfg.retrain)
    _check_diffusion_shape(cfg)


def _check_retrain(rc: RetrainConfig) -> None:
    if rc.mode != "probe" and not rc.synthetic_only and rc.source != "none" and not 0.0 < rc.synthetic_ratio < 1.0:
        _fail("retrain.synthetic_ratio", "lie in (0, 1), the share of extra images in each labeled batch",
              rc.synthetic_ratio, " (retrain.synthetic_only=true trains on the extra images alone)")
    if rc.synthetic_only and rc.source == "none":
        _fail("retrain.source", "name the images to train on when retrain.synthetic_only=true", rc.source,
              "; e.g. retrain.source=synthetic")
    if rc.filter_conf > 0 and rc.source in ("none", "real"):
        _fail("retrain.filter_conf", f"be 0 with retrain.source={rc.source} (it filters synthetic or pseudo-real "
              "images by the stage-1 classifier's confidence)", rc.filter_conf)
    if str(rc.probe_l2) != "auto":
        try:
            l2 = float(rc.probe_l2)
        except ValueError:
            l2 = -1.0
        if not (math.isfinite(l2) and l2 >= 0):
            _fail("retrain.probe_l2", "be auto or a number >= 0", rc.probe_l2)


def _check_diffusion_shape(cfg: Config) -> None:
    """The denoiser's own sizes; in pixel space its input is known now (with a VAE only once the
    VAE is loaded, where dpt.diffusion.model_space checks it)."""
    dc = cfg.diffusion
    size = dc.image_size or cfg.data.image_size
    where = "diffusion.image_size" if dc.image_size else "data.image_size (diffusion.image_size=0 follows it)"
    if dc.model == "dit":
        if dc.hidden_size % dc.num_heads:
            _fail("diffusion.hidden_size", f"be a multiple of diffusion.num_heads={dc.num_heads}", dc.hidden_size)
        if not dc.vae and size % dc.patch_size:
            _fail("diffusion.patch_size", f"divide the generator's input size {size} ({where})", dc.patch_size)
        return
    chans = dc.unet_channels
    if not chans or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in chans):
        _fail("diffusion.unet_channels", "be a non-empty list of channel counts >= 1, e.g. [64, 128, 128]", chans)
    if dc.unet_attention_levels > len(chans):
        _fail("diffusion.unet_attention_levels", f"be <= {len(chans)}, the levels of diffusion.unet_channels",
              dc.unet_attention_levels)
    factor = 2 ** (len(chans) - 1)
    if not dc.vae and size % factor:
        _fail("diffusion.unet_channels", f"have levels whose downsampling ({factor}x) divides the input size "
              f"{size} ({where})", chans)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)

