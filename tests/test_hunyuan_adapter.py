"""USV Sparse Attention on HunyuanVideo: joint image-text attention.

The kernel-level function (usv_core.attention.vsa_attention_joint) is checked against an
explicit masked softmax; the node against a tiny random HunyuanVideo built through ComfyUI's own
classes and sampled in-process (1 double block + 1 single block, hidden 256, 2 heads of 128).
"""

import logging
import math

import pytest
import torch

from harness import tiny_models
from usv_core.attention import vsa_attention_joint

TEXT_TOKENS = 8
CONTEXT_DIM = 64
POOLED_DIM = 32


# ------------------------------------------------------------------------- the joint function
def explicit_joint(q, k, v, grid, keep, cube, text):
    """Image queries: softmax over the top-scoring grid cubes (cube-mean q.k) plus all text keys;
    text queries: all keys. Written independently of usv_core, in float64."""
    B, H, N, D = q.shape
    T, Hg, W = grid
    G = T * Hg * W
    ct, ch, cw = cube
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(Hg), torch.arange(W), indexing="ij")
    nh, nw = -(-Hg // ch), -(-W // cw)
    cube_of = ((t // ct) * nh * nw + (h // ch) * nw + w // cw).flatten()
    C = int(cube_of.max()) + 1
    member = torch.nn.functional.one_hot(cube_of, C).double()  # (G, C)
    qc = torch.einsum("bhnd,nc->bhcd", q[:, :, :G].double(), member) / member.sum(0)[:, None]
    kc = torch.einsum("bhnd,nc->bhcd", k[:, :, :G].double(), member) / member.sum(0)[:, None]
    scores = qc @ kc.transpose(-1, -2)
    keep = torch.as_tensor(keep, dtype=torch.float64).expand(B, H)
    allowed = torch.ones(B, H, N, N, dtype=torch.bool)
    for b in range(B):
        for hd in range(H):
            n = max(1, math.ceil(float(keep[b, hd]) * C - 1e-6))
            kept = torch.zeros(C, C, dtype=torch.bool).scatter_(-1, scores[b, hd].topk(n, -1).indices, True)
            allowed[b, hd, :G, :G] = kept[cube_of][:, cube_of]
    logits = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ v.double()


@pytest.mark.parametrize("grid, text, cube, keep", [
    ((3, 5, 6), 7, (4, 4, 4), 0.5),  # edge cubes on every axis, one short text block
    ((5, 7, 9), 70, (2, 4, 8), 0.3),  # two text blocks, the last one short
    ((2, 3, 3), 1, (1, 8, 8), 0.5),  # cubes smaller than the kernel tile
])
def test_joint_matches_explicit_masked_softmax(grid, text, cube, keep):
    gen = torch.Generator().manual_seed(1)
    N = math.prod(grid) + text
    q, k, v = (torch.randn(2, 2, N, 64, generator=gen) for _ in range(3))
    out, h = vsa_attention_joint(q, k, v, grid, keep, cube=cube, text_tokens=text, return_stats=True)
    assert out.shape == q.shape and h.shape == (2, 2)
    assert torch.allclose(out.double(), explicit_joint(q, k, v, grid, keep, cube, text), atol=1e-5)


def test_joint_per_head_keep_and_keep_one_is_dense():
    gen = torch.Generator().manual_seed(2)
    grid, text = (3, 5, 6), 20
    q, k, v = (torch.randn(1, 2, math.prod(grid) + text, 64, generator=gen) for _ in range(3))
    keep = torch.tensor([0.25, 0.75])
    out = vsa_attention_joint(q, k, v, grid, keep, text_tokens=text)
    assert torch.allclose(out.double(), explicit_joint(q, k, v, grid, keep[None], (4, 4, 4), text), atol=1e-5)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(vsa_attention_joint(q, k, v, grid, 1.0, text_tokens=text), dense, atol=1e-5)
    with pytest.raises(ValueError, match="text_tokens"):
        vsa_attention_joint(q, k, v, grid, 0.5, text_tokens=text + 1)


def test_joint_triton_kernel_matches_reference():
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(3)
    grid, text = (3, 5, 6), 20
    q, k, v = (torch.randn(1, 1, math.prod(grid) + text, 64, generator=gen).to(torch.bfloat16) for _ in range(3))
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU: Triton's interpreter
    q, k, v = (t.to(dev) for t in (q, k, v))
    out = vsa_attention_joint(q, k, v, grid, 0.5, text_tokens=text, backend="triton")
    ref = vsa_attention_joint(q, k, v, grid, 0.5, text_tokens=text, backend="reference")
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err <= 1e-2


# --------------------------------------------------------------------------- the tiny model
@pytest.fixture(scope="module")
def hunyuan(comfy):
    return tiny_models.tiny_hunyuan_video(seed=5, pooled_dim=POOLED_DIM, context_dim=CONTEXT_DIM)


def cond(seed, mask=None):
    gen = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(1, POOLED_DIM, generator=gen)}
    if mask is not None:
        extra["attention_mask"] = mask
    return [torch.randn(1, TEXT_TOKENS, CONTEXT_DIM, generator=gen), extra]


def sample(patcher, steps=3, mask=None, cfg=3.0):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds([cond(3, mask)], [cond(4, mask)])
    guider.set_cfg(cfg)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", steps)
    latent = torch.zeros(1, 16, 5, 10, 12)  # grid (5, 5, 6): 2 x 2 x 2 cubes, edge cubes on every axis
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)


def last_run(patched):
    return patched.model_options["transformer_options"]["usv_patch"].last_run


def test_model_info_names_hunyuan(comfy_nodes, hunyuan):
    text = comfy_nodes.NODE_CLASS_MAPPINGS["USVModelInfo"].execute(hunyuan).result[0]
    assert "HunyuanVideo (t2v)" in text and "layers: 2" in text and "heads: 2, head dim: 128" in text
    assert "USV can patch it" in text


def test_keep_one_is_dense_and_keep_below_one_is_sparse_in_every_block(comfy_nodes, hunyuan):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    dense = sample(hunyuan)
    assert torch.equal(dense, sample(node.execute(hunyuan, 1.0, 0, "", "4x4x4").result[0]))

    patched = node.execute(hunyuan, 0.25, 1, "", "4x4x4").result[0]
    out = sample(patched)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-4)
    run = last_run(patched)
    # block 0 is the double block, block 1 the single block; the text refiner (block -1) declines
    sparse_at = {(s, b) for (s, b, p) in run.calls if p == "sparse"}
    assert sparse_at == {(s, b) for s in (1, 2) for b in (0, 1)}
    assert {(s, b) for (s, b, p) in run.calls if p == "dense:step"} == {(0, 0), (0, 1)}
    assert {b for (_, b, p) in run.calls if p == "declined"} == {-1}

    single_dense = node.execute(hunyuan, 0.25, 1, "1", "4x4x4").result[0]
    sample(single_dense, steps=2)
    assert {b for (_, b, p) in last_run(single_dense).calls if p == "sparse"} == {0}


