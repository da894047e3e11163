"""One USB (``semilearn``) cell of benchmarks/peers.py: FixMatch, FlexMatch, FreeMatch or SoftMatch,
run by USB's own training loop and algorithm code on this project's data, views and model.

Run by peers.py in a child process of the Python that has ``semilearn`` (``--usb-python``):

    python -m benchmarks.peers_usb --config C --start FOLDER --algorithm fixmatch --steps N --epochs E \\
        --seed S --out cell.json [key=value ...]

What is USB's and what is this project's:
  * USB's: the algorithm class (its ``train_step``, thresholds, hooks: FlexMatch's class-wise
    thresholds, FreeMatch's self-adaptive ones, SoftMatch's truncated Gaussian weights), its
    training loop (``AlgorithmBase.train``), its EMA model, its AdamW parameter groups with layer
    decay and its cosine schedule with warm-up, its default algorithm settings (``get_argument``)
    and ``ulb_loss_ratio`` 1.0.
  * this project's: the data (the same labeled split through ``data.label_csv``, the same
    unlabeled images), the views (the semi stage's labeled, weak and strong views), the network
    (the classifier of ``--start``, the fine-tuned model Semi-ViT starts from, wrapped to return
    USB's ``{"logits", "feat"}``), and the budget: steps, labeled batch, ``uratio`` = ``semi.mu``,
    lr, weight decay, layer decay, warm-up steps and EMA momentum of the ``semi`` section.

On a machine without a GPU, ``torch.Tensor.cuda`` and ``torch.nn.Module.cuda`` become no-ops in
this process (USB calls ``.cuda()`` in its loop and hooks); on a GPU USB runs as shipped. USB's
audio/text/logging imports (torchaudio, transformers, wandb, aim) are stood in for when they are
not installed: the image algorithms never call them.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import random
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

USB_ALGORITHMS = ("fixmatch", "flexmatch", "freematch", "softmatch")
# imported by semilearn's audio / text / logging modules only; never called by the image algorithms
OPTIONAL_IMPORTS = ("torchaudio", "transformers", "wandb", "aim")
# USB hooks this harness leaves out: evaluation on the test set during training, checkpoints, logs;
# on the CPU also the timer, which records CUDA events (the cell's wall time is measured here)
DROPPED_HOOKS = ("EvaluationHook", "CheckpointHook", "LoggingHook", "WANDBHook", "AimHook")
CPU_DROPPED_HOOKS = ("TimerHook",)


class _Absent(types.ModuleType):
    """A module that imports but is never meant to be used: any attribute is another such module."""

    def __getattr__(self, key):
        if key.startswith("__"):
            raise AttributeError(key)
        return _Absent(f"{self.__name__}.{key}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} is not installed (benchmarks.peers_usb stands in for it)")


class _AbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Absent(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def usb_available() -> str | None:
    """None when semilearn can be imported here, else why not."""
    if importlib.util.find_spec("semilearn") is None:
        return "the semilearn package is not installed in this Python (pip install -e .[peers])"
    return None


def import_semilearn(cpu: bool):
    """Import semilearn with stand-ins for its unused optional imports; on the CPU, ``.cuda()`` is a no-op."""
    missing = [m for m in OPTIONAL_IMPORTS if importlib.util.find_spec(m) is None]
    if missing:
        sys.meta_path.insert(0, _AbsentFinder(missing))
    if cpu:
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    import semilearn

    return semilearn


def _usb_forward(self, x, only_fc: bool = False, only_feat: bool = False, **kwargs):
    if only_fc:
        return self.get_classifier()(x)
    feat = self.forward_head(self.forward_features(x), pre_logits=True)
    if only_feat:
        return feat
    return {"logits": self.get_classifier()(feat), "feat": feat}


def usb_net(net: torch.nn.Module) -> torch.nn.Module:
    """The timm classifier itself with USB's network interface: ``forward(x)`` -> ``{"logits", "feat"}``
    (``only_feat`` / ``only_fc``). Its class becomes a subclass, so parameter names, ``group_matcher``
    (USB's layer decay) and ``no_weight_decay`` stay the classifier's."""
    cls = type(net)
    net.__class__ = type(f"USB{cls.__name__}", (cls,), {"forward": _usb_forward})
    return net


class Labeled(Dataset):
    def __init__(self, source, indices, view):
        self.source, self.indices, self.view = source, np.asarray(indices), view

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = int(self.indices[k])
        return {"idx_lb": k, "x_lb": self.view(self.source.load(i)), "y_lb": int(self.source.targets[i])}


class Unlabeled(Labeled):
    def __init__(self, source, indices, weak, strong):
        super().__init__(source, indices, weak)
        self.strong = strong

    def __getitem__(self, k):
        img = self.source.load(int(self.indices[k]))
        return {"idx_ulb": k, "x_ulb_w": self.view(img), "x_ulb_s": self.strong(img)}


def usb_args(semilearn, algorithm: str, cfg, num_classes: int, steps: int, epochs: int, seed: int, save_dir: str, gpu):
    sc = cfg.semi
    per_epoch = max(1, steps // epochs)
    return semilearn.get_config({
        "algorithm": algorithm, "net": "project_classifier", "dataset": cfg.data.name, "num_classes": num_classes,
        "num_labels": 0, "img_size": cfg.data.image_size, "num_train_iter": steps, "epoch": epochs,
        "num_warmup_iter": int(sc.warmup_epochs * per_epoch), "num_eval_iter": steps + 1, "num_log_iter": steps + 1,
        "batch_size": sc.batch_size, "uratio": sc.mu, "eval_batch_size": 256, "ema_m": sc.ema_decay,
        "optim": "AdamW", "lr": sc.lr, "weight_decay": sc.weight_decay, "layer_decay": sc.layer_decay,
        "clip_grad": sc.clip_grad, "amp": False, "seed": seed, "gpu": gpu, "num_workers": 0,
        "save_dir": save_dir, "save_name": algorithm, "use_wandb": False, "use_aim": False, "use_tensorboard": False,
        "distributed": False, "world_size": 1, "rank": 0, "multiprocessing_distributed": False,
    })


def run_cell(cfg, start: str, algorithm: str, steps: int, epochs: int, seed: int) -> dict:
    """Train ``algorithm`` from the classifier folder ``start``; top-1 of USB's EMA model and of the
    final student on the held-out split."""
    from semivit.data.run_split import run_split
    from semivit.data.sources import build_data
    from semivit.data.views import build_transforms
    from semivit.models.classifier import load_classifier

    cpu = not torch.cuda.is_available()
    semilearn = import_semilearn(cpu)
    from semilearn.algorithms import name2alg

    t0 = time.time()  # as for this project's cells: data, model, training and the final evaluation
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    bundle = build_data(cfg.data)
    tf = build_transforms(cfg.data, bundle)
    split = run_split(cfg, bundle.train, "peers")
    datasets = {
        "train_lb": Labeled(bundle.train, split.labeled, tf.get("semi_labeled", tf["train"])),
        "train_ulb": Unlabeled(bundle.train, split.unlabeled, tf["weak"], tf["strong"]),
        "eval": Labeled(bundle.test, np.arange(len(bundle.test)), tf["test"]),
        "test": None,
    }
    gpu = None if cpu else 0

    def net_builder(num_classes, pretrained=False, pretrained_path=None, **kwargs):
        net, _ = load_classifier(start, prefer_ema=True)
        return usb_net(net.train()).to("cpu" if cpu else "cuda")

    base = name2alg[algorithm]

    class Peer(base):
        def set_dataset(self):
            self.args.lb_dest_len = len(datasets["train_lb"])
            self.args.ulb_dest_len = len(datasets["train_ulb"])
            return datasets

        def set_hooks(self):
            super().set_hooks()
            drop = DROPPED_HOOKS + (CPU_DROPPED_HOOKS if cpu else ())
            self._hooks = [h for h in self._hooks if type(h).__name__ not in drop]
            self.hooks_dict = {h.name: h for h in self._hooks}

    with tempfile.TemporaryDirectory() as save_dir:
        args = usb_args(semilearn, algorithm, cfg, bundle.num_classes, steps, epochs, seed, save_dir, gpu)
        alg = Peer(args, net_builder, tb_log=None, logger=None)
        t_train = time.time()
        alg.train()
        train_s = time.time() - t_train
    alg.ema.apply_shadow()
    top1_ema = accuracy(alg.model, datasets["eval"], cpu)
    alg.ema.restore()
    top1 = accuracy(alg.model, datasets["eval"], cpu)
    wall = time.time() - t0
    images = steps * (1 + sc_mu(cfg)) * cfg.semi.batch_size
    return {"top1": top1_ema, "top1_student": top1, "top1_kind": "ema", "wall_s": wall, "images_per_s": images / wall,
            "train_loop_s": train_s,
            "last_step_log": {k: float(v) for k, v in (getattr(alg, "log_dict", None) or {}).items()
                              if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)},
            "steps": int(alg.it), "images_per_step": (1 + sc_mu(cfg)) * cfg.semi.batch_size,
            "runner": f"semilearn {semilearn_version()} ({'CPU, .cuda() as a no-op' if cpu else 'GPU, as shipped'})"}


def sc_mu(cfg) -> int:
    return int(cfg.semi.mu)


def semilearn_version() -> str:
    try:
        from importlib.metadata import version

        return version("semilearn")
    except Exception:  # noqa: BLE001 - a source checkout has no metadata
        return "unknown"


@torch.no_grad()
def accuracy(model: torch.nn.Module, dataset: Dataset, cpu: bool) -> float:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False)
    correct = total = 0
    device = "cpu" if cpu else "cuda"
    for batch in loader:
        logits = model(batch["x_lb"].to(device))["logits"]
        correct += int((logits.argmax(1).cpu() == batch["y_lb"]).sum())
        total += len(batch["y_lb"])
    model.train()
    return 100.0 * correct / total


def main(argv=None) -> int:
    from semivit.config.load import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--start", required=True, help="the fine-tuned classifier folder every SSL cell starts from")
    p.add_argument("--algorithm", choices=USB_ALGORITHMS, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON file of the cell's numbers")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    why = usb_available()
    if why:
        print(f"USB cell skipped: {why}", file=sys.stderr)
        return 3
    cfg = load_config(a.config, a.overrides)
    cell = run_cell(cfg, a.start, a.algorithm, a.steps, a.epochs, a.seed)
    Path(a.out).write_text(json.dumps(cell, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
