"""The whole DPT pipeline in one command: stage 0 -> 1 -> 2 -> 3 -> report, in ``runs/<name>/``.

Stages talk only through files. A stage is skipped when its output exists, the settings it depends
on are those it was run with, and it is newer than the stages it reads from. ``--from STAGE``
reruns from a stage on. An interrupted stage resumes from its last saved state (classifier and
diffusion training) or from the files it already wrote (generation).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dpt.state import _load_state, _state_file
from semivit.config.load import read_saved_config
from semivit.config.schema import Config, to_dict
from semivit.errors import ConfigError
from semivit.files import atomic_write_json, read_json
from semivit.runtime.accelerator import distributed_state
from semivit.runtime.layout import CONFIG, METRICS, RELATIVE, layout, previous_copy

logger = logging.getLogger("dpt")

# the keys that draw the labeled split: stages that see no label (MAE) or every label (the judge)
# ignore them, so a run with another label count keeps its stage 0 and its judge
_SPLIT_KEYS = ("labels_per_class", "label_percent", "label_csv")

# Settings added after runs existed: at the value that behaves as before they existed they stay
# out of the fingerprint, so upgrading does not rerun finished stages (key -> settings it covers)
_ADDED_OFF = {
    ("semi", "dist_align", "none"): ("dist_align", "dist_align_momentum"),
    ("retrain", "mode", "semi"): ("mode", "probe_l2", "probe_folds"),
    ("retrain", "source", "synthetic"): ("source",),
    ("retrain", "filter_conf", 0.0): ("filter_conf",),
    ("diffusion", "min_snr_gamma", 0.0): ("min_snr_gamma",),
    ("generate", "guidance_min_t", 0.0): ("guidance_min_t",),
    ("data", "labeled_csv", ""): ("labeled_csv",),
    ("data", "unlabeled", ""): ("unlabeled",),
    ("data", "val_csv", ""): ("val_csv",),
    ("data", "skip_unreadable", False): ("skip_unreadable",),
    ("data", "train_images", 0): ("train_images", "train_classes"),
    ("model", "stem", "auto"): ("stem",),
    ("pretrain", "global_batch", 0): ("global_batch", "blr", "max_device_batch"),
    ("finetune", "global_batch", 0): ("global_batch", "blr", "max_device_batch"),
    ("semi", "global_batch", 0): ("global_batch", "blr", "max_device_batch"),
    ("diffusion", "global_batch", 0): ("global_batch", "blr", "max_device_batch"),
    ("diffusion", "latent_dtype", "float32"): ("latent_dtype",),
    ("diffusion", "lr_schedule", "cosine"): ("lr_schedule",),
    ("diffusion", "init", "diffusers"): ("init",),  # the only initialisation before the setting existed
}


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections the result depends on (plus seed)
    marker: str  # file, relative to the run folder, that exists once the stage is done
    folder: str  # what a rerun of the stage clears, relative to the run folder
    upstream: tuple[str, ...]
    run: Callable[[Config], object]
    configure: Callable[[Config], Config] = lambda cfg: cfg  # the settings the stage runs with
    enabled: Callable[[Config], bool] = lambda cfg: True
    # a stage whose resume keeps every file already in its folder (generation) must start from an
    # empty folder when its settings change; the others only drop their resumable state
    resumes_from_outputs: bool = False
    split_free: bool = False  # the result does not depend on which images are labeled


def _judge_config(cfg: Config) -> Config:
    """The ceiling classifier: every training label, same recipe as fine-tuning. It also judges the
    synthetic images (class accuracy) and gives the in-domain FID features."""
    judge = copy.deepcopy(cfg)
    judge.data.label_percent = 100.0
    judge.data.label_csv = ""
    judge.finetune.epochs = cfg.pipeline.judge_epochs
    return judge


def _lazy(module: str, name: str) -> Callable[[Config], object]:
    """The stage's entry point, imported when the stage runs (a skipped stage costs no import)."""

    def run(cfg: Config):
        return getattr(importlib.import_module(module), name)(cfg)

    run.__name__ = name
    return run


def _given_labels(cfg: Config) -> bool:
    from semivit.data.sources import uses_given_labels

    return uses_given_labels(cfg.data)


def _run_judge(cfg):
    from semivit.stages.finetune import run_finetune

    return run_finetune(_judge_config(cfg), out_dir=layout(cfg).judge, use_run_split=False)

