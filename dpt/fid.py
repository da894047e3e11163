"""FID (as the field computes it), Inception Score and synthetic class accuracy of a generated set.

Features: Inception-v3 only from a local weights file (``fid.inception_weights``; never
downloaded), otherwise an in-domain network, a classifier of this project (its pre-logit
features; for small data). The name of the feature network travels with every number
(``fid_features``).

Images of any size, real and generated alike, reach Inception-v3 by one rule: converted to RGB,
the shorter side resized to ``fid.image_size`` (PIL bicubic with antialiasing; 0: 299), the centre
square of that side cropped, kept as uint8; the network then resizes the square to 299 x 299
(bilinear, torch-fidelity's rule) unless it is 299 already. ``fid.image_size=256`` gives the
centre-cropped 256 px images that ADM / DiT reference batches were made of.

Statistics are accumulated per batch (count, sum and sum of outer products of the 2048 features,
in float64), each rank over its own contiguous share of the images, and summed over the ranks
once: memory does not grow with the number of images (except for ``fid.per_class``, which keeps
every feature). The reference set's statistics are stored as ``.npz`` (``mu``, ``sigma``,
``count``) keyed by the set's identity (file paths, sizes and mtimes), the feature network and the
image size, and reused by later runs; ``fid.reference=FILE.npz`` reads published statistics
(arrays ``mu`` and ``sigma``, as in ADM's VIRTUAL_imagenet256_labeled.npz).
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
INCEPTION_SIZE = 299
IS_SPLITS = 10  # Inception Score: mean and std over 10 splits, as published numbers use
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
        bundle = build_data(cfg.data, layout(cfg).image_lists)
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
        self.weights_identity = sorted(
            [p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in folder.iterdir() if p.is_file()
        )

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


def inception_transform(size: int = INCEPTION_SIZE) -> T.Compose:
    """The one rule for real and generated images (see the module's doc)."""
    return T.Compose([
        T.Lambda(lambda im: im.convert("RGB")),
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(size),
        T.PILToTensor(),
    ])


class InceptionFeatures(torch.nn.Module):
    """torchmetrics' FID Inception-v3 (torch-fidelity), weights from a local file only, read safely.
    ``forward`` gives the 2048 pool features; ``features_and_logits`` also the 1008 unbiased logits
    the Inception Score uses."""

    def __init__(self, weights: str, image_size: int = 0):
        super().__init__()
        if not weights or not Path(weights).is_file():
            where = f"fid.inception_weights='{weights}' does not exist. " if weights else ""
            raise DPTError(where + INCEPTION_HELP)
        self.net = inception_from_tensors(read_inception_weights(weights), weights)
        self.num_features = 2048
        self.size = int(image_size) or INCEPTION_SIZE
        st = Path(weights).stat()
        self.weights_identity = [str(Path(weights).resolve()), st.st_size, st.st_mtime_ns]
        self.name = "inception-v3-2048" + (f"@{self.size}px-crop" if self.size != INCEPTION_SIZE else "")

    def preprocess(self):
        return inception_transform(self.size)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.net
        wanted = net.features_list
        net.features_list = ["2048", "logits_unbiased"]
        try:
            feats, logits = net._torch_fidelity_forward(x)
        finally:
            net.features_list = wanted
        return feats.reshape(x.shape[0], -1), logits


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
        return InceptionFeatures(fcfg.inception_weights, fcfg.image_size)
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
    """Every image's features in memory (per-class FID and small sets; ``extract_stats`` otherwise)."""
    indices = range(len(source)) if indices is None else indices
    loader = DataLoader(_Images(source, indices, net.preprocess()), batch_size=batch_size)
    feats = [net(x.to(device)).double().cpu() for x in loader]
    return torch.cat(feats) if feats else torch.zeros(0, net.num_features, dtype=torch.float64)


class FeatureStats:
    """Count, sum and sum of outer products of feature rows (float64): mean and covariance of any
    number of images in fixed memory; with ``is_splits`` also the Inception Score's sums."""

    def __init__(self, dim: int, is_splits: int = 0, num_logits: int = 1008):
        self.n = torch.zeros((), dtype=torch.float64)
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        # per split: count, sum of p(y|x), sum of sum_y p log p
        self.is_n = torch.zeros(is_splits, dtype=torch.float64)
        self.is_p = torch.zeros(is_splits, num_logits, dtype=torch.float64)
        self.is_plogp = torch.zeros(is_splits, dtype=torch.float64)

    def update(self, feats: torch.Tensor, logits: torch.Tensor | None = None, positions=None) -> None:
        f = feats.double().cpu()
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f
        if logits is not None and len(self.is_n):
            p = logits.double().softmax(dim=1).cpu()
            split = torch.as_tensor(np.asarray(positions) % len(self.is_n), dtype=torch.long)
            plogp = (p * torch.log(p.clamp_min(1e-30))).sum(1)
            self.is_n.index_add_(0, split, torch.ones(len(p), dtype=torch.float64))
            self.is_p.index_add_(0, split, p)
            self.is_plogp.index_add_(0, split, plogp)

    def all_reduce(self) -> FeatureStats:
        """Sum over the ranks, once (one flat tensor), when a process group is running."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self
        parts = [self.n.reshape(1), self.sum, self.outer.reshape(-1), self.is_n, self.is_p.reshape(-1), self.is_plogp]
        flat = torch.cat(parts)
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flat = flat.to(device)
        dist.all_reduce(flat)
        flat = flat.cpu()
        out, k = [], 0
        for t in parts:
            out.append(flat[k : k + t.numel()].reshape(t.shape))
            k += t.numel()
        self.n = out[0].reshape(())
        self.sum, self.outer = out[1], out[2].reshape(self.outer.shape)
        self.is_n, self.is_p, self.is_plogp = out[3], out[4].reshape(self.is_p.shape), out[5]
        return self

    @property
    def count(self) -> int:
        return int(self.n)

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        n = float(self.n)
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), sigma.numpy()

    def inception_score(self) -> tuple[float, float]:
        """Mean and std over the splits of exp(E_x KL(p(y|x) || p(y)))."""
        keep = self.is_n > 0
        n, p, plogp = self.is_n[keep], self.is_p[keep], self.is_plogp[keep]
        marginal = p / n[:, None]
        kl = plogp / n - (marginal * torch.log(marginal.clamp_min(1e-30))).sum(1)
        scores = torch.exp(kl)
        return float(scores.mean()), float(scores.std(unbiased=False)) if len(scores) > 1 else 0.0


def shard(count: int) -> np.ndarray:
    """This rank's contiguous share of ``range(count)`` (all of it on one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return np.array_split(np.arange(count), dist.get_world_size())[dist.get_rank()]
    return np.arange(count)


def spread(count: int, limit: int) -> np.ndarray:
    """``limit`` indices spread evenly over ``range(count)`` (all when limit is 0 or larger): a
    generated set sorted by class keeps its class balance."""
    if limit <= 0 or limit >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))


