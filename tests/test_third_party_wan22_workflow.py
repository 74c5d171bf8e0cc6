"""workflows/wan22_t2v_two_experts_usv.json, laid out like ComfyUI's own Wan 2.2 template (a
high-noise and a low-noise expert, switched by step between two KSamplerAdvanced), run with two
different tiny Wan models: both experts run sparse, under the one USV Policy that sets them."""

import json
import os

import pytest

from harness import runtime, tiny_models
from harness.ui_workflow import ui_to_api
from test_workflows import shrink

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW = os.path.join(ROOT, "workflows", "wan22_t2v_two_experts_usv.json")
STEPS, SPLIT = 4, 2


def upstream(prompt, key, class_type):
    """The nearest node of `class_type` up the model inputs from `key`."""
    while prompt[key]["class_type"] != class_type:
        key = prompt[key]["inputs"]["model"][0]
    return key


@pytest.fixture(scope="module")
def experts(comfy, tiny_wan, tiny_vae):
    """(prompt, {"high": (sampler id, USV node id), "low": ...}) with the experts on two tiny models."""
    with open(WORKFLOW) as f:
        prompt = shrink(ui_to_api(comfy, json.load(f)), tiny_wan, tiny_vae)
    samplers = {k: v for k, v in prompt.items() if v["class_type"] == "KSamplerAdvanced"}
    assert len(samplers) == 2, "the workflow should sample with two KSamplerAdvanced, one per expert"
    high, low = sorted(samplers, key=lambda k: samplers[k]["inputs"]["start_at_step"])
    out = {}
    for name, key in (("high", high), ("low", low)):
        usv = upstream(prompt, samplers[key]["inputs"]["model"][0], "USVSparseAttention")
        out[name] = (key, usv)
    prompt[upstream(prompt, out["low"][1], "UNETLoader")]["inputs"]["unet_name"] = tiny_models.tiny_wan_t2v(5)
    for key in samplers:
        prompt[key]["inputs"]["steps"] = STEPS
    # 128 x 128 x 9 frames: a (3, 8, 8) token grid, four cubes of 4x4x4, so keeping fewer is sparse
    # (shrink's 64 x 64 fits in one cube)
    for v in prompt.values():
        if v["class_type"] == "EmptyHunyuanLatentVideo":
            v["inputs"].update(width=128, height=128, length=9)
    # decoding and saving are tests/test_workflows.py's part; here only the experts matter
    for key in [k for k, v in prompt.items() if v["class_type"] in ("VAELoader", "VAEDecode", "CreateVideo", "SaveVideo")]:
        del prompt[key]
    prompt[high]["inputs"]["end_at_step"] = SPLIT
    prompt[low]["inputs"]["start_at_step"] = SPLIT
    return prompt, out


def test_one_policy_sets_both_experts(experts):
    prompt, out = experts
    policies = {prompt[usv]["inputs"].get("policy", [None])[0] for _, usv in out.values()}
    assert len(policies) == 1 and None not in policies, "both experts' USV nodes should take the same USV Policy"
    assert prompt[policies.pop()]["class_type"] == "USVPolicy"
    unets = {upstream(prompt, usv, "UNETLoader") for _, usv in out.values()}
    assert len(unets) == 2, "each expert should load its own model"


def test_both_experts_run_sparse(experts):
    prompt, out = experts
    result = runtime.run_workflow(prompt, outputs=tuple(usv for _, usv in out.values()))
    runs = {}
    for name, (_, usv) in out.items():
        patch = result.output(usv).model_options["transformer_options"]["usv_patch"]
        assert patch.last_run is not None, f"the {name}-noise expert left no USV statistics"
        runs[name] = patch.last_run
    for name, run in runs.items():
        # each expert counts steps from the first step of its own share of the schedule
        assert run.steps == SPLIT, (name, run.steps)
        assert run.policy is not None, f"the {name}-noise expert ran without the policy"
        dense_steps = prompt[out[name][1]]["inputs"]["dense_steps"]
        for step in range(run.steps):
            paths = {p for (s, b, p) in run.calls if s == step and b >= 0} - {"declined"}
            assert paths == ({"dense:step"} if step < dense_steps else {"sparse"}), (name, step, paths)
    assert runs["low"].paths()["sparse"] > 0 and runs["high"].paths()["sparse"] > 0
    assert runs["high"].policy is not runs["low"].policy, "the experts' statistics should be their own"
