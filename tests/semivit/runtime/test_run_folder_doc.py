"""docs/run-folder.md is generated from semivit/runtime/layout.py's docstring and must not drift from it."""

from __future__ import annotations

from pathlib import Path

from semivit.runtime import layout

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "run-folder.md"


def test_committed_run_folder_page_is_current():
    committed = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    assert committed == layout.markdown(), (
        f"{DOC.relative_to(ROOT)} is out of date with the docstring of semivit/runtime/layout.py; regenerate it "
        "with `PYTHONPATH=. python -m semivit.runtime.layout > docs/run-folder.md` and commit it"
    )


def test_page_lists_every_run_level_path_of_the_layout():
    page = layout.markdown()
    for rel in ("run.lock", "pipeline.json", "label_split.csv", "stage1/pseudo_labels.csv", "stage2/model/",
                "synthetic/", "summary.json"):
        assert f"| `{rel}`" in page
    assert "``" not in page  # reStructuredText literals turned into Markdown ones
