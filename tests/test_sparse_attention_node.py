"""USV Sparse Attention in the real ComfyUI, on a tiny random Wan 2.1."""

import shutil

import pytest
import torch

from harness import runtime, test_nodes, tiny_models

LAYERS = 2


def latent_of(frames=3, height=16, width=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return test_nodes.put_tensor(torch.randn(1, 16, frames, height, width, generator=gen) * 0)


def graph(unet, conds, usv=None, sampler="ksampler", latent=None, steps=3, cfg=4.0, extra=None):
    """UNETLoader -> [USVSparseAttention] -> sampler; the sampled latent is node 'sample'."""
    pos, neg = conds
    g = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "pos": {"class_type": "USVTestConditioning", "inputs": {"name": pos}},
        "neg": {"class_type": "USVTestConditioning", "inputs": {"name": neg}},
        "latent": {"class_type": "USVTestLatent", "inputs": {"name": latent or latent_of()}},
    }
    model = ["unet", 0]
    if usv is not None:
        g["usv"] = {"class_type": "USVSparseAttention", "inputs": {
            "model": model, "keep": usv.get("keep", 0.125), "dense_steps": usv.get("dense_steps", 1),
            "dense_blocks": usv.get("dense_blocks", ""), "cube": usv.get("cube", "4x4x4")}}
        if "blocks" in usv:
            g["usv"]["inputs"]["blocks"] = usv["blocks"]
        model = ["usv", 0]
    if extra:
        g.update(extra(model))
        model = ["extra", 0]
    if sampler == "ksampler":
        g["sample"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": 7, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    else:
        g.update({
            "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
            "guider": {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["pos", 0],
                                                              "negative": ["neg", 0], "cfg": cfg}},
            "ksel": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
            "sched": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "simple",
                                                                  "steps": steps, "denoise": 1.0}},
            "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["ksel", 0], "sigmas": ["sched", 0],
                "latent_image": ["latent", 0]}},
        })
    return g


def sampled(result, node="sample"):
    return result.output(node)["samples"]


def usv_stats(result):
    from_node = result.output("usv")
    patch = from_node.model_options["transformer_options"]["usv_patch"]
    return patch.last_run


@pytest.mark.parametrize("sampler", ["ksampler", "custom_advanced"])
def test_keep_one_equals_unpatched(run_workflow, tiny_wan, conds, sampler):
    dense = sampled(run_workflow(graph(tiny_wan, conds, sampler=sampler)))
    patched = sampled(run_workflow(graph(tiny_wan, conds, usv={"keep": 1.0, "dense_steps": 0}, sampler=sampler)))
    assert torch.equal(dense, patched)


def test_sparse_path_serves_every_self_attention_it_should(run_workflow, tiny_wan, conds):
    # 3 x 16 x 16 latent -> grid (3, 8, 8): 2 x 2 x 1 = 4 cubes of 4x4x4 (edge cubes in time), keep 0.25 -> 1 cube
    steps = 4
    dense = sampled(run_workflow(graph(tiny_wan, conds, steps=steps)))
    result = run_workflow(graph(tiny_wan, conds, usv={"keep": 0.25, "dense_steps": 1, "dense_blocks": "1"}, steps=steps))
    out = sampled(result)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, dense, atol=1e-4), "sparse attention changed nothing"

    stats = usv_stats(result)
    assert stats is not None, "the run left no statistics"
    by_step_block = {}
    for (step, block, path), n in stats.calls.items():
        by_step_block.setdefault((step, block), set()).add(path)
    for step in range(steps):
        for block in range(LAYERS):
            paths = by_step_block.get((step, block), set()) - {"declined"}
            if step < 1:
                assert paths == {"dense:step"}, (step, block, paths)
            elif block == 1:
                assert paths == {"dense:block"}, (step, block, paths)
            else:
                assert paths == {"sparse"}, (step, block, paths)
    # cross-attention is handed on, once per block and model call
    assert stats.paths()["declined"] >= steps * LAYERS


