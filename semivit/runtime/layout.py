"""The run folder: every path a stage writes into ``output_dir``, and who reads it.

Stages talk only through these files, so this table is the contract between them. Paths are
relative to the run folder (``output_dir``); ``RunLayout(run_dir)`` (or ``layout(cfg)``) gives them
as paths, ``RELATIVE`` as the relative names the pipeline's stage table and the report use.

| path | written by | read by | what it holds |
|---|---|---|---|
| `run.lock` | every `semivit` / `dpt` command while it runs | the next command on the same folder | the holder's pid, host and command line; a second command on the folder stops with its name |
| `pipeline.json` | `dpt run` | `dpt run` (what to skip), report (seconds per stage) | per stage: the settings fingerprint it finished with (`done`) or runs with (`running`), seconds, peak memory |
| `label_split.csv` | the first stage that needs the labeled split (finetune in a pipeline run); drawn again by any of them when the settings in `label_split.json` changed | finetune, semi, pseudo-label, retrain (stage 3): every stage after the first | the run's labeled subset: `index,path,label` per labeled training image; the judge (every label) never touches it |
| `label_split.json` | with `label_split.csv` | the stages that read the split | what drew it: seed, data.name/root, labels_per_class, label_percent, label_csv (and a digest of its rows), the max_train*/max_test* caps, unlabeled_includes_labeled; another value draws the split again. Also the number of training images (another number with the same settings: the data changed, an error), the number labeled and the stage that drew it |
| `skipped_images.txt` | the stages that read the split, when `data.skip_unreadable=true` left images out | people | one `path<TAB>reason` line per unreadable image |
| `predictions/<folder name>.csv` | `semivit predict` without `predict.out` | people | `path,class,confidence,top5` per image |
| `pseudo_labeled/` | `dpt export-pseudo-labels` (`export.out` default) | other tools | `<class>/<index>_<name>` links or copies of the pseudo-labeled training images, `labels.csv` |
| `stage0/` | pretrain (stage 0, MAE) | finetune and the judge (`model.init=auto`), retrain (`retrain.init=stage0`) | `encoder.safetensors` (the MAE encoder), `reconstruction.png`, and the stage files below |
| `stage1/finetune/` | finetune (stage 1a) | semi (its start), report | a classifier folder (below) |
| `stage1/semi/` | semi (stage 1b) | pseudo-label, evaluate (default), retrain (`retrain.init=stage1`), report | a classifier folder (below) |
| `stage1/pseudo_labels.csv` | pseudo-label (stage 1c) | train-diffusion (`diffusion.labels=auto`) | one row per training image: `index,path,label,class_name,confidence,top5_labels,top5_confidences,true_label` (`true_label` empty where unknown); labeled images keep their label with confidence 1 |
| `stage1/pseudo_labels.json` | pseudo-label | report | count per class, mean confidence and accuracy of the pseudo-labels of the unlabeled images |
| `judge/` | the pipeline's judge (finetune on every training label) | report (ceiling top-1, synthetic class accuracy, FID features) | a classifier folder (below) |
| `stage2/` | train-diffusion (stage 2a) | report (curves) | `samples/step_N.png` (sample grids while training) and the stage files below |
| `cache/latents/` | train-diffusion in latent space (`diffusion.cache_latents`) | train-diffusion (later epochs, reruns, resumed runs, every rank) | the VAE posterior mean and std of every training image, plain and mirrored (one memory-mapped .npy shard per rank), and the key (data, VAE, resolution, dtype) they were made for |
| `cache/images/` | the first stage (and rank) that lists an image folder (`data.name=imagefolder`) | every later stage and rank | the folder's image list (classes, paths, labels) and the modification time of every folder listed; listed again when one changed |
| `cache/fid/` | fid, report (`fid.stats_dir` default) | fid, report (later runs with the same reference images, network and size) | reference statistics `fid-stats-<key>.npz` (`mu`, `sigma`, `count`, `key`) |
| `stage2/model/` | train-diffusion | generate (`generate.model` default) | the generator: the denoiser's and noise scheduler's diffusers `save_pretrained` files and `dpt_meta.json` (classes, image size, VAE ...) |
| `synthetic/` | generate (stage 2b) | retrain (`retrain.synthetic` default), fid, report | `<class>/*.png`, `manifest.csv`, `grid.png`, `metrics.json`, `.generation.json` (the settings the images were made with); `fid.json` when `dpt fid` ran without `fid.out` |
| `stage3/` | retrain (stage 3) | report | a classifier folder (below) |
| `evaluate/<folder name>/` | `semivit evaluate` | people | `metrics.json` of the classifier folder it evaluated |
| `fid.json` | report (`fid.out` default) | people | FID, its features and image counts |
| `summary.json` | report | `dpt run` (final table), benchmarks | every headline number of the run |
| `report.md`, `results.png` | report | people | the run's report and its top-1 plot |
| `.staging/synthetic/`, `.old_synthetic/` | `dpt run` while generation with new settings is swapped in | `dpt run` (recovers an interrupted swap) | the new images until complete; the previous ones during the swap |

Every training stage folder (`stage0`, `stage1/finetune`, `stage1/semi`, `judge`, `stage2`,
`stage3`) holds `config.yaml` (the settings it ran with), `history.json` and `curves.png`, and
`metrics.json`, written last: it marks the stage as finished. While a stage runs,
`checkpoints/epoch_N/` holds its resumable state (removed when it finishes) and `logs/` its
TensorBoard events (`tensorboard=true`). A classifier folder adds `meta.json` (classes, channels, image size, model),
`model.safetensors`, `model_ema.safetensors` and `label_split.csv` (the labeled images it saw).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# files of every training stage folder
CONFIG = "config.yaml"
METRICS = "metrics.json"  # written last: the stage is finished
HISTORY = "history.json"
CURVES = "curves.png"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
# files of a classifier folder (and of stage 0)
META = "meta.json"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"
ENCODER_WEIGHTS = "encoder.safetensors"
LABEL_SPLIT = "label_split.csv"
# files of a synthetic data set
MANIFEST = "manifest.csv"
GRID = "grid.png"
FID = "fid.json"  # the run's, or next to the images `dpt fid` measured
# stage 2's sample grids during training
SAMPLES = "samples"

LOCK = "run.lock"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder (see the module's table)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ---- run-level files ---------------------------------------------------------------------

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def pipeline_state(self) -> Path:
        return self.root / "pipeline.json"

    @property
    def label_split(self) -> Path:
        return self.root / LABEL_SPLIT

    @property
    def label_split_meta(self) -> Path:
        return self.root / "label_split.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def results_plot(self) -> Path:
        return self.root / "results.png"

    @property
    def fid_json(self) -> Path:
        return self.root / FID

    @property
    def staging(self) -> Path:
        return self.root / ".staging"

    # ---- stage 0 and 1 -----------------------------------------------------------------------

    @property
    def stage0(self) -> Path:
        return self.root / "stage0"

    @property
    def encoder(self) -> Path:
        return self.stage0 / ENCODER_WEIGHTS

    @property
    def reconstruction(self) -> Path:
        return self.stage0 / "reconstruction.png"

    @property
    def stage1(self) -> Path:
        return self.root / "stage1"

    @property
    def finetune(self) -> Path:
        return self.stage1 / "finetune"

    @property
    def semi(self) -> Path:
        return self.stage1 / "semi"

    @property
    def pseudo_labels_csv(self) -> Path:
        return self.stage1 / "pseudo_labels.csv"

    @property
    def pseudo_labels_json(self) -> Path:
        return self.stage1 / "pseudo_labels.json"

    @property
    def judge(self) -> Path:
        return self.root / "judge"

    # ---- stage 2 and 3 -----------------------------------------------------------------------

    @property
    def stage2(self) -> Path:
        return self.root / "stage2"

    @property
    def latents(self) -> Path:
        return self.root / "cache" / "latents"

    @property
    def image_lists(self) -> Path:
        return self.root / "cache" / "images"

    @property
    def generator(self) -> Path:
        return self.stage2 / "model"

    @property
    def synthetic(self) -> Path:
        return self.root / "synthetic"

    @property
    def stage3(self) -> Path:
        return self.root / "stage3"

    def evaluation(self, name: str) -> Path:
        """Where ``semivit evaluate`` puts the numbers of the classifier folder called ``name``."""
        return self.root / "evaluate" / name


def layout(cfg) -> RunLayout:
    """The layout of the run folder of a config (``output_dir``)."""
    return RunLayout(cfg.run_dir)


# the same paths relative to the run folder, for tables that name them (stage markers, report)
RELATIVE = RunLayout(Path())


def previous_copy(folder: Path) -> Path:
    """Where a folder being replaced waits until its successor is in place (``.old_<name>``)."""
    return folder.parent / f".old_{folder.name}"


def markdown() -> str:
    """This module's table of the run folder as a Markdown page (``docs/run-folder.md``)."""
    import inspect

    title, body = inspect.cleandoc(__doc__).split("\n\n", 1)
    return (
        "# The run folder\n\n"
        f"{title.replace('``', '`')}\n\n"
        "Generated from the docstring of `semivit/runtime/layout.py` by\n"
        "`python -m semivit.runtime.layout > docs/run-folder.md`; do not edit by hand.\n\n"
        f"{body.replace('``', '`')}\n"
    )


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown())
