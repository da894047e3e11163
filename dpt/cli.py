"""``dpt <command> --config FILE [key=value ...]`` (also ``python -m dpt`` and ``accelerate launch -m dpt``).

Commands live in one registry: name -> :class:`Command` (function of the config, settings section
whose keys may be given without the section prefix, those keys, help, the settings it reads). A new
command is one more entry. Errors follow the policy of :mod:`semivit.runtime.command` (one line and
exit code 2 for bad input, including an override the command does not read unless
``--allow-unread``; ``--debug`` or ``DPT_DEBUG=1`` for the traceback); a command holds the lock of
the folder it writes into.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from semivit.config.load import load_config
from semivit.config.reads import EVERYTHING, Reads
from semivit.config.scaling import check_launch
from semivit.runtime.command import check_unread, run_cli
from semivit.runtime.layout import MANIFEST, layout
from semivit.runtime.lock import lock_folder, run_lock


def _train_diffusion(cfg):
    from dpt.train_diffusion import run_train_diffusion

    return run_train_diffusion(cfg)


def _generate(cfg, check_data: bool = True):
    from dpt.generate import run_generate

    return run_generate(cfg, check_data=check_data)


def _fid(cfg):
    from dpt.fid import run_fid, synthetic_class_accuracy

    result = run_fid(cfg)
    print(f"FID {result['fid']:.3f} ({result['fid_features']}; {result['num_real']} real, {result['num_fake']} fake)")
    if cfg.fid.features == "classifier" and cfg.fid.classifier:
        fake = cfg.fid.fake or str(layout(cfg).synthetic)
        if (Path(fake) / MANIFEST).is_file():
            acc = synthetic_class_accuracy(cfg.fid.classifier, fake)
            print(f"synthetic class accuracy {acc['synthetic_class_acc']:.2f} % ({acc['num_images']} images)")
    return result


def _retrain(cfg):
    from dpt.retrain import run_retrain

    return run_retrain(cfg)


def _export(cfg):
    from dpt.export import run_export

    out = run_export(cfg)
    print(f"dpt export-pseudo-labels: wrote {out}")
    return out


def _run(cfg, start: str | None = None, until: str | None = None):
    from dpt.pipeline import run_pipeline

    return run_pipeline(cfg, start=start, until=until)


class Command(NamedTuple):
    run: Callable
    section: str  # the settings section whose keys may be given without the prefix
    short: tuple[str, ...]  # those keys
    help: str
    reads: Reads  # the settings it reads besides the shared ones


COMMANDS: dict[str, Command] = {
    "train-diffusion": Command(
        _train_diffusion,
        "diffusion",
        ("labels", "min_confidence", "max_per_class", "vae", "epochs"),
        "train the class-conditional diffusion model (stage 2a)",
        Reads(("diffusion",), {"checkpoint": ("diffusion.labels", "the labels it trains on")}),
    ),
    "generate": Command(
        _generate,
        "generate",
        ("model", "out", "num_per_class", "guidance_scale", "guidance_min_t", "sampler", "steps", "classes", "batch_size"),
        "write a labeled synthetic data set (stage 2b)",
        Reads(("generate", "diffusion.amp"), {"checkpoint": ("generate.model", "the generator folder (RUN/stage2/model)")}),
    ),
    "fid": Command(
        _fid,
        "fid",
        ("real", "fake", "features", "inception_weights", "classifier", "per_class", "out"),
        "FID of a generated set against real images",
        Reads(("fid",), {"checkpoint": ("fid.classifier", "the classifier folder whose features it compares")}),
    ),
    "retrain": Command(
        _retrain,
        "retrain",
        ("mode", "source", "synthetic", "synthetic_per_class", "synthetic_ratio", "filter_conf", "init", "synthetic_only",
         "probe_l2", "probe_folds"),
        "the classifier retrained on real labeled + synthetic (or control) images (stage 3)",
        # semi.* in mode semi, finetune.* in modes supervised and probe (and synthetic_only), the
        # pseudo_label batch size and teacher choice for the filter and the pseudo-real source
        Reads(
            ("retrain", "semi", "finetune", "pseudo_label"),
            {"checkpoint": ("retrain.init", "the weights stage 3 starts from (stage0, stage1 or PATH)")},
        ),
    ),
    "export-pseudo-labels": Command(
        _export,
        "export",
        ("out", "mode", "min_confidence", "include_labeled"),
        "the pseudo-labeled training images as an ImageFolder (<class>/ links or copies + labels.csv)",
        Reads(("export",)),
    ),
    "run": Command(_run, "pipeline", (), "the whole pipeline: stages 0-3, evaluation and report", Reads((EVERYTHING,))),
    "plan": Command(
        None, "pipeline", (), "per stage (diffusion and retrain included) on --processes N: batches, lr, steps, time",
        Reads((EVERYTHING,)),
    ),
}

ALLOW_UNREAD_HELP = "run even if a key=value override is not read by the command (a warning instead of an error)"


def add_command(sub, name: str) -> None:
    command = COMMANDS[name]
    section, short, help_ = command.section, command.short, command.help
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--config", default=None, help="experiment YAML (e.g. configs/mnist5k.yaml)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    p.add_argument("--allow-unread", action="store_true", default=argparse.SUPPRESS, help=ALLOW_UNREAD_HELP)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"settings; {', '.join(short)} stand for {section}.<key>" if short else "settings",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpt", description="DPT stages: class-conditional diffusion and synthetic data"
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also DPT_DEBUG=1)")
    parser.add_argument("--allow-unread", action="store_true", help=ALLOW_UNREAD_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        add_command(sub, name)
    from dpt.pipeline import STAGE_NAMES
    from semivit.cli import add_plan_options

    add_plan_options(sub.choices["plan"])
    sub.choices["run"].add_argument(
        "--from", dest="start", choices=STAGE_NAMES, default=None, help="rerun from this stage on"
    )
    sub.choices["run"].add_argument(
        "--until", choices=STAGE_NAMES, default=None,
        help="stop after this stage (e.g. generate: the synthetic set, for stage-3 studies of your own)",
    )
    return parser


def expand_overrides(command: str, overrides: list[str]) -> list[str]:
    """``num_per_class=5`` -> ``generate.num_per_class=5`` for the command's short keys."""
    section, short = COMMANDS[command].section, COMMANDS[command].short
    out = []
    for pair in overrides:
        key = pair.split("=", 1)[0].strip()
        out.append(f"{section}.{pair.strip()}" if key in short else pair)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    run = COMMANDS[args.command].run

    def body():
        if args.command == "plan":
            from semivit.cli import print_plan

            return print_plan(args, diffusion=True)
        overrides = expand_overrides(args.command, args.overrides)
        cfg = load_config(args.config, overrides)
        check_unread("dpt", args.command, overrides, COMMANDS[args.command].reads, args.allow_unread)
        check_launch(cfg, _trained_sections(args.command, cfg))  # before the first stage, not hours into the run
        folder = written_folder(args.command, cfg)
        setting = "output_dir" if folder is None or folder == cfg.run_dir.resolve() else "generate.out"
        with run_lock(folder, f"dpt {' '.join(argv)}", f"dpt {args.command}", setting):
            if args.command == "run":
                run(cfg, start=args.start, until=args.until)
            elif args.command == "generate":
                run(cfg, check_data=args.config is not None or _sets_data(args.overrides))
            else:
                run(cfg)

    return run_cli("dpt", args.command, body, debug=args.debug)


