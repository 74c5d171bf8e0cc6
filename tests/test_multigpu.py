"""USV under ComfyUI's MultiGPU (0.28+): the model's work units run on per-device deep clones in
threads. Each device's clone owns its USV patch (no statistics shared between threads), and USV
Report merges the devices' statistics into the run one device would have shown.

A CPU machine has one device, so the second device here is torch.device("cpu", 0): a distinct
device key for ComfyUI's scheduler and thread pool whose tensors live in the same memory. The
clones are built as comfy.multigpu.create_multigpu_deepclones builds them (it only enumerates
devices first), and sampling runs ComfyUI's real multi-device path: cond on one device, uncond
on the other, each in its own worker thread."""


import pytest
import torch

from harness import tiny_models

EXTRA = torch.device("cpu", 0)


@pytest.fixture(scope="module")
def multigpu(comfy_nodes):
    try:
        import comfy.multigpu
    except ImportError:
        from harness import runtime

        pytest.skip(f"ComfyUI {'.'.join(map(str, runtime.comfyui_version()))} has no comfy.multigpu "
                    "(MultiGPU CFG Split; 0.28.1 has it)")
    return comfy.multigpu


@pytest.fixture(scope="module")
def wan(comfy_nodes, wan4):
    return comfy_nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet(wan4, "default")[0]


def node(comfy_nodes, name, *args):
    return comfy_nodes.NODE_CLASS_MAPPINGS[name].execute(*args).result[0]


def patch_of(model):
    return model.model_options.get("transformer_options", {}).get("usv_patch")


def split(multigpu, model):
    """`model` on two devices, the way MultiGPU CFG Split prepares it."""
    m = model.clone()
    extra = m.deepclone_multigpu(new_load_device=EXTRA)
    extra.is_multigpu_base_clone = True
    m.set_additional_models("multigpu", [extra])
    m.match_multigpu_clones()
    multigpu.GPUOptionsGroup().register(m)
    return m


def sample(model, steps=3):
    return tiny_models.sample_wan(model, steps)




def test_each_device_clone_owns_its_patch_and_the_model_given_is_untouched(comfy_nodes, multigpu, wan):
    sparse = node(comfy_nodes, "USVSparseAttention", wan, 0.25, 0, "", "4x4x4")
    two = split(multigpu, sparse)
    main, [extra] = patch_of(two), two.get_additional_models_with_key("multigpu")
    own = patch_of(extra)
    assert own is not main and own is not patch_of(sparse)
    assert own.run is not main.run and own.features == main.features
    assert main.devices == {EXTRA: own}
    assert patch_of(sparse).devices == {}, "preparing MultiGPU changed the model it was given"


@pytest.mark.parametrize("usv_first", [True, False], ids=["usv-then-split", "split-then-usv"])
def test_cfg_split_over_two_devices_matches_one_device_and_report_merges_them(comfy_nodes, multigpu, wan, usv_first):
    if usv_first:
        two = split(multigpu, node(comfy_nodes, "USVSparseAttention", wan, 0.25, 1, "", "4x4x4"))
    else:
        two = node(comfy_nodes, "USVSparseAttention", split(multigpu, wan), 0.25, 1, "", "4x4x4")
    one = node(comfy_nodes, "USVSparseAttention", wan, 0.25, 1, "", "4x4x4")

    assert torch.allclose(sample(two), sample(one), rtol=1e-4, atol=1e-4), "two devices sampled another video than one"

    main = patch_of(two)
    [extra] = main.devices.values()
    for p in (main, extra):
        run = p.last_run
        assert run is not None and run.steps == 3
        # each device ran one of cond / uncond per step: sparse on steps 1-2 of 4 blocks, once each
        assert run.paths()["sparse"] == 2 * 4, run.paths()
        assert set(run.entropy) and all(h.shape[0] == 1 for h in run.entropy.values())
    assert main.last_run is not extra.last_run

    report = comfy_nodes.NODE_CLASS_MAPPINGS["USVReport"]
    merged_image, merged = report.execute(two, {"samples": None}).result
    single_image, single = report.execute(one, {"samples": None}).result
    lines = merged.splitlines()
    assert lines[0].startswith("USV run: 3 steps x 4 blocks"), merged
    assert any(line.startswith("devices: 2 (MultiGPU") for line in lines), merged
    # the merged tables are those of the one-device run, which saw cond and uncond in one batch
    # (but for the measured seconds)
    def same(text):
        return [line for line in text.splitlines() if not line.startswith(("devices:", "measured on"))]

    assert same(merged) == same(single)
    assert any(line.startswith("measured on") for line in lines), merged
    assert torch.allclose(merged_image, single_image, atol=1e-4)


@pytest.mark.gpu
def test_multigpu_cfg_split_on_two_gpus(comfy_nodes, multigpu, wan):
    """The same on real GPUs, through comfy.multigpu.create_multigpu_deepclones (what MultiGPU CFG
    Split calls): runs with `scripts/test.sh -m gpu tests/test_multigpu.py` on a 2-GPU machine."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    one = node(comfy_nodes, "USVSparseAttention", wan, 0.25, 1, "", "4x4x4")
    two = multigpu.create_multigpu_deepclones(one, 2)
    assert torch.allclose(sample(two), sample(one), rtol=1e-3, atol=1e-3)
    main = patch_of(two)
    assert len(main.devices) == 1
    [extra] = main.devices.values()
    assert main.last_run.paths()["sparse"] == 8 and extra.last_run.paths()["sparse"] == 8
