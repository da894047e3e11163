"""Every benchmark script is a module of the benchmarks package (no sys.path edits) whose usage
lines say `python -m benchmarks.<script>`; its folders follow benchmarks.record; its JSON carries
its provenance."""

import importlib
import json
import pkgutil
import subprocess
import sys
import types

import pytest

import benchmarks
from benchmarks.record import RESULTS, ROOT, read_result, result_dir, run_dir, script_name, write_result

SCRIPTS = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name != "record")


def test_every_script_is_found():
    assert {"throughput", "mechanisms_mnist", "stage3_mnist", "summarize_runs", "plot_bench"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_as_a_module_and_documents_its_module_command(name, capsys):
    source = (ROOT / "benchmarks" / f"{name}.py").read_text()
    assert "sys.path" not in source
    mod = importlib.import_module(f"benchmarks.{name}")
    assert f"python -m benchmarks.{name}" in mod.__doc__
    assert "python benchmarks/" not in mod.__doc__
    with pytest.raises(SystemExit) as stop:
        mod.main(["--help"])
    assert stop.value.code == 0 and "--" in capsys.readouterr().out


def test_folders_follow_the_script_name_however_it_runs(monkeypatch):
    assert script_name("benchmarks.stage3_mnist") == "stage3_mnist"
    assert script_name(str(ROOT / "benchmarks" / "stage3_mnist.py")) == "stage3_mnist"
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="benchmarks.stage3_mnist")  # python -m benchmarks.stage3_mnist
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert result_dir("__main__") == RESULTS / "stage3_mnist" == ROOT / "benchmarks" / "results" / "stage3_mnist"
    assert run_dir("__main__") == ROOT / "runs" / "bench" / "stage3_mnist"


def test_read_result_reads_new_and_old_files(tmp_path):
    new = write_result(tmp_path / "new.json", [{"seed": 0}], argv=[str(ROOT / "benchmarks" / "stage3_mnist.py"), "--k", "3"])
    data = json.loads(new.read_text())
    assert data["provenance"]["command"] == "python -m benchmarks.stage3_mnist --k 3"
    assert read_result(new) == [{"seed": 0}]
    (tmp_path / "old.json").write_text(json.dumps([{"seed": 1}]))
    assert read_result(tmp_path / "old.json") == [{"seed": 1}]


def test_summarize_runs_as_a_module_writes_its_table_with_provenance(tmp_path):
    for seed, top1 in ((0, 90.0), (1, 92.0)):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"dpt_top1": top1, "stage_seconds": {"semi": 60}}))
    out = tmp_path / "table.json"
    args = [str(tmp_path / "run0"), str(tmp_path / "run1"), "--out", str(out)]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.summarize_runs", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| DPT (stage 3), top-1 % | 90.00 | 92.00 | 91.00 ± 1.41 |" in proc.stdout
    written = json.loads(out.read_text())
    assert written["provenance"]["command"] == "python -m benchmarks.summarize_runs " + " ".join(args)
    table = written["results"]
    assert table["runs"] == ["run0", "run1"] and table["metrics"]["dpt_top1"]["mean"] == pytest.approx(91.0)
    assert table["wall_minutes"] == [1.0, 1.0]
