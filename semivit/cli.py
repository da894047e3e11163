"""``semivit {pretrain,finetune,semi,evaluate,pseudo-label,predict} --config FILE [key=value ...]``.

The same entry point runs as a console script, as ``python -m semivit`` and under
``accelerate launch -m semivit``. Bad input (settings, data, checkpoints) ends with one error line
and exit code 2, not a traceback (``--debug`` or ``DPT_DEBUG=1`` shows it; policy in
:mod:`semivit.runtime.command`), and so does an override the command does not read (each command's
:class:`~semivit.config.reads.Reads` below; ``--allow-unread`` makes it a warning, docs/cli.md).
Every command holds the lock of its output_dir while it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from semivit.config.load import load_config
from semivit.config.reads import EVERYTHING, Reads
from semivit.config.scaling import check_launch
from semivit.errors import ConfigError
from semivit.runtime.command import check_unread, run_cli
from semivit.runtime.layout import layout
from semivit.runtime.lock import run_lock

# name -> (help, the settings it reads besides the shared ones)
COMMANDS: dict[str, tuple[str, Reads]] = {
    "pretrain": (
        "stage 0: MAE self-pre-training of the encoder on all training images",
        Reads(("pretrain",)),
    ),
    "finetune": (
        "stage 1a: supervised fine-tuning on the labeled subset",
        Reads(("finetune",), {"checkpoint": ("model.init", "the weights fine-tuning starts from")}),
    ),
    "semi": (
        "stage 1b: EMA-Teacher semi-supervised fine-tuning (Semi-ViT)",
        Reads(("semi", "checkpoint")),
    ),
    "evaluate": (
        "top-1/top-5 of a classifier folder (checkpoint=FOLDER) on the held-out split",
        Reads(("checkpoint",)),
    ),
    "pseudo-label": (
        "label the training images with the EMA teacher (pseudo_labels.csv)",
        Reads(("pseudo_label", "checkpoint")),
    ),
    "predict": (
        "label new images (predict.images=FOLDER_OR_LIST) with a classifier folder (checkpoint=FOLDER) into a CSV",
        Reads(("predict", "checkpoint")),
    ),
    "plan": (
        "per stage on --processes N: global batch, per-process batch, accumulation, lr, steps, images, time",
        Reads((EVERYTHING,)),
    ),
}

STAGE_SECTIONS = {"pretrain": ("pretrain",), "finetune": ("finetune",), "semi": ("semi",)}


ALLOW_UNREAD_HELP = "run even if a key=value override is not read by the command (a warning instead of an error)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semivit", description="Semi-supervised ViT training (Semi-ViT) on Accelerate")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also DPT_DEBUG=1)")
    p.add_argument("--allow-unread", action="store_true", help=ALLOW_UNREAD_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_, _) in COMMANDS.items():
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("--config", default=None, help="YAML file (configs/mnist5k.yaml when omitted)")
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
        s.add_argument("--allow-unread", action="store_true", default=argparse.SUPPRESS, help=ALLOW_UNREAD_HELP)
        s.add_argument("overrides", nargs="*", help="settings as key=value, e.g. output_dir=runs/a data.labels_per_class=10")
        if name == "plan":
            add_plan_options(s)
    return p


def add_plan_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--processes", type=int, default=1, help="processes (GPUs) of the launch to plan for")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.add_argument("--throughput", default=None, help="the throughput benchmark's JSON (default: its committed result)")


def print_plan(args, diffusion: bool) -> None:
    from semivit.stages.plan import format_plan, plan

    cfg = load_config(default_config(args.config), args.overrides)
    result = plan(cfg, args.processes, diffusion=diffusion, throughput=args.throughput)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))


def run(command: str, cfg):
    if command == "pretrain":
        from semivit.stages.pretrain import run_pretrain

        return run_pretrain(cfg)
    if command == "finetune":
        from semivit.stages.finetune import run_finetune

        return run_finetune(cfg)
    if command == "semi":
        from semivit.stages.semi import run_semi

        return run_semi(cfg)
    if command == "evaluate":
        from semivit.stages.evaluate import run_evaluate

        checkpoint = cfg.checkpoint or str(layout(cfg).semi)
        metrics = run_evaluate(cfg, checkpoint)
        print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("per_class")}, indent=2))
        return metrics
    if command == "pseudo-label":
        from semivit.stages.pseudo_label import run_pseudo_label

        return run_pseudo_label(cfg)
    if command == "predict":
        from semivit.stages.predict import run_predict

        return run_predict(cfg)
    raise ConfigError(f"unknown command '{command}'")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)

    def body():
        if args.command == "plan":
            return print_plan(args, diffusion=False)
        cfg = load_config(default_config(args.config), args.overrides)
        check_unread("semivit", args.command, args.overrides, COMMANDS[args.command][1], args.allow_unread)
        check_launch(cfg, STAGE_SECTIONS.get(args.command, ()))
        with run_lock(cfg.run_dir, f"semivit {' '.join(argv)}", f"semivit {args.command}"):
            result = run(args.command, cfg)
        if isinstance(result, Path):
            print(f"semivit {args.command}: wrote {result}")

    return run_cli("semivit", args.command, body, debug=args.debug)


def default_config(config: str | None) -> str | None:
    """``--config``, else configs/mnist5k.yaml when run from the repository root, else the defaults."""
    if config is None and Path("configs/mnist5k.yaml").is_file():
        return "configs/mnist5k.yaml"
    return config


if __name__ == "__main__":
    sys.exit(main())