@torch.no_grad()
def extract_stats(net, source: ImageSource, indices: np.ndarray, batch_size: int, device="cpu", num_workers: int = 0,
                  inception_score: bool = False, desc: str = "FID features") -> FeatureStats:
    """Statistics of ``source[indices]``: each rank extracts its share's features, batch by batch;
    the sums are added over the ranks once at the end."""
    from tqdm.auto import tqdm

    mine = shard(len(indices))
    stats = FeatureStats(net.num_features, IS_SPLITS if inception_score else 0)
    loader = DataLoader(_Images(source, np.asarray(indices)[mine], net.preprocess()), batch_size=batch_size,
                        num_workers=num_workers)
    done = 0
    main = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
    for x in tqdm(loader, desc=desc, leave=False, disable=not main):
        x = x.to(device)
        positions = mine[done : done + len(x)]
        if inception_score:
            feats, logits = net.features_and_logits(x)
            stats.update(feats, logits, positions)
        else:
            stats.update(net(x))
        done += len(x)
    return stats.all_reduce()


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


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """The Frechet distance of two Gaussians (torchmetrics' formula, in float64)."""
    from torchmetrics.image.fid import _compute_fid

    args = [torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (mu1, sigma1, mu2, sigma2)]
    if args[0].shape != args[2].shape:
        raise DPTError(f"FID: the reference statistics have {args[2].shape[0]} features, the images {args[0].shape[0]}")
    return max(0.0, float(_compute_fid(*args)))


