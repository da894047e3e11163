"""Classifiers (any timm model: ViTs, ResNets, ConvNeXts, ...), small ViTs for small images, and
encoder-weight loading.

Small ViTs are registered in timm's registry, so ``timm.create_model("vit_mini_patch4")`` and any
timm ViT name go through the same path. Nothing is ever downloaded: weights come from local files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from semivit.config.schema import Config, ModelConfig
from semivit.errors import ConfigError, FileFormatError, WeightsError
from semivit.files import load_weights, save_weights
from semivit.runtime.layout import EMA_WEIGHTS, ENCODER_WEIGHTS, META, WEIGHTS

logger = logging.getLogger(__name__)

# name -> (embed_dim, depth, num_heads, patch_size); image size and channels come from the data.
SMALL_VITS = {
    "vit_micro_patch4": (64, 3, 2, 4),  # for tests
    "vit_compact_patch4": (128, 4, 4, 4),  # the MNIST-5k default: stage 0 + 1 in ~10 min on 2 CPU cores
    "vit_mini_patch4": (128, 6, 4, 4),  # a deeper variant for the small data sets
    "vit_tiny_patch4": (192, 12, 3, 4),  # CIFAR-sized
    "vit_small_patch4": (384, 12, 6, 4),
}


def _register_small_vits() -> None:
    for name, (dim, depth, heads, patch) in SMALL_VITS.items():

        def make(pretrained=False, _d=dim, _depth=depth, _h=heads, _p=patch, **kwargs):
            if pretrained:
                raise ConfigError("small ViTs have no pretrained weights; load a local file with model.init=PATH")
            for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
                kwargs.pop(k, None)
            kwargs.setdefault("img_size", 32)
            return VisionTransformer(patch_size=_p, embed_dim=_d, depth=_depth, num_heads=_h, mlp_ratio=4.0, **kwargs)

        make.__name__ = name
        make.__qualname__ = name
        if name not in timm.list_models(name):
            register_model(make)


_register_small_vits()


# CNN families whose stem can be made small-image friendly: name prefix -> how.
# resnet*: the 7x7/2 stem conv and its max-pool become one 3x3/1 conv (the CIFAR variant, total stride 8);
# convnext*: the 4x4/4 patchify stem becomes 1x1/1 (total stride 8).
SMALL_STEM_FAMILIES = ("resnet", "convnext")
SMALL_STEM_BELOW = 64  # stem=auto: a native total stride of 32 leaves < 2 px per side below this size


def is_vit(model: torch.nn.Module) -> bool:
    return isinstance(model, VisionTransformer)


def _family(name: str) -> str | None:
    base = name.split(".")[0]
    return next((f for f in SMALL_STEM_FAMILIES if base.startswith(f)), None)


def _use_small_stem(cfg: ModelConfig, image_size: int) -> bool:
    if cfg.stem == "native":
        return False
    family = _family(cfg.name)
    if cfg.stem == "small" and family is None:
        raise ConfigError(
            f"model.stem=small is defined for {', '.join(f + '*' for f in SMALL_STEM_FAMILIES)} models, not "
            f"model.name='{cfg.name}'; use model.stem=native (or auto)"
        )
    return family is not None and (cfg.stem == "small" or image_size < SMALL_STEM_BELOW)


def _create(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model``; ``img_size`` only goes to models that take it (ViTs and kin)."""
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
    kwargs.pop("img_size")
    return timm.create_model(name, pretrained=False, **kwargs)