def test_grid_not_a_multiple_of_the_cube_and_cond_uncond_batches(run_workflow, tiny_wan, conds):
    # latent 2 x 10 x 14 -> grid (2, 5, 7): every cube is an edge cube in time; cfg > 1 batches cond and uncond
    latent = latent_of(frames=2, height=10, width=14)
    result = run_workflow(graph(tiny_wan, conds, usv={"keep": 0.3, "dense_steps": 0}, latent=latent, cfg=5.0))
    out = sampled(result)
    assert out.shape == (1, 16, 2, 10, 14)
    assert torch.isfinite(out).all()
    assert usv_stats(result).paths()["sparse"] >= 3 * LAYERS


def test_blocks_packed_joins_edge_cubes_and_cubes_keeps_them(run_workflow, tiny_wan, conds):
    # grid (2, 5, 7): four partial cubes (32, 24, 8, 6 tokens); packed joins each row's pair into
    # one block, so keep 0.3 selects 1 of 2 blocks there and 2 of 4 cubes with "cubes"
    latent = latent_of(frames=2, height=10, width=14)
    out = {}
    for blocks in ("auto", "packed", "cubes"):
        usv = {"keep": 0.3, "dense_steps": 0, "blocks": blocks}
        out[blocks] = sampled(run_workflow(graph(tiny_wan, conds, usv=usv, latent=latent)))
    assert torch.equal(out["auto"], out["packed"])  # no gate weights: auto packs
    assert (out["packed"] - out["cubes"]).abs().max() > 1e-4


def test_patched_model_is_untouched_and_repatching_replaces(comfy_nodes, tiny_wan):
    import comfy.patcher_extension as pe
    import comfy.sd

    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    base = comfy.sd.load_diffusion_model(runtime.model_path("diffusion_models", tiny_wan))
    before_opts = repr(base.model_options)
    before_wrappers = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in base.wrappers.items()}

    once = node.execute(base, 0.25, 1, "", "4x4x4").result[0]
    assert repr(base.model_options) == before_opts
    assert base.wrappers == before_wrappers
    assert "usv_patch" not in base.model_options.get("transformer_options", {})

    twice = node.execute(once, 0.5, 0, "0", "1x8x8").result[0]
    assert len(twice.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, "usv")) == 1
    assert len(twice.get_callbacks(pe.CallbacksMP.ON_CLEANUP, "usv")) == 1
    feature = twice.model_options["transformer_options"]["usv_patch"].features["sparse_attention"]
    assert (feature.keep, feature.dense_steps, feature.cube) == (0.5, 0, (1, 8, 8))
    assert once.model_options["transformer_options"]["usv_patch"].features["sparse_attention"].keep == 0.25


class CountingOverride:
    """Stands in for another pack's attention override (core sparse attention, Sage, ...)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, func, *args, **kwargs):
        self.calls += 1
        return func(*args, **kwargs)

    def __deepcopy__(self, memo):
        # Overrides are usually plain functions, which model clones share rather than copy.
        return self


def install_override_node(comfy_nodes, name, override):
    """Register a node that, like another pack's patch node, puts `override` on a model clone."""

    class InstallOverride:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",)}}

        RETURN_TYPES = ("MODEL",)
        FUNCTION = "patch"
        CATEGORY = "_for_testing"

        def patch(self, model):
            m = model.clone()
            m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
            return (m,)

    comfy_nodes.NODE_CLASS_MAPPINGS[name] = InstallOverride
    return name


def test_previous_override_is_called_for_what_usv_declines(run_workflow, comfy_nodes, tiny_wan, conds):
    counting = CountingOverride()
    node = install_override_node(comfy_nodes, "TestInstallOverride", counting)
    # the other pack's node comes first in the graph, USV after it
    g = graph(tiny_wan, conds, usv={"keep": 0.25, "dense_steps": 1}, steps=3)
    g["other"] = {"class_type": node, "inputs": {"model": ["unet", 0]}}
    g["usv"]["inputs"]["model"] = ["other", 0]
    result = run_workflow(g)
    stats = usv_stats(result)
    handed_on = sum(n for (_, _, path), n in stats.calls.items() if path != "sparse")
    assert counting.calls == handed_on > 0
    assert stats.paths()["sparse"] > 0


