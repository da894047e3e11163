"""``dpt <command> --config FILE [key=value ...]`` (also ``python -m dpt`` and ``accelerate launch -m dpt``).

Commands live in one registry: name -> (function of the config, settings section whose keys may
be given without the section prefix, help). A new command is one more entry. Errors follow the
policy of :mod:`semivit.errors` (one line and exit code 2 for bad input; ``--debug`` or
``DPT_DEBUG=1`` for the traceback); a command holds the lock of the folder it writes into.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from semivit.config.load import load_config
from semivit.config.scaling import check_launch
from semivit.runtime.command import run_cli
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


def _run(cfg, start: str | None = None, until: str | None = None):
    from dpt.pipeline import run_pipeline

    return run_pipeline(cfg, start=start, until=until)


# name -> (run function, section for short keys, short keys, help)
COMMANDS: dict[str, tuple[Callable, str, tuple[str, ...], str]] = {
    "train-diffusion": (
        _train_diffusion,
        "diffusion",
        ("labels", "min_confidence", "max_per_class", "vae", "epochs"),
        "train the class-conditional diffusion model (stage 2a)",
    ),
    "generate": (
        _generate,
        "generate",
        ("model", "out", "num_per_class", "guidance_scale", "guidance_min_t", "sampler", "steps", "classes", "batch_size"),
        "write a labeled synthetic data set (stage 2b)",
    ),
    "fid": (
        _fid,
        "fid",
        ("real", "fake", "features", "inception_weights", "classifier", "per_class", "out"),
        "FID of a generated set against real images",
    ),
    "retrain": (
        _retrain,
        "retrain",
        ("mode", "source", "synthetic", "synthetic_per_class", "synthetic_ratio", "filter_conf", "init", "synthetic_only",
         "probe_l2", "probe_folds"),
        "the classifier retrained on real labeled + synthetic (or control) images (stage 3)",
    ),
    "run": (_run, "pipeline", (), "the whole pipeline: stages 0-3, evaluation and report"),
    "plan": (None, "pipeline", (), "per stage (diffusion and retrain included) on --processes N: batches, lr, steps, time"),
}


def add_command(sub, name: str) -> None:
    _, section, short, help_ = COMMANDS[name]
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--config", default=None, help="experiment YAML (e.g. configs/mnist5k.yaml)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
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
    _, section, short, _ = COMMANDS[command]
    out = []
    for pair in overrides:
        key = pair.split("=", 1)[0].strip()
        out.append(f"{section}.{pair.strip()}" if key in short else pair)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    run = COMMANDS[args.command][0]

    def body():
        if args.command == "plan":
            from semivit.cli import print_plan

            return print_plan(args, diffusion=True)
        cfg = load_config(args.config, expand_overrides(args.command, args.overrides))
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
