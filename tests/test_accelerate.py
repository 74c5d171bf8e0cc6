"""USV Accelerate follows the schedule it runs in: DMD schedules of 4 steps or fewer run no dense
step, longer ones their first dense_share of steps; saved workflows keep working. In the real
ComfyUI on a tiny random Wan 2.1 (4 blocks)."""

import pytest
import torch

from harness import runtime, test_nodes
from harness.ui_workflow import ui_to_api
from test_policy_nodes import base, dmd_graph, ksampler, last_run
from test_sparse_attention_node import sampled


@pytest.fixture(scope="module")
def latent(comfy):
    return test_nodes.put_tensor(torch.zeros(1, 16, 4, 16, 32))  # grid (4, 8, 16): 8 cubes


@pytest.fixture(scope="module")
def acc():
    return runtime.pack_module("nodes.accelerate")


def dense_steps_run(run) -> set[int]:
    return {s for (s, b, p) in run.calls if p == "dense:step"}


def test_dense_steps_follow_the_schedule(acc):
    assert [acc.dense_steps(n) for n in (1, 2, 3, 4)] == [0, 0, 0, 0]  # DMD: none
    assert acc.dense_steps(50) == 15 and acc.dense_steps(20) == 6 and acc.dense_steps(5) == 2
    assert acc.dense_steps(50, 0.0) == 0 and acc.dense_steps(10, 1.0) == 10
    assert acc.dense_steps(0) == 1  # a sampler that names no schedule: the first step, as before
    with pytest.raises(ValueError, match="dense_share must be a number from 0 to 1"):
        acc.dense_steps(50, 1.5)
    # the run's speedup counts the dense steps: all of a 3-step run is accelerated
    assert acc.run_speedup(3.0, 3) == pytest.approx(3.0)
    assert acc.run_speedup(3.0, 50) == pytest.approx(50 / (15 + 35 / 3.0))


def test_the_new_widget_comes_last_and_old_workflows_keep_working(comfy_nodes, acc):
    schema = comfy_nodes.NODE_CLASS_MAPPINGS["USVAccelerate"].GET_SCHEMA()
    assert [i.id for i in schema.inputs] == ["model", "speed", "dense_share"]
    # a workflow saved before dense_share stores one widget value: the share takes its default
    saved = {"nodes": [{"id": 1, "type": "USVAccelerate", "widgets_values": [6],
                        "inputs": [{"name": "model", "link": None}]}], "links": []}
    assert ui_to_api(comfy_nodes, saved)["1"]["inputs"] == {"speed": 6, "dense_share": acc.DENSE_SHARE}


def test_a_3_step_dmd_schedule_runs_no_dense_step(run_workflow, wan4, conds, latent):
    result = run_workflow(dmd_graph(wan4, conds, latent), outputs=("sample", "acc"))
    assert torch.isfinite(sampled(result)).all()
    run = last_run(result, "acc")
    assert run.steps == 3
    assert dense_steps_run(run) == set()
    sparse_at = {s for (s, b, p) in run.calls if p == "sparse"}
    assert 0 in sparse_at  # the first step is accelerated too
    merged_at = {s for (s, b) in run.merged}
    assert 0 in merged_at
    stated = result.outputs["acc"]["text"][0]
    assert "none on schedules of 4 steps or fewer" in stated and "15 of 50 steps" in stated


@pytest.mark.parametrize("share,dense", [(0.3, {0, 1}), (0.0, set())])
def test_a_longer_schedule_runs_its_share_of_steps_dense(run_workflow, wan4, conds, latent, share, dense):
    g = base(wan4, conds, latent)
    g["acc"] = {"class_type": "USVAccelerate", "inputs": {"model": ["unet", 0], "speed": 4, "dense_share": share}}
    result = run_workflow(ksampler(g, ["acc", 0], steps=5, cfg=1.0), outputs=("sample", "acc"))
    assert torch.isfinite(sampled(result)).all()
    run = last_run(result, "acc")
    assert run.steps == 5
    assert dense_steps_run(run) == dense  # 0.3 * 5 = 1.5, rounded up
    assert {s for (s, b, p) in run.calls if p == "sparse"} == set(range(5)) - dense


def test_the_given_model_is_not_changed(run_workflow, wan4, conds, latent):
    g = base(wan4, conds, latent)
    g["acc"] = {"class_type": "USVAccelerate", "inputs": {"model": ["unet", 0], "speed": 6, "dense_share": 0.5}}
    result = run_workflow(g, outputs=("unet", "acc"))
    opts = result.output("unet").model_options.get("transformer_options", {})
    assert "usv_patch" not in opts
    feats = result.output("acc").model_options["transformer_options"]["usv_patch"].features
    assert feats["sparse_attention"].dense_share == 0.5 and feats["token_merge"].dense_share == 0.5
