"""Fault matrix: every way a user can get the input wrong ends with exit code 2 and one line.

Each case runs in-process through a CLI's ``main(argv)``: settings, files, weights (damaged,
pickled with a payload that must never run), class lists, the run lock and the output folder.
``python tests/test_reliability.py`` prints the matrix as a markdown table (case | what the user
sees) for docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.reads import only_read
from PIL import Image

import dpt.cli
import semivit.cli

# --------------------------------------------------------------------------------------------
# Things to break
# --------------------------------------------------------------------------------------------

DIGITS = [
    "data.name=digits", "data.image_size=8", "data.max_train=60", "data.max_test=20", "data.labels_per_class=2",
    "model.name=vit_micro_patch4", "tensorboard=false", "finetune.epochs=1", "finetune.batch_size=8",
    "semi.epochs=1", "semi.batch_size=4", "semi.mu=1",
]
SEMI_DIGITS = [s for s in DIGITS if not s.startswith("finetune.")]  # what `semivit semi` reads of them


def payload(path: Path, marker: Path) -> Path:
    """A torch file whose unpickling would run ``touch MARKER``."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": Payload()}, path)
    return path


def truncated_safetensors(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def write_images(folder: Path, n: int, channels: int = 3, size: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        shape = (size, size) if channels == 1 else (size, size, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"{i:03d}.png")


def class_folders(folder: Path, classes: list[str], per_class: int) -> Path:
    for c in classes:
        write_images(folder / c, per_class)
    return folder


def imagefolder(root: Path, classes: list[str], per_class: int = 3) -> Path:
    for split in ("train", "val"):
        class_folders(root / split, classes, per_class)
    return root


def imagefolder_args(root: Path) -> list[str]:
    return ["data.name=imagefolder", f"data.root={root}", "data.image_size=8", "data.labels_per_class=1",
            "model.name=vit_micro_patch4", "tensorboard=false"]


def classifier(folder: Path, classes: list[str], channels: int = 3, model: str = "vit_micro_patch4") -> Path:
    from semivit.config.schema import ModelConfig
    from semivit.models.classifier import create_classifier, save_classifier

    net = create_classifier(ModelConfig(name=model, drop_path=0.0), len(classes), 8, channels)
    meta = {"classes": classes, "channels": channels, "image_size": 8, "mean": [0.5] * channels,
            "std": [0.5] * channels, "model": model, "global_pool": "avg"}
    save_classifier(folder, net, net, meta)
    return folder


def generator(folder: Path, classes: list[str]) -> Path:
    from dpt.diffusion.model import build_denoiser, save_generator
    from dpt.diffusion.sampling import make_noise_scheduler
    from semivit.config.schema import DiffusionConfig

    dcfg = DiffusionConfig(patch_size=2, hidden_size=16, depth=1, num_heads=2, num_train_timesteps=50)
    net = build_denoiser(dcfg, len(classes), channels=1, sample_size=8)
    meta = {"classes": classes, "num_classes": len(classes), "null_label": len(classes), "channels": 1,
            "image_size": 8, "model_channels": 1, "model_size": 8, "vae": ""}
    save_generator(folder, net, make_noise_scheduler(dcfg, latent=False), meta)
    return folder


def synthetic_set(folder: Path, classes: list[str], per_class: int = 5) -> Path:
    lines = ["file,label,class_name,seed,guidance_scale,sampler,steps,model"]
    for c, name in enumerate(classes):
        write_images(folder / name, per_class, channels=1)
        lines += [f"{name}/{i:03d}.png,{c},{name},0,2.0,ddim,5,m" for i in range(per_class)]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


def random_inception(path: Path) -> Path:
    """The FID Inception-v3 in torch-fidelity's layout with random weights: its constructor insists
    on loading a file, so a subclass skips that step and the fresh network's state dict is saved."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    torch.save(net.state_dict(), path)
    return path


def lock_file(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "command": "dpt run --config configs/big.yaml",
              "started": "2025-01-01T09:00:00+00:00", "start_ticks": None, "token": "other"}
    (folder / "run.lock").write_text(json.dumps(record))
    return folder


# --------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    prog: str  # semivit | dpt
    argv: Callable[[Path], list[str]]  # tmp folder -> arguments after the program name
    expect: str
    payload: bool = False  # a pickle payload is involved: its marker file must never appear


def out(t: Path) -> str:
    return f"output_dir={t / 'run'}"


def evil(t: Path) -> Path:
    return payload(t / "evil.pth", t / "MARKER")


def abc_data(t: Path) -> Path:
    return imagefolder(t / "data", ["a", "b", "x"])


CASES: list[Case] = [
    # ---- settings ----------------------------------------------------------------------------
    Case("negative learning rate", "semivit", lambda t: ["finetune", out(t), *DIGITS, "finetune.lr=-1"],
         "setting 'finetune.lr' must be > 0 (got -1)"),
    Case("batch size 0 (train-diffusion)", "dpt",
         lambda t: ["train-diffusion", "--config", "configs/tiny.yaml", out(t), "labels=true", "diffusion.batch_size=0"],
         "setting 'diffusion.batch_size' must be >= 1 (got 0)"),
    Case("batch size 0 (finetune)", "semivit", lambda t: ["finetune", out(t), *DIGITS, "finetune.batch_size=0"],
         "setting 'finetune.batch_size' must be >= 1 (got 0)"),
    Case("semi.mu=0", "semivit", lambda t: ["semi", out(t), *DIGITS, "semi.mu=0"], "setting 'semi.mu' must be >= 1 (got 0)"),
    Case("data.channels=2", "semivit", lambda t: ["finetune", out(t), *DIGITS, "data.channels=2"],
         "setting 'data.channels' must be one of 0, 1, 3 (got 2)"),
    Case("data.image_size=0", "semivit", lambda t: ["pretrain", out(t), *DIGITS, "data.image_size=0"],
         "setting 'data.image_size' must be >= 1 (got 0)"),
    Case("image size not divisible by the ViT patch", "semivit",
         lambda t: ["finetune", out(t), *DIGITS, "data.image_size=30"], "must be divisible by 4, the patch size"),
    Case("tau above 1", "semivit", lambda t: ["semi", out(t), *DIGITS, "semi.tau=1.5"], "setting 'semi.tau' must lie in [0, 1]"),
    Case("p_uncond 1", "dpt", lambda t: ["train-diffusion", out(t), *DIGITS, "diffusion.p_uncond=1"],
         "setting 'diffusion.p_uncond' must lie in [0, 1)"),
    Case("MAE mask ratio 1", "semivit", lambda t: ["pretrain", out(t), *DIGITS, "pretrain.mask_ratio=1"],
         "setting 'pretrain.mask_ratio' must lie in (0, 1)"),
    Case("label smoothing 1", "semivit", lambda t: ["finetune", out(t), *DIGITS, "finetune.label_smoothing=1"],
         "setting 'finetune.label_smoothing' must lie in [0, 1)"),
    Case("EMA decay 1", "semivit", lambda t: ["semi", out(t), *DIGITS, "semi.ema_decay=1"],
         "setting 'semi.ema_decay' must lie in [0, 1)"),
    Case("cutmix probability 2", "semivit", lambda t: ["semi", out(t), *DIGITS, "semi.pseudo_mixup_cutmix_prob=2"],
         "setting 'semi.pseudo_mixup_cutmix_prob' must lie in [0, 1]"),
    Case("synthetic ratio 1 without synthetic_only", "dpt", lambda t: ["retrain", out(t), "synthetic_ratio=1"],
         "setting 'retrain.synthetic_ratio' must lie in (0, 1)"),
    Case("learning rate NaN", "semivit", lambda t: ["semi", out(t), *DIGITS, "semi.lr=nan"],
         "setting 'semi.lr' must be a finite number"),
    Case("min_lr above lr", "semivit", lambda t: ["finetune", out(t), *DIGITS, "finetune.lr=1e-4", "finetune.min_lr=1e-3"],
         "setting 'finetune.min_lr' must be <= finetune.lr"),
    Case("grad_accum 0", "dpt", lambda t: ["train-diffusion", out(t), *DIGITS, "diffusion.grad_accum=0"],
         "setting 'diffusion.grad_accum' must be >= 1"),
    Case("generate.steps=0", "dpt", lambda t: ["generate", out(t), "steps=0"], "setting 'generate.steps' must be >= 1"),
    Case("negative num_per_class", "dpt", lambda t: ["generate", out(t), "num_per_class=-1"],
         "setting 'generate.num_per_class' must be >= 0"),
    Case("negative guidance", "dpt", lambda t: ["generate", out(t), "guidance_scale=-1"],
         "setting 'generate.guidance_scale' must be >= 0"),
    Case("unknown sampler", "dpt", lambda t: ["generate", out(t), "sampler=euler"],
         "setting 'generate.sampler' must be one of ddpm, ddim, dpmsolver++, sde-dpmsolver++ (got 'euler')"),
    Case("unknown diffusion model", "dpt", lambda t: ["train-diffusion", out(t), "diffusion.model=gan"],
         "setting 'diffusion.model' must be one of dit, unet"),
    Case("unknown prediction type", "dpt", lambda t: ["train-diffusion", out(t), "diffusion.prediction_type=x0"],
         "setting 'diffusion.prediction_type' must be one of"),
    Case("unknown beta schedule", "dpt", lambda t: ["train-diffusion", out(t), "diffusion.beta_schedule=cosine"],
         "setting 'diffusion.beta_schedule' must be one of"),
    Case("DiT width not a multiple of heads", "dpt", lambda t: ["train-diffusion", out(t), "diffusion.num_heads=3"],
         "setting 'diffusion.hidden_size' must be a multiple of diffusion.num_heads=3"),
    Case("DiT patch not dividing the size", "dpt",
         lambda t: ["train-diffusion", "--config", "configs/tiny.yaml", out(t), "diffusion.patch_size=3"],
         "setting 'diffusion.patch_size' must divide the generator's input size 16"),
    Case("unknown FID features", "dpt", lambda t: ["fid", out(t), "features=clip"], "setting 'fid.features' must be one of"),
    Case("fid.batch_size=0", "dpt", lambda t: ["fid", out(t), "fid.batch_size=0"], "setting 'fid.batch_size' must be >= 1"),
    Case("pipeline.judge_epochs=0", "dpt", lambda t: ["run", out(t), "pipeline.judge_epochs=0"],
         "setting 'pipeline.judge_epochs' must be >= 1"),
    Case("unknown data set", "semivit", lambda t: ["finetune", out(t), "data.name=imagenet"],
         "setting 'data.name' must be one of"),
    Case("label percent above 100", "semivit", lambda t: ["finetune", out(t), *DIGITS, "data.label_percent=150"],
         "setting 'data.label_percent' must lie in [0, 100]"),
    Case("misspelt setting", "semivit", lambda t: ["finetune", out(t), "semi.lamda_u=1"], "Did you mean 'lambda_u'"),
    Case("wrong type", "dpt", lambda t: ["generate", out(t), "steps=many"], "setting 'generate.steps' expects int"),
    Case("override without '='", "semivit", lambda t: ["finetune", out(t), "seed"], "is not of the form key=value"),
    Case("setting from a YAML file", "semivit", lambda t: ["semi", "--config", str(_yaml(t, "semi:\n  mu: 0\n")), out(t)],
         "setting 'semi.mu' must be >= 1 (got 0)"),
    # ---- files -------------------------------------------------------------------------------
    Case("config file missing", "dpt", lambda t: ["run", "--config", str(t / "nowhere.yaml")], "nowhere.yaml' not found"),
    Case("config file not YAML", "semivit", lambda t: ["finetune", "--config", str(_yaml(t, "semi: [1,\n"))],
         "is not valid YAML"),
    Case("imagefolder root missing", "semivit",
         lambda t: ["finetune", out(t), "data.name=imagefolder", f"data.root={t / 'none'}"], "data.root"),
    Case("labels CSV missing", "dpt", lambda t: ["train-diffusion", out(t), *DIGITS, f"labels={t / 'no.csv'}"],
         "labels file"),
    Case("semi without a fine-tuned classifier", "semivit", lambda t: ["semi", out(t), *DIGITS], "semivit finetune"),
    Case("evaluate a folder that is no classifier", "semivit",
         lambda t: ["evaluate", out(t), *DIGITS, f"checkpoint={_mkdir(t / 'empty')}"], "not a classifier folder"),
    Case("classifier meta.json damaged", "semivit",
         lambda t: ["evaluate", out(t), *DIGITS, f"checkpoint={_damage(classifier(t / 'clf', _ten(), 1), 'meta.json')}"],
         "meta.json' is not valid JSON"),
    Case("synthetic set without manifest", "dpt",
         lambda t: ["retrain", out(t), *DIGITS, f"synthetic={_mkdir(t / 'syn')}"], "holds no manifest.csv"),
    Case("fid.real neither split nor folder", "dpt", lambda t: ["fid", out(t), "real=nowhere", f"fake={t}"],
         "is neither 'test', 'train' nor a folder"),
    Case("Inception weights missing", "dpt",
         lambda t: ["fid", out(t), *_fid_sets(t), "features=inception", f"inception_weights={t / 'no.pth'}"],
         "does not exist"),
    # ---- weights -----------------------------------------------------------------------------
    Case("truncated .safetensors as checkpoint=", "semivit",
         lambda t: ["semi", out(t), *DIGITS, f"checkpoint={truncated_safetensors(t / 'w.safetensors')}"],
         "is not a readable safetensors file"),
    Case("random bytes .safetensors as model.init", "semivit",
         lambda t: ["finetune", out(t), *DIGITS, f"model.init={random_bytes(t / 'w.safetensors')}"],
         "is not a readable safetensors file"),
    Case("bare tensor .pt as model.init", "semivit",
         lambda t: ["finetune", out(t), *DIGITS, f"model.init={_bare_tensor(t)}"], "holds a Tensor, not a state dict"),
    Case("random bytes .pt as model.init", "semivit",
         lambda t: ["finetune", out(t), *DIGITS, f"model.init={random_bytes(t / 'w.pt')}"],
         "could not be read as safetensors or as torch weights"),
    Case("weights of another ViT as model.init", "semivit",
         lambda t: ["finetune", out(t), *DIGITS, f"model.init={_other_vit(t)}"], "does not fit model"),
    Case("pickle payload as model.init", "semivit",
         lambda t: ["finetune", out(t), *DIGITS, f"model.init={evil(t)}"],
         "refused by torch.load(weights_only=True)", payload=True),
    Case("pickle payload as checkpoint=", "semivit", lambda t: ["semi", out(t), *DIGITS, f"checkpoint={evil(t)}"],
         "refused by torch.load(weights_only=True)", payload=True),
    Case("pickle payload as fid.inception_weights", "dpt",
         lambda t: ["fid", out(t), *_fid_sets(t), "features=inception", f"inception_weights={evil(t)}"],
         "refused by torch.load(weights_only=True)", payload=True),
    Case("truncated Inception weights", "dpt",
         lambda t: ["fid", out(t), *_fid_sets(t), "features=inception",
                    f"inception_weights={truncated_safetensors(t / 'incep.safetensors')}"],
         "is not a readable safetensors file"),
    Case("other weights as Inception", "dpt",
         lambda t: ["fid", out(t), *_fid_sets(t), "features=inception", f"inception_weights={_bare_dict(t)}"],
         "does not hold the FID Inception-v3"),
    Case("classifier weights truncated", "semivit",
         lambda t: ["evaluate", out(t), *DIGITS,
                    f"checkpoint={_truncate(classifier(t / 'clf', _ten(), 1), 'model.safetensors')}"],
         "is not a readable safetensors file"),
    Case("classifier weights of another model", "semivit",
         lambda t: ["evaluate", out(t), *DIGITS, f"checkpoint={_swap_model(classifier(t / 'clf', _ten(), 1))}"],
         "do not fit the model"),
    Case("generator weights damaged", "dpt",
         lambda t: ["generate", out(t), f"model={_truncate(generator(t / 'gen', ['a', 'b']), 'diffusion_pytorch_model.safetensors')}"],
         "cannot be loaded (Error while deserializing header"),
    Case("generator with pickled .bin weights only", "dpt",
         lambda t: ["generate", out(t), f"model={_bin_only(generator(t / 'gen', ['a', 'b']))}"], "never loaded"),
    Case("generator dpt_meta.json damaged", "dpt",
         lambda t: ["generate", out(t), f"model={_damage(generator(t / 'gen', ['a', 'b']), 'dpt_meta.json')}"],
         "dpt_meta.json' is not valid JSON"),
    Case("generate.steps above the generator's timesteps", "dpt",
         lambda t: ["generate", out(t), f"model={generator(t / 'gen', ['a', 'b'])}", "steps=80"],
         "setting 'generate.steps' must be <= 50"),
    # ---- class lists -------------------------------------------------------------------------
    Case("evaluate: classifier of a,b,c on data a,b,x", "semivit",
         lambda t: ["evaluate", out(t), *imagefolder_args(abc_data(t)),
                    f"checkpoint={classifier(t / 'clf', ['a', 'b', 'c'])}"],
         "has 3 classes ['a', 'b', 'c'] but data 'imagefolder'"),
    Case("evaluate: classifier of 2 classes on data of 3", "semivit",
         lambda t: ["evaluate", out(t), *imagefolder_args(abc_data(t)), f"checkpoint={classifier(t / 'clf', ['a', 'b'])}"],
         "has 2 classes ['a', 'b'] but data 'imagefolder'"),
    Case("pseudo-label: classifier of other classes", "semivit",
         lambda t: ["pseudo-label", out(t), *imagefolder_args(abc_data(t)),
                    f"checkpoint={classifier(t / 'clf', ['a', 'b', 'c'])}"],
         "they first differ at label 2: 'c' vs 'x'"),
    Case("generate: generator of other classes than the data", "dpt",
         lambda t: ["generate", out(t), *imagefolder_args(abc_data(t)), f"model={generator(t / 'gen', ['a', 'b', 'c'])}"],
         "generator '"),
    Case("retrain: init classifier of other classes", "dpt",
         lambda t: ["retrain", out(t), *imagefolder_args(abc_data(t)), f"synthetic={synthetic_set(t / 'syn', ['a'])}",
                    f"retrain.init={classifier(t / 'clf', ['a', 'b', 'c'])}"],
         "retrain.init classifier"),
    Case("retrain: synthetic set of another class", "dpt",
         lambda t: ["retrain", out(t), *imagefolder_args(abc_data(t)), f"synthetic={synthetic_set(t / 'syn', ['zebra'])}",
                    f"retrain.init={_encoder_file(t)}"],
         "has classes that the data set does not: 1 class ['zebra']"),
    Case("FID: classifier features for other classes", "dpt",
         lambda t: ["fid", out(t), f"real={class_folders(t / 'real', ['a', 'b', 'x'], 4)}",
                    f"fake={synthetic_set(t / 'syn', ['a', 'b'])}", "features=classifier",
                    f"classifier={classifier(t / 'clf', ['a', 'b', 'c'], 1)}"],
         "has classes that fid.classifier"),
    # ---- lock and output folder ----------------------------------------------------------------
    Case("run folder in use (finetune)", "semivit",
         lambda t: ["finetune", f"output_dir={lock_file(t / 'run', os.getppid())}", *DIGITS], "is in use by pid"),
    Case("run folder in use (dpt run)", "dpt",
         lambda t: ["run", "--config", "configs/tiny.yaml", f"output_dir={lock_file(t / 'run', os.getppid())}"],
         "command 'dpt run --config configs/big.yaml'"),
    Case("generate.out in use", "dpt",
         lambda t: ["generate", out(t), f"out={lock_file(t / 'syn', os.getppid())}"], "syn' is in use by pid"),
    Case("run folder locked from another host", "dpt",
         lambda t: ["train-diffusion", f"output_dir={lock_file(t / 'run', 1, 'elsewhere')}"], "on host elsewhere"),
    Case("output_dir is a file", "semivit", lambda t: ["pretrain", f"output_dir={_file(t)}", *DIGITS],
         "cannot be written"),
    Case("output_dir below a file", "dpt", lambda t: ["run", f"output_dir={_file(t) / 'run'}"], "cannot be written"),
    Case("output_dir that cannot be created", "semivit",
         lambda t: ["evaluate", "output_dir=/proc/self/run", *DIGITS], "cannot be written"),
]


def _yaml(t: Path, text: str) -> Path:
    (t / "c.yaml").write_text(text)
    return t / "c.yaml"


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _file(t: Path) -> Path:
    (t / "a_file").write_text("x")
    return t / "a_file"


def _ten() -> list[str]:
    return [str(i) for i in range(10)]


def _damage(folder: Path, name: str) -> Path:
    (folder / name).write_text("{not json")
    return folder


def _truncate(folder: Path, name: str) -> Path:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    return folder


def _swap_model(folder: Path) -> Path:
    meta = json.loads((folder / "meta.json").read_text())
    meta["model"] = "vit_mini_patch4"
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _bin_only(folder: Path) -> Path:
    from safetensors.torch import load_file

    weights = folder / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), folder / "diffusion_pytorch_model.bin")
    weights.unlink()
    return folder


def _bare_tensor(t: Path) -> Path:
    torch.save(torch.zeros(3, 3), t / "bare.pt")
    return t / "bare.pt"


def _bare_dict(t: Path) -> Path:
    torch.save({"fc.weight": torch.zeros(2, 2)}, t / "small.pth")
    return t / "small.pth"


def _other_vit(t: Path) -> Path:
    from semivit.config.schema import ModelConfig
    from semivit.files import save_weights
    from semivit.models.classifier import create_classifier

    net = create_classifier(ModelConfig(name="vit_mini_patch4"), 10, 8, 1)
    save_weights(net.state_dict(), t / "mini.safetensors")
    return t / "mini.safetensors"


def _encoder_file(t: Path) -> Path:
    from semivit.files import save_weights

    save_weights({"w": torch.zeros(1)}, _mkdir(t / "enc") / "encoder.safetensors")
    return t / "enc" / "encoder.safetensors"


def _fid_sets(t: Path) -> list[str]:
    write_images(t / "real", 10)
    write_images(t / "fake", 10)
    return [f"real={t / 'real'}", f"fake={t / 'fake'}"]


MAINS = {"semivit": semivit.cli.main, "dpt": dpt.cli.main}
ROOT = Path(__file__).resolve().parents[1]


def run_case(case: Case, tmp: Path) -> tuple[int, str]:
    """(exit code, stderr) of the case, run from the repository root (configs/ are relative)."""
    argv = only_read(case.prog, case.argv(tmp), DIGITS)  # DIGITS: settings of both stages
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stderr(err):
            code = MAINS[case.prog](argv)
    finally:
        os.chdir(cwd)
    return code, err.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault_matrix(case, tmp_path, capsys):
    code, err = run_case(case, tmp_path)
    err += capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{case.prog} ") and ": error: " in lines[0], lines[0]
    assert case.expect in lines[0], lines[0]
    if case.payload:
        assert not (tmp_path / "MARKER").exists(), "the pickle payload ran"


def test_matrix_is_large_and_names_are_unique():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------------------------
# Beyond the matrix: the debug switch, bugs, the lock's release, Inception from a safe file
# --------------------------------------------------------------------------------------------


def test_debug_flag_and_env_show_the_traceback(tmp_path, capsys, monkeypatch):
    assert semivit.cli.main(["finetune", "--debug", out(tmp_path), "semi.mu=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].endswith("must be >= 1 (got 0)")
    monkeypatch.setenv("DPT_DEBUG", "1")
    assert dpt.cli.main(["generate", out(tmp_path), "steps=0"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_and_says_so(tmp_path, capsys, monkeypatch):
    import dpt.generate

    def broken(cfg, check_data=None):
        return {}["no such key"]

    monkeypatch.setattr(dpt.generate, "run_generate", broken)
    assert dpt.cli.main(["generate", out(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error (KeyError" in err
    assert not (tmp_path / "run" / "run.lock").exists()  # released on the way out


def test_lock_released_after_an_error_and_no_empty_folder_left(tmp_path, capsys):
    run = tmp_path / "new" / "run"
    assert semivit.cli.main(["semi", f"output_dir={run}", *SEMI_DIGITS]) == 2  # no fine-tuned model yet
    assert not (tmp_path / "new").exists()  # nothing was written: the folders made for the lock went too
    run.mkdir(parents=True)
    (run / "kept.txt").write_text("x")
    assert semivit.cli.main(["semi", f"output_dir={run}", *SEMI_DIGITS]) == 2
    assert (run / "kept.txt").exists() and not (run / "run.lock").exists()
    capsys.readouterr()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = lock_file(tmp_path / "run", int(dead.stdout))
    assert semivit.cli.main(["semi", f"output_dir={run}", *SEMI_DIGITS]) == 2  # got past the lock, to the next error
    err = capsys.readouterr().err
    assert "semivit semi: warning: taking over" in err and "semivit finetune" in err
    assert not (run / "run.lock").exists()


def test_inception_features_from_a_safe_file(tmp_path):
    """Random weights in torch-fidelity's layout load through weights_only=True and give 2048 features."""
    from dpt.fid import InceptionFeatures

    net = InceptionFeatures(str(random_inception(tmp_path / "pt_inception.pth")))
    x = torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)
    feats = net(x)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()


def test_an_error_in_a_data_loader_worker_shows_the_workers_message():
    from semivit.runtime.command import error_message

    class DataError(ValueError):
        pass

    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in load\nsemivit.data.DataError: image \'a.png\' cannot be read (truncated)'
    )
    assert error_message(wrapped) == "image 'a.png' cannot be read (truncated)"