# --------------------------------------------------------------------------------------------
# Reference statistics
# --------------------------------------------------------------------------------------------


def load_reference_npz(path: Path) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(mu, sigma, count or None) from an .npz with arrays ``mu`` and ``sigma`` (the layout of ADM's
    published reference batches and of this project's stored statistics); read without pickles."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("mu", "sigma") if k not in z.files]
            if missing:
                raise DPTError(
                    f"fid.reference='{path}' lacks array(s) {missing} (has {z.files}); it needs 'mu' (D,) and "
                    "'sigma' (D, D), the layout of ADM's VIRTUAL_imagenet256_labeled.npz"
                )
            mu, sigma = np.asarray(z["mu"], dtype=np.float64), np.asarray(z["sigma"], dtype=np.float64)
            count = int(z["count"]) if "count" in z.files else None
    except (OSError, ValueError) as e:
        raise DPTError(f"fid.reference='{path}' is not a readable .npz without pickles: {e}") from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DPTError(f"fid.reference='{path}': mu has shape {mu.shape} and sigma {sigma.shape}; need (D,) and (D, D)")
    return mu, sigma, count


def stats_key(source: ImageSource, indices: np.ndarray, net) -> dict:
    from dpt.diffusion.latents import data_identity

    return {"images": data_identity(source, indices), "num_images": int(len(indices)), "features": net.name,
            "weights": getattr(net, "weights_identity", ""), "format": 1}


def stats_path(folder: Path, key: dict) -> Path:
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"fid-stats-{digest}.npz"


def save_stats(path: Path, key: dict, mu, sigma, count: int) -> None:
    import json

    from semivit.files import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, count=np.int64(count), key=np.array(json.dumps(key, sort_keys=True)))


def cached_stats(path: Path, key: dict):
    """(mu, sigma, count) of a stored file made for exactly ``key``, else None."""
    import json

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != json.dumps(key, sort_keys=True):
                return None
            return np.asarray(z["mu"]), np.asarray(z["sigma"]), int(z["count"])
    except (OSError, ValueError, KeyError) as e:
        logger.warning("FID statistics '%s' unreadable (%s); computing them again", path, e)
        return None


def reference_spec(cfg: Config) -> str:
    """fid.reference (train | val | FILE.npz) when set, else fid.real (a folder, test or train)."""
    ref = cfg.fid.reference
    if ref == "val":
        return "test"
    return ref or cfg.fid.real or "test"


def reference_set(cfg: Config, min_images: int) -> tuple[ImageSource | None, str]:
    """(images, name) of the reference set; (None, path) for a statistics file."""
    spec = reference_spec(cfg)
    if spec.endswith(".npz"):
        if not Path(spec).is_file():
            raise DPTError(f"fid.reference='{spec}' does not exist; give a .npz with arrays mu and sigma, or train / val")
        return None, spec
    src, name = image_set(cfg, spec, "reference" if cfg.fid.reference else "real")
    if len(src) < min_images:
        raise DPTError(f"fid.real='{name}' holds {len(src)} images; FID needs at least {min_images} per set")
    return src, name


