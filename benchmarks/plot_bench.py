"""Bar chart of stage-3 benchmark results side by side: mean top-1 with each seed as a dot.

    python -m benchmarks.plot_bench benchmarks/results/stage3_mnist/mnist5k_l2_stage3_bench.json:"no alignment" \\
        benchmarks/results/stage3_mnist/mnist5k_l2da_stage3_bench.json:"semi.dist_align=uniform" \\
        --out mnist5k_l2_dist_align.png

Each argument is a JSON written by ``python -m benchmarks.stage3_mnist`` and, after a colon, its
label. --out is a file name in benchmarks/results/plot_bench/ or a path.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.record import read_result, result_dir

ROWS = [
    ("supervised", "supervised"),
    ("semivit", "Semi-ViT"),
    ("dpt_k0_w2", "stage 3, K = 0"),
    ("dpt_k100_w2", "DPT, K = 100"),
]


def load(arg: str) -> tuple[str, list[dict]]:
    path, _, label = arg.partition(":")
    if not Path(path).is_file():
        raise SystemExit(f"{path}: not found; run python -m benchmarks.stage3_mnist first")
    return label or Path(path).stem, read_result(path)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benches", nargs="+", help="FILE.json[:label]")
    p.add_argument("--out", required=True, help="PNG: a bare file name goes to benchmarks/results/plot_bench/")
    args = p.parse_args(argv)
    out = Path(args.out) if Path(args.out).parent != Path(".") else result_dir(__name__) / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    from semivit.files import pyplot

    plt = pyplot()

    sets = [load(a) for a in args.benches]
    lows = [r[k] for _, rows in sets for r in rows for k, _ in ROWS if isinstance(r.get(k), (int, float))]
    bottom = max(0.0, min(lows) - 10)
    width = 0.8 / len(sets)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for j, (label, rows) in enumerate(sets):
        for i, (key, _) in enumerate(ROWS):
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if not vals:
                continue
            x = i + (j - (len(sets) - 1) / 2) * width
            ax.bar(x, statistics.mean(vals), width, color=f"C{j}", alpha=0.6, label=label if i == 0 else None)
            ax.scatter([x] * len(vals), vals, color=f"C{j}", s=12, zorder=3)
            ax.text(x, bottom + 1, f"{statistics.mean(vals):.1f}", ha="center", fontsize=7)
    ax.set_xticks(range(len(ROWS)), [name for _, name in ROWS])
    ax.set_ylabel("top-1 % (EMA), dots: seeds")
    ax.set_ylim(bottom, min(100.0, max(lows) + 5))
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
