"""The generated configuration reference (docs/configuration.md) and the comment parser behind it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from semivit.config import reference, schema

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "configuration.md"


def test_committed_reference_is_current():
    committed = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    assert committed == reference.render(), (
        f"{DOC.relative_to(ROOT)} is out of date with semivit/config/schema.py; regenerate it with "
        f"`PYTHONPATH=. {reference.COMMAND}` and commit it"
    )


def _leaf_keys(obj, prefix=""):
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_every_setting_has_a_row_with_its_default_and_rule():
    text = reference.render()
    keys = _leaf_keys(schema.Config())
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    assert sorted(rows) == sorted(keys)
    assert "| `semi.tau` | `0.7` | [0, 1] |" in rows["semi.tau"]
    assert "one of ema, student" in rows["semi.teacher"]
    assert "| `semi.pseudo_mixup` | `true` | true/false |" in rows["semi.pseudo_mixup"]
    assert "free text" in rows["data.root"]
    # a field without a comment of its own takes the shared line of its name; its own comment wins
    assert reference.SHARED["lr"] in rows["finetune.lr"] and reference.SHARED["lr"] in rows["diffusion.lr"]
    assert reference.SHARED["ema_decay"] in rows["finetune.ema_decay"]
    assert "0.9999 at ImageNet scale" in rows["semi.ema_decay"]
    assert reference.SHARED["ema_decay"] not in rows["semi.ema_decay"]
    # a '|' inside a comment is escaped, so the row keeps four cells
    assert rows["data.name"].count(" | ") == 3 and "mnist5k \\| digits" in rows["data.name"]


def test_comments_come_from_the_schema_source():
    semi = reference.field_comments(schema.SemiConfig)
    # the block above the field
    assert semi["dist_align"].startswith("distribution alignment of the teacher's probabilities")
    assert "1-2 labels per class" in semi["dist_align"]
    # the comment on the field's line
    assert semi["ema_decay"].startswith("0.9999 at ImageNet scale")
    # a block above does not leak to the next field, which has its own line comment
    assert semi["dist_align_momentum"].startswith("running mean of the teacher's class shares")
    assert "labels per class" not in semi["dist_align_momentum"]


@dataclass
class _Sample:
    plain: int = 1
    inline: str = "a # not a comment"  # the inline one
    # first line above
    #   an indented line
    # back at the margin
    both: float = 0.5  # and inline

    # separated by a blank line: not the next field's

    after_blank: bool = False
    items: list = field(default_factory=lambda: [1, 2])  # a list


def test_field_comments_parser():
    got = reference.field_comments(_Sample)
    assert got == {
        "plain": "",
        "inline": "the inline one",
        "both": "first line above\nan indented line back at the margin\nand inline",
        "after_blank": "",
        "items": "a list",
    }


def test_main_prints_the_reference(capsys):
    reference.main()
    assert capsys.readouterr().out == reference.render()
