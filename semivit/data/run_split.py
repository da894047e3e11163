"""The run's labeled split: drawn once, then read from ``<run>/label_split.csv`` by every stage.

The first stage that needs the split (finetune in a pipeline run) draws it with
``semivit.data.split.make_split`` and writes it with ``label_split.json`` beside it: the settings that
drew it and the number of training images. Every later stage (semi, pseudo-label, retrain) reads
the file back through ``load_label_split``, which checks its paths against the data, so a data
folder that changed between stages is an error instead of silently shifted indices.

When the drawing settings change (the sidecar differs) the split is drawn again and replaced,
each file in one rename. Under several processes every rank reads the sidecar, then only the main
process writes, and every rank reads the same file.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from semivit.config.schema import Config
from semivit.data.sources import ImageSource
from semivit.data.split import Split, draw_labeled, load_label_split, save_label_split, split_with
from semivit.errors import DataError
from semivit.files import atomic_write_json, read_json
from semivit.runtime.accelerator import distributed_state
from semivit.runtime.layout import RunLayout, layout

logger = logging.getLogger("semivit")

# the data settings that decide which images are labeled (and which are unlabeled)
_DRAWING_KEYS = (
    "name",
    "root",
    "labels_per_class",
    "label_percent",
    "label_csv",
    "max_train",
    "max_train_per_class",
    "max_test",
    "max_test_per_class",
    "unlabeled_includes_labeled",
)


_GIVEN_KEYS = ("labeled_csv", "unlabeled", "skip_unreadable")


def split_settings(cfg: Config) -> dict:
    """What draws the split; another value of any of these draws it again."""
    settings = {"seed": cfg.seed, **{f"data.{k}": getattr(cfg.data, k) for k in _DRAWING_KEYS}}
    # the settings of your own data's layout, recorded only when set (older splits stay valid)
    for k in _GIVEN_KEYS:
        if getattr(cfg.data, k):
            settings[f"data.{k}"] = getattr(cfg.data, k)
    if cfg.data.labeled_csv:
        settings["data.labeled_csv_sha256"] = _file_digest(Path(cfg.data.labeled_csv).expanduser())
    if cfg.data.label_csv:
        # the same file name with other rows is another split
        settings["data.label_csv_sha256"] = _file_digest(Path(cfg.data.label_csv).expanduser())
    return settings


def _file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_split(cfg: Config, source: ImageSource, stage: str = "") -> Split:
    """The run's split of ``source`` (the training images): read from ``<run>/label_split.csv``,
    drawn and written first when the file is missing or was drawn with other settings."""
    paths = layout(cfg)
    state = distributed_state()
    wanted = split_settings(cfg)
    recorded = _recorded_settings(paths)
    # every rank decides from the same files, before any rank may replace them
    redraw = recorded is None or {k: recorded.get(k) for k in wanted} != wanted
    if redraw:
        labeled = draw_labeled(cfg.data, source, cfg.seed)  # on every rank: a bad setting fails them all
    else:
        _check_same_data(paths, recorded, source)
    state.wait_for_everyone()
    if redraw and state.is_main_process:
        _write_split(paths, labeled, source, wanted, stage)
    if source.skipped and state.is_main_process:
        _write_skipped(paths.root / SKIPPED_IMAGES, source.skipped)
    state.wait_for_everyone()
    return split_with(cfg.data, source, _read_split(paths, source))


SKIPPED_IMAGES = "skipped_images.txt"


def _write_skipped(path: Path, skipped) -> None:
    """The unreadable images that data.skip_unreadable left out: one 'path<TAB>reason' per line."""
    from semivit.files import atomic_write_text

    atomic_write_text(path, "".join(f"{line}\n" for line in skipped))
    logger.warning("%d unreadable images were left out; listed in %s", len(skipped), path)


def _recorded_settings(paths: RunLayout) -> dict | None:
    """The sidecar of the run's split; None when there is no complete pair of files."""
    if not (paths.label_split.is_file() and paths.label_split_meta.is_file()):
        return None
    recorded = read_json(paths.label_split_meta)
    return recorded if isinstance(recorded, dict) else None


def _check_same_data(paths: RunLayout, recorded: dict, source: ImageSource) -> None:
    """Same settings, another number of training images: the data folder changed between stages."""
    drawn_from = recorded.get("num_train")
    if drawn_from is not None and drawn_from != len(source):
        raise DataError(
            f"the run's labeled split '{paths.label_split}' was drawn from {drawn_from} training images "
            f"({paths.label_split_meta.name}), the data set now has {len(source)}: the data folder changed "
            f"between stages. Restore it, or delete '{paths.label_split}' to draw a new split and rerun "
            "the stages from finetune on"
        )


def _write_split(paths: RunLayout, labeled, source: ImageSource, settings: dict, stage: str) -> None:
    # the CSV first: a sidecar that describes it is what makes the pair valid
    save_label_split(paths.label_split, labeled, source)
    meta = {**settings, "num_train": len(source), "num_labeled": len(labeled), "drawn_by": stage}
    atomic_write_json(paths.label_split_meta, meta)
    logger.info("%s: drew the labeled split (%d of %d images) -> %s", stage or "split", len(labeled), len(source), paths.label_split)


def _read_split(paths: RunLayout, source: ImageSource):
    try:
        return load_label_split(paths.label_split, source)
    except DataError as e:
        raise DataError(
            f"{e} (the run's split: delete '{paths.label_split}' to draw a new one, then rerun the stages "
            "from finetune on)"
        ) from e
