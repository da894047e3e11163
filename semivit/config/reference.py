"""The configuration reference, generated from the schema: every setting of every section with its
default, its allowed values and the comment written next to it in ``semivit/config/schema.py``.

    python -m semivit.config.reference > docs/configuration.md

The comments are read from the source of each dataclass: the ``# ...`` comment on a field's line
and the comment lines directly above it (no blank line between). A field without a comment of its
own whose name the training sections share (``lr``, ``amp`` ...) gets the line of ``SHARED`` for that
name. ``tests/semivit/config/test_reference.py`` checks that the committed ``docs/configuration.md``
equals this output.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import sys
import tokenize
from typing import Any

from semivit.config import schema

COMMAND = "python -m semivit.config.reference > docs/configuration.md"

# one line per section, under its heading
SECTION_NOTES = {
    "": "Run-wide settings, written without a section: `seed=1`, `output_dir=runs/x`.",
    "data": "The data set, its labeled split and the augmentation recipe (shared by every stage).",
    "model": "The classifier (a ViT) and the weights it starts from.",
    "pretrain": "Stage 0: MAE self-pre-training (`semivit pretrain`; runs only with `model.init=auto`).",
    "finetune": "Stage 1a: supervised fine-tuning on the labeled images (`semivit finetune`; also the judge).",
    "semi": "Stage 1b: EMA-Teacher semi-supervised fine-tuning (`semivit semi`; stage 3 in `retrain.mode=semi`).",
    "pseudo_label": "Stage 1c: pseudo-labels of every training image (`semivit pseudo-label`).",
    "diffusion": "Stage 2a: the class-conditional diffusion model and its training (`dpt train-diffusion`).",
    "generate": "Stage 2b: the labeled synthetic data set (`dpt generate`).",
    "fid": "FID and synthetic class accuracy of a set of images (`dpt fid`, the report).",
    "retrain": "Stage 3: retraining on the real labeled images plus extra ones (`dpt retrain`).",
    "pipeline": "What `dpt run` adds to the stages.",
}

# settings that several sections share under one name, described once; a comment on the field wins
SHARED = {
    "epochs": "training epochs",
    "batch_size": "images per step, per process",
    "lr": "peak learning rate: linear warm-up to it, then cosine decay",
    "min_lr": "learning rate at the end of the cosine decay",
    "weight_decay": "weight decay of the optimizer",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "layer_decay": "layer-wise learning-rate decay of the ViT blocks (1: none)",
    "label_smoothing": "label smoothing of the classification targets",
    "mixup": "Mixup alpha on the labeled images (0: off)",
    "cutmix": "CutMix alpha on the labeled images (0: off)",
    "ema_decay": "decay of the model's exponential moving average",
    "clip_grad": "clip the gradient norm to this value (0: off)",
    "amp": "mixed precision: no, bf16 or fp16 (fp16 needs a GPU)",
    "grad_accum": "micro-batches per optimizer step",
    "eval_every": "epochs between evaluations on the held-out split (0: only at the end)",
}


@dataclasses.dataclass(frozen=True)
class Setting:
    key: str  # dotted: "semi.tau", or "seed" at the top level
    default: Any
    rule: str
    comment: str


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment: the comment lines directly above the field, then (on a new line) the
    one on its line. In a block above, a line indented beyond the block's least indented starts a new line."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}  # line number -> comment text (without '#')
    code_lines: set[int] = set()  # lines that hold code
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string[1:]
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip()
        if number not in code_lines or ":" not in stripped or name not in names or name in out:
            continue
        above = []
        n = number - 1
        while n >= 1 and n in comments and n not in code_lines:
            above.append(comments[n])
            n -= 1
        parts = [_join(list(reversed(above)))] if above else []
        if number in comments:
            parts.append(comments[number].strip())
        out[name] = "\n".join(parts)
    return out


def _join(block: list[str]) -> str:
    if not block:
        return ""
    base = min(len(c) - len(c.lstrip()) for c in block)
    text = ""
    for c in block:
        indent = len(c) - len(c.lstrip())
        part = c.strip()
        if not text:
            text = part
        elif indent > base:
            text += "\n" + part
        else:
            text += " " + part
    return text


def rule_of(key: str, value: Any) -> str:
    spec = schema._RULES.get(key)
    if isinstance(spec, tuple):
        return "one of " + ", ".join(str(s) for s in spec)
    if spec is not None:
        return spec
    if isinstance(value, bool):
        return "true/false"
    if key in schema.FREE_TEXT:
        return "free text"
    if isinstance(value, list):
        return "list"
    return "free text"


def settings() -> list[tuple[str, list[Setting]]]:
    """(section, its settings) in the order of ``schema.Config``; the top level is section ``""``."""
    top: list[Setting] = []
    sections: list[tuple[str, list[Setting]]] = []
    root_comments = field_comments(schema.Config)
    defaults = schema.Config()
    for f in dataclasses.fields(schema.Config):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            comments = field_comments(type(value))
            rows = [
                Setting(f"{f.name}.{g.name}", getattr(value, g.name),
                        rule_of(f"{f.name}.{g.name}", getattr(value, g.name)),
                        comments.get(g.name) or SHARED.get(g.name, ""))
                for g in dataclasses.fields(value)
            ]
            sections.append((f.name, rows))
        else:
            top.append(Setting(f.name, value, rule_of(f.name, value), root_comments.get(f.name, "")))
    return [("", top)] + sections


def show_default(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        f"Generated from `semivit/config/schema.py` by `{COMMAND}`; do not edit by hand (the test",
        "`tests/semivit/config/test_reference.py` fails when this file and the schema differ).",
        "",
        "A config file is YAML with one section per stage. `base: [a.yaml, b.yaml]` at its top reads those",
        "files first (paths relative to the file), so a config can be a few keys on top of another. Any",
        "setting can be overridden on the command line as `key=value` (`semi.tau=0.8`, `seed=1`), after the",
        "files; an unknown key is an error that names the nearest one. Numbers and choices are checked",
        "against the *allowed* column when the config is loaded, before any stage starts.",
        "",
    ]
    for section, rows in settings():
        out.append(f"## `{section}`" if section else "## Top level")
        out.append("")
        note = SECTION_NOTES.get(section, "")
        if note:
            out += [note, ""]
        out.append("| key | default | allowed | description |")
        out.append("|---|---|---|---|")
        for s in rows:
            out.append(f"| `{s.key}` | {_cell(show_default(s.default))} | {_cell(s.rule)} | {_cell(s.comment)} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