STAGES: list[Stage] = [
    Stage(
        "pretrain",
        ("data", "model", "pretrain"),
        str(RELATIVE.encoder),
        str(RELATIVE.stage0),
        (),
        _lazy("semivit.stages.pretrain", "run_pretrain"),
        enabled=lambda cfg: cfg.model.init == "auto",  # a given init (a path, or none) needs no stage 0
        split_free=True,
    ),
    Stage(
        "finetune",
        ("data", "model", "finetune"),
        str(RELATIVE.finetune / METRICS),
        str(RELATIVE.finetune),
        ("pretrain",),
        _lazy("semivit.stages.finetune", "run_finetune"),
    ),
    Stage(
        "semi",
        ("data", "model", "semi"),
        str(RELATIVE.semi / METRICS),
        str(RELATIVE.semi),
        ("finetune",),
        _lazy("semivit.stages.semi", "run_semi"),
    ),
    Stage(
        "pseudo-label",
        ("data", "pseudo_label"),
        str(RELATIVE.pseudo_labels_csv),
        "",
        ("semi",),
        _lazy("semivit.stages.pseudo_label", "run_pseudo_label"),
    ),
    Stage(
        "judge",
        ("data", "model", "finetune"),
        str(RELATIVE.judge / METRICS),
        str(RELATIVE.judge),
        ("pretrain",),
        _run_judge,
        _judge_config,
        # your own data has no hidden labels: no classifier can be trained on every label
        lambda cfg: cfg.pipeline.judge and not _given_labels(cfg),
        split_free=True,
    ),
    Stage(
        "train-diffusion",
        ("data", "diffusion"),
        str(RELATIVE.stage2 / METRICS),
        str(RELATIVE.stage2),
        ("pseudo-label",),
        _lazy("dpt.train_diffusion", "run_train_diffusion"),
    ),
    Stage(
        "generate",
        ("data", "generate"),
        str(RELATIVE.synthetic / METRICS),
        str(RELATIVE.synthetic),
        ("train-diffusion",),
        _lazy("dpt.generate", "run_generate"),
        resumes_from_outputs=True,
    ),
    Stage(
        "retrain",
        ("data", "model", "semi", "retrain"),
        str(RELATIVE.stage3 / METRICS),
        str(RELATIVE.stage3),
        ("generate", "semi"),
        _lazy("dpt.retrain", "run_retrain"),
    ),
    Stage("report", ("fid",), str(RELATIVE.summary), "", ("retrain", "judge", "generate"), _lazy("dpt.report", "run_report")),
]

STAGE_NAMES = [s.name for s in STAGES]


def fingerprint(cfg: Config, stage: Stage, configured: bool = False) -> str:
    d = to_dict(cfg if configured else stage.configure(cfg))
    relevant = {"seed": d["seed"], **{s: d[s] for s in stage.sections}}
    if stage.split_free:
        relevant["data"] = {k: v for k, v in relevant["data"].items() if k not in _SPLIT_KEYS}
    for (section, key, off), keys in _ADDED_OFF.items():
        if section in relevant and relevant[section].get(key) == off:
            relevant[section] = {k: v for k, v in relevant[section].items() if k not in keys}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def plan(cfg: Config, start: str | None = None, until: str | None = None) -> list[tuple[Stage, str]]:
    """``(stage, reason)`` for each stage that must run, in order (up to ``until`` when given)."""
    for flag, name in (("--from", start), ("--until", until)):
        if name is not None and name not in STAGE_NAMES:
            raise ConfigError(f"{flag} '{name}' is not a stage; stages: {', '.join(STAGE_NAMES)}")
    state = _load_state(cfg)
    todo: list[tuple[Stage, str]] = []
    rerun: set[str] = set()
    forced = False
    last = STAGE_NAMES.index(until) if until is not None else len(STAGES)
    for stage in STAGES[: last + 1]:
        if not stage.enabled(cfg):
            continue
        forced = forced or stage.name == start
        marker = cfg.run_dir / stage.marker
        record = state.get(stage.name, {})
        reason = None
        if forced:
            reason = f"--from {start}"
        elif not marker.exists():
            reason = "not done" if not record else "interrupted"
        elif _recorded_fingerprint(cfg, stage, record) not in (None, fingerprint(cfg, stage)):
            reason = "settings changed"
        elif any(u in rerun for u in stage.upstream):
            reason = "an input is rerun"
        else:
            newer = [
                u
                for u in stage.upstream
                if _by_name(u).enabled(cfg)
                and (cfg.run_dir / _by_name(u).marker).exists()
                and (cfg.run_dir / _by_name(u).marker).stat().st_mtime > marker.stat().st_mtime
            ]
            if newer:
                reason = f"{newer[0]} is newer"
        if reason:
            todo.append((stage, reason))
            rerun.add(stage.name)
    return todo


