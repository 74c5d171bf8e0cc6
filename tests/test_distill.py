"""Sparse DMD2 on tiny models (usv_core.distill): the student's sparse forward is Wan's forward with
VSA and token merging in it, gradients reach the student through the sparse kernels, one student
step moves its samples toward the distribution-matching target, the fake score learns, and the
dense-student flag trains a dense student."""

import os

import pytest
import torch

from usv_core.distill import Sparsity, SparseWanDiT
from usv_core.distill.config import from_args
from usv_core.distill.dist import Dist
from usv_core.distill.loop import Trainer
from usv_core.distill.models import tiny_teacher

X_SHAPE = (1, 16, 2, 16, 16)  # grid (2, 8, 8): four 4x4x4 cubes


@pytest.fixture(autouse=True)
def one_thread():
    # two shared cores: more threads only contend on matrices this small
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def inputs(seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + X_SHAPE[1:], generator=g)
    return x, torch.full((batch,), 757.0), torch.randn(batch, 8, 4096, generator=g)


def student(layers=3):
    return SparseWanDiT.from_dit(tiny_teacher(0, layers))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_sparse_forward_is_wans_forward_when_every_cube_is_kept():
    model = student()
    x, t, c = inputs()
    stats = {}
    with torch.no_grad():
        dense = super(SparseWanDiT, model).forward(x, t, c)
        kept = model(x, t, c, Sparsity(keep=0.99), stats=stats)  # ceil(0.99 * 4) = 4 cubes: exact
    assert stats["sparse_calls"] == 3
    assert rel(kept, dense) < 1e-5


def test_sparse_forward_runs_vsa_and_merging_at_the_given_ratios():
    model = student()
    x, t, c = inputs()
    stats = {}
    with torch.no_grad():
        dense = model(x, t, c)
        sparse = model(x, t, c, Sparsity(keep=0.25, merge=0.5), stats=stats)
    assert stats == {"sparse_calls": 3, "merged_share": 0.5}  # middle block merged: first and last never do
    assert 1e-3 < rel(sparse, dense) < 0.5


def _grads(model, sparsity, dtype=torch.float32):
    x, t, c = inputs(1)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(x, t, c, sparsity)
    (out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_reach_every_block_through_sparse_attention_and_merging():
    model = student()
    grads = _grads(model, Sparsity(keep=0.25, merge=0.5, backend="reference"))
    for i in range(3):
        for name in ("q", "k", "v", "o"):
            g = grads[f"blocks.{i}.self_attn.{name}.weight"]
            assert torch.isfinite(g).all() and g.abs().sum() > 0, f"no gradient in block {i} self_attn.{name}"
    assert grads["patch_embedding.weight"].abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_gradients_through_the_triton_kernels_match_the_reference():
    pytest.importorskip("triton")
    model = student(layers=2)
    sparse = dict(keep=0.5, merge=0.0)
    ref = _grads(model, Sparsity(backend="reference", **sparse), torch.bfloat16)
    tri = _grads(model, Sparsity(backend="triton", **sparse), torch.bfloat16)
    for name in ("blocks.0.self_attn.q.weight", "blocks.1.self_attn.k.weight", "blocks.1.self_attn.v.weight"):
        assert tri[name].abs().sum() > 0
        assert rel(tri[name], ref[name]) < 0.05, name


def test_activation_checkpointing_gives_the_same_gradients():
    from usv_core.distill.dist import checkpoint_blocks

    sparsity = Sparsity(keep=0.25, merge=0.5)
    plain = _grads(student(), sparsity)
    recomputed = _grads(checkpoint_blocks(student()), sparsity)
    assert plain.keys() == recomputed.keys()
    for name, g in plain.items():
        assert torch.allclose(g, recomputed[name], rtol=1e-4, atol=1e-9), name


def tiny_trainer(tmp_path, *extra):
    cfg = from_args(["--out", str(tmp_path), "--tiny", "--keep", "0.25", "--merge", "0.5", *extra])
    return Trainer(cfg, Dist())


def test_one_student_step_lowers_the_dmd_loss_on_a_fixed_batch(tmp_path):
    tr = tiny_trainer(tmp_path, "--lr", "1e-4", "--betas", "0.9", "0.999")
    step = 3  # a draw whose schedule step goes through the sparse student more than once
    loss, x0, target, stats = tr.student_loss(step)
    assert loss.requires_grad and stats["real_gap"] > 0
    tr.opt_student.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is not None for p in tr.student.parameters() if p.requires_grad)
    tr.opt_student.step()
    with torch.no_grad():
        _, x0_after, _, _ = tr.student_loss(step)  # the same draw: same noise, prompts and step
    before = 0.5 * torch.nn.functional.mse_loss(x0.detach(), target)
    after = 0.5 * torch.nn.functional.mse_loss(x0_after, target)
    assert after < before * 0.999, (float(before), float(after))


def test_the_fake_score_learns_the_students_samples(tmp_path):
    tr = tiny_trainer(tmp_path, "--fake-lr", "1e-4")
    losses = [float(tr.fake_step(step=0, i=0)[0]) for _ in range(6)]  # one fixed batch of student samples
    # most of a flow-matching loss is the noise it cannot predict: a small, steady fall is learning
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.99 * losses[0], losses