def _trained_sections(command: str, cfg) -> tuple[str, ...]:
    if command == "train-diffusion":
        return ("diffusion",)
    if command == "retrain":
        return ("semi",) if cfg.retrain.mode == "semi" else ("finetune",) if cfg.retrain.mode == "supervised" else ()
    if command == "run":
        return (("pretrain",) if cfg.model.init == "auto" else ()) + ("finetune", "semi", "diffusion")
    return ()


def _sets_data(overrides: list[str]) -> bool:
    return any(pair.split("=", 1)[0].strip().startswith("data.") for pair in overrides)


def written_folder(command: str, cfg) -> Path | None:
    """The folder whose lock the command holds: the run folder for everything written into it;
    generate.out when generation writes elsewhere; none for fid writing its one JSON outside it."""
    if command == "generate":
        from dpt.generate import out_dir_of

        return lock_folder(out_dir_of(cfg), cfg.run_dir)
    if command == "fid":
        fake = Path(cfg.fid.fake) if cfg.fid.fake else layout(cfg).synthetic
        target = Path(cfg.fid.out).parent if cfg.fid.out else (fake if fake.is_dir() else Path.cwd())
        folder = lock_folder(target, cfg.run_dir)
        return folder if folder == cfg.run_dir.resolve() and folder.is_dir() else None
    return cfg.run_dir.resolve()


if __name__ == "__main__":
    sys.exit(main())
