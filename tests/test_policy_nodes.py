"""USV Policy, USV Accelerate and USV Report in the real ComfyUI, on a tiny random Wan 2.1 (4 blocks,
2 heads), with KSampler and with the DMD sampler."""

import numpy as np
import pytest
import torch

from harness import test_nodes
from test_sparse_attention_node import sampled

LAYERS = 4
HEADS = 2


@pytest.fixture(scope="module")
def latent(comfy):
    # 4 x 16 x 32 latent -> grid (4, 8, 16): 1 x 2 x 4 = 8 cubes of 4x4x4
    return test_nodes.put_tensor(torch.zeros(1, 16, 4, 16, 32))


def base(unet, conds, latent):
    pos, neg = conds
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "pos": {"class_type": "USVTestConditioning", "inputs": {"name": pos}},
        "neg": {"class_type": "USVTestConditioning", "inputs": {"name": neg}},
        "latent": {"class_type": "USVTestLatent", "inputs": {"name": latent}},
    }


def dmd_graph(unet, conds, latent, preset="fastwan-3step", speed=4):
    """UNETLoader -> USVAccelerate -> USV DMD Sigmas + USV DMD Sampler (SamplerCustomAdvanced), no CFG."""
    g = base(unet, conds, latent)
    g.update({
        "acc": {"class_type": "USVAccelerate", "inputs": {"model": ["unet", 0], "speed": speed}},
        "sigmas": {"class_type": "USVDMDSigmas", "inputs": {"model": ["acc", 0], "preset": preset,
                                                             "timesteps": "1000, 750, 500, 250", "shift": 5.0}},
        "dmd": {"class_type": "USVDMDSampler", "inputs": {"mode": "stochastic", "noise_seed": 0}},
        "guider": {"class_type": "BasicGuider", "inputs": {"model": ["acc", 0], "conditioning": ["pos", 0]}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["dmd", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
    })
    return g


def ksampler(g, model, steps=3, cfg=4.0):
    g["sample"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 7, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    return g


def policy_graph(unet, conds, latent, mode="entropy", budget=0.3, refresh=1, keep=0.05, ratio=0.5, steps=3,
                 report=False):
    """UNETLoader -> USVSparseAttention -> USVTokenMerge (both with one USVPolicy) -> KSampler [-> USVReport]."""
    g = base(unet, conds, latent)
    g["policy"] = {"class_type": "USVPolicy", "inputs": {"budget": budget, "gamma": 1.0, "refresh": refresh,
                                                          "mode": mode, "early": 0.0}}
    g["usv"] = {"class_type": "USVSparseAttention", "inputs": {
        "model": ["unet", 0], "keep": keep, "dense_steps": 1, "dense_blocks": "", "cube": "4x4x4",
        "gate_weights": "none", "policy": ["policy", 0]}}
    g["merge"] = {"class_type": "USVTokenMerge", "inputs": {
        "model": ["usv", 0], "ratio": ratio, "dense_steps": 1, "blocks": "", "metric": "keys",
        "policy": ["policy", 0]}}
    ksampler(g, ["merge", 0], steps=steps)
    if report:
        g["report"] = {"class_type": "USVReport", "inputs": {"model": ["merge", 0], "latent": ["sample", 0]}}
    return g


def last_run(result, node):
    return result.output(node).model_options["transformer_options"]["usv_patch"].last_run


def test_new_inputs_come_after_the_released_ones(comfy_nodes):
    def names(node_id):
        schema = comfy_nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        return [i.id for i in schema.inputs]

    assert names("USVSparseAttention") == ["model", "keep", "dense_steps", "dense_blocks", "cube", "gate_weights",
                                           "policy", "blocks"]
    assert names("USVTokenMerge") == ["model", "ratio", "dense_steps", "blocks", "metric", "policy"]
    assert names("USVPolicy") == ["budget", "gamma", "refresh", "mode", "early"]
    assert names("USVAccelerate") == ["model", "speed", "dense_share"]  # new widgets go last
    assert names("USVReport") == ["model", "latent"]


def test_entropy_policy_spends_the_budget_and_reports_it(run_workflow, wan4, conds, latent):
    # attention is ~22% of this tiny model's FLOPs at 512 tokens (the policy uses the model's own
    # share), so 0.7 needs both sparse attention and merging
    steps, budget = 3, 0.7
    result = run_workflow(policy_graph(wan4, conds, latent, budget=budget, steps=steps, report=True),
                          outputs=("sample", "merge", "report"))
    assert torch.isfinite(sampled(result)).all()
    run = last_run(result, "merge")
    pr = run.policy
    assert pr is not None and pr.config.mode == "entropy"
    # step 0 is dense; its coarse entropy is measured for every block so that step 1 is decided from it
    assert {b for (s, b) in run.entropy if s == 0} == set(range(LAYERS))
    assert pr.refreshed_at == [1, 2]  # refresh 1: every controlled step, once (not per call)
    for step in (1, 2):
        alloc = pr.decisions[step]
        assert not alloc.provisional
        assert alloc.work == pytest.approx(budget, abs=0.03)  # whole cubes and merge levels round a little
        assert (alloc.keep >= 0.05 - 1e-9).all() and (alloc.merge <= 0.5 + 1e-9).all()  # the nodes' caps
        assert alloc.merge[0] == alloc.merge[-1] == 0.0  # default merge blocks: not the first and the last
        for b in range(LAYERS):
            recorded = run.keep[(step, b)]
            want = alloc.keep[b]
            got = recorded.numpy() if isinstance(recorded, torch.Tensor) else np.full(HEADS, recorded)
            np.testing.assert_allclose(got, want)
            if alloc.merge[b] > 0:
                assert run.merged[(step, b)] == pytest.approx(1 - alloc.merge[b], abs=0.05)
    # the state lived in the run: the patch's current run is fresh again
    patch = result.output("merge").model_options["transformer_options"]["usv_patch"]
    assert patch.run.policy is None

    # USV Report: a heatmap IMAGE and a summary with this run's numbers
    image = result.output("report", 0)
    text = result.output("report", 1)
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    from usv_core import telemetry

    ran = {(s, b) for (s, b, _p) in run.calls if b >= 0}
    t = telemetry.tables(run.steps, LAYERS, ran, run.entropy, run.keep, run.merged)
    assert f"attended share: {np.nanmean(t['keep']):.1%}" in text
    assert f"{np.nanmean(t['tokens']):.1%} of tokens kept" in text
    assert "policy: entropy, budget 0.70" in text and "steps 1, 2" in text
    assert pr.config.attention_share == pytest.approx(0.22, abs=0.01)
    assert result.outputs["report"]["text"] == [text] or result.outputs["report"]["text"] == (text,)


def test_static_mode_is_uniform(run_workflow, wan4, conds, latent):
    result = run_workflow(policy_graph(wan4, conds, latent, mode="static", budget=0.7, refresh=2),
                          outputs=("sample", "merge"))
    run = last_run(result, "merge")
    assert not any(s == 0 for (s, b) in run.entropy)  # static never measures dense steps
    keeps = {run.keep[k] for k in run.keep}
    assert len(keeps) == 1 and isinstance(next(iter(keeps)), float)  # one float keep everywhere
    merges = {round(v, 6) for v in run.merged.values()}
    assert len(merges) == 1
    assert run.policy.refreshed_at == [1]  # refresh 2 over controlled steps 1, 2


def test_accelerate_speed_one_equals_the_unpatched_model(run_workflow, wan4, conds, latent):
    dense = sampled(run_workflow(ksampler(base(wan4, conds, latent), ["unet", 0], steps=2, cfg=1.0)))
    g = base(wan4, conds, latent)
    g["acc"] = {"class_type": "USVAccelerate", "inputs": {"model": ["unet", 0], "speed": 1}}
    same = sampled(run_workflow(ksampler(g, ["acc", 0], steps=2, cfg=1.0)))
    assert torch.equal(dense, same)


def test_accelerate_with_the_dmd_sampler_and_report(run_workflow, wan4, conds, latent):
    g = dmd_graph(wan4, conds, latent, preset="lightx2v-4step")
    g["report"] = {"class_type": "USVReport", "inputs": {"model": ["acc", 0], "latent": ["sample", 0]}}
    result = run_workflow(g, outputs=("sample", "acc", "report"))
    assert torch.isfinite(sampled(result)).all()
    run = last_run(result, "acc")
    assert run.steps == 4
    # a 4-step schedule runs no dense step: step 0 decides before any entropy is seen, step 1 again
    # once it is, then every second step
    assert run.policy.refreshed_at == [0, 1, 3]
    paths = run.paths()
    assert paths["sparse"] > 0 and paths["merged"] > 0
    # budget 0.25 is beyond this 4-block model's reach (first and last blocks never merge, attention
    # is ~22% of its FLOPs): the policy saturates at the least work its caps allow, and says so
    from usv_core.policy import MIN_BUDGET, allocate

    floor = allocate(None, MIN_BUDGET, run.policy._limits, attention_share=run.policy.config.attention_share).work
    assert all(run.policy.decisions[s].work == pytest.approx(floor, abs=0.02) for s in (1, 2, 3))
    text = result.output("report", 1)
    assert "USV run: 4 steps x 4 blocks" in text and "policy: entropy, budget 0.25" in text
    assert "the caps (keep floor, merge cap, blocks) stop it there" in text
    # the stated speedup is the measured time per unit of work at this model's reachable work
    from harness import runtime

    acc = runtime.pack_module("nodes.accelerate")
    stated = result.outputs["acc"]["text"][0]
    assert f"(cost model: {acc.work(4, 4, 2):.0%} reachable)" in stated
    assert f"about {acc.estimate(4, 4, 2):.1f}x faster" in stated and acc.estimate(4, 4, 2) < 1 / acc.work(4, 4, 2)


def test_bad_settings_are_clear_errors(comfy_nodes):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVPolicy"]
    with pytest.raises(ValueError, match=r"budget must be a number in \[0.02, 1\]"):
        node.execute(0.01, 1.0, 2, "entropy", 0.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        node.execute(0.5, 1.0, 2, "greedy", 0.0)
    with pytest.raises(ValueError, match="refresh must be a whole number"):
        node.execute(0.5, 1.0, 0, "entropy", 0.0)
    acc = comfy_nodes.NODE_CLASS_MAPPINGS["USVAccelerate"]
    with pytest.raises(ValueError, match="speed must be a whole number from 1"):
        acc.execute(None, 11)


@pytest.mark.server
def test_frontend_shows_node_text_without_saving_it(comfy_server):
    """web/usv_report.js: the text USV Report / USV Accelerate send to the UI appears on the node,
    and is not stored in the workflow's widget values."""
    import test_frontend

    if test_frontend.CHROMIUM is None:
        pytest.skip("needs Debian's chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=test_frontend.CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(comfy_server.url, wait_until="networkidle", timeout=120_000)
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        out = page.evaluate("""() => {
            const res = {};
            for (const type of ["USVReport", "USVAccelerate"]) {
                const node = LiteGraph.createNode(type);
                window.app.graph.add(node);
                node.onExecuted({text: ["attended share: 12.5%"]});
                const w = node.widgets.find(w => w.name === "usv_text");
                res[type] = {value: w && w.value, saved: node.serialize().widgets_values || []};
            }
            return res;
        }""")
        browser.close()
    assert out["USVReport"]["value"] == "attended share: 12.5%"
    assert out["USVAccelerate"]["value"] == "attended share: 12.5%"
    assert "attended share: 12.5%" not in out["USVReport"]["saved"]
    assert out["USVAccelerate"]["saved"][0] == 3 and "attended share: 12.5%" not in out["USVAccelerate"]["saved"]
    assert errors == []