def test_dense_student_flag_trains_a_dense_student(tmp_path):
    tr = tiny_trainer(tmp_path, "--dense-student")
    assert tr.sparsity.is_dense
    stats = {}
    x, t, c = inputs()
    with torch.no_grad():
        tr.student(x, t, c, tr.sparsity_at(1), stats=stats)
    assert stats == {}


def test_bad_settings_say_what_to_change(tmp_path):
    with pytest.raises(ValueError, match="keep must be in"):
        from_args(["--out", str(tmp_path), "--keep", "0"])
    with pytest.raises(SystemExit):
        from_args(["--out", str(tmp_path), "--schedule", "nine-step"])
    cfg = from_args(["--out", str(tmp_path), "--frames", "18"])
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        cfg.latent_shape()


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [[], ["--compile"]], ids=["eager", "compiled"])
def test_tiny_distillation_runs_the_triton_kernels_on_the_gpu(tmp_path, compiled):
    """On CUDA: bf16 autocast, the Triton forward and backward in the student, two full steps,
    eager and with the dense work compiled."""
    cfg = from_args(["--out", str(tmp_path), "--tiny", "--keep", "0.25", "--merge", "0.5", "--steps", "2", "--backend",
                     "triton", *compiled])
    tr = Trainer(cfg, Dist(device=torch.device("cuda")))
    result = tr.run(say=lambda _msg: None)
    assert result["step"] == 2 and all(torch.isfinite(torch.tensor([result["dmd"], result["fake"], result["grad_norm"]])))
    stats = {}
    x, t, c = (v.cuda() for v in inputs())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        tr.student(x, t, c, tr.sparsity, stats=stats)
    assert stats["sparse_calls"] == 3


def test_a_wan_checkpoint_as_comfyui_keeps_it_with_precomputed_text_embeddings(tmp_path):
    """The real-Wan path: a teacher file with ComfyUI's "model.diffusion_model." prefix and text
    conditioning from a file instead of the world's caption encoder."""
    from safetensors.torch import save_file

    teacher = tiny_teacher(0, 3).state_dict()
    save_file({"model.diffusion_model." + k: v.to(torch.bfloat16) for k, v in teacher.items()}, tmp_path / "wan.safetensors")
    save_file({"cond": torch.randn(3, 12, 4096), "uncond": torch.zeros(1, 12, 4096)}, tmp_path / "umt5.safetensors")
    cfg = from_args(["--out", str(tmp_path / "run"), "--teacher", str(tmp_path / "wan.safetensors"),
                     "--embeddings", str(tmp_path / "umt5.safetensors"), "--frames", "5", "--size", "128", "--width", "64",
                     "--batch", "1", "--fake-updates", "1", "--steps", "1"])
    tr = Trainer(cfg, Dist())
    assert torch.equal(tr.teacher.blocks[0].ffn[0].weight, teacher["blocks.0.ffn.0.weight"].to(torch.bfloat16).float())
    result = tr.run(say=lambda _msg: None)
    assert result["step"] == 1 and (tmp_path / "run" / "student_dit.safetensors").exists()


def test_not_a_wan_file_is_refused_with_what_to_give(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a Wan 2.1 text-to-video DiT"):
        Trainer(from_args(["--out", str(tmp_path), "--teacher", str(tmp_path / "x.safetensors")]), Dist())


SHIPPED = all(os.path.exists(p) for p in (from_args(["--out", "x"]).teacher_path(), from_args(["--out", "x"]).text_path()))


@pytest.mark.skipif(not SHIPPED, reason="models/ holds no trained USV World model")
def test_default_run_distils_the_shipped_usv_world_teacher(tmp_path):
    cfg = from_args(["--out", str(tmp_path), "--frames", "5", "--size", "128", "--batch", "1", "--fake-updates", "1",
                     "--steps", "1"])
    tr = Trainer(cfg, Dist())
    assert len(tr.student.blocks) == len(tr.teacher.blocks) and tr.sparsity.keep == 0.2 and tr.sparsity.merge == 0.5
    _, _, prompts = tr.data.batch(torch.Generator().manual_seed(0), 2, "cpu")
    assert all(p.startswith("a ") for p in prompts)  # world captions, e.g. "a red circle and a blue square"
    result = tr.run(say=lambda _msg: None)
    assert result["step"] == 1 and result["real_gap"] > 0


def test_compiled_dense_parts_train_as_the_eager_step_does(tmp_path):
    """--compile fuses the blocks' dense work (teacher and fake whole, the student's around its
    sparse attention): the same draws give the same losses and the same student."""
    from usv_core.distill.student import SparseBlock

    runs = {}
    for compiled in (False, True):
        tr = tiny_trainer(tmp_path / str(compiled), "--fake-updates", "1", *(["--compile"] if compiled else []))
        runs[compiled] = ([tr.train_step() for _ in range(2)], tr.student.state_dict())
        assert (tr.student.blocks[1].project is not SparseBlock.project) == compiled
        assert (tr.teacher.blocks[1]._compiled_call_impl is not None) == compiled
    (eager, w_eager), (comp, w_comp) = runs[False], runs[True]
    for a, b in zip(eager, comp):
        for k in ("dmd", "fake", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), k
    assert all(torch.allclose(w_comp[k], w_eager[k], rtol=1e-3, atol=1e-5) for k in w_eager)
