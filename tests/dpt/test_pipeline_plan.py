"""The pipeline runner's bookkeeping: which stages run, which are skipped, what a rerun clears.

Stage bodies are replaced by stand-ins that write the stage's marker file, so these tests check
the runner alone in well under a second each."""

import dataclasses
import os
import time
from pathlib import Path

import pytest

import dpt.pipeline as pipeline
from dpt.errors import DPTError
from semivit.config.load import load_config, save_config
from semivit.errors import ConfigError


@pytest.fixture
def calls(monkeypatch):
    ran = []

    def fake(stage):
        def run(cfg):
            ran.append(stage.name)
            run_cfg = stage.configure(cfg)
            if stage.folder:
                save_config(run_cfg, cfg.run_dir / stage.folder / "config.yaml")
            marker = cfg.run_dir / stage.marker
            if stage.name == "generate" and cfg.generate.out:
                marker = Path(cfg.generate.out) / "metrics.json"
            if cfg.diffusion.epochs == 13 and stage.name == "train-diffusion":
                raise ValueError("stand-in failure")
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("{}")
            time.sleep(0.01)  # distinct modification times

        return run

    stages = [dataclasses.replace(s, run=fake(s)) for s in pipeline.STAGES]
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr("dpt.report.format_table", lambda summary: "")
    return ran


