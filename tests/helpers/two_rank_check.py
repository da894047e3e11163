"""Run under ``accelerate launch --num_processes 2``: checks the distributed path of stage 1b.

Writes ``<out>/two_rank.json`` (rank 0) with what the test asserts: both ranks read the same
split from the run's file, saw different data, and hold identical parameters after optimizer steps; the evaluation of a
classifier folder; and the result of the real ``semi`` command on two ranks.
"""

import json
import sys
from pathlib import Path

import torch

from semivit.cli import main as cli_main
from semivit.config.load import load_config
from semivit.data.run_split import run_split
from semivit.data.sources import build_data
from semivit.data.views import TwoViewDataset, ViewDataset, build_transforms
from semivit.runtime.accelerator import make_accelerator
from semivit.stages.common import build_classifier, make_ema, make_loader, make_optimizer
from semivit.stages.evaluate import run_evaluate
from semivit.stages.semi import train_step


def main():
    out, finetuned, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    cfg = load_config(None, [f"output_dir={out}", *overrides])
    acc = make_accelerator(cfg, out / "check")
    bundle = build_data(cfg.data)
    split = run_split(cfg, bundle.train, "check")  # rank 0 writes <out>/label_split.csv, both read it
    splits = acc.gather(torch.as_tensor(split.labeled).unsqueeze(0))

    # a few real semi steps with the prepared (DDP) model
    tf = build_transforms(cfg.data, bundle)
    model = build_classifier(cfg, bundle, None)
    ema = make_ema(model, 0.9)
    opt = make_optimizer(model, 1e-3, 0.05, 0.75)
    lab = make_loader(ViewDataset(bundle.train, split.labeled, tf["train"]), 8, True, cfg)
    unl = make_loader(TwoViewDataset(bundle.train, split.unlabeled, tf["weak"], tf["strong"]), 16, True, cfg)
    model, opt, lab, unl = acc.prepare(model, opt, lab, unl)
    ema.to(acc.device)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    seen = []
    for step, ((x_l, y_l, _), (w, s, _, idx)) in enumerate(zip(lab, unl, strict=False)):
        if step == 3:
            break
        seen.append(idx)
        losses, _, _ = train_step(model, ema, acc, crit, None, cfg.semi, bundle.num_classes, x_l, y_l, w, s)
        acc.backward(losses[0])
        opt.step()
        opt.zero_grad()
        ema.update(acc.unwrap_model(model))
    flat = torch.cat([p.detach().flatten() for p in acc.unwrap_model(model).parameters()]).unsqueeze(0)
    params = acc.gather(flat)
    first_idx = acc.gather(seen[0].unsqueeze(0))

    streams = training_draws(cfg, out, bundle, tf)
    metrics = run_evaluate(cfg, finetuned)
    rc = cli_main(["semi", f"output_dir={out}", f"checkpoint={finetuned}", *overrides])
    if acc.is_main_process:
        result = {
            "world": acc.num_processes,
            "same_split": bool((splits[0] == splits[1]).all()),
            "different_batches": not torch.equal(first_idx[0], first_idx[1]),
            "same_params": bool(torch.equal(params[0], params[1])),
            "eval": {k: v for k, v in metrics.items() if not isinstance(v, list)},
            "semi_rc": rc,
            **streams,
        }
        (out / "two_rank.json").write_text(json.dumps(result))


def training_draws(cfg, out, bundle, tf) -> dict:
    """What each rank draws inside the training loop: noise, MAE masks, mixup permutations and
    augmentations must differ across ranks; a generated image's starting noise must not."""
    import random

    import numpy as np
    from torch.utils.data import TensorDataset

    from dpt.diffusion.sampling import image_noise, image_seed
    from semivit.runtime.loop import Trainer
    from semivit.stages.ssl import prob_pseudo_mixup

    trainer = Trainer(cfg, "draws", out / "draws", sections=())
    model = torch.nn.Linear(2, 1)
    loader = trainer.loader(TensorDataset(torch.zeros(8, 2)), 2)
    model, loader = trainer.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0), loader)
    trainer.schedule(1, 0)
    seen = []
    image = bundle.train.load(0)

    def step(batch):
        pm = prob_pseudo_mixup(torch.rand(6, 1, 8, 8), torch.rand(6), torch.zeros(6, dtype=torch.long), 10, 0.5)
        seen.append(torch.cat([
            torch.randn(3),  # diffusion noise, timesteps, MAE masks: torch's generator
            torch.tensor([np.random.rand(), random.random()], dtype=torch.float32),
            pm["perm"].float(),
            tf["strong"](image).flatten()[:32],
        ]))
        return {"loss": model(batch[0]).sum() * 0.0}

    trainer.fit(1, lambda epoch: loader, step)
    draws = trainer.accelerator.gather(torch.stack(seen).unsqueeze(0))
    noise, _ = image_noise([image_seed(cfg.seed, 3, 7)], (1, 4, 4))
    noises = trainer.accelerator.gather(noise)
    parts = {"noise": slice(0, 3), "numpy_python": slice(3, 5), "mixup_perm": slice(5, 11), "augmentation": slice(11, None)}
    return {
        "different_draws": {k: not torch.equal(draws[0][:, sl], draws[1][:, sl]) for k, sl in parts.items()},
        "same_generation_noise": bool(torch.equal(noises[0], noises[1])),
    }


if __name__ == "__main__":
    main()