def finished_with(cfg: Config, name: str) -> bool:
    """Whether stage ``name`` has finished in ``cfg.run_dir`` with the settings of ``cfg`` (the test
    ``plan`` makes before "settings changed"; upstream stages and file times are not looked at)."""
    stage = _by_name(name)
    if not (cfg.run_dir / stage.marker).exists():
        return False
    record = _load_state(cfg).get(name, {})
    return _recorded_fingerprint(cfg, stage, record) == fingerprint(cfg, stage)


def stage_seconds(cfg: Config, name: str) -> float | None:
    """Wall seconds of stage ``name``'s last run by the pipeline in ``cfg.run_dir`` (None where the
    pipeline has not recorded one, e.g. a stage run on its own)."""
    _by_name(name)
    seconds = _load_state(cfg).get(name, {}).get("seconds")
    return None if seconds is None else float(seconds)


def _recorded_fingerprint(cfg: Config, stage: Stage, record: dict) -> str | None:
    """The settings the finished outputs of a stage were made with: from pipeline.json, else (a
    stage run on its own, e.g. by the stage scripts) from the config.yaml it saved when it
    finished; None when neither says."""
    if "done" in record:
        return record["done"]
    if "fingerprint" in record:  # pipeline.json of an earlier version: one fingerprint per stage
        return record["fingerprint"]
    saved = cfg.run_dir / stage.folder / CONFIG if stage.folder else None
    if saved is not None and saved.is_file():
        return fingerprint(read_saved_config(saved), stage, configured=True)
    return None


