"""Atomic file writes and safe reads of checkpoints and metadata.

Every file a stage leaves behind is written to a temporary name in the same folder and then
renamed over the target, so an interrupted run never leaves a half-written file under a real name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from semivit.errors import FileFormatError, WeightsError


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported on first use: plotting is optional
    work at the end of a stage, and a headless rank has no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file under the process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()  # read once: changing the umask is process-wide


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.
    The file gets the usual mode (0644 under umask 022), not mkstemp's owner-only 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if hasattr(os, "fchmod"):  # POSIX (Windows has it from Python 3.13 only; its files carry no such mode)
        os.fchmod(fd, _FILE_MODE)
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
    """A JSON file of this project (meta.json, dpt_meta.json ...); a damaged one is a clear error."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FileFormatError(
            f"'{path}' is not valid JSON ({e}); the file is damaged: restore it or re-run the stage that wrote it"
        ) from e


def save_weights(state_dict: dict, path: str | Path, metadata: dict | None = None) -> None:
    """Save a state dict as safetensors, atomically (tensors made contiguous, shared ones cloned)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(path: str | Path) -> dict:
    """Read a checkpoint without executing code: safetensors (by suffix or content), else torch with
    ``weights_only=True``. Returns the file's mapping (a state dict, or one nested in a checkpoint);
    a damaged file, a pickle with objects besides tensors, or a bare tensor is a :class:`WeightsError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file '{path}' not found")
    if path.suffix == ".safetensors" or looks_like_safetensors(path):
        state = _load_safetensors(path)
    else:
        state = _load_torch(path)
    if not isinstance(state, Mapping):
        raise WeightsError(
            f"checkpoint '{path}' holds a {type(state).__name__}, not a state dict (name -> tensor); save it "
            "with torch.save(model.state_dict(), path) or as safetensors"
        )
    return dict(state)


def looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with the 8-byte length of its JSON header, then ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (truncated, not safetensors) or a header naming bad dtypes
        raise WeightsError(
            f"checkpoint '{path}' is not a readable safetensors file ({_first_line(e)}); it is truncated or "
            "damaged: copy it again or re-save it"
        ) from e


def _load_torch(path: Path):
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not a refused import: the bytes are no pickle of weights at all
            raise WeightsError(
                f"checkpoint '{path}' could not be read as safetensors or as torch weights "
                f"(torch.load(weights_only=True): {_refused_global(e)}); it is damaged or of another format"
            ) from e
        raise WeightsError(
            f"checkpoint '{path}' was refused by torch.load(weights_only=True): it holds Python objects besides "
            f"tensors ({_refused_global(e)}), and loading those could run code from the file. Re-save only the "
            "weights: torch.save(model.state_dict(), path), or as safetensors"
        ) from e
    except Exception as e:  # not a torch file at all, or truncated
        raise WeightsError(
            f"checkpoint '{path}' could not be read as safetensors or as torch weights "
            f"(torch.load(weights_only=True): {_first_line(e)}); it is damaged or of another format"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _refused_global(e: BaseException) -> str:
    """The line of torch's message that names what was refused (e.g. ``GLOBAL posix.system``)."""
    for line in str(e).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().rstrip(".")
    return _first_line(e)
