"""The class-conditional denoiser, its noise schedule, guided sampling and the saved model folder.

K classes use label ids ``0..K-1``; id ``K`` is the null label that classifier-free guidance
uses as "no class". The model is a diffusers ``DiTTransformer2DModel`` (default) or
``UNet2DModel``, so a saved model folder loads with plain ``from_pretrained``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from diffusers import (
    DDPMScheduler,
    DiTTransformer2DModel,
    UNet2DModel,
)

from dpt.errors import DPTError
from semivit.config.schema import DiffusionConfig
from semivit.files import atomic_write_json

logger = logging.getLogger("dpt")

META_FILE = "dpt_meta.json"

MODEL_CLASSES = {"DiTTransformer2DModel": DiTTransformer2DModel, "UNet2DModel": UNet2DModel}


def build_denoiser(dcfg: DiffusionConfig, num_classes: int, channels: int, sample_size: int) -> torch.nn.Module:
    """A fresh denoiser for ``num_classes`` classes (+ the null label) on ``channels`` x ``sample_size``^2."""
    if dcfg.model == "dit":
        if sample_size % dcfg.patch_size:
            raise DPTError(
                f"diffusion.patch_size={dcfg.patch_size} does not divide the model input size {sample_size}; "
                "pick a patch size that divides it (e.g. 4 for 28 or 32 px, 2 for 32x32 latents)"
            )
        if dcfg.hidden_size % dcfg.num_heads:
            raise DPTError(f"diffusion.hidden_size={dcfg.hidden_size} must be a multiple of diffusion.num_heads")
        model = DiTTransformer2DModel(
            num_attention_heads=dcfg.num_heads,
            attention_head_dim=dcfg.hidden_size // dcfg.num_heads,
            in_channels=channels,
            out_channels=channels,
            num_layers=dcfg.depth,
            sample_size=sample_size,
            patch_size=dcfg.patch_size,
            num_embeds_ada_norm=num_classes,  # the label tables get K+1 rows: row K is the null label
        )
        if dcfg.init == "dit":
            init_dit(model)
    elif dcfg.model == "unet":
        chans = tuple(int(c) for c in dcfg.unet_channels)
        levels = len(chans)
        if sample_size % (2 ** (levels - 1)):
            raise DPTError(
                f"diffusion.unet_channels has {levels} levels, so the input size must be divisible by "
                f"{2 ** (levels - 1)} (got {sample_size}); drop a level or change diffusion.image_size"
            )
        attn = dcfg.unet_attention_levels
        if not 0 <= attn <= levels or dcfg.unet_layers_per_block < 1:
            raise DPTError(
                f"diffusion.unet_attention_levels must be 0..{levels} (the levels of diffusion.unet_channels; got "
                f"{attn}) and diffusion.unet_layers_per_block >= 1 (got {dcfg.unet_layers_per_block})"
            )
        down = ("DownBlock2D",) * (levels - attn) + ("AttnDownBlock2D",) * attn
        up = ("AttnUpBlock2D",) * attn + ("UpBlock2D",) * (levels - attn)
        model = UNet2DModel(
            sample_size=sample_size,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=chans,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=dcfg.unet_layers_per_block,
            num_class_embeds=num_classes + 1,  # row K: the null label
            norm_num_groups=min(32, min(chans)),
        )
    else:
        raise DPTError(f"unknown diffusion.model '{dcfg.model}': use dit or unet")
    disable_internal_label_dropout(model)
    return model


def init_dit(model: DiTTransformer2DModel) -> None:
    """DiT's initialisation (Peebles & Xie, ``DiT.initialize_weights``), which diffusers'
    ``DiTTransformer2DModel`` does not apply: Xavier-uniform linear layers (and patch embedding,
    seen as a linear map) with zero biases, label tables and timestep MLPs from N(0, 0.02), and
    adaLN-Zero: every block's adaLN modulation and the final layer (its modulation and its output
    projection) start at zero, so each block starts as the identity and the model predicts 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
        proj = model.pos_embed.proj
        torch.nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        torch.nn.init.zeros_(proj.bias)
        for block in model.transformer_blocks:
            emb = block.norm1.emb
            torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
            torch.nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
            torch.nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
            torch.nn.init.zeros_(block.norm1.linear.weight)  # adaLN-Zero
            torch.nn.init.zeros_(block.norm1.linear.bias)
        for final in (model.proj_out_1, model.proj_out_2):  # the final layer's modulation and output
            torch.nn.init.zeros_(final.weight)
            torch.nn.init.zeros_(final.bias)


def disable_internal_label_dropout(model: torch.nn.Module) -> None:
    """diffusers' DiT gives every block its own label embedder with its own dropout (p=0.1), which
    drops labels independently per block in train mode. We drop labels once per sample ourselves
    (:func:`drop_labels`), so every block sees the same label and p_uncond is exactly the setting."""
    for module in model.modules():
        if hasattr(module, "dropout_prob") and hasattr(module, "embedding_table"):
            module.dropout_prob = 0.0


