"""Mean and spread of pipeline runs over seeds: reads RUN/summary.json of each run folder given.

    for s in 0 1 2; do python -m dpt run --config configs/mnist5k.yaml seed=$s output_dir=runs/mnist5k_seed$s; done
    python benchmarks/summarize_runs.py runs/mnist5k_seed*
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semivit.runtime.layout import RunLayout  # noqa: E402

KEYS = [
    ("supervised_top1", "supervised (MAE + fine-tuning), top-1 %"),
    ("semivit_top1", "Semi-ViT (stage 1), top-1 %"),
    ("dpt_top1", "DPT (stage 3), top-1 %"),
    ("ceiling_top1", "ceiling (all 4000 labels), top-1 %"),
    ("pseudo_label_acc", "pseudo-label accuracy %"),
    ("synthetic_class_acc", "synthetic class accuracy %"),
    ("fid", "FID (judge features)"),
]


def main(folders: list[str]) -> None:
    runs = [(Path(f).name, json.loads(RunLayout(f).summary.read_text())) for f in folders
            if RunLayout(f).summary.is_file()]
    if not runs:
        sys.exit("no summary.json in the folders given")
    print("| metric | " + " | ".join(name for name, _ in runs) + " | mean ± sd |")
    print("|---|" + "---|" * (len(runs) + 1))
    for key, label in KEYS:
        vals = [s.get(key) for _, s in runs]
        nums = [v for v in vals if isinstance(v, (int, float))]
        spread = f"{statistics.mean(nums):.2f} ± {statistics.stdev(nums):.2f}" if len(nums) > 1 else "-"
        cells = " | ".join(f"{v:.2f}" if isinstance(v, (int, float)) else "-" for v in vals)
        print(f"| {label} | {cells} | {spread} |")
    secs = [sum(v for v in s.get("stage_seconds", {}).values() if v) for _, s in runs]
    print("| wall time of the run, minutes | " + " | ".join(f"{x / 60:.1f}" for x in secs) + " | - |")


if __name__ == "__main__":
    main(sys.argv[1:])
