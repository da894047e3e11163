"""Stage-2 benchmark on MNIST-5k: oracle generator (true labels) vs generator on stage-1 pseudo-labels.

    nice python -m benchmarks.stage2_mnist --phase all

Phases (each skipped when its output exists, so a phase can be re-run on its own):
  stage1   MAE pre-training, fine-tuning (10 labels/class), Semi-ViT, pseudo-labels (semivit, config defaults)
  judge    a classifier trained on all 4000 true labels (judges synthetic class accuracy, gives FID features)
  oracle   train-diffusion on the true labels + generate 100 per class
  pseudo   train-diffusion on stage-1 pseudo-labels + generate 100 per class
  speed    our guided sampling loop vs diffusers' DiTPipeline loop on the same model and steps
  report   FID (1000 real test images vs 1000 generated, judge features) and synthetic class accuracy
Runs go to --out (default runs/bench/stage2_mnist/). Prints a table and writes
stage2_results.json with its provenance (command, commit, machine) to --results (default
benchmarks/results/stage2_mnist/). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.record import ROOT, result_dir, run_dir, write_result
from semivit.config.load import load_config
from semivit.runtime.layout import MANIFEST, META, METRICS, RunLayout, layout

CONFIG = ROOT / "configs" / "mnist5k.yaml"
JUDGE_MODEL = "vit_micro_patch4"  # small enough to train on all 4000 labels in minutes on a CPU


def cfg_for(out: Path, name: str, *extra: str):
    return load_config(CONFIG, [f"output_dir={out / name}", "tensorboard=false", *extra])


def phase_stage1(out: Path, overrides: list[str]) -> None:
    cfg = cfg_for(out, "pseudo", *overrides)
    if layout(cfg).pseudo_labels_csv.is_file():
        return
    from semivit.stages.finetune import run_finetune
    from semivit.stages.pretrain import run_pretrain
    from semivit.stages.pseudo_label import run_pseudo_label
    from semivit.stages.semi import run_semi

    t = time.time()
    if cfg.model.init != "none":
        run_pretrain(cfg)
    run_finetune(cfg)
    run_semi(cfg)
    run_pseudo_label(cfg)
    (out / "stage1_seconds.txt").write_text(f"{time.time() - t:.0f}\n")


def phase_standin_labels(out: Path) -> None:
    """Pseudo-labels from a quick stand-in labeler (sklearn LabelSpreading on pixels, same 10 labels per
    class as stage 1) for when the Semi-ViT stage-1 run is not available; the report names the source."""
    cfg = cfg_for(out, "pseudo")
    path = layout(cfg).pseudo_labels_csv
    if path.is_file():
        return
    import numpy as np
    from sklearn.semi_supervised import LabelSpreading

    from semivit.data.run_split import run_split
    from semivit.data.sources import build_data

    bundle = build_data(cfg.data)
    src = bundle.train
    split = run_split(cfg, src, "stand-in labels")
    x = np.stack([np.asarray(src.load(i), dtype=np.float32).ravel() / 255.0 for i in range(len(src))])
    y = np.full(len(src), -1)
    y[split.labeled] = src.targets[split.labeled]
    from sklearn.decomposition import PCA

    x = PCA(50, random_state=0).fit_transform(x)
    ls = LabelSpreading(kernel="knn", n_neighbors=10, alpha=0.99, max_iter=200).fit(x, y)
    prob = ls.label_distributions_
    label, conf = prob.argmax(1), prob.max(1)
    label[split.labeled], conf[split.labeled] = src.targets[split.labeled], 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["index,path,label,confidence,true_label"]
    lines += [f"{i},{src.paths[i]},{label[i]},{conf[i]:.4f},{src.targets[i]}" for i in range(len(src))]
    path.write_text("\n".join(lines) + "\n")
    acc = float((label == src.targets).mean())
    (layout(cfg).stage1 / "pseudo_labels_source.json").write_text(
        json.dumps({"labeler": "sklearn LabelSpreading(knn k=10, alpha 0.99) on PCA-50 pixels (stand-in for Semi-ViT)", "accuracy": acc})
    )
    print(f"stand-in pseudo-labels: accuracy {acc:.4f} on the 4000 training images")


def phase_judge(out: Path, overrides: list[str]) -> None:
    if (RunLayout(out).judge / META).is_file():
        return
    from semivit.stages.finetune import run_finetune

    cfg = cfg_for(out, "pseudo", *overrides)  # its stage-0 encoder (if any) initialises the judge, as in the pipeline
    judge = copy.deepcopy(cfg)
    judge.data.label_percent = 100.0
    judge.finetune.epochs = cfg.pipeline.judge_epochs
    judge.model.name = JUDGE_MODEL
    judge.data.randaug_num_ops, judge.data.random_erasing = 0, 0.0  # all labels: light augmentation suffices
    run_finetune(judge, out_dir=RunLayout(out).judge, use_run_split=False)


def phase_generator(out: Path, name: str, labels: str) -> None:
    from dpt.generate import run_generate
    from dpt.train_diffusion import run_train_diffusion

    cfg = cfg_for(out, name, f"diffusion.labels={labels}")
    t = time.time()
    if not (layout(cfg).generator / "config.json").is_file():
        run_train_diffusion(cfg)
    if not (layout(cfg).synthetic / MANIFEST).is_file():
        run_generate(cfg)
    (cfg.run_dir / "stage2_wall_seconds.txt").write_text(f"{time.time() - t:.0f}\n")


def phase_speed(out: Path, n: int = 100, steps: int = 25, w: float = 2.0) -> dict:
    """Same DiT weights (label tables for 1000 classes, as DiTPipeline needs), same DPM-Solver++,
    same steps, same batch, same pass-through-sized VAE decode; best of two runs each."""
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    from dpt.diffusion.codec import Codec
    from dpt.diffusion.model import disable_internal_label_dropout, load_generator
    from dpt.diffusion.sampling import image_noise, sample

    trained, sched_cfg, meta = load_generator(RunLayout(out / "oracle").generator)
    conf = dict(trained.config)
    conf["num_embeds_ada_norm"] = 1000
    model = DiTTransformer2DModel.from_config(conf)
    own = model.state_dict()
    own.update({k: v for k, v in trained.state_dict().items() if own[k].shape == v.shape})
    model.load_state_dict(own)
    disable_internal_label_dropout(model)
    model.eval()
    c = conf["in_channels"]
    vae = AutoencoderKL(
        in_channels=c,
        out_channels=c,
        latent_channels=c,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        norm_num_groups=8,
    ).eval()
    sched = DPMSolverMultistepScheduler.from_config(sched_cfg, algorithm_type="dpmsolver++")
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(n)]
    codec = Codec(vae)

    def ours():
        noise, gens = image_noise(list(range(n)), (c, conf["sample_size"], conf["sample_size"]))
        x = sample(
            model,
            DPMSolverMultistepScheduler.from_config(sched_cfg, algorithm_type="dpmsolver++"),
            noise,
            torch.tensor(labels),
            1000,
            w,
            steps,
            gens,
        )
        return codec.decode(x)

    def theirs():
        return pipe(
            class_labels=labels,
            guidance_scale=w,
            num_inference_steps=steps,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )

    times = {"ours": [], "diffusers": []}
    with torch.no_grad():
        for _ in range(2):
            for name, fn in (("ours", ours), ("diffusers", theirs)):
                t = time.time()
                fn()
                times[name].append(time.time() - t)
    best = {k: min(v) for k, v in times.items()}
    res = {
        "images": n,
        "steps": steps,
        "guidance_scale": w,
        "sampler": "dpmsolver++",
        "ours_images_per_s": n / best["ours"],
        "diffusers_images_per_s": n / best["diffusers"],
        "speed_ratio_ours_over_diffusers": best["diffusers"] / best["ours"],
    }
    (out / "speed.json").write_text(json.dumps(res, indent=2))
    return res


def svc_class_accuracy(syn: Path) -> tuple[float, float]:
    """A second, independent judge: an RBF SVM on raw pixels trained on all 4000 true training labels
    (sklearn; ~97% on the MNIST-5k test split). Returns (synthetic class accuracy, its own test top-1)."""
    import numpy as np
    from sklearn.svm import SVC

    from dpt.generate import load_synthetic_source
    from semivit.data.sources import build_data

    bundle = build_data(load_config(CONFIG).data)

    def arr(src):
        return np.stack([np.asarray(src.load(i).convert("L"), dtype=np.float32).ravel() / 255 for i in range(len(src))])

    svc = SVC(C=5.0, gamma="scale").fit(arr(bundle.train), bundle.train.targets)
    test_top1 = float((svc.predict(arr(bundle.test)) == bundle.test.targets).mean())
    src = load_synthetic_source(syn, bundle.classes, 1)
    return float((svc.predict(arr(src)) == src.targets).mean()), test_top1


def phase_report(out: Path, results: Path | None = None, argv: list[str] | None = None) -> dict:
    from dpt.fid import run_fid, synthetic_class_accuracy

    rows = {}
    for name in ("oracle", "pseudo"):
        run = RunLayout(out / name)
        syn = run.synthetic
        if not (syn / MANIFEST).is_file():
            continue
        cfg = cfg_for(
            out,
            name,
            "fid.real=test",
            f"fid.fake={syn}",
            "fid.features=classifier",
            f"fid.classifier={RunLayout(out).judge}",
            "fid.per_class=true",
            f"fid.out={run.fid_json}",
        )
        fid = run_fid(cfg)
        acc = synthetic_class_accuracy(RunLayout(out).judge, syn)
        svc_acc, svc_test = svc_class_accuracy(syn)
        s2 = json.loads((run.stage2 / METRICS).read_text())
        gen = json.loads((syn / METRICS).read_text())
        wall = out / name / "stage2_wall_seconds.txt"  # train + generate when run in one go
        rows[name] = {
            "fid": fid["fid"],
            "fid_features": fid["fid_features"],
            "num_real": fid["num_real"],
            "num_fake": fid["num_fake"],
            "synthetic_class_acc": acc["synthetic_class_acc"],
            "synthetic_class_acc_per_class": acc["per_class"],
            "synthetic_class_acc_svc": svc_acc, "svc_test_top1": svc_test,
            "train_seconds": s2["seconds"],
            "train_label_acc": s2["labels"].get("label_acc_vs_true", 1.0),
            "final_loss": s2["final_loss"],
            "gen_images_per_s": gen["images_per_second"],
            "gen_seconds": gen["seconds"],
            "stage2_wall_seconds": float(wall.read_text()) if wall.is_file() else None,
        }
    speed = out / "speed.json"
    judge = json.loads((RunLayout(out).judge / METRICS).read_text())
    result = {
        "judge_test_top1": judge["top1"], "judge_test_top1_ema": judge["top1_ema"],
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "rows": rows,
        "speed": json.loads(speed.read_text()) if speed.is_file() else None,
    }
    if "oracle" in rows and "pseudo" in rows:
        result["fid_ratio_pseudo_over_oracle"] = rows["pseudo"]["fid"] / max(rows["oracle"]["fid"], 1e-9)
    written = write_result((results or result_dir(__name__)) / "stage2_results.json", result, argv=argv)
    print(f"results: {written}")
    print(
        f"{'run':8s} {'FID':>8s} {'acc ViT':>8s} {'acc SVC':>8s} {'labels acc':>10s} {'train s':>8s} {'gen img/s':>10s} {'stage2 wall s':>14s}"
    )
    for name, r in rows.items():
        print(
            f"{name:8s} {r['fid']:8.3f} {r['synthetic_class_acc']:8.4f} {r['synthetic_class_acc_svc']:8.4f} "
            f"{r['train_label_acc']:10.4f} "
            f"{r['train_seconds']:8.0f} {r['gen_images_per_s']:10.2f} {r['stage2_wall_seconds'] or float('nan'):14.0f}"
        )
    if result["speed"]:
        print(
            "sampling loop speed (ours / diffusers DiTPipeline):",
            f"{result['speed']['speed_ratio_ours_over_diffusers']:.2f}",
        )
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(run_dir(__name__)), help="folder of the runs (default: runs/bench/stage2_mnist)")
    ap.add_argument("--results", default=str(result_dir(__name__)),
                    help="folder of stage2_results.json (default: benchmarks/results/stage2_mnist)")
    ap.add_argument("--stage1", nargs="*", default=[], help="overrides for the stage-1 run (e.g. a shorter recipe)")
    ap.add_argument(
        "--phase", default="all", help="all | stage1 | judge | oracle | pseudo | speed | report (comma list)"
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = (
        ["stage1", "judge", "oracle", "pseudo", "speed", "report"] if args.phase == "all" else args.phase.split(",")
    )
    for p in phases:
        t = time.time()
        if p == "stage1":
            phase_stage1(out, args.stage1)
        elif p == "standin":
            phase_standin_labels(out)
        elif p == "judge":
            phase_judge(out, args.stage1)
        elif p == "oracle":
            phase_generator(out, "oracle", "true")
        elif p == "pseudo":
            phase_generator(out, "pseudo", "auto")
        elif p == "speed":
            print(json.dumps(phase_speed(out), indent=2))
        elif p == "report":
            phase_report(out, Path(args.results), argv=None if argv is None else [__file__, *argv])
        print(f"[bench] phase {p}: {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