def num_classes_of(model: torch.nn.Module) -> int:
    """K, the number of real classes the model was built for (its null label is K)."""
    if isinstance(model, DiTTransformer2DModel):
        return int(model.config.num_embeds_ada_norm)
    return int(model.config.num_class_embeds) - 1


def denoiser_forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(model, DiTTransformer2DModel):
        return model(hidden_states=x, timestep=t, class_labels=labels).sample
    return model(x, t, class_labels=labels).sample


def drop_labels(labels: torch.Tensor, null_label: int, p_uncond: float, generator=None) -> torch.Tensor:
    """Replace each label by the null label with probability ``p_uncond`` (training only)."""
    if p_uncond <= 0:
        return labels
    drop = torch.rand(labels.shape[0], generator=generator, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def save_generator(folder: Path, model, noise_scheduler, meta: dict) -> None:
    """``save_pretrained`` of the model and its training scheduler plus ``dpt_meta.json`` (classes,
    channels, image size, null label ...), written to a temporary folder renamed into place."""
    folder = Path(folder)
    tmp = folder.parent / f".tmp_{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    noise_scheduler.save_pretrained(str(tmp))
    atomic_write_json(tmp / META_FILE, meta)
    old = folder.parent / f".old_{folder.name}"
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")

META_KEYS = ("classes", "null_label", "channels", "image_size", "model_channels", "model_size")


def load_pretrained(cls, folder: Path, what: str):
    """``cls.from_pretrained`` of a local folder, safetensors only (a pickled ``.bin`` could run code);
    a missing, truncated or mismatched weights file is one :class:`DPTError`, not diffusers' chain."""
    from diffusers.utils import logging as dlogging

    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        pickled = (folder / "diffusion_pytorch_model.bin").is_file()
        raise DPTError(
            f"{what} '{folder}' holds no {WEIGHT_FILES[0]}"
            + (
                " (only a pickled diffusion_pytorch_model.bin, which is never loaded since unpickling can run code: "
                "re-save it with save_pretrained(DIR, safe_serialization=True))"
                if pickled
                else "; point the setting at a folder written by save_pretrained"
            )
        )
    verbosity = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # diffusers' own warnings would add lines to the one error line
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except Exception as e:  # OSError, SafetensorError, ValueError ... all say: these files do not load
        raise DPTError(
            f"{what} '{folder}' cannot be loaded ({_root_cause(e)}): its weights are truncated or damaged, or do "
            "not match its config.json; restore the folder or re-run the stage that wrote it"
        ) from e
    finally:
        dlogging.set_verbosity(verbosity)


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost exception of a chain (the one that names the real problem)."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    for exc in reversed(seen):
        text = str(exc).strip()
        if text and not isinstance(exc, UnicodeDecodeError):  # diffusers' probe for a git-lfs pointer
            return text.splitlines()[0]
    return type(seen[-1]).__name__


def load_generator(folder: str | Path) -> tuple[torch.nn.Module, dict, dict]:
    """(model in eval mode, training scheduler config, meta) from a folder written by train-diffusion."""
    folder = Path(folder)
    cls_name, meta, sched = read_generator_files(folder)
    model = load_pretrained(MODEL_CLASSES[cls_name], folder, "generator folder")
    disable_internal_label_dropout(model)
    k = num_classes_of(model)
    if k != len(meta["classes"]) or int(meta.get("null_label", k)) != k:
        raise DPTError(
            f"'{folder}': the model has {k} classes but {META_FILE} lists {len(meta['classes'])} "
            f"(null label {meta.get('null_label')}); the folder is inconsistent, re-run train-diffusion"
        )
    return model.eval(), sched, meta


def read_generator_files(folder: str | Path) -> tuple[str, dict, dict]:
    """(model class name, meta, training scheduler config) of a generator folder, without its
    weights: what a caller checks before paying for loading them."""
    from semivit.files import read_json

    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not folder.is_dir():
        raise DPTError(f"model folder '{folder}' (generate.model) not found; run train-diffusion first or fix the path")
    cls_name = read_json(cfg_file).get("_class_name", "") if cfg_file.is_file() else ""
    if cls_name not in MODEL_CLASSES:
        raise DPTError(
            f"'{folder}' is not a diffusers model folder of DiTTransformer2DModel or UNet2DModel "
            f"(config.json missing or of class '{cls_name}'); pass the stage2/model folder of train-diffusion"
        )
    meta_file = folder / META_FILE
    if not meta_file.is_file():
        raise DPTError(
            f"'{folder}' has no {META_FILE} (classes, channels, image size, null label); it was not written "
            "by train-diffusion. Add one with keys classes, channels, image_size, null_label"
        )
    meta = read_json(meta_file)
    missing = [k for k in META_KEYS if k not in meta]
    if missing or not isinstance(meta.get("classes"), list):
        raise DPTError(f"'{meta_file}' lacks {missing or ['a list of classes']}; restore it or re-run train-diffusion")
    sched_file = folder / "scheduler_config.json"
    sched = read_json(sched_file) if sched_file.is_file() else DDPMScheduler().config
    return cls_name, meta, sched
