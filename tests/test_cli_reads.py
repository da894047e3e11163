"""Overrides a command does not read: reported before anything runs, naming the setting it reads
instead; an error unless --allow-unread; the YAML file's own settings are never reported."""

import re
from pathlib import Path

import pytest

import dpt.cli
import semivit.cli
from semivit.config.reads import SHARED, Reads, unread_settings
from semivit.config.schema import Config, to_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _all_keys() -> list[str]:
    def walk(d: dict, prefix: str = ""):
        for k, v in d.items():
            yield from walk(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    return list(walk(to_dict(Config())))


TABLES = {
    **{f"semivit {name}": reads for name, (_, reads) in semivit.cli.COMMANDS.items()},
    **{f"dpt {name}": command.reads for name, command in dpt.cli.COMMANDS.items()},
}


def test_the_message_names_the_key_and_what_the_command_reads_instead():
    reads = semivit.cli.COMMANDS["finetune"][1]
    assert unread_settings(["semi.epochs=5", "finetune.lr=0.1", "seed=3"], reads, "semivit finetune") == [
        "semi.epochs is not read by `semivit finetune` (it reads finetune.*; did you mean finetune.epochs?)"
    ]
    # a key with no counterpart in the command's sections: no guess
    assert unread_settings(["semi.tau=0.5"], reads, "semivit finetune") == [
        "semi.tau is not read by `semivit finetune` (it reads finetune.*)"
    ]


@pytest.mark.parametrize("name", list(TABLES))
def test_every_command_reads_the_shared_settings_and_its_own(name):
    reads = TABLES[name]
    for key in _all_keys():
        if key.split(".")[0] in SHARED:
            assert reads.reads(key), (name, key)
    for setting in reads.settings:
        if setting != "*":
            assert any(k == setting or k.startswith(setting + ".") for k in _all_keys()), f"{name}: no setting {setting}"
    for unread, (instead, _) in reads.instead.items():
        assert unread in _all_keys() and instead in _all_keys() and not reads.reads(unread) and reads.reads(instead)


def test_dpt_run_reads_everything_and_stages_read_only_their_own():
    assert all(TABLES["dpt run"].reads(k) for k in _all_keys())
    assert not TABLES["semivit pretrain"].reads("finetune.epochs")
    assert not TABLES["semivit finetune"].reads("checkpoint")  # it starts from model.init
    assert TABLES["semivit semi"].reads("checkpoint") and TABLES["semivit evaluate"].reads("checkpoint")
    assert TABLES["dpt generate"].reads("diffusion.amp") and not TABLES["dpt generate"].reads("diffusion.epochs")
    assert {"checkpoint", "semi.epochs", "generate.model", "data.name"} <= set(_all_keys())  # the walk finds them


def _last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def test_semivit_finetune_with_a_stage_folder_fails_before_anything_runs(tmp_path, capsys):
    run = tmp_path / "run"
    code = semivit.cli.main(["finetune", "--config", TINY, f"output_dir={run}", f"checkpoint={tmp_path}/other/stage1/semi"])
    assert code == 2
    line = _last_line(capsys.readouterr().err)
    assert line.startswith("semivit finetune: error: checkpoint is not read by `semivit finetune`")
    assert "did you mean model.init" in line and "--allow-unread" in line
    assert not run.exists()  # nothing ran: no folder, no lock


def test_semivit_names_a_setting_of_another_stage(tmp_path, capsys):
    code = semivit.cli.main(["finetune", "--config", TINY, f"output_dir={tmp_path / 'run'}", "semi.epochs=5"])
    assert code == 2
    assert _last_line(capsys.readouterr().err) == (
        "semivit finetune: error: semi.epochs is not read by `semivit finetune` (it reads finetune.*; did you mean "
        "finetune.epochs?); remove it, or pass --allow-unread to run anyway"
    )


def test_dpt_generate_with_a_checkpoint_names_generate_model(tmp_path, capsys):
    run = tmp_path / "run"
    code = dpt.cli.main(["generate", "--config", TINY, f"output_dir={run}", f"checkpoint={run}/stage1/semi"])
    assert code == 2
    line = _last_line(capsys.readouterr().err)
    assert line.startswith("dpt generate: error: checkpoint is not read by `dpt generate`")
    assert "did you mean generate.model" in line
    assert not run.exists()


def test_dpt_reports_every_unread_key_in_one_line_and_accepts_short_keys(tmp_path, capsys):
    code = dpt.cli.main(["train-diffusion", "--config", TINY, f"output_dir={tmp_path / 'run'}", "epochs=1",
                         "semi.epochs=2", "generate.steps=4"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "semi.epochs is not read by `dpt train-diffusion` (it reads diffusion.*; did you mean diffusion.epochs?)" in err
    assert "generate.steps is not read" in err and "diffusion.epochs is not read" not in err  # epochs= is its own
    assert err.endswith("; remove them, or pass --allow-unread to run anyway")


def test_settings_of_the_yaml_file_are_not_reported(tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text(f"base: {TINY}\nsemi:\n  epochs: 3\ngenerate:\n  steps: 2\n")
    # evaluate reads neither semi.* nor generate.*; it fails later, on the missing classifier
    code = semivit.cli.main(["evaluate", "--config", str(config), f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "not read" not in err and "semivit evaluate: error:" in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_allow_unread_runs_with_a_warning(tmp_path, capsys, where):
    run = tmp_path / "run"
    args = ["finetune", "--config", TINY, f"output_dir={run}", "finetune.epochs=1", "semi.epochs=5"]
    argv = ["--allow-unread", *args] if where == "before" else [*args[:1], "--allow-unread", *args[1:]]
    assert semivit.cli.main(argv) == 0
    err = capsys.readouterr().err
    assert re.search(r"semivit finetune: warning: semi\.epochs is not read by `semivit finetune` .*; ignored", err)
    assert (run / "stage1" / "finetune" / "metrics.json").is_file()


def test_dpt_allow_unread_warns_and_runs(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train-diffusion", "--allow-unread", "--config", TINY, f"output_dir={run}", "labels=true", "epochs=1",
            "diffusion.batch_size=120", "retrain.mode=probe"]
    assert dpt.cli.main(argv) == 0
    assert "dpt train-diffusion: warning: retrain.mode is not read" in capsys.readouterr().err
    assert (run / "stage2" / "metrics.json").is_file()


def test_reads_accept_only_whole_keys():
    reads = Reads(("generate", "diffusion.amp"))
    assert reads.reads("generate.steps") and reads.reads("diffusion.amp")
    assert not reads.reads("generate_x") and not reads.reads("diffusion.amp2") and not reads.reads("diffusion.epochs")