# --------------------------------------------------------------------------------------------
# Validation covers every setting
# --------------------------------------------------------------------------------------------


def _settings() -> dict[str, type]:
    import dataclasses
    import typing

    from semivit.config.schema import Config

    out: dict[str, type] = {}

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ = hints[f.name]
            if dataclasses.is_dataclass(typ):
                walk(typ, f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = typ

    walk(Config, "")
    return out


def test_every_numeric_and_text_setting_has_a_rule():
    from semivit.config.schema import _RULES, FREE_TEXT

    unruled = [k for k, t in _settings().items() if t in (int, float, str) and k not in _RULES and k not in FREE_TEXT]
    assert not unruled, f"add a range or choices to semivit.config.schema._RULES (or FREE_TEXT) for {unruled}"


def _bad_value(spec):
    if isinstance(spec, tuple):
        return "bogus" if isinstance(spec[0], str) else max(spec) + 1
    if spec.startswith(">"):
        bound = float(spec.split()[1])
        return bound - 1 if spec.startswith(">=") else bound
    low, high = (float(s) for s in spec[1:-1].split(","))
    return high + 1


def test_every_rule_rejects_a_value_outside_it():
    from semivit.config.load import load_config
    from semivit.config.schema import _RULES
    from semivit.errors import ConfigError

    for key, spec in _RULES.items():
        bad = _bad_value(spec)
        if key == "retrain.synthetic_ratio":
            continue  # its range depends on retrain.synthetic_only (a case of the matrix)
        with pytest.raises(ConfigError, match=f"setting '{key}'"):
            load_config(None, [f"{key}={bad}"])


# --------------------------------------------------------------------------------------------
# The matrix for docs/reliability.md
# --------------------------------------------------------------------------------------------


def markdown_table() -> str:
    """Run every case and tabulate what the user sees (temporary paths shown as <tmp>)."""
    import tempfile

    rows = ["| case | what the user sees (exit code 2) |", "|---|---|"]
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            _, err = run_case(case, Path(tmp))
            seen = err.strip().splitlines()[-1] if err.strip() else ""
            seen = seen.replace(str(Path(tmp).resolve()), "<tmp>").replace(tmp, "<tmp>")
        rows.append(f"| {case.name} | `{seen.replace('|', '/')}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    import logging

    logging.disable(logging.CRITICAL)
    print(markdown_table())

