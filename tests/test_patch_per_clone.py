"""Every USV node's output owns its patch, whatever ModelPatcher.clone() copies (ComfyUI 0.14+
shares objects in model_options between clones): chaining nodes never changes a model upstream,
and each clone keeps its own run statistics."""

import pytest
import torch

from harness import tiny_models


@pytest.fixture(scope="module")
def wan(comfy_nodes, wan4):
    return comfy_nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet(wan4, "default")[0]


def node(comfy_nodes, name, *args):
    return comfy_nodes.NODE_CLASS_MAPPINGS[name].execute(*args).result[0]


def sample(model, steps=3):
    return tiny_models.sample_wan(model, steps)


def patch_of(model):
    return model.model_options.get("transformer_options", {}).get("usv_patch")


def test_repatching_replaces_on_the_new_clone_only(comfy_nodes, wan):
    dense = sample(wan)
    sparse = node(comfy_nodes, "USVSparseAttention", wan, 0.25, 0, "", "4x4x4")
    before = sample(sparse)
    assert not torch.allclose(before, dense, atol=1e-4), "keep 0.25 changed nothing"

    again = node(comfy_nodes, "USVSparseAttention", sparse, 1.0, 0, "", "4x4x4")
    assert torch.equal(sample(again), dense)
    assert torch.equal(sample(sparse), before), "patching the output changed the model it was given"
    assert patch_of(sparse).features["sparse_attention"].keep == 0.25
    assert patch_of(wan) is None and torch.equal(sample(wan), dense)


@pytest.mark.parametrize("on_top", ["merge", "accelerate"])
def test_features_chained_on_top_leave_the_sparse_output_as_it_was(comfy_nodes, wan, on_top):
    sparse = node(comfy_nodes, "USVSparseAttention", wan, 0.25, 0, "", "4x4x4")
    before = sample(sparse)
    if on_top == "merge":
        top = node(comfy_nodes, "USVTokenMerge", sparse, 0.5, 0, "", "keys")
    else:
        top = node(comfy_nodes, "USVAccelerate", sparse, 6)
    assert not torch.allclose(sample(top), before, atol=1e-4)
    assert torch.equal(sample(sparse), before)
    assert set(patch_of(sparse).features) == {"sparse_attention"}
    assert patch_of(sparse).features["sparse_attention"].keep == 0.25


def test_each_clone_keeps_the_statistics_of_its_own_runs(comfy_nodes, wan):
    sparse = node(comfy_nodes, "USVSparseAttention", wan, 0.25, 1, "", "4x4x4")
    dense = node(comfy_nodes, "USVSparseAttention", sparse, 1.0, 0, "", "4x4x4")
    # a clone made by another node (a LoRA loader would do the same) samples on its own account
    other = comfy_nodes.NODE_CLASS_MAPPINGS["ModelSamplingSD3"]().patch(sparse, 5.0)[0]
    sample(sparse, steps=3)
    sample(dense, steps=2)
    sample(other, steps=4)

    run = patch_of(sparse).last_run
    assert run.steps == 3 and run.paths()["sparse"] == 2 * 4  # steps 1-2 x 4 blocks
    assert patch_of(dense).last_run.steps == 2 and "sparse" not in patch_of(dense).last_run.paths()
    assert patch_of(other).last_run.steps == 4

    report = comfy_nodes.NODE_CLASS_MAPPINGS["USVReport"].execute(sparse, {"samples": None}).result[1]
    assert report.startswith("USV run: 3 steps x 4 blocks"), report
