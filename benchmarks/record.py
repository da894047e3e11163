"""Where every benchmark writes, and what each result file records about how it was made.

Every script writes its committed results to ``benchmarks/results/<script>/`` (``result_dir``) and
its runs (models, images) under ``runs/bench/<script>/`` (``run_dir``) unless told otherwise. Each JSON
result carries ``provenance()``: the command that made it, the commit, the machine and the date.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path

from semivit.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def script_name(script: str) -> str:
    """``benchmarks.throughput``, ``__main__`` (run as ``python -m benchmarks.throughput``) or
    ``.../benchmarks/throughput.py`` -> ``throughput``."""
    if script == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        script = spec.name if spec is not None and spec.name else (sys.argv[0] if sys.argv else script)
    if script.endswith(".py"):
        return Path(script).stem
    return script.rsplit(".", 1)[-1]


def result_dir(script: str) -> Path:
    """``benchmarks/results/<script>/`` (``script``: the module's ``__name__`` or a file path)."""
    return RESULTS / script_name(script)


def run_dir(script: str) -> Path:
    """``runs/bench/<script>/``: the default folder of a benchmark's runs (not committed)."""
    return ROOT / "runs" / "bench" / script_name(script)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads())
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {threads} threads, {gpu}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def provenance(argv: list[str] | None = None) -> dict:
    """How a result was made: command line, commit, machine, UTC date."""
    argv = list(sys.argv if argv is None else argv)
    main = Path(argv[0]) if argv else Path("?")
    if main.suffix == ".py" and main.parent.name == "benchmarks":
        head = f"python -m benchmarks.{main.stem}"
    else:
        head = " ".join(argv[:1])
    return {
        "command": " ".join([head, *argv[1:]]),
        "commit": _commit(),
        "machine": machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def read_result(path: str | Path):
    """The ``results`` of a file ``write_result`` wrote; a result file written before provenance
    was recorded (the bare data) is returned as it is."""
    from semivit.files import read_json

    data = read_json(Path(path))
    return data["results"] if isinstance(data, dict) and set(data) == {"provenance", "results"} else data


def write_result(path: str | Path, data: dict | list, argv: list[str] | None = None) -> Path:
    """Write ``data`` as JSON with its provenance (``{"provenance": ..., "results": data}``), atomically."""
    path = Path(path)
    atomic_write_json(path, {"provenance": provenance(argv), "results": data})
    return path