def _by_name(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ConfigError(f"'{name}' is not a stage; stages: {', '.join(STAGE_NAMES)}")

STAGING = str(RELATIVE.staging)  # generation with new settings, while the finished images stay in place


def _generation_target(cfg: Config, stage: Stage, record: dict, fp: str) -> Config:
    """Where generation writes. Finished images of other settings stay until the new set is
    complete: the new one is made in a staging folder and swapped in (``_swap_in``). Partial images
    of other settings (an interrupted run that was never finished) are not results: they go."""
    final = cfg.run_dir / stage.folder
    staging = layout(cfg).staging / stage.folder
    if cfg.generate.out:  # the user chose the folder; generate itself refuses mixed settings
        return cfg
    finished = (cfg.run_dir / stage.marker).is_file()
    if finished and _recorded_fingerprint(cfg, stage, record) not in (None, fp):
        if record.get("running") != fp:
            shutil.rmtree(staging, ignore_errors=True)
        run_cfg = copy.deepcopy(cfg)
        run_cfg.generate.out = str(staging)
        return run_cfg
    if not finished and final.exists() and record.get("running") not in (None, fp):
        logger.info("removing %s: partial images of other settings", final)
        shutil.rmtree(final, ignore_errors=True)
    return cfg


def _swap_in(staging: Path, final: Path) -> None:
    """Replace ``final`` by the complete ``staging`` folder: two renames, undone by ``_recover``."""
    old = previous_copy(final)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _recover(cfg: Config) -> None:
    """A swap interrupted between its two renames left the previous results in ``.old_<folder>``."""
    for stage in STAGES:
        if stage.folder and "/" not in stage.folder:
            final = cfg.run_dir / stage.folder
            old = previous_copy(final)
            if old.is_dir() and not final.exists():
                old.rename(final)


def _peak_memory_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory() -> dict:
    import torch

    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_host_gb"] = round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    if torch.cuda.is_available():
        out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _judge_planned(cfg: Config, names: set[str]) -> bool:
    """Whether the report will have a judge classifier, counting the ones this plan's stages make
    (the report chooses it with dpt.report.judge_classifier)."""
    from dpt.report import judge_classifier

    paths = layout(cfg)
    made = {paths.judge: "judge" in names, paths.semi: "semi" in names}

    def ready(folder: Path) -> bool:
        return made.get(folder, False) or (folder / METRICS).is_file()  # a finished stage's marker

    return bool(judge_classifier(cfg, ready))


def preflight(cfg: Config, todo: list[tuple[Stage, str]]) -> None:
    """Check every file the stages to run will need before the first one starts, so a missing
    VAE or Inception file is reported in seconds, not after hours of training."""
    from dpt.errors import DPTError
    from semivit.stages.class_checks import data_class_names

    names = {s.name for s, _ in todo}
    if names & {"pretrain", "finetune", "semi", "pseudo-label", "judge", "train-diffusion", "retrain", "report"}:
        data_class_names(cfg.data)  # the data layout (class folders), without reading every image
    if names & {"finetune", "judge"} and cfg.model.init not in ("", "auto", "none") and not Path(cfg.model.init).exists():
        raise DPTError(f"model.init='{cfg.model.init}' not found; use auto, none or the path of a weights file/folder")
    if names & {"train-diffusion"} and cfg.diffusion.vae and not (Path(cfg.diffusion.vae) / "config.json").is_file():
        raise DPTError(
            f"diffusion.vae='{cfg.diffusion.vae}' is not a local AutoencoderKL folder (config.json missing); save one "
            "with AutoencoderKL.save_pretrained(DIR) on a machine with internet and point diffusion.vae at DIR"
        )
    if "report" in names and cfg.fid.features == "classifier" and not _judge_planned(cfg, names):
        raise DPTError(
            "fid.features=classifier needs a judge and pipeline.judge=false trains none: set pipeline.judge=true, "
            "fid.classifier=DIR, or fid.features=inception with fid.inception_weights=FILE; or stop before the "
            "report with --until retrain"
        )
    if "report" in names and cfg.fid.features == "inception":
        from dpt.fid import InceptionFeatures

        InceptionFeatures(cfg.fid.inception_weights)  # reads the file safely and checks its layout


def run_pipeline(cfg: Config, start: str | None = None, until: str | None = None) -> dict:
    state_ = distributed_state()
    if state_.is_main_process:
        _recover(cfg)
    state_.wait_for_everyone()
    todo = plan(cfg, start, until)
    preflight(cfg, todo)
    if cfg.smoke and state_.is_main_process:
        logger.info("smoke run: the config's models, precision and files on a few images and ~2 steps per stage")
    skipped = [s.name for s in STAGES if s.enabled(cfg) and s.name not in {t.name for t, _ in todo}]
    if state_.is_main_process:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        if skipped:
            logger.info("done already (same settings): %s", ", ".join(skipped))
    for k, (stage, reason) in enumerate(todo, 1):
        fp = fingerprint(cfg, stage)
        state = _load_state(cfg)
        record = dict(state.get(stage.name, {}))
        run_cfg = _generation_target(cfg, stage, record, fp) if stage.resumes_from_outputs else cfg
        state_.wait_for_everyone()
        if state_.is_main_process:
            logger.info("=== [%d/%d] %s (%s) ===", k, len(todo), stage.name, reason)
            done = _recorded_fingerprint(cfg, stage, record) if (cfg.run_dir / stage.marker).exists() else None
            state[stage.name] = {**({"done": done} if done else {}), "running": fp}
            atomic_write_json(_state_file(cfg), state)
        state_.wait_for_everyone()
        _peak_memory_reset()
        t0 = time.time()
        stage.run(run_cfg)
        state_.wait_for_everyone()
        if state_.is_main_process:
            if run_cfg is not cfg:
                _swap_in(Path(run_cfg.generate.out), cfg.run_dir / stage.folder)
            state = _load_state(cfg)
            state[stage.name] = {"done": fp, "seconds": round(time.time() - t0, 1), **_peak_memory()}
            atomic_write_json(_state_file(cfg), state)
        state_.wait_for_everyone()
    summary_file = layout(cfg).summary
    summary = read_json(summary_file) if summary_file.is_file() else {}
    if state_.is_main_process:
        from dpt.report import format_table

        print(format_table(summary))
        print(format_stage_table(cfg, {t.name for t, _ in todo}))
        print(f"report: {layout(cfg).report}")
    return summary


def format_stage_table(cfg: Config, ran: set[str]) -> str:
    """Each enabled stage: ran now or earlier, its seconds and peak memory (main process)."""
    state = _load_state(cfg)
    lines = [f"{'stage':<16} {'':<8} {'seconds':>9} {'peak host GB':>13} {'peak GPU GB':>12}", "-" * 62]
    for stage in STAGES:
        if not stage.enabled(cfg):
            continue
        rec = state.get(stage.name, {})
        when = "ran" if stage.name in ran else "earlier"
        cells = [rec.get("seconds"), rec.get("peak_host_gb"), rec.get("peak_gpu_gb")]
        sec, host, gpu = ("-" if c is None else f"{c:g}" for c in cells)
        lines.append(f"{stage.name:<16} {when:<8} {sec:>9} {host:>13} {gpu:>12}")
    return "\n".join(lines)
