"""scripts/stage1_semivit.sh runs MAE pre-training only when fine-tuning starts from it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def steps(tmp_path: Path, *args: str) -> list[str]:
    """The semivit steps the script launches (a stand-in `python` on PATH records them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "steps.log"
    log.unlink(missing_ok=True)
    fake = bin_dir / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\n'
        f'echo "$3" >> {log}\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "DPT_BIN": ""}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "stage1_semivit.sh"), "configs/tiny.yaml", *args],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return log.read_text().split()


def test_stage1_script_skips_mae_when_model_init_names_weights(tmp_path):
    assert steps(tmp_path) == ["pretrain", "finetune", "semi", "pseudo-label"]
    weights = tmp_path / "mae.pth"
    weights.write_bytes(b"")
    assert steps(tmp_path, f"model.init={weights}") == ["finetune", "semi", "pseudo-label"]
    assert steps(tmp_path, "1", "model.init=none") == ["finetune", "semi", "pseudo-label"]