def reference_stats(cfg: Config, net, device, src: ImageSource | None, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, count) of the reference set: from a published .npz, from stored statistics of
    the same images and network, or computed (and stored) now."""
    from semivit.runtime.accelerator import distributed_state

    fcfg = cfg.fid
    if src is None:
        mu, sigma, count = load_reference_npz(Path(name))
        return mu, sigma, count or 0
    indices = spread(len(src), fcfg.reference_samples)
    key = {**stats_key(src, indices, net), "image_size": getattr(net, "size", 0)}
    path = stats_path(Path(fcfg.stats_dir) if fcfg.stats_dir else layout(cfg).root / "cache" / "fid", key)
    found = cached_stats(path, key)
    if found is not None:
        logger.info("FID reference statistics of '%s' (%d images) from %s", name, found[2], path)
        return found
    stats = extract_stats(net, src, indices, fcfg.batch_size, device, cfg.data.num_workers, desc="FID reference")
    mu, sigma = stats.mu_sigma()
    if distributed_state().is_main_process:
        save_stats(path, key, mu, sigma, stats.count)
        logger.info("FID reference statistics of '%s' (%d images) stored in %s", name, stats.count, path)
    return mu, sigma, stats.count


def run_fid(cfg: Config) -> dict:
    from semivit.runtime.accelerator import distributed_state

    state = distributed_state()
    fcfg = cfg.fid
    fake_spec = fcfg.fake or str(layout(cfg).synthetic)
    # a smoke run proves the FID path on its few images; its number means nothing anyway
    min_images = SMOKE_MIN_IMAGES if cfg.smoke else MIN_IMAGES
    real_src, real_name = reference_set(cfg, min_images)
    fake_src, fake_name = image_set(cfg, fake_spec, "fake")
    fake_idx = spread(len(fake_src), fcfg.num_samples)
    if len(fake_idx) < min_images:
        raise DPTError(f"fid.fake='{fake_name}' holds {len(fake_idx)} images; FID needs at least {min_images} per set")
    if fcfg.inception_score and fcfg.features != "inception":
        raise DPTError("fid.inception_score=true needs fid.features=inception (the score is defined on its logits)")
    net = feature_network(cfg).eval()
    device = state.device
    net.to(device)
    if isinstance(net, ClassifierFeatures):
        if real_src is not None:
            check_image_classes(real_src, f"fid.real '{real_name}'", net, fcfg.classifier)
        check_image_classes(fake_src, f"fid.fake '{fake_name}'", net, fcfg.classifier)
    mu_r, sigma_r, num_real = reference_stats(cfg, net, device, real_src, real_name)
    fake = extract_stats(net, fake_src, fake_idx, fcfg.batch_size, device, cfg.data.num_workers,
                         inception_score=fcfg.inception_score, desc="FID generated")
    mu_f, sigma_f = fake.mu_sigma()
    result = {
        "fid": fid_from_stats(mu_f, sigma_f, mu_r, sigma_r),
        "fid_features": net.name,
        "num_real": int(num_real),
        "num_fake": fake.count,
        "real": real_name,
        "fake": fake_name,
        "image_rule": f"RGB, shorter side to {getattr(net, 'size', '?')} px, centre crop"
        + (", Inception resizes to 299" if isinstance(net, InceptionFeatures) else ""),
    }
    if fcfg.inception_score:
        result["inception_score"], result["inception_score_std"] = fake.inception_score()
    if fcfg.per_class:
        if real_src is None:
            raise DPTError("fid.per_class=true needs the reference images, not only their statistics (fid.reference)")
        real = extract_features(net, real_src, batch_size=fcfg.batch_size, device=device)
        fake_all = extract_features(net, fake_src, batch_size=fcfg.batch_size, device=device)
        result["per_class"] = _per_class(real_src, fake_src, real, fake_all)
    out = (
        Path(fcfg.out) if fcfg.out else (Path(fake_spec) / FID if Path(fake_spec).is_dir() else Path(FID))
    )
    if state.is_main_process:
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