def test_other_packs_override_installed_after_usv_still_chains(run_workflow, comfy_nodes, tiny_wan, conds):
    counting = CountingOverride()
    node = install_override_node(comfy_nodes, "TestInstallOverrideAfter", counting)
    extra = lambda model: {"extra": {"class_type": node, "inputs": {"model": model}}}  # noqa: E731
    result = run_workflow(graph(tiny_wan, conds, usv={"keep": 0.25, "dense_steps": 0}, extra=extra, steps=2))
    patch = result.output("extra").model_options["transformer_options"]["usv_patch"]
    assert patch.last_run.paths()["sparse"] == 2 * LAYERS
    assert counting.calls > 0


def test_bad_inputs_say_what_to_change(comfy_nodes, tiny_wan):
    import comfy.sd

    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    model = comfy.sd.load_diffusion_model(runtime.model_path("diffusion_models", tiny_wan))
    with pytest.raises(ValueError, match="block 5 does not exist; this model has 2 blocks"):
        node.execute(model, 0.25, 1, "5", "4x4x4")
    with pytest.raises(ValueError, match="ranges like '0-2'"):
        node.execute(model, 0.25, 1, "first", "4x4x4")
    with pytest.raises(ValueError, match="blocks must be one of"):
        node.execute(model, 0.25, 1, "", "4x4x4", blocks="tiles")


def test_unsupported_model_gets_an_error_naming_the_families(comfy_nodes):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    with pytest.raises(ValueError, match="Supported: Wan 2.1 / 2.2 .* LTX-Video"):
        node.execute(tiny_models.tiny_sd15(), 0.25, 1, "", "4x4x4")


@pytest.mark.server
def test_server_runs_a_workflow_with_sparse_attention(comfy_server, tiny_wan):
    assert "USVSparseAttention" in comfy_server.object_info()
    shutil.copy(runtime.model_path("diffusion_models", tiny_wan), comfy_server.models_dir("diffusion_models"))
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": tiny_wan, "weight_dtype": "default"}},
        "2": {"class_type": "USVSparseAttention", "inputs": {"model": ["1", 0], "keep": 0.125, "dense_steps": 1,
                                                             "dense_blocks": "0", "cube": "4x4x4"}},
        "3": {"class_type": "USVModelInfo", "inputs": {"model": ["2", 0]}},
    }
    entry = comfy_server.wait(comfy_server.queue(prompt))
    assert "USV can patch it" in entry["outputs"]["3"]["text"][0]


def test_lora_models_keep_working(run_workflow, comfy_nodes, tiny_wan, conds):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(9)
    lora = {}
    for i in range(LAYERS):
        for name in ("self_attn.q", "self_attn.k", "ffn.0"):
            out_dim = 512 if name == "ffn.0" else 256
            lora[f"diffusion_model.blocks.{i}.{name}.lora_up.weight"] = 0.05 * torch.randn(out_dim, 4, generator=gen)
            lora[f"diffusion_model.blocks.{i}.{name}.lora_down.weight"] = 0.05 * torch.randn(4, 256, generator=gen)
    save_file(lora, runtime.model_path("loras", "tiny_wan_lora.safetensors"))
    with_lora = lambda model: {"extra": {"class_type": "LoraLoaderModelOnly", "inputs": {  # noqa: E731
        "model": model, "lora_name": "tiny_wan_lora.safetensors", "strength_model": 1.0}}}

    base = sampled(run_workflow(graph(tiny_wan, conds)))
    lora_only = sampled(run_workflow(graph(tiny_wan, conds, extra=with_lora)))
    assert not torch.allclose(base, lora_only, atol=1e-4), "the LoRA changed nothing"
    # LoRA after USV in the graph: its weight patches and USV's call-time patches both apply
    dense_usv = sampled(run_workflow(graph(tiny_wan, conds, usv={"keep": 1.0, "dense_steps": 0}, extra=with_lora)))
    assert torch.equal(dense_usv, lora_only)
    sparse = run_workflow(graph(tiny_wan, conds, usv={"keep": 0.25, "dense_steps": 0}, extra=with_lora))
    assert torch.isfinite(sampled(sparse)).all()
    patch = sparse.output("extra").model_options["transformer_options"]["usv_patch"]
    assert patch.last_run.paths()["sparse"] == 3 * LAYERS
