"""``plan``: what a config does on a launch of N processes, before anything runs.

Per training stage: the global batch, the per-process batch and accumulation the launch derives
from it (semivit.config.scaling), the learning rate, epochs, optimizer steps, images seen and,
where the throughput benchmark measured the same model, an estimated time. The counts follow the
trainer's rules (semivit.runtime.loop): an epoch is one pass over the stage's images by all
processes together (the semi stage: over the unlabeled images, or ``semi.steps_per_epoch``
batches), loaders drop their last partial batch.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from semivit.config.scaling import Layout, apply_scaling, check_launch, layout_section
from semivit.config.schema import Config
from semivit.errors import ConfigError

THROUGHPUT_JSON = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "throughput" / "throughput.json"

# the throughput benchmark's rows, and the models they measure (semivit's stage -> row)
_ROWS = {"finetune": ("vit_finetune", "vit_base_patch16"), "semi": ("semivit_step", "vit_base_patch16"),
         "pretrain": ("mae_pretrain", "vit_base_patch16"), "diffusion": ("dit_train", "dit_b2")}


@dataclass
class StagePlan:
    stage: str
    section: str
    global_batch: int
    per_process: int
    accum: int
    lr: float
    epochs: int
    steps_per_epoch: int
    steps: int
    images_seen: int  # images through the trained model (semi: labeled + unlabeled)
    hours: float | None = None  # at the throughput benchmark's images/s per process
    note: str = ""


@dataclass
class DataSizes:
    train: int
    classes: int
    labeled: int
    unlabeled: int
    source: str  # where the numbers come from


def data_sizes(cfg: Config) -> DataSizes:
    """The training set's size, classes and labeled/unlabeled counts: from data.train_images /
    data.train_classes when set (data not at hand), else by reading the data set."""
    d = cfg.data
    if d.train_images > 0:
        if d.train_classes < 1:
            raise ConfigError("set data.train_classes with data.train_images (the class count `plan` needs)")
        n, k, source = d.train_images, d.train_classes, "data.train_images"
        if d.max_train:
            n = min(n, d.max_train)
        if d.max_train_per_class:
            n = min(n, d.max_train_per_class * k)
        if d.label_percent > 0:
            labeled = round(n * d.label_percent / 100)
        else:
            labeled = min(n, d.labels_per_class * k)
    else:
        from semivit.data.sources import build_data
        from semivit.data.split import make_split

        bundle = build_data(d)
        split = make_split(d, bundle.train, cfg.seed)
        n, k, labeled = len(bundle.train), bundle.num_classes, len(split.labeled)
        source = f"data set '{d.name}'"
    unlabeled = n if d.unlabeled_includes_labeled else n - labeled
    return DataSizes(n, k, labeled, unlabeled, source)


def _row(name: str, section: str, lay: Layout, epochs: int, micro: int, images_per_step: int, note: str = "") -> StagePlan:
    per_epoch = max(1, math.ceil(max(1, micro) / lay.accum))
    steps = per_epoch * epochs
    return StagePlan(name, section, lay.global_batch, lay.per_process, lay.accum, lay.lr, epochs, per_epoch, steps,
                     steps * images_per_step, note=note)


def plan(cfg: Config, processes: int, diffusion: bool = False, throughput: Path | None = None) -> dict:
    """The plan of ``cfg`` on ``processes`` processes; ``diffusion``: the DPT stages too."""
    cfg = copy.deepcopy(cfg)
    apply_scaling(cfg, processes, strict=False)
    shown = (("pretrain",) if cfg.model.init == "auto" else ()) + ("finetune", "semi") + (("diffusion",) if diffusion else ())
    check_launch(cfg, shown, processes)
    layouts = {name: layout_section(getattr(cfg, name), name, processes) for name in shown}
    sizes = data_sizes(cfg)
    p = processes
    rows: list[StagePlan] = []
    init = cfg.model.init
    if init == "auto":
        lay = layouts["pretrain"]
        micro = sizes.train // (p * lay.per_process)
        rows.append(_row("pretrain", "pretrain", lay, cfg.pretrain.epochs, micro, lay.global_batch, "MAE on every training image"))
    lay = layouts["finetune"]
    rows.append(_row("finetune", "finetune", lay, cfg.finetune.epochs, sizes.labeled // (p * lay.per_process), lay.global_batch))
    lay, sc = layouts["semi"], cfg.semi
    global_micro = sc.steps_per_epoch or sizes.unlabeled // (sc.mu * lay.per_process)
    rows.append(_row("semi", "semi", lay, sc.epochs, math.ceil(global_micro / p), (1 + sc.mu) * lay.global_batch,
                     f"labeled batch; unlabeled batch mu x {lay.global_batch} = {sc.mu * lay.global_batch}"))
    if diffusion:
        lay, dc = layouts["diffusion"], cfg.diffusion
        n = sizes.train  # every training image with its pseudo-label (or true label)
        if dc.max_per_class:
            n = min(n, dc.max_per_class * sizes.classes)
        rows.append(_row("diffusion", "diffusion", lay, dc.epochs, n // (p * lay.per_process), lay.global_batch,
                         f"lr schedule {dc.lr_schedule}"))
        rc = cfg.retrain
        if rc.mode == "probe":
            rows.append(StagePlan("retrain", "retrain", 0, 0, 0, 0.0, 0, 0, 0, 0,
                                  note="probe: logistic regression on frozen features (no SGD steps)"))
        else:
            section = "semi" if rc.mode == "semi" else "finetune"
            base = next(r for r in rows if r.stage == section)
            rows.append(StagePlan(**{**asdict(base), "stage": "retrain", "note": f"retrain.mode={rc.mode}: the {section} "
                                     f"section's batch and lr, the same optimizer steps as its K = 0 control"}))
    _estimate(rows, cfg, throughput)
    return {
        "config": cfg.name,
        "processes": processes,
        "data": asdict(sizes),
        "stages": [asdict(r) for r in rows],
    }


def _estimate(rows: list[StagePlan], cfg: Config, throughput: Path | None) -> None:
    path = Path(throughput) if throughput else THROUGHPUT_JSON
    if not path.is_file():
        return
    try:
        data = json.loads(path.read_text())
        data = data.get("results", data)
        measured = {r["name"]: r for r in data.get("rows", [])}
    except (OSError, ValueError, AttributeError):
        return
    dc = cfg.diffusion
    dit_b2 = dc.model == "dit" and (dc.hidden_size, dc.depth, dc.patch_size) == (768, 12, 2)
    for r in rows:
        if r.stage not in _ROWS or r.images_seen == 0:
            continue
        name, model = _ROWS[r.stage]
        fits = dit_b2 if model == "dit_b2" else model in cfg.model.name
        if fits and name in measured and not data.get("small"):
            per_s = measured[name]["images_per_s"] * (r.global_batch // r.per_process // r.accum if r.per_process else 1)
            r.hours = r.images_seen / per_s / 3600
            r.note = (r.note + "; " if r.note else "") + f"time at {measured[name]['images_per_s']:.0f} img/s per device " \
                     f"({data.get('device', '?')})"


def format_plan(result: dict) -> str:
    d = result["data"]
    lines = [
        f"{result['config']} on {result['processes']} process(es); {d['train']} training images, {d['classes']} classes, "
        f"{d['labeled']} labeled, {d['unlabeled']} unlabeled ({d['source']})",
        f"{'stage':10} {'global':>7} {'/proc':>6} {'accum':>5} {'lr':>10} {'epochs':>6} {'steps/ep':>8} {'steps':>9} "
        f"{'images seen':>13} {'time':>8}  note",
    ]
    for s in result["stages"]:
        hours = f"{s['hours']:.1f} h" if s["hours"] is not None else "-"
        if s["global_batch"] == 0:
            lines.append(f"{s['stage']:10} {'-':>7} {'-':>6} {'-':>5} {'-':>10} {'-':>6} {'-':>8} {'-':>9} {'-':>13} {'-':>8}  {s['note']}")
            continue
        lines.append(
            f"{s['stage']:10} {s['global_batch']:>7} {s['per_process']:>6} {s['accum']:>5} {s['lr']:>10.3g} "
            f"{s['epochs']:>6} {s['steps_per_epoch']:>8} {s['steps']:>9} {s['images_seen']:>13,} {hours:>8}  {s['note']}"
        )
    return "\n".join(lines)
