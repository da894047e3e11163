"""Which settings a command reads, and the ``key=value`` overrides it would ignore.

Each command of ``semivit`` and ``dpt`` declares the settings it reads (its :class:`Reads`) next to
its entry in the command table. An override on the command line that the command does not read is
reported before anything runs, naming the setting the command reads instead where there is one:
``semivit finetune semi.epochs=5`` sets nothing that fine-tuning uses, and
``dpt generate checkpoint=RUN/stage1/semi`` would sample from this run's generator, not from the
folder given. See docs/cli.md for why this is an error and what ``--allow-unread`` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from semivit.config.schema import Config

# read by every command: the run folder and its name, the seed, resuming and logging, the shared
# data and model sections (a command that ignores some of them, e.g. fid and model.*, still
# accepts them: one set of shared settings works with every command)
SHARED: tuple[str, ...] = (
    "name", "output_dir", "seed", "resume", "tensorboard", "stop_after_epoch", "smoke", "data", "model",
)
EVERYTHING = "*"
_SECTIONS = {f.name for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING}


@dataclass(frozen=True)
class Reads:
    """The settings a command reads besides :data:`SHARED`: whole sections (``"semi"``) or single
    keys (``"checkpoint"``, ``"diffusion.amp"``); ``("*",)`` for a command that reads them all.
    ``instead`` maps a setting the command ignores to the one it reads for that purpose and what
    the latter holds (``{"checkpoint": ("model.init", "the weights fine-tuning starts from")}``)."""

    settings: tuple[str, ...]
    instead: dict[str, tuple[str, str]] = field(default_factory=dict)

    def reads(self, key: str) -> bool:
        if EVERYTHING in self.settings:
            return True
        return any(key == p or key.startswith(p + ".") for p in (*SHARED, *self.settings))

    def described(self) -> str:
        """``finetune.*, checkpoint``: what the command reads besides the shared settings."""
        return ", ".join(f"{s}.*" if s in _SECTIONS else s for s in self.settings)


def override_keys(overrides: list[str]) -> list[str]:
    """``["semi.epochs=5", "seed=1"]`` -> ``["semi.epochs", "seed"]`` (pairs without ``=`` are
    left to the config loader, which reports them)."""
    return [pair.split("=", 1)[0].strip() for pair in overrides if "=" in pair]


def unread_settings(overrides: list[str], reads: Reads, command: str) -> list[str]:
    """One sentence per override that ``command`` (e.g. ``semivit finetune``) does not read."""
    out = []
    for key in dict.fromkeys(override_keys(overrides)):
        if reads.reads(key):
            continue
        hints = [f"it reads {reads.described()}"] if reads.settings else ["it reads only the shared settings"]
        if key in reads.instead:
            setting, what = reads.instead[key]
            hints.append(f"did you mean {setting}, {what}?")
        elif alternative := _same_key_elsewhere(key, reads):
            hints.append(f"did you mean {alternative}?")
        out.append(f"{key} is not read by `{command}` ({'; '.join(hints)})")
    return out


def _same_key_elsewhere(key: str, reads: Reads) -> str | None:
    """``semi.epochs`` for a command that reads ``finetune.*`` -> ``finetune.epochs``."""
    leaf = key.rsplit(".", 1)[-1]
    cfg = Config()
    for section in reads.settings:
        if section in _SECTIONS and leaf in {f.name for f in dataclasses.fields(getattr(cfg, section))}:
            return f"{section}.{leaf}"
    return None
