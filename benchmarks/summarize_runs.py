"""Mean and spread of pipeline runs over seeds: reads RUN/summary.json of each run folder given.

    for s in 0 1 2; do python -m dpt run --config configs/mnist5k.yaml seed=$s output_dir=runs/mnist5k_seed$s; done
    python -m benchmarks.summarize_runs runs/mnist5k_seed* [--out NAME.json]

Prints the table; --out also writes it as JSON with its provenance (command, commit, machine): a
bare file name goes to benchmarks/results/summarize_runs/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.record import result_dir, write_result
from semivit.runtime.layout import RunLayout

KEYS = [
    ("supervised_top1", "supervised (MAE + fine-tuning), top-1 %"),
    ("semivit_top1", "Semi-ViT (stage 1), top-1 %"),
    ("dpt_top1", "DPT (stage 3), top-1 %"),
    ("ceiling_top1", "ceiling (all 4000 labels), top-1 %"),
    ("pseudo_label_acc", "pseudo-label accuracy %"),
    ("synthetic_class_acc", "synthetic class accuracy %"),
    ("fid", "FID (judge features)"),
]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="run folders (each with its summary.json)")
    p.add_argument("--out", default="", help="also write the table as JSON (a bare name: benchmarks/results/summarize_runs/)")
    args = p.parse_args(argv)
    runs = [(Path(f).name, json.loads(RunLayout(f).summary.read_text())) for f in args.folders
            if RunLayout(f).summary.is_file()]
    if not runs:
        sys.exit("no summary.json in the folders given")
    table: dict = {"runs": [name for name, _ in runs], "metrics": {}}
    print("| metric | " + " | ".join(name for name, _ in runs) + " | mean ± sd |")
    print("|---|" + "---|" * (len(runs) + 1))
    for key, label in KEYS:
        vals = [s.get(key) for _, s in runs]
        nums = [v for v in vals if isinstance(v, (int, float))]
        spread = f"{statistics.mean(nums):.2f} ± {statistics.stdev(nums):.2f}" if len(nums) > 1 else "-"
        cells = " | ".join(f"{v:.2f}" if isinstance(v, (int, float)) else "-" for v in vals)
        print(f"| {label} | {cells} | {spread} |")
        table["metrics"][key] = {
            "values": vals,
            "mean": statistics.mean(nums) if nums else None,
            "sd": statistics.stdev(nums) if len(nums) > 1 else None,
        }
    secs = [sum(v for v in s.get("stage_seconds", {}).values() if v) for _, s in runs]
    print("| wall time of the run, minutes | " + " | ".join(f"{x / 60:.1f}" for x in secs) + " | - |")
    table["wall_minutes"] = [x / 60 for x in secs]
    if args.out:
        out = Path(args.out) if Path(args.out).parent != Path(".") else result_dir(__name__) / args.out
        print(f"results: {write_result(out, table, argv=None if argv is None else [__file__, *argv])}")
    return table


if __name__ == "__main__":
    main()
