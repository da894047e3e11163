"""``pipeline.json``, the run state of ``dpt run``: per stage the settings fingerprint it finished
with, its seconds and peak memory. The pipeline writes it; the pipeline and the report read it.
"""

from __future__ import annotations

from pathlib import Path

from semivit.config.schema import Config
from semivit.files import read_json
from semivit.runtime.layout import layout


def _state_file(cfg: Config) -> Path:
    return layout(cfg).pipeline_state


def _load_state(cfg: Config) -> dict:
    path = _state_file(cfg)
    return read_json(path) if path.is_file() else {}


def stage_seconds(cfg: Config) -> dict:
    return {k: v.get("seconds") for k, v in _load_state(cfg).items() if isinstance(v, dict)}


def stage_resources(cfg: Config) -> dict:
    """Seconds and peak memory of every stage that ran (pipeline.json)."""
    keys = ("seconds", "peak_host_gb", "peak_gpu_gb")
    return {k: {x: v[x] for x in keys if x in v} for k, v in _load_state(cfg).items() if isinstance(v, dict)}
