"""USV Token Merge in the real ComfyUI, alone and stacked with USV Sparse Attention."""

import pytest
import torch

from harness import runtime
from test_sparse_attention_node import graph, sampled

LAYERS = 4


def merge_node(model, ratio=0.5, dense_steps=1, blocks="", metric="keys"):
    return {"class_type": "USVTokenMerge", "inputs": {"model": model, "ratio": ratio, "dense_steps": dense_steps,
                                                      "blocks": blocks, "metric": metric}}


def with_merge(**kw):
    return lambda model: {"extra": merge_node(model, **kw)}


def patch_of(result, node):
    return result.output(node).model_options["transformer_options"]["usv_patch"]


def test_ratio_zero_is_the_identity(run_workflow, wan4, conds):
    dense = sampled(run_workflow(graph(wan4, conds)))
    merged = sampled(run_workflow(graph(wan4, conds, extra=with_merge(ratio=0.0, dense_steps=0))))
    assert torch.equal(dense, merged)


@pytest.mark.parametrize("metric", ["keys", "hidden"])
def test_merging_runs_chosen_blocks_on_fewer_tokens(run_workflow, wan4, conds, metric):
    steps = 3
    dense = sampled(run_workflow(graph(wan4, conds, steps=steps)))
    result = run_workflow(graph(wan4, conds, steps=steps, extra=with_merge(ratio=0.5, dense_steps=1, metric=metric)))
    out = sampled(result)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, dense, atol=1e-4)
    run = patch_of(result, "extra").last_run
    merged_at = {(s, b) for (s, b, path) in run.calls if path == "merged"}
    # default blocks: all but the first and the last; the first step runs on all tokens
    assert merged_at == {(s, b) for s in range(1, steps) for b in range(1, LAYERS - 1)}
    assert all(0.45 <= r <= 0.55 for r in run.merged.values())


def test_stacks_with_sparse_attention_in_either_order(run_workflow, wan4, conds):
    usv = {"keep": 0.5, "dense_steps": 0}
    merge_after = run_workflow(graph(wan4, conds, usv=usv, extra=with_merge(ratio=0.5, dense_steps=0)))

    merge_first = graph(wan4, conds, usv=usv)
    merge_first["merge"] = merge_node(["unet", 0], ratio=0.5, dense_steps=0)
    merge_first["usv"]["inputs"]["model"] = ["merge", 0]
    merge_first = run_workflow(merge_first)

    assert torch.equal(sampled(merge_after), sampled(merge_first))
    run = patch_of(merge_after, "extra").last_run
    paths = {(s, b): set() for s in range(3) for b in range(LAYERS)}
    for (s, b, path) in run.calls:
        paths[(s, b)].add(path)
    for (s, b), p in paths.items():
        assert "sparse" in p, (s, b, p)  # VSA ran on the merged sequence as well as on full blocks
        assert ("merged" in p) == (1 <= b <= LAYERS - 2), (s, b, p)


def test_bad_inputs(comfy_nodes, wan4):
    import comfy.sd

    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVTokenMerge"]
    model = comfy.sd.load_diffusion_model(runtime.model_path("diffusion_models", wan4))
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 0.9\]"):
        node.execute(model, 0.95, 1, "", "keys")
    with pytest.raises(ValueError, match="blocks: block 9 does not exist"):
        node.execute(model, 0.5, 1, "9", "keys")
