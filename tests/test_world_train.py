"""The training script runs end to end (tiny sizes, CPU, seconds), writes files that load, and a
run stopped by its time limit or by a step budget resumes from its checkpoint."""

import json
import os
import shutil

import torch
from safetensors.torch import load_file

from usv_core.world import train, weights
from usv_core.world.checkpoint import load_state, save_state


def test_train_tiny_stops_resumes_and_finishes(tmp_path, capsys):
    out = str(tmp_path)
    # A time limit already spent: the VAE phase saves its state and the command ends cleanly.
    assert train.main(["--out", out, "--tiny", "--stop-after", "1e-9"]) == 0
    assert "run the same command again to resume" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "ckpt" / "vae_state.safetensors")
    assert not os.path.exists(tmp_path / "usv_world_dit.safetensors")

    assert train.main(["--out", out, "--tiny", "--dit-steps", "2", "--no-eval"]) == 0
    assert "vae: resumed at step 0" in capsys.readouterr().out  # the state the stop saved loads
    assert json.load(open(tmp_path / "world_teacher.json"))["dit_steps"] == 2

    # A larger budget trains on from the checkpoint instead of starting over.
    assert train.main(["--out", out, "--tiny"]) == 0
    log = capsys.readouterr().out
    assert "vae: read back" in log and "dit: resumed at step 2" in log
    result = json.load(open(tmp_path / "world_teacher.json"))
    assert result["dit_steps"] == 3 and len(result["commands"]) == 3
    assert 0.0 <= result["world_score"] <= 1.0 and result["seconds_per_video"] > 0
    assert set(result) >= {"world_score_se", "presence", "shape_ok", "smooth", "moving", "colour_presence", "vae_psnr_db"}
    names = set(os.listdir(tmp_path))
    assert names >= {"usv_world_dit.safetensors", "usv_world_vae.safetensors", "usv_world_text.safetensors",
                     "curves.json", "curves.png", "world_teacher.json", "samples.png"}
    dit = weights.load_dit(str(tmp_path / "usv_world_dit.safetensors"))
    vae = weights.load_vae(str(tmp_path / "usv_world_vae.safetensors"))
    text = weights.load_text(str(tmp_path / "usv_world_text.safetensors"))
    assert dit.dim == 128 and vae.dim == 4 and text.encode("a red circle").shape == (1, 16, 4096)


def test_init_from_trains_shipped_weights_on(tmp_path, capsys):
    """--init-from starts the DiT and caption encoder from a models/-like folder (how a later
    session trains the shipped model further); the totals count the earlier training."""
    first = tmp_path / "first"
    assert train.main(["--out", str(first), "--tiny", "--dit-steps", "2", "--no-eval"]) == 0
    shipped = tmp_path / "models"
    for name, sub in (("usv_world_dit.safetensors", weights.DIT_FILE), ("usv_world_text.safetensors", weights.TEXT_FILE)):
        os.makedirs(os.path.dirname(shipped / sub), exist_ok=True)
        os.replace(first / name, shipped / sub)
    ckpt = tmp_path / "second" / "ckpt"
    os.makedirs(ckpt)
    os.replace(first / "ckpt" / "vae.safetensors", ckpt / "vae.safetensors")
    os.replace(first / "world_teacher.json", ckpt / "results.json")
    capsys.readouterr()
    # a step at learning rate 0: what it saves is what it started from
    assert train.main(["--out", str(tmp_path / "second"), "--tiny", "--dit-steps", "1", "--lr", "0", "--no-eval",
                       "--init-from", str(shipped)]) == 0
    assert "dit: starts from the weights in" in capsys.readouterr().out
    before = weights.load_dit(str(shipped / weights.DIT_FILE)).state_dict()
    after = weights.load_dit(str(tmp_path / "second" / "usv_world_dit.safetensors")).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.load(open(tmp_path / "second" / "world_teacher.json"))["dit_steps"] == 3
    # the next continuation, on a fresh checkpoint folder as on a fresh machine, trains on other clips
    ckpt3 = tmp_path / "third" / "ckpt"
    os.makedirs(ckpt3)
    shutil.copy(ckpt / "vae.safetensors", ckpt3 / "vae.safetensors")
    shutil.copy(tmp_path / "second" / "world_teacher.json", ckpt3 / "results.json")
    assert train.main(["--out", str(tmp_path / "third"), "--tiny", "--dit-steps", "1", "--lr", "0", "--no-eval",
                       "--init-from", str(shipped)]) == 0
    clips = [load_file(str(c / "latents.safetensors"))["lat"] for c in (ckpt, ckpt3)]
    assert clips[0].shape == clips[1].shape and not torch.equal(*clips)


def test_checkpoint_resumes_the_same_optimisation(tmp_path):
    """Two steps straight equal one step, save, load into fresh objects, one step."""
    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2)

    def step(m, opt, i):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()

    m, opt = make()
    step(m, opt, 0)
    step(m, opt, 1)
    m2, opt2 = make()
    step(m2, opt2, 0)
    save_state(str(tmp_path / "s.safetensors"), {"m": m2}, {"m": opt2}, {"step": 1})
    m3, opt3 = make()
    assert load_state(str(tmp_path / "s.safetensors"), {"m": m3}, {"m": opt3}) == {"step": 1}
    step(m3, opt3, 1)
    for a, b in zip(m.parameters(), m3.parameters()):
        assert torch.equal(a, b)