def test_padded_text_runs_dense_with_one_warning(comfy_nodes, hunyuan, caplog):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    padded = torch.tensor([[1] * (TEXT_TOKENS - 3) + [0] * 3])
    patched = node.execute(hunyuan, 0.25, 0, "", "4x4x4").result[0]
    # cfg 1 runs the cond alone: ComfyUI's HunyuanVideo builds one (1, 1, N) mask for the batch
    with caplog.at_level(logging.WARNING, logger="usv"):
        out = sample(patched, steps=2, mask=padded, cfg=1.0)
    assert torch.equal(out, sample(hunyuan, steps=2, mask=padded, cfg=1.0))
    paths = last_run(patched).paths()
    assert paths["dense:mask"] == 2 * 2 and "sparse" not in paths  # 2 steps x 2 blocks
    assert sum("padded text" in r.getMessage() for r in caplog.records) == 1

    # a mask without padding adds zeros everywhere: the sparse path serves it
    patched = node.execute(hunyuan, 0.25, 0, "", "4x4x4").result[0]
    sample(patched, steps=2, mask=torch.ones(1, TEXT_TOKENS, dtype=torch.long), cfg=1.0)
    assert last_run(patched).paths()["sparse"] == 2 * 2


def test_policy_scores_grid_cubes_only_and_other_nodes_refuse(comfy_nodes, hunyuan):
    nodes = comfy_nodes.NODE_CLASS_MAPPINGS
    policy = nodes["USVPolicy"].execute(0.5, 1.0, 1, "entropy", 0.0).result[0]
    patched = nodes["USVSparseAttention"].execute(hunyuan, 0.05, 1, "", "4x4x4", "none", policy).result[0]
    assert torch.isfinite(sample(patched)).all()
    run = last_run(patched)
    # the dense step's entropy is measured on the grid part of the joint calls, for both blocks
    assert {b for (s, b) in run.entropy if s == 0} == {0, 1}
    assert all(((h >= 0) & (h <= 1)).all() for h in run.entropy.values())
    assert {(s, b) for (s, b, p) in run.calls if p in ("sparse", "dense:policy")} == {(s, b) for s in (1, 2) for b in (0, 1)}
    with pytest.raises(ValueError, match="supports Wan 2.1 / 2.2 models; this is HunyuanVideo"):
        nodes["USVTokenMerge"].execute(hunyuan, 0.5, 1, "", "keys")
