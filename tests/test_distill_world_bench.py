"""bench/distill_world.py, the ablation's driver: the student names a user types (+gan, +ema,
+reg, +regall) reach the distillation as its options, and its CPU smoke path (--tiny) trains,
exports and scores a named student end to end."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "distill_world.py")
_spec = importlib.util.spec_from_file_location("distill_world", SCRIPT)
dw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dw)


def test_student_names_become_distillation_options():
    options, sparsity = dw.student_options("keep0.2+reg4+regall+ema0.99")
    assert sparsity == (0.2, 0.0)
    assert options == ["--keep", "0.2", "--merge", "0", "--regress", "4", "--regress-at", "all", "--ema", "0.99"]
    assert dw.student_options("keep0.05+merge0.5+gan")[0][-2:] == ["--gan", str(dw.GAN_WEIGHT)]
    for bad in ("keep0.3", "keep0.2+reg", "keep0.2+regall", "keep0.2+ganshift1", "keep0.2+ema"):
        with pytest.raises(SystemExit, match="--students: unknown"):
            dw.student_options(bad)


def test_the_tiny_path_trains_and_scores_a_named_student(tmp_path):
    out = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--tiny", "--students", "keep0.2+reg1+regall"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with safe_open(str(out / "keep0.2+reg1+regall" / "student_dit.safetensors"), "pt") as f:
        recipe = json.loads(f.metadata()["usv_distill"])
    assert recipe["regress"] == 1.0 and recipe["regress_at"] == "all" and recipe["keep"] == 0.2
    result = json.loads((out / "distill_world_cpu.json").read_text())
    (row,) = [r for r in result["rows"] if r["student"] == "keep0.2+reg1+regall"]
    assert row["distill_steps"] == 2 and 0.0 <= row["world_score"] <= 1.0 and row["keep"] == 0.2
    assert "partial" not in result  # the last write is the whole result