def _small_stem(model: torch.nn.Module, family: str, in_chans: int) -> None:
    if family == "resnet":
        out = model.conv1.out_channels if isinstance(model.conv1, torch.nn.Conv2d) else model.bn1.num_features
        model.conv1 = torch.nn.Conv2d(in_chans, out, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
    elif family == "convnext":
        conv = model.stem[0]
        model.stem[0] = torch.nn.Conv2d(in_chans, conv.out_channels, kernel_size=1, stride=1)


def create_classifier(cfg: ModelConfig, num_classes: int, image_size: int, in_chans: int) -> torch.nn.Module:
    """Any timm classifier. ViTs pool the patch tokens (+ fc_norm) as Semi-ViT and MAE fine-tuning do;
    CNNs (ResNet, ConvNeXt, ...) pool their last feature map. ``model.stem`` adapts the stem of a
    ResNet / ConvNeXt to small images (see SMALL_STEM_FAMILIES)."""
    name = cfg.name
    if name.startswith("hf-hub:") or name.startswith("hf_hub:") or "/" in name:
        raise ConfigError(
            f"model.name='{name}' names a hub model; this tool never downloads weights. Use a timm architecture "
            "name (e.g. vit_base_patch16_224, resnet18, convnext_atto) and point model.init at a local weights file."
        )
    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise ConfigError(f"model.name='{name}' is not a known model; e.g. {list(SMALL_VITS)[:3] + near}")
    try:
        model = _create(
            name,
            num_classes=num_classes,
            img_size=image_size,
            in_chans=in_chans,
            global_pool=cfg.global_pool,
            drop_path_rate=cfg.drop_path,
        )
    except (AssertionError, ValueError, TypeError, NotImplementedError) as e:
        raise ConfigError(
            f"timm cannot build model.name='{name}' with model.global_pool='{cfg.global_pool}' "
            f"({type(e).__name__}: {e}); ViTs take avg/token/max/avgmax/map, CNNs avg/max/avgmax/catavgmax"
        ) from e
    if _use_small_stem(cfg, image_size) and not is_vit(model):
        _small_stem(model, _family(name), in_chans)
    _check_feature_map(model, name, image_size, in_chans)
    return model


def _check_feature_map(model: torch.nn.Module, name: str, image_size: int, in_chans: int) -> None:
    """A CNN's downsampling must leave at least one pixel: run a tiny forward once."""
    if is_vit(model):
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = model.forward_features(torch.zeros(1, in_chans, image_size, image_size))
    except RuntimeError as e:
        raise ConfigError(
            f"model.name='{name}' cannot take {image_size}-px images: its downsampling shrinks them to nothing "
            f"({_first_line(e)}). Set model.stem=small (ResNet / ConvNeXt) or a larger data.image_size"
        ) from e
    finally:
        model.train(was_training)
    if feats.ndim == 4 and min(feats.shape[-2:]) < 1:
        raise ConfigError(f"model.name='{name}' leaves an empty feature map at data.image_size={image_size}")
    logger.debug("%s: feature map %s at %d px", name, tuple(feats.shape[1:]), image_size)


def classifier_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The final linear layer of any timm classifier (``head``, ``fc``, ``head.fc``, ...)."""
    head = model.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(f"the classifier head of '{type(model).__name__}' is a {type(head).__name__}, not a Linear")
    return head


# --------------------------------------------------------------------------------------------
# Loading encoder weights from this project's, MAE, DINO or timm checkpoints
# --------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "teacher", "student", "module")
_PREFIXES = ("module.", "backbone.", "encoder.", "model.", "_orig_mod.")
# keys of an MAE decoder / DINO head / pre-training extras that a classifier never uses
_DROP_PREFIXES = ("decoder", "mask_token", "head.mlp", "head.last_layer")


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_shape: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors from '{self.path}'; missing {len(self.missing)} "
            f"{self.missing[:8]}; unexpected {len(self.unexpected)} {self.unexpected[:8]}; "
            f"shape-mismatched (skipped) {len(self.skipped_shape)} {self.skipped_shape[:8]}"
        )


def _unwrap(state: dict) -> dict:
    for _ in range(3):
        inner = next((state[k] for k in _WRAPPER_KEYS if k in state and isinstance(state[k], dict)), None)
        if inner is None:
            break
        state = inner
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
        if k.startswith(_DROP_PREFIXES):
            continue
        out[k] = v
    return out


def resolve_weights_file(path: str | Path) -> Path:
    """A weights file, or a stage folder holding one of this project's weight files."""
    path = Path(path)
    if path.is_dir():
        for name in (EMA_WEIGHTS, ENCODER_WEIGHTS, WEIGHTS):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"folder '{path}' holds no model_ema.safetensors, encoder.safetensors or model.safetensors"
        )
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' not found (model.init / checkpoint)")
    return path


def _head_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """Key prefixes of the classification head (ViT: head, fc_norm; ResNet: fc; ConvNeXt: head.fc)."""
    named = getattr(model, "pretrained_cfg", {}).get("classifier") or "head"
    names = named if isinstance(named, (list, tuple)) else [named]
    return tuple(f"{n}." for n in names) + (("head", "fc_norm") if is_vit(model) else ())


def load_encoder_weights(model: torch.nn.Module, path: str | Path, strict_head: bool = False) -> LoadReport:
    """Load backbone weights into ``model``; a ViT's positional and patch embeddings are resized to
    the model (timm's filter), the classification head is kept only when its shape fits."""
    file = resolve_weights_file(path)
    state = _unwrap(load_weights(file))
    if not state:
        raise WeightsError(f"checkpoint '{file}' holds no tensors (after unwrapping {', '.join(_WRAPPER_KEYS)})")
    try:
        if is_vit(model):
            state = checkpoint_filter_fn(state, model)
    except Exception as e:  # timm's resizing of position / patch embeddings met shapes it cannot map
        raise WeightsError(
            f"checkpoint '{file}' does not fit model '{type(model).__name__}': its embeddings cannot be resized "
            f"({type(e).__name__}: {e}). Check model.name / data.image_size against the checkpoint."
        ) from e
    own = model.state_dict()
    head = _head_prefixes(model)
    report = LoadReport(str(file))
    fitted = {}
    for k, v in state.items():
        if k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            if k.startswith(head) and not strict_head:
                report.skipped_shape.append(k)
            else:
                raise WeightsError(
                    f"checkpoint '{file}' does not fit model: '{k}' has shape {tuple(v.shape)}, the model "
                    f"{tuple(own[k].shape)}. Check model.name / data.image_size against the checkpoint."
                )
        else:
            fitted[k] = v
    report.loaded = sorted(fitted)
    report.missing = sorted(k for k in own if k not in fitted)
    backbone_missing = [k for k in report.missing if not k.startswith(head)]
    if not fitted or len(backbone_missing) > len(own) // 2:
        raise WeightsError(
            f"checkpoint '{file}' does not fit model '{type(model).__name__}': "
            f"{len(backbone_missing)} backbone tensors missing (e.g. {backbone_missing[:5]}), "
            f"unexpected e.g. {report.unexpected[:5]}"
        )
    model.load_state_dict(fitted, strict=False)
    logger.info(report.summary())
    return report


