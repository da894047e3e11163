"""Evaluation of a pipeline run: ``summary.json`` (keys listed in docs/pipeline.md, File contracts) and ``report.md``.

Every top-1 is that of the final EMA (teacher) model of its stage on the held-out split; no number
is chosen by looking at the test split during training. Accuracies are in percent.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from semivit.config.schema import Config
from semivit.data.sources import uses_given_labels
from semivit.errors import ConfigError, UserError
from semivit.files import atomic_path, atomic_write_json, atomic_write_text, pyplot, read_json
from semivit.runtime.layout import CURVES, GRID, META, METRICS, RELATIVE, layout

logger = logging.getLogger("dpt")

ROWS = [
    ("supervised_top1", "Supervised (MAE + fine-tuning on the labeled subset)", RELATIVE.finetune),
    ("semivit_top1", "Semi-ViT (EMA-Teacher, stage 1)", RELATIVE.semi),
    ("dpt_top1", "DPT (stage 3: real labeled + extra images, see dpt_mode / dpt_source)", RELATIVE.stage3),
    ("ceiling_top1", "Ceiling (MAE + fine-tuning on all training labels)", RELATIVE.judge),
]


def _top1(metrics: dict) -> float | None:
    for key in ("top1_ema", "top1"):
        if metrics.get(key) is not None:
            return float(metrics[key])
    return None


def _metrics(run: Path, rel: Path) -> dict:
    path = run / rel / METRICS
    return read_json(path) if path.is_file() else {}


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}"


def format_table(summary: dict) -> str:
    if not summary:
        return "(no summary yet)"
    lines = [f"{'classifier':<58} {'top-1 %':>8}", "-" * 67]
    for key, label, _ in ROWS:
        lines.append(f"{label:<58} {_fmt(summary.get(key)):>8}")
    lines.append("-" * 67)
    lines.append(f"{'pseudo-label accuracy (unlabeled images)':<58} {_fmt(summary.get('pseudo_label_acc')):>8}")
    lines.append(f"{'synthetic class accuracy':<58} {_fmt(summary.get('synthetic_class_acc')):>8}")
    fid = summary.get("fid")
    lines.append(f"{'FID (' + str(summary.get('fid_features')) + ')':<58} {_fmt(fid):>8}")
    return "\n".join(lines)


def _results_plot(summary: dict, path: Path) -> None:
    plt = pyplot()

    names = [label.split(" (")[0] for key, label, _ in ROWS if summary.get(key) is not None]
    values = [summary[key] for key, _, _ in ROWS if summary.get(key) is not None]
    if not values:
        return
    fig, ax = plt.subplots(figsize=(6, 2.8))
    bars = ax.bar(names, values, color=["#999", "#4c72b0", "#dd8452", "#55a868"][: len(values)])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylabel("top-1 %")
    ax.set_ylim(max(0, min(values) - 10), 100)
    ax.set_title(f"held-out top-1 ({summary.get('num_test', '?')} images)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def run_report(cfg: Config) -> dict:
    from dpt.fid import run_fid, synthetic_class_accuracy
    from dpt.state import stage_resources, stage_seconds
    from semivit.runtime.accelerator import distributed_state

    run, paths = cfg.run_dir, layout(cfg)
    synthetic = Path(cfg.retrain.synthetic) if cfg.retrain.synthetic else paths.synthetic
    summary: dict = {}
    for key, _, rel in ROWS:
        summary[key] = _top1(_metrics(run, rel))
    semi = _metrics(run, RELATIVE.semi)
    summary["num_labeled"] = semi.get("num_labeled")
    summary["num_test"] = semi.get("num_test")
    stage3 = _metrics(run, RELATIVE.stage3)
    summary["dpt_mode"] = stage3.get("mode", "semi")
    summary["dpt_source"] = stage3.get("source", "synthetic")
    pl_file = paths.pseudo_labels_json
    pl = read_json(pl_file) if pl_file.is_file() else {}
    summary["pseudo_label_acc"] = pl.get("accuracy", pl.get("pseudo_label_acc"))
    given = uses_given_labels(cfg.data)
    unavailable = not_available(summary, given)

    classifier = judge_classifier(cfg)
    summary["synthetic_class_acc_judge"] = _judge_name(cfg, classifier, paths)
    fid_cfg = copy.deepcopy(cfg)
    # FID against the real images the run has: the held-out ones, else (your own data without val/)
    # the training images, labeled + unlabeled
    fid_cfg.fid.real = cfg.fid.real or ("train" if given and not summary["num_test"] else "test")
    fid_cfg.fid.fake = cfg.fid.fake or str(synthetic)
    fid_cfg.fid.classifier = classifier
    fid_cfg.fid.out = cfg.fid.out or str(paths.fid_json)
    if cfg.fid.features == "classifier" and not classifier:
        raise ConfigError(
            "fid.features=classifier needs a judge: set pipeline.judge=true, fid.classifier=DIR, "
            "or fid.features=inception with fid.inception_weights=FILE"
        )
    if given:
        try:
            fid = run_fid(fid_cfg)
        except UserError as e:  # e.g. too few images of your own: the rest of the report still counts
            logger.warning("FID not measured: %s", e)
            fid = {}
            unavailable["fid"] = f"not measured: {e}"
    else:
        fid = run_fid(fid_cfg)
    acc = synthetic_class_accuracy(classifier, synthetic) if classifier else {}
    texture = _texture(cfg, synthetic, run / TEXTURE_GRID) if distributed_state().is_main_process else None
    if not classifier:
        unavailable.setdefault("synthetic_class_acc", "no judge classifier (pipeline.judge=false, fid.classifier unset)")
    summary.update(
        synthetic_class_acc=acc.get("synthetic_class_acc"),
        synthetic_class_acc_per_class=acc.get("per_class"),
        fid=fid.get("fid"),
        fid_features=fid.get("fid_features"),
        fid_num_real=fid.get("num_real"),
        fid_num_fake=fid.get("num_fake"),
        texture=texture,
        fid_real=fid_cfg.fid.real,
        given_labels=given,
        not_available=unavailable,
        stage_seconds=stage_seconds(cfg),
        stage_resources=stage_resources(cfg),
        smoke=cfg.smoke,
    )
    if distributed_state().is_main_process:
        atomic_write_json(paths.summary, summary)
        _results_plot(summary, paths.results_plot)
        atomic_write_text(paths.report, render_report(cfg, summary))
        logger.info("wrote %s and %s", paths.summary, paths.report)
    distributed_state().wait_for_everyone()
    return summary


TEXTURE_GRID = "real_vs_synthetic.png"


def _texture(cfg: Config, synthetic: Path, grid: Path) -> dict | None:
    """dpt.quality's texture measures of the synthetic and the held-out real images, and the grid
    of both side by side (None for colour data or without a synthetic set)."""
    from dpt.quality import synthetic_vs_real
    from semivit.data.sources import build_data

    bundle = build_data(cfg.data)
    if bundle.channels != 1 or len(bundle.test) == 0 or not (synthetic / "manifest.csv").is_file():
        return None
    return synthetic_vs_real(synthetic, bundle.test, grid)


def _texture_rows(t: dict | None) -> str:
    if not t:
        return ""
    s, r, spread = t["synthetic"], t["real"], t["real_spread"]
    return (
        f"| isolated foreground pixels (no 8-neighbour), synthetic / held-out real (real spread, "
        f"{spread['chunk']} images) | {100 * s['isolated_pixel_rate']:.3f} / {100 * r['isolated_pixel_rate']:.3f} % "
        f"({100 * spread['isolated_pixel_rate'][0]:.3f}-{100 * spread['isolated_pixel_rate'][1]:.3f}) |\n"
        f"| foreground pieces per digit, synthetic / real (real spread) | {s['fragments']:.2f} / {r['fragments']:.2f} "
        f"({spread['fragments'][0]:.2f}-{spread['fragments'][1]:.2f}) |\n"
        f"| total variation per pixel, synthetic / real (real spread) | {s['total_variation']:.3f} / "
        f"{r['total_variation']:.3f} ({spread['total_variation'][0]:.3f}-{spread['total_variation'][1]:.3f}) |\n"
    )


NO_HIDDEN_LABELS = (
    "your own data (labeled/ + unlabeled/ or data.labeled_csv): the unlabeled images have no true label"
)
NO_HELD_OUT = "no held-out images (no val/ or test/ folder under data.root, data.val_csv unset)"


def not_available(summary: dict, given: bool) -> dict:
    """The measures this run cannot have, each with its reason; their values stay None (never a
    number computed from something else)."""
    out: dict = {}
    if given:
        out["pseudo_label_acc"] = f"needs the unlabeled images' true labels; {NO_HIDDEN_LABELS}"
        out["ceiling_top1"] = f"the ceiling classifier is trained on every training label; {NO_HIDDEN_LABELS}"
        summary["pseudo_label_acc"] = summary["ceiling_top1"] = None
    if summary.get("num_test") == 0:
        for key, _, _ in ROWS:
            out.setdefault(key, NO_HELD_OUT)
            summary[key] = None
    return out


def judge_classifier(cfg: Config, ready=lambda folder: (folder / META).is_file()) -> str:
    """The classifier that judges the synthetic images (their class accuracy, classifier-feature FID):
    ``fid.classifier`` if set, else this run's ceiling model (pipeline.judge); your own data has no
    ceiling model, so the stage-1 Semi-ViT model (it saw no hidden label) judges instead. ``ready``
    says whether a classifier folder is there (the pipeline's preflight also counts the ones its
    planned stages will make). "" when there is none."""
    paths = layout(cfg)
    if cfg.fid.classifier:
        return cfg.fid.classifier
    if ready(paths.judge):
        return str(paths.judge)
    if uses_given_labels(cfg.data) and ready(paths.semi):
        return str(paths.semi)
    return ""


def _judge_name(cfg: Config, classifier: str, paths) -> str | None:
    if not classifier:
        return None
    if cfg.fid.classifier:
        return f"fid.classifier '{classifier}'"
    if Path(classifier) == paths.judge:
        return f"the ceiling classifier '{classifier}' (every training label)"
    return f"the stage-1 Semi-ViT classifier '{classifier}' (it saw no hidden label)"


def _not_available_lines(summary: dict) -> str:
    na = summary.get("not_available") or {}
    if not na:
        return ""
    return "\n## Not available\n\n" + "".join(f"- `{k}`: not available: {why}\n" for k, why in na.items())


def _per_class_table(run: Path) -> str:
    cols = [(label.split(" (")[0], _metrics(run, rel)) for _, label, rel in ROWS]
    cols = [(n, m.get("per_class_acc_ema") or m.get("per_class_acc") or m.get("per_class")) for n, m in cols]
    cols = [(n, pc) for n, pc in cols if isinstance(pc, (dict, list)) and pc]
    if not cols:
        return "(per-class accuracy not recorded)\n"
    first = cols[0][1]
    classes = list(first.keys()) if isinstance(first, dict) else [str(i) for i in range(len(first))]

    def get(pc, i, c):
        v = pc.get(c) if isinstance(pc, dict) else (pc[i] if i < len(pc) else None)
        return _fmt(v)

    head = "| class | " + " | ".join(n for n, _ in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    body = "".join(f"| {c} | " + " | ".join(get(pc, i, c) for _, pc in cols) + " |\n" for i, c in enumerate(classes))
    return head + body


def _data_line(cfg: Config, summary: dict) -> str:
    n_lab, n_test = summary.get("num_labeled"), summary.get("num_test")
    if summary.get("given_labels"):
        line = f"Data: your own (`{cfg.data.root or cfg.data.labeled_csv}`), {n_lab} labeled images as given (labeled/), "
    else:
        line = (
            f"Data: `{cfg.data.name}`, {n_lab} labeled training images ({cfg.data.labels_per_class} per class unless "
            "data.label_percent / data.label_csv say otherwise), "
        )
    if n_test == 0:
        return line + "no held-out images: no held-out top-1 is measured (add val/<class>/ for one)."
    return line + f"held-out split of {n_test} images."


def _real_name(summary: dict) -> str:
    real = summary.get("fid_real") or "test"
    return {"test": "held-out", "train": "training images, labeled + unlabeled"}.get(real, real)


SMOKE_NOTE = """
**Smoke run** (`smoke=true`): the config's models, precision and files on a few images per class
and about two optimizer steps per stage. It proves that the run works; its numbers mean nothing.
"""


def render_report(cfg: Config, summary: dict) -> str:
    run = cfg.run_dir
    rows = "".join(f"| {label} | {_fmt(summary.get(key))} |\n" for key, label, _ in ROWS)
    res = summary.get("stage_resources") or {k: {"seconds": v} for k, v in (summary.get("stage_seconds") or {}).items()}
    timing = "".join(
        f"| {k} | {v.get('seconds', '-')} | {v.get('peak_host_gb', '-')} | {v.get('peak_gpu_gb', '-')} |\n"
        for k, v in res.items()
    )
    images = []
    for rel, caption in [
        (RELATIVE.results_plot, "Top-1 of each classifier"),
        (RELATIVE.synthetic / GRID, "Synthetic images, one row per class"),
        (Path(TEXTURE_GRID), "Real held-out digits (left) beside synthetic digits of the same classes (right)"),
        (RELATIVE.reconstruction, "MAE reconstructions (stage 0)"),
        (RELATIVE.semi / CURVES, "Semi-ViT training curves (stage 1)"),
        (RELATIVE.stage2 / CURVES, "Diffusion training loss (stage 2)"),
        (RELATIVE.stage3 / CURVES, "DPT training curves (stage 3)"),
    ]:
        if (run / rel).is_file():
            images.append(f"### {caption}\n\n![{caption}]({rel})\n")
    return f"""# DPT run `{cfg.name}`

{_data_line(cfg, summary)} Model: `{cfg.model.name}`. Seed {cfg.seed}.
Each top-1 is the final EMA model of its stage on the held-out split.
{SMOKE_NOTE if summary.get("smoke") else ""}
| classifier | top-1 % |
|---|---|
{rows}
| synthetic data | value |
|---|---|
| pseudo-label accuracy on the unlabeled images | {_fmt(summary.get("pseudo_label_acc"))} % |
| synthetic class accuracy (judge: {summary.get("synthetic_class_acc_judge") or "none"}) | {_fmt(summary.get("synthetic_class_acc"))} % |
| FID, features `{summary.get("fid_features")}`, {summary.get("fid_num_real")} real ({_real_name(summary)}) vs {summary.get("fid_num_fake")} synthetic | {_fmt(summary.get("fid"))} |
{_texture_rows(summary.get("texture"))}
{_not_available_lines(summary)}
## Per-class top-1 %

{_per_class_table(run)}
## Wall time and peak memory per stage (main process)

| stage | seconds | peak host GB | peak GPU GB |
|---|---|---|---|
{timing}
{chr(10).join(images)}"""
