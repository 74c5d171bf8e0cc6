"""The training script runs end to end (tiny sizes, CPU, seconds) and writes files that load."""

import json
import os

from usv_core.world import train, weights


def test_train_tiny_end_to_end(tmp_path):
    train.main(["--out", str(tmp_path), "--tiny"])
    names = sorted(os.listdir(tmp_path))
    for n in ("usv_world_dit.safetensors", "usv_world_vae.safetensors", "usv_world_text.safetensors",
              "curves.json", "curves.png", "world_teacher.json", "samples.png"):
        assert n in names
    result = json.load(open(tmp_path / "world_teacher.json"))
    assert 0.0 <= result["world_score"] <= 1.0 and result["seconds_per_video"] > 0
    dit = weights.load_dit(str(tmp_path / "usv_world_dit.safetensors"))
    vae = weights.load_vae(str(tmp_path / "usv_world_vae.safetensors"))
    text = weights.load_text(str(tmp_path / "usv_world_text.safetensors"))
    assert dit.dim == 128 and vae.dim == 4 and text.encode("a red circle").shape == (1, 16, 4096)