HEAD_INIT_STD = 2e-5  # MAE / Semi-ViT fine-tuning: the new head starts almost at zero


def init_head(model: VisionTransformer) -> None:
    """The fine-tuning head init of MAE and Semi-ViT (``main_finetune.py``): a head that the loaded
    weights did not provide gets truncated-normal weights of std 2e-5 and a zero bias, so the first
    steps start from near-uniform predictions instead of timm's random head."""
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        with torch.no_grad():
            torch.nn.init.trunc_normal_(head.weight, std=HEAD_INIT_STD, a=-2 * HEAD_INIT_STD, b=2 * HEAD_INIT_STD)
            if head.bias is not None:
                head.bias.zero_()


# --------------------------------------------------------------------------------------------
# Classifier folders written by the training stages
# --------------------------------------------------------------------------------------------


def save_classifier(folder: str | Path, model: torch.nn.Module, ema: torch.nn.Module | None, meta: dict) -> None:
    """Write ``model.safetensors`` (student), ``model_ema.safetensors`` (teacher) and ``meta.json``
    (classes, channels, image size, normalisation, model name): all that inference needs."""
    from semivit.files import atomic_write_json

    folder = Path(folder)
    save_weights(model.state_dict(), folder / WEIGHTS)
    if ema is not None:
        save_weights(ema.state_dict(), folder / EMA_WEIGHTS)
    atomic_write_json(folder / META, meta)


def classifier_meta(cfg: Config, bundle) -> dict:
    return {
        "classes": list(bundle.classes),
        "channels": bundle.channels,
        "image_size": cfg.data.image_size,
        "mean": list(bundle.mean),
        "std": list(bundle.std),
        "model": cfg.model.name,
        "global_pool": cfg.model.global_pool,
        "stem": cfg.model.stem,
    }


META_KEYS = ("classes", "channels", "image_size", "model")


def read_classifier_meta(folder: str | Path) -> dict:
    """``meta.json`` of a classifier folder, with the keys inference needs."""
    from semivit.files import read_json

    folder = Path(folder)
    if not (folder / META).is_file():
        raise FileNotFoundError(
            f"'{folder}' is not a classifier folder of this project (meta.json missing); "
            "pass the output folder of finetune, semi or retrain"
        )
    meta = read_json(folder / META)
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing or not isinstance(meta.get("classes"), list):
        raise FileFormatError(
            f"'{folder / 'meta.json'}' lacks {missing or ['a list of classes']}; it was not written by this "
            "project's finetune, semi or retrain (restore it or re-run that stage)"
        )
    return meta


def load_classifier(folder: str | Path, prefer_ema: bool = True, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a classifier from a stage folder (``meta.json`` + weights) for inference.
    Returns the model in eval mode and its meta (classes, channels, image_size, mean, std)."""
    folder = Path(folder)
    meta = read_classifier_meta(folder)
    mcfg = ModelConfig(
        name=meta["model"], drop_path=0.0, global_pool=meta.get("global_pool", "avg"), init="none",
        stem=meta.get("stem", "auto"),
    )
    model = create_classifier(mcfg, len(meta["classes"]), meta["image_size"], meta["channels"])
    names = [EMA_WEIGHTS, WEIGHTS] if prefer_ema else [WEIGHTS]
    file = next((folder / n for n in names if (folder / n).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"'{folder}' holds no model weights ({' or '.join(names)})")
    try:
        missing, unexpected = model.load_state_dict(load_weights(file), strict=False)
    except RuntimeError as e:  # same names, other shapes
        raise WeightsError(
            f"weights '{file}' do not fit the model that meta.json describes ({_first_line(e)}); the folder mixes "
            "files of different runs: re-run the stage that wrote it"
        ) from e
    if missing or unexpected:
        raise WeightsError(
            f"weights '{file}' do not fit the model in meta.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(device).eval(), meta


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(e).__name__
