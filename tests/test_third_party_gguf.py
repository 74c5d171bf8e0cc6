"""USV beside the real ComfyUI-GGUF pack: a tiny Wan 2.1 quantized to Q8_0, loaded by its
UnetLoaderGGUF (a GGUFModelPatcher whose weights dequantize on the fly) and patched by USV."""

import pytest
import torch

from harness import third_party, tiny_gguf
from test_sparse_attention_node import LAYERS, graph, latent_of, sampled, usv_stats

PACK = "ComfyUI-GGUF"
QTYPE = "Q8_0"


@pytest.fixture(scope="module")
def gguf_wan(comfy):
    third_party.load_or_skip(PACK)
    pytest.importorskip("gguf", reason="ComfyUI-GGUF needs the gguf package (scripts/setup_runtime.sh installs it)")
    return tiny_gguf.tiny_wan_t2v_gguf(0, QTYPE)


def gguf_graph(name, conds, **kw):
    g = graph("unused", conds, **kw)
    g["unet"] = {"class_type": "UnetLoaderGGUF", "inputs": {"unet_name": name}}
    return g


def test_the_loader_gives_a_quantized_wan(comfy, gguf_wan):
    model = comfy.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]().load_unet(gguf_wan)[0]
    assert type(model.model).__name__ == "WAN21"
    weight = model.model.diffusion_model.blocks[0].self_attn.q.weight
    # the GGUF pack keeps quantized blocks and dequantizes per call: USV must see that model, not a float copy
    assert getattr(weight, "tensor_type", None) is not None and weight.tensor_type.name == QTYPE


def test_keep_one_equals_the_gguf_models_own_output(run_workflow, gguf_wan, conds):
    own = sampled(run_workflow(gguf_graph(gguf_wan, conds)))
    patched = sampled(run_workflow(gguf_graph(gguf_wan, conds, usv={"keep": 1.0, "dense_steps": 0})))
    assert torch.isfinite(own).all()
    assert torch.equal(own, patched)


def test_keep_below_one_runs_sparse_and_stays_finite(run_workflow, gguf_wan, conds):
    steps = 3
    own = sampled(run_workflow(gguf_graph(gguf_wan, conds, steps=steps)))
    g = gguf_graph(gguf_wan, conds, usv={"keep": 0.25, "dense_steps": 1}, steps=steps)
    g["report"] = {"class_type": "USVReport", "inputs": {"model": ["usv", 0], "latent": ["sample", 0]}}
    result = run_workflow(g, outputs=("sample", "usv", "report"))
    out = sampled(result)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, own, atol=1e-4), "sparse attention changed nothing on the GGUF model"

    stats = usv_stats(result)
    assert stats.steps == steps
    # step 0 is dense by dense_steps; every block of every later step takes the sparse path
    assert stats.paths()["sparse"] == (steps - 1) * LAYERS
    summary = result.output("report", 1)
    assert f"USV run: {steps} steps x {LAYERS} blocks" in summary
    assert "attended share: 100.0%" not in summary


def test_grid_with_edge_cubes_and_cfg_batches(run_workflow, gguf_wan, conds):
    latent = latent_of(frames=2, height=10, width=14)
    result = run_workflow(gguf_graph(gguf_wan, conds, usv={"keep": 0.3, "dense_steps": 0}, latent=latent, cfg=5.0))
    out = sampled(result)
    assert out.shape == (1, 16, 2, 10, 14) and torch.isfinite(out).all()
    assert usv_stats(result).paths()["sparse"] == 3 * LAYERS
