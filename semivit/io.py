"""Atomic file writes and safe checkpoint reads.

Every file a stage leaves behind is written to a temporary name in the same folder and then
renamed over the target, so an interrupted run never leaves a half-written file under a real name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def save_weights(state_dict: dict, path: str | Path, metadata: dict | None = None) -> None:
    """Save a state dict as safetensors, atomically (tensors made contiguous, shared ones cloned)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(path: str | Path) -> dict:
    """Read a checkpoint without executing code: safetensors, or torch with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file '{path}' not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with arbitrary objects, or not a torch file at all
        raise ValueError(
            f"checkpoint '{path}' could not be read safely (safetensors, or torch with weights_only=True): {e}. "
            "Convert it to safetensors, or re-save it with torch.save(model.state_dict(), path)."
        ) from e
