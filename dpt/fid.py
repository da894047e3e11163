"""FID (torchmetrics) and synthetic class accuracy of a generated data set.

Features: Inception-v3 only from a local weights file (``fid.inception_weights``; never
downloaded), otherwise an in-domain network, a classifier of this project (its pre-logit
features). The name of the feature network travels with every number (``fid_features``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from dpt.errors import DPTClassMismatchError, DPTError
from dpt.generate import load_synthetic_source, read_manifest
from semivit.config.schema import Config
from semivit.data.sources import IMAGE_EXTENSIONS, FileSource, ImageSource, build_data
from semivit.files import atomic_write_json
from semivit.runtime.layout import FID, MANIFEST, layout
from semivit.stages.class_checks import check_known_classes

logger = logging.getLogger("dpt")

MIN_IMAGES = 10  # fewer images per set give a meaningless covariance estimate
SMOKE_MIN_IMAGES = 2
INCEPTION_HELP = (
    "FID with Inception-v3 features needs a local copy of the FID Inception weights "
    "(pt_inception-2015-12-05-6726825d.pth, the file torch-fidelity and pytorch-fid use): download it once on a "
    "machine with internet and pass fid.inception_weights=PATH, or use fid.features=classifier with "
    "fid.classifier=DIR (a classifier folder of this project)"
)


# --------------------------------------------------------------------------------------------
# Image sets
# --------------------------------------------------------------------------------------------


def folder_source(folder: Path) -> ImageSource:
    """A synthetic set (manifest.csv) or any folder of images; labels from ``<class>/`` sub-folders
    when the images sit in them (-1 otherwise)."""
    if (folder / MANIFEST).is_file():
        rows = read_manifest(folder)
        classes = sorted({r["class_name"] for r in rows})
        return load_synthetic_source(folder, classes, channels=3) if rows else FileSource([], [], classes)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    in_subdirs = files and all(p.parent != folder for p in files)
    classes = sorted({p.parent.relative_to(folder).parts[0] for p in files}) if in_subdirs else []
    index = {c: i for i, c in enumerate(classes)}
    targets = [index[p.relative_to(folder).parts[0]] for p in files] if in_subdirs else [-1] * len(files)
    return FileSource([str(p) for p in files], targets, classes)


def image_set(cfg: Config, spec: str, what: str) -> tuple[ImageSource, str]:
    """``spec``: 'test' / 'train' (the configured data set's split) or a folder."""
    if spec in ("test", "train"):
        bundle = build_data(cfg.data)
        return (bundle.test if spec == "test" else bundle.train), f"{cfg.data.name}:{spec}"
    if not spec:
        raise DPTError(f"fid.{what} is not set: give a folder of images (or 'test' / 'train' for the data set)")
    path = Path(spec)
    if not path.is_dir():
        raise DPTError(f"fid.{what}='{spec}' is neither 'test', 'train' nor a folder")
    return folder_source(path), str(path)


class _Images(Dataset):
    def __init__(self, source: ImageSource, indices, transform):
        self.source, self.indices, self.transform = source, list(indices), transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        return self.transform(self.source.load(int(self.indices[k])))


# --------------------------------------------------------------------------------------------
# Feature networks
# --------------------------------------------------------------------------------------------


class ClassifierFeatures(torch.nn.Module):
    """Pre-logit (penultimate) features of a classifier of this project, from images in [0, 1]."""

    def __init__(self, folder: str | Path):
        super().__init__()
        from semivit.models.classifier import load_classifier

        folder = Path(folder)
        self.model, self.meta = load_classifier(folder)
        self.register_buffer("mean", torch.tensor(self.meta["mean"]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(self.meta["std"]).view(1, -1, 1, 1))
        self.num_features = int(self.model.num_features)
        self.name = f"classifier:{self.meta.get('model', '?')}@{folder}"
        self.size = int(self.meta["image_size"])
        self.channels = int(self.meta["channels"])

    def preprocess(self):
        mode = "L" if self.channels == 1 else "RGB"
        return T.Compose(
            [
                T.Lambda(lambda im: im.convert(mode)),
                T.Resize(self.size, antialias=True),
                T.CenterCrop(self.size),
                T.ToTensor(),
            ]
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class InceptionFeatures(torch.nn.Module):
    """torchmetrics' FID Inception-v3 (torch-fidelity), weights from a local file only, read safely."""

    def __init__(self, weights: str):
        super().__init__()
        if not weights or not Path(weights).is_file():
            where = f"fid.inception_weights='{weights}' does not exist. " if weights else ""
            raise DPTError(where + INCEPTION_HELP)
        self.net = inception_from_tensors(read_inception_weights(weights), weights)
        self.num_features = 2048
        self.name = "inception-v3-2048"

    def preprocess(self):
        # uint8 RGB; the network resizes to 299 itself
        return T.Compose([T.Lambda(lambda im: im.convert("RGB")), T.PILToTensor()])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def read_inception_weights(path: str | Path) -> dict:
    """The Inception state dict, read without running code (torch weights_only=True or safetensors)."""
    from semivit.errors import WeightsError
    from semivit.files import load_weights

    try:
        state = load_weights(path)
    except WeightsError as e:
        raise DPTError(f"fid.inception_weights: {e}") from e
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DPTError(
            f"fid.inception_weights='{path}' is not a flat state dict of tensors (torch-fidelity's "
            f"pt_inception-2015-12-05-6726825d.pth layout); got keys {list(state)[:5]}"
        )
    return state


def inception_from_tensors(state: dict, path: str | Path = "") -> torch.nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` holding ``state`` (tensors already read safely).

    Its constructor (torch-fidelity's) reads a weights path with an unrestricted ``torch.load``,
    which would unpickle whatever the file holds. For the length of the constructor, ``torch.load``
    hands it ``state`` instead, so no file and no bytes are unpickled at all; the constructor then
    loads ``state`` strictly, so a file of another layout is still refused."""
    from unittest import mock

    try:
        import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:  # pragma: no cover
        raise DPTError(f"Inception FID needs torch-fidelity (pip install torch-fidelity): {e}") from e
    tensors = {k: v.detach().cpu() for k, v in state.items()}
    try:
        with mock.patch.object(tf_inception.torch, "load", lambda *args, **kwargs: tensors):
            return NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
            )
    except RuntimeError as e:  # load_state_dict: missing / unexpected keys or other shapes
        detail = _state_dict_mismatch(str(e))
        raise DPTError(
            f"fid.inception_weights='{path}' does not hold the FID Inception-v3 in torch-fidelity's layout "
            f"({detail}); use pt_inception-2015-12-05-6726825d.pth"
        ) from e


def _state_dict_mismatch(message: str) -> str:
    """``load_state_dict``'s complaint in brief: per kind, how many keys and the first two."""
    import re

    parts = []
    for line in message.splitlines():
        line = line.strip()
        kinds = {"Missing key": "missing keys", "Unexpected key": "unexpected keys", "size mismatch": "other shapes"}
        kind = next((k for k in kinds if line.startswith(k)), None)
        if kind:
            names = re.findall(r'"([^"]+)"', line) or re.findall(r"for ([\w.]+):", line)
            parts.append(f"{kinds[kind]}: {len(names)} (e.g. {', '.join(names[:2])})")
    return "; ".join(parts) or message.splitlines()[0]


def feature_network(cfg: Config) -> torch.nn.Module:
    fcfg = cfg.fid
    if fcfg.features == "inception":
        return InceptionFeatures(fcfg.inception_weights)
    if fcfg.features == "classifier":
        folder = fcfg.classifier
        if not folder:
            raise DPTError(
                "fid.features=classifier needs fid.classifier=DIR, a classifier folder of this project "
                "(meta.json + model_ema.safetensors); or use fid.features=inception with fid.inception_weights=PATH"
            )
        try:
            return ClassifierFeatures(folder)
        except FileNotFoundError as e:
            raise DPTError(f"fid.classifier: {e}") from e
    raise DPTError(f"fid.features must be inception or classifier (got '{fcfg.features}')")


@torch.no_grad()
def extract_features(net, source: ImageSource, indices=None, batch_size: int = 250, device="cpu") -> torch.Tensor:
    indices = range(len(source)) if indices is None else indices
    loader = DataLoader(_Images(source, indices, net.preprocess()), batch_size=batch_size)
    feats = [net(x.to(device)).double().cpu() for x in loader]
    return torch.cat(feats) if feats else torch.zeros(0, net.num_features, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------


class _Precomputed(torch.nn.Module):
    """Feeds features that were already extracted into torchmetrics' FID."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


def fid_from_features(real: torch.Tensor, fake: torch.Tensor, what: str = "", min_images: int = MIN_IMAGES) -> float:
    """FID between two feature sets (rows = images), computed by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, f in (("real", real), ("fake", fake)):
        if f.shape[0] < min_images:
            raise DPTError(
                f"FID needs at least {min_images} images per set; the {name} set{what} has {f.shape[0]}. "
                "Give more images (e.g. generate.num_per_class)"
            )
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return max(0.0, float(metric.compute()))


def run_fid(cfg: Config) -> dict:
    fcfg = cfg.fid
    fake_spec = fcfg.fake or str(layout(cfg).synthetic)
    real_src, real_name = image_set(cfg, fcfg.real or "test", "real")
    fake_src, fake_name = image_set(cfg, fake_spec, "fake")
    # a smoke run proves the FID path on its few images; its number means nothing anyway
    min_images = SMOKE_MIN_IMAGES if cfg.smoke else MIN_IMAGES
    for name, src, spec in (("real", real_src, real_name), ("fake", fake_src, fake_name)):
        if len(src) < min_images:
            raise DPTError(f"fid.{name}='{spec}' holds {len(src)} images; FID needs at least {min_images} per set")
    net = feature_network(cfg).eval()
    if isinstance(net, ClassifierFeatures):
        for what, src, name in (("real", real_src, real_name), ("fake", fake_src, fake_name)):
            check_image_classes(src, f"fid.{what} '{name}'", net, fcfg.classifier)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device)
    real = extract_features(net, real_src, batch_size=fcfg.batch_size, device=device)
    fake = extract_features(net, fake_src, batch_size=fcfg.batch_size, device=device)
    result = {
        "fid": fid_from_features(real, fake, min_images=min_images),
        "fid_features": net.name,
        "num_real": int(real.shape[0]),
        "num_fake": int(fake.shape[0]),
        "real": real_name,
        "fake": fake_name,
    }
    if fcfg.per_class:
        result["per_class"] = _per_class(real_src, fake_src, real, fake)
    out = (
        Path(fcfg.out) if fcfg.out else (Path(fake_spec) / FID if Path(fake_spec).is_dir() else Path(FID))
    )
    atomic_write_json(out, result)
    logger.info(
        "FID %.3f (%s; %d real, %d fake) -> %s", result["fid"], net.name, result["num_real"], result["num_fake"], out
    )
    return result


def check_image_classes(src: ImageSource, what: str, net: ClassifierFeatures, classifier: str) -> None:
    """Images with class names (a data split, a manifest, class sub-folders) must be of classes the
    feature classifier knows: features of a classifier for other classes compare nothing."""
    if src.classes:
        check_known_classes(
            src.classes, what, net.meta["classes"], f"fid.classifier '{classifier}'",
            "use a classifier trained on these classes (fid.classifier=DIR); images without classes belong in "
            "one flat folder",
            error=DPTClassMismatchError,
        )


def _per_class(real_src, fake_src, real, fake) -> dict:
    """FID per class name present in both sets with at least MIN_IMAGES images each."""
    out = {}
    real_t, fake_t = np.asarray(real_src.targets), np.asarray(fake_src.targets)
    if not real_src.classes or not fake_src.classes:
        raise DPTError(
            "fid.per_class=true needs class labels for both sets (a data set split, class sub-folders or a manifest)"
        )
    for name in sorted(set(real_src.classes) & set(fake_src.classes)):
        r = np.flatnonzero(real_t == real_src.classes.index(name))
        f = np.flatnonzero(fake_t == fake_src.classes.index(name))
        if len(r) >= MIN_IMAGES and len(f) >= MIN_IMAGES:
            out[name] = fid_from_features(real[r], fake[f], f" of class '{name}'")
    return out


# --------------------------------------------------------------------------------------------
# Synthetic class accuracy
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def synthetic_class_accuracy(classifier_dir: str | Path, synthetic_dir: str | Path, batch_size: int = 250) -> dict:
    """Share of generated images that the classifier assigns to the class they were generated for,
    overall and per class (class names of the manifest matched to the classifier's classes)."""
    from semivit.models.classifier import load_classifier

    try:
        model, meta = load_classifier(classifier_dir)
    except FileNotFoundError as e:
        raise DPTError(str(e)) from e
    classes = list(meta["classes"])
    src = load_synthetic_source(synthetic_dir, classes, int(meta["channels"]))
    size = int(meta["image_size"])
    tf = T.Compose(
        [T.Resize(size, antialias=True), T.CenterCrop(size), T.ToTensor(), T.Normalize(meta["mean"], meta["std"])]
    )
    loader = DataLoader(_Images(src, range(len(src)), tf), batch_size=batch_size)
    preds = torch.cat([model(x).argmax(1) for x in loader]).numpy()
    correct = preds == src.targets
    per_class = {classes[c]: 100.0 * float(correct[src.targets == c].mean()) for c in np.unique(src.targets)}
    return {
        "synthetic_class_acc": 100.0 * float(correct.mean()),  # percent, like every accuracy here
        "per_class": per_class,
        "num_images": int(len(src)),
        "classifier": str(classifier_dir),
    }
