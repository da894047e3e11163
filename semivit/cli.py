"""``semivit {pretrain,finetune,semi,evaluate,pseudo-label} --config FILE [key=value ...]``.

The same entry point runs as a console script, as ``python -m semivit`` and under
``accelerate launch -m semivit``. Bad input (settings, data, checkpoints) ends with one error line
and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from semivit.config import ConfigError, load_config

COMMANDS = {
    "pretrain": "stage 0: MAE self-pre-training of the encoder on all training images",
    "finetune": "stage 1a: supervised fine-tuning on the labeled subset",
    "semi": "stage 1b: EMA-Teacher semi-supervised fine-tuning (Semi-ViT)",
    "evaluate": "top-1/top-5 of a classifier folder (checkpoint=FOLDER) on the held-out split",
    "pseudo-label": "label the training images with the EMA teacher (pseudo_labels.csv)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semivit", description="Semi-supervised ViT training (Semi-ViT) on Accelerate")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in COMMANDS.items():
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("--config", default=None, help="YAML file (configs/mnist5k.yaml when omitted)")
        s.add_argument("overrides", nargs="*", help="settings as key=value, e.g. output_dir=runs/a data.labels_per_class=10")
    return p


def run(command: str, cfg):
    if command == "pretrain":
        from semivit.pretrain import run_pretrain

        return run_pretrain(cfg)
    if command == "finetune":
        from semivit.finetune import run_finetune

        return run_finetune(cfg)
    if command == "semi":
        from semivit.semi import run_semi

        return run_semi(cfg)
    if command == "evaluate":
        from semivit.evaluate import run_evaluate

        checkpoint = cfg.checkpoint or str(cfg.run_dir / "stage1" / "semi")
        metrics = run_evaluate(cfg, checkpoint)
        print(json.dumps({k: v for k, v in metrics.items() if not k.startswith("per_class")}, indent=2))
        return metrics
    if command == "pseudo-label":
        from semivit.pseudo_label import run_pseudo_label

        return run_pseudo_label(cfg)
    raise ConfigError(f"unknown command '{command}'")


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    args = build_parser().parse_args(argv)
    from semivit.data import DataError
    from semivit.stage import StopRequested

    ok = False
    try:
        config = args.config
        if config is None and Path("configs/mnist5k.yaml").is_file():
            config = "configs/mnist5k.yaml"
        cfg = load_config(config, args.overrides)
        result = run(args.command, cfg)
        ok = True
    except StopRequested as e:
        print(f"semivit {args.command}: {e}", file=sys.stderr)
        return 0
    except (ConfigError, DataError, FileNotFoundError, ValueError, FloatingPointError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _is_own_error(e):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"semivit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if "torch" in sys.modules:  # no torch, no process group (and no slow import for an error)
            from semivit.engine import leave_process_group

            leave_process_group(ok)
    if isinstance(result, Path):
        print(f"semivit {args.command}: wrote {result}")
    return 0


def _is_own_error(e: RuntimeError) -> bool:
    """Collapse stops are ours; other RuntimeErrors (torch internals) keep their traceback."""
    return "semi.stop_on_collapse" in str(e)


if __name__ == "__main__":
    sys.exit(main())