def cfg_for(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", *overrides])


def names(todo):
    return [s.name for s, _ in todo]


def test_fresh_run_runs_every_stage_then_nothing(tmp_path, calls):
    cfg = cfg_for(tmp_path)
    assert names(pipeline.plan(cfg)) == pipeline.STAGE_NAMES
    pipeline.run_pipeline(cfg)
    assert calls == pipeline.STAGE_NAMES
    assert pipeline.plan(cfg) == []
    state = (cfg.run_dir / "pipeline.json").read_text()
    assert '"done"' in state


def test_changed_setting_reruns_that_stage_and_what_reads_it(tmp_path, calls):
    cfg = cfg_for(tmp_path)
    pipeline.run_pipeline(cfg)
    changed = cfg_for(tmp_path, "semi.tau=0.5")
    todo = pipeline.plan(changed)
    assert names(todo) == ["semi", "pseudo-label", "train-diffusion", "generate", "retrain", "report"]
    assert dict((s.name, r) for s, r in todo)["semi"] == "settings changed"


def test_judge_settings_are_its_own(tmp_path, calls):
    cfg = cfg_for(tmp_path)
    pipeline.run_pipeline(cfg)
    todo = names(pipeline.plan(cfg_for(tmp_path, "pipeline.judge_epochs=3")))
    assert todo == ["judge", "report"]


def test_from_stage_forces_that_stage_and_later(tmp_path, calls):
    cfg = cfg_for(tmp_path)
    pipeline.run_pipeline(cfg)
    assert names(pipeline.plan(cfg, start="generate")) == ["generate", "retrain", "report"]
    with pytest.raises(ConfigError, match="not a stage"):
        pipeline.plan(cfg, start="genrate")


def test_stage_run_outside_the_pipeline_counts_as_done(tmp_path, calls):
    cfg = cfg_for(tmp_path)
    pipeline.run_pipeline(cfg)
    (cfg.run_dir / "pipeline.json").unlink()  # as if every stage had been run by the stage scripts
    assert pipeline.plan(cfg) == []


def test_newer_input_reruns_downstream(tmp_path, calls):
    cfg = cfg_for(tmp_path)
    pipeline.run_pipeline(cfg)
    marker = cfg.run_dir / "stage2" / "metrics.json"  # stage 2 retrained by hand
    later = time.time() + 5
    os.utime(marker, (later, later))
    assert names(pipeline.plan(cfg)) == ["generate", "retrain", "report"]


def test_failed_rerun_with_other_settings_keeps_the_finished_stage(tmp_path, calls):
    cfg = cfg_for(tmp_path)
    pipeline.run_pipeline(cfg)
    marker = cfg.run_dir / "stage2" / "metrics.json"
    with pytest.raises(ValueError, match="stand-in"):
        pipeline.run_pipeline(cfg_for(tmp_path, "diffusion.epochs=13"))
    assert marker.is_file()  # nothing was removed before the new run could finish
    assert pipeline.plan(cfg) == []  # the original settings are still done
    todo = dict((s.name, r) for s, r in pipeline.plan(cfg_for(tmp_path, "diffusion.epochs=13")))
    assert todo["train-diffusion"] == "settings changed"


def test_rerun_of_generation_replaces_the_old_images_once_complete(tmp_path, calls):
    cfg = cfg_for(tmp_path)
    pipeline.run_pipeline(cfg)
    old = cfg.run_dir / "synthetic" / "3" / "old.png"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x")
    changed = cfg_for(tmp_path, "generate.guidance_scale=4")
    assert names(pipeline.plan(changed)) == ["generate", "retrain", "report"]
    pipeline.run_pipeline(changed)
    assert not old.exists() and (cfg.run_dir / "synthetic" / "metrics.json").is_file()
    assert not (cfg.run_dir / pipeline.STAGING).joinpath("synthetic").exists()
    assert calls[-3:] == ["generate", "retrain", "report"]


def test_interrupted_swap_is_undone(tmp_path, calls):
    cfg = cfg_for(tmp_path)
    pipeline.run_pipeline(cfg)
    (cfg.run_dir / "synthetic").rename(cfg.run_dir / ".old_synthetic")  # killed between the renames
    pipeline.run_pipeline(cfg)
    assert (cfg.run_dir / "synthetic" / "metrics.json").is_file() and calls.count("generate") == 1


def test_judge_can_be_switched_off(tmp_path, calls):
    # without a judge, FID on classifier features has no classifier: said before stage 0, not after stage 3
    no_judge = cfg_for(tmp_path, "pipeline.judge=false")
    assert "judge" not in names(pipeline.plan(no_judge))
    with pytest.raises(DPTError, match="pipeline.judge=false trains none.*--until retrain"):
        pipeline.run_pipeline(no_judge)
    assert calls == []
    pipeline.run_pipeline(no_judge, until="retrain")
    assert "judge" not in calls and calls[-1] == "retrain"
    cfg = cfg_for(tmp_path, "pipeline.judge=false", f"fid.classifier={tmp_path / 'judge'}")
    pipeline.run_pipeline(cfg)
    assert "judge" not in calls and calls[-1] == "report" and pipeline.plan(cfg) == []


def test_another_label_split_keeps_stage0_and_the_judge(tmp_path, calls):
    cfg = cfg_for(tmp_path)
    pipeline.run_pipeline(cfg)
    todo = names(pipeline.plan(cfg_for(tmp_path, "data.labels_per_class=2")))
    assert "pretrain" not in todo and "judge" not in todo
    assert todo[0] == "finetune" and todo[-1] == "report"
    # a data setting that is not the split still reruns everything
    assert names(pipeline.plan(cfg_for(tmp_path, "data.randaug_magnitude=3")))[:1] == ["pretrain"]


def test_distribution_alignment_reruns_semi_only_when_switched_on(tmp_path, calls, monkeypatch):
    cfg = cfg_for(tmp_path)
    pipeline.run_pipeline(cfg)
    # off, its momentum is not part of any fingerprint
    assert pipeline.plan(cfg_for(tmp_path, "semi.dist_align_momentum=0.9")) == []
    todo = names(pipeline.plan(cfg_for(tmp_path, "semi.dist_align=uniform")))
    assert todo[0] == "semi" and "finetune" not in todo and "retrain" in todo
    # a run made before the setting existed has the same fingerprints as one with it off
    semi = next(s for s in pipeline.STAGES if s.name == "semi")
    with_keys = pipeline.fingerprint(cfg, semi)
    real_to_dict = pipeline.to_dict

    def without_keys(c):
        d = real_to_dict(c)
        d["semi"] = {k: v for k, v in d["semi"].items() if not k.startswith("dist_align")}
        return d

    monkeypatch.setattr(pipeline, "to_dict", without_keys)
    assert pipeline.fingerprint(cfg, semi) == with_keys


def test_finished_with_names_the_settings_a_stage_was_made_with(tmp_path, calls):
    cfg = cfg_for(tmp_path)
    assert not pipeline.finished_with(cfg, "retrain")  # nothing ran yet
    pipeline.run_pipeline(cfg)
    assert pipeline.finished_with(cfg, "retrain")
    assert not pipeline.finished_with(cfg_for(tmp_path, "retrain.synthetic_ratio=0.25"), "retrain")
    assert pipeline.finished_with(cfg_for(tmp_path, "diffusion.epochs=3"), "retrain")  # its own settings only
    (cfg.run_dir / "stage3" / "metrics.json").unlink()
    assert not pipeline.finished_with(cfg, "retrain")
    with pytest.raises(ConfigError, match="not a stage"):
        pipeline.finished_with(cfg, "retrian")
