"""The run-folder contract: every path where runs already on disk keep their files."""

from pathlib import Path

from semivit.config.load import load_config
from semivit.runtime.layout import RELATIVE, RunLayout, layout


def test_paths_are_those_runs_on_disk_use(tmp_path):
    run = RunLayout(tmp_path)
    expected = {
        "stage0": "stage0",
        "encoder": "stage0/encoder.safetensors",
        "reconstruction": "stage0/reconstruction.png",
        "stage1": "stage1",
        "finetune": "stage1/finetune",
        "semi": "stage1/semi",
        "pseudo_labels_csv": "stage1/pseudo_labels.csv",
        "pseudo_labels_json": "stage1/pseudo_labels.json",
        "judge": "judge",
        "stage2": "stage2",
        "generator": "stage2/model",
        "synthetic": "synthetic",
        "stage3": "stage3",
        "summary": "summary.json",
        "report": "report.md",
        "results_plot": "results.png",
        "fid_json": "fid.json",
        "pipeline_state": "pipeline.json",
        "label_split": "label_split.csv",
        "label_split_meta": "label_split.json",
        "staging": ".staging",
        "lock": "run.lock",
    }
    for name, rel in expected.items():
        assert getattr(run, name) == tmp_path / rel, name
        assert str(getattr(RELATIVE, name)) == rel, name
    assert run.evaluation("semi") == tmp_path / "evaluate" / "semi"


def test_layout_of_a_config_is_its_output_dir(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path / 'r'}"])
    assert layout(cfg) == RunLayout(Path(tmp_path / "r"))
    assert layout(cfg).semi == tmp_path / "r" / "stage1" / "semi"


def test_pipeline_stage_table_names_the_same_files():
    from dpt.pipeline import STAGES

    markers = {s.name: (s.marker, s.folder) for s in STAGES}
    assert markers == {
        "pretrain": ("stage0/encoder.safetensors", "stage0"),
        "finetune": ("stage1/finetune/metrics.json", "stage1/finetune"),
        "semi": ("stage1/semi/metrics.json", "stage1/semi"),
        "pseudo-label": ("stage1/pseudo_labels.csv", ""),
        "judge": ("judge/metrics.json", "judge"),
        "train-diffusion": ("stage2/metrics.json", "stage2"),
        "generate": ("synthetic/metrics.json", "synthetic"),
        "retrain": ("stage3/metrics.json", "stage3"),
        "report": ("summary.json", ""),
    }
