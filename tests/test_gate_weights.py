"""The gated coarse branch of VSA-trained checkpoints, through USV Sparse Attention."""

import pytest
import torch
from safetensors.torch import save_file

from harness import runtime
from test_sparse_attention_node import graph, sampled

DIM, LAYERS = 256, 2


def write_gates(name, scale=0.05, dim=DIM, layers=LAYERS, prefix="blocks"):
    gen = torch.Generator().manual_seed(5)
    sd = {}
    for i in range(layers):
        sd[f"{prefix}.{i}.attn1.to_gate_compress.weight"] = scale * torch.randn(dim, dim, generator=gen)
        sd[f"{prefix}.{i}.attn1.to_gate_compress.bias"] = scale * torch.randn(dim, generator=gen)
    save_file(sd, runtime.model_path("diffusion_models", name))
    return name


def with_gate(g, name):
    g["usv"]["inputs"]["gate_weights"] = name
    return g


def test_zero_gate_equals_no_gate_and_a_real_gate_changes_the_video(run_workflow, tiny_wan, conds):
    usv = {"keep": 0.25, "dense_steps": 1}
    plain = sampled(run_workflow(graph(tiny_wan, conds, usv=usv)))
    zero = sampled(run_workflow(with_gate(graph(tiny_wan, conds, usv=usv), write_gates("gates_zero.safetensors", 0.0))))
    gated = sampled(run_workflow(with_gate(graph(tiny_wan, conds, usv=usv),
                                           write_gates("gates_real.safetensors", 0.05, prefix="model.diffusion_model.blocks"))))
    assert torch.equal(plain, zero)
    assert torch.isfinite(gated).all()
    assert not torch.allclose(plain, gated, atol=1e-4)


def test_gate_input_is_what_the_block_feeds_its_self_attention(comfy_nodes, tiny_wan):
    import comfy.sd

    gw = runtime.pack_module("nodes.gate_weights")

    model = comfy.sd.load_diffusion_model(runtime.model_path("diffusion_models", tiny_wan))
    dm = model.model.diffusion_model
    block = dm.blocks[0]
    seen = {}
    hook = block.self_attn.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(x=args[0]), with_kwargs=True)
    try:
        x = torch.randn(2, 12, DIM)
        e0 = torch.randn(2, 6, DIM)
        freqs = dm.rope_encode(1, 6, 8, device=x.device, dtype=x.dtype)
        block(x, e=e0, freqs=freqs, context=torch.randn(2, 4, DIM))
    finally:
        hook.remove()
    assert torch.allclose(gw.wan_attention_input(block, x, e0), seen["x"], atol=1e-6)


def test_files_that_do_not_fit_are_refused_with_the_reason(comfy_nodes, tiny_wan):
    import comfy.sd

    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    model = comfy.sd.load_diffusion_model(runtime.model_path("diffusion_models", tiny_wan))
    with pytest.raises(ValueError, match="holds no to_gate_compress"):
        node.execute(model, 0.25, 1, "", "4x4x4", tiny_wan)
    with pytest.raises(ValueError, match="width is 256; it belongs to another model"):
        node.execute(model, 0.25, 1, "", "4x4x4", write_gates("gates_wide.safetensors", dim=384))
    with pytest.raises(ValueError, match=r"no to_gate_compress for blocks \[1\]"):
        node.execute(model, 0.25, 1, "", "4x4x4", write_gates("gates_short.safetensors", layers=1))
