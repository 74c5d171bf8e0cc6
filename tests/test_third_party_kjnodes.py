"""USV beside the real ComfyUI-KJNodes pack, each of its nodes placed before and after USV in the
graph: its attention overrides, WanVideoTeaCacheKJ (with ComfyUI's EasyCache, which it points users
to, for steps that really are skipped) and TorchCompileModelWanVideoV2 with inductor on the CPU."""

import importlib
import logging
import re
import sys
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from harness import runtime, third_party
from test_sparse_attention_node import LAYERS, graph, sampled

PACK = "ComfyUI-KJNodes"
ORDERS = ("kj_before_usv", "kj_after_usv")


@pytest.fixture(scope="module")
def kj(comfy):
    third_party.load_or_skip(PACK)
    return importlib.import_module(third_party.module(PACK).__name__ + ".nodes.model_optimization_nodes")


def stacked(unet, conds, kj_node, order, usv, steps=3, **kw):
    """UNETLoader -> KJ node -> USV Sparse Attention -> sampler, or with KJ's node after USV. The
    model the sampler uses is node 'last'."""
    g = graph(unet, conds, usv=usv, steps=steps, **kw)
    inputs = dict(kj_node["inputs"])
    if order == "kj_before_usv":
        g["kj"] = {"class_type": kj_node["class_type"], "inputs": {**inputs, "model": ["unet", 0]}}
        g["usv"]["inputs"]["model"] = ["kj", 0]
        last = "usv"
    else:
        g["kj"] = {"class_type": kj_node["class_type"], "inputs": {**inputs, "model": ["usv", 0]}}
        last = "kj"
    for node in g.values():
        if node["class_type"] in ("KSampler", "CFGGuider", "BasicScheduler"):
            node["inputs"]["model"] = [last, 0]
    return g, last


def run_of(result, node):
    """The statistics of the finished run, from the model clone the sampler used."""
    patch = result.output(node).model_options["transformer_options"]["usv_patch"]
    assert patch.last_run is not None, "the run left no statistics"
    return patch.last_run


@contextmanager
def calls_by_code():
    """Counts Python calls by code object while sampling runs (ComfyUI's executor runs the prompt
    in this thread): observes the real pack without replacing any of it."""
    counts = Counter()

    def profile(frame, event, _arg):
        if event == "call":
            counts[frame.f_code] += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield counts
    finally:
        sys.setprofile(previous)


# attention overrides ------------------------------------------------------------------------------

def nabla():
    # torch_compile off: KJ compiles the override with max-autotune, which is for a GPU
    return {"class_type": "NABLA_AttentionKJ", "inputs": {
        "latent": ["latent", 0], "window_time": 11, "window_width": 3, "window_height": 3, "sparsity": 0.9,
        "torch_compile": False}}


def flash():
    return {"class_type": "PatchFlashAttentionKJ", "inputs": {"allow_compile": False}}


OVERRIDES = {"NABLA_AttentionKJ": nabla, "PatchFlashAttentionKJ": flash}


def require_override(name):
    if name == "PatchFlashAttentionKJ":
        try:
            importlib.import_module("flash_attn")
        except ImportError:
            try:
                importlib.import_module("flash_attn_interface")
            except ImportError:
                pytest.skip("PatchFlashAttentionKJ needs flash_attn (FA2) or flash_attn_interface (FA3), CUDA-only "
                            "packages that this runtime does not have")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("override", sorted(OVERRIDES))
def test_usv_serves_grid_self_attention_and_the_rest_reaches_kjs_override(
        run_workflow, kj, tiny_wan, conds, override, order):
    require_override(override)
    steps, dense_steps = 3, 1
    usv = {"keep": 0.25, "dense_steps": dense_steps}
    alone = sampled(run_workflow(graph(tiny_wan, conds, usv=usv, steps=steps)))
    g, last = stacked(tiny_wan, conds, OVERRIDES[override](), order, usv, steps=steps)
    with calls_by_code() as counts:
        result = run_workflow(g, outputs=("sample", "kj", last))
    installed = result.output("kj").model_options["transformer_options"]["optimized_attention_override"]
    # after USV too, KJ's node puts its own override on the clone; USV's per-call wrapper chains it
    assert installed.__module__ == kj.__name__, installed
    kj_calls = counts[installed.__code__]

    paths = run_of(result, last).paths()
    handed_on = sum(n for path, n in paths.items() if path != "sparse")
    assert paths["sparse"] == (steps - dense_steps) * LAYERS, paths
    # KJ's override sees every call USV hands on (cross-attention, the dense first step) and no other
    assert paths["declined"] >= steps * LAYERS
    assert kj_calls == handed_on, (kj_calls, paths)
    if override == "NABLA_AttentionKJ":
        # below 3000 tokens NABLA runs ComfyUI's own attention, so the chain must change nothing
        assert torch.equal(sampled(result), alone)


# caches -------------------------------------------------------------------------------------------

def teacache_kj():
    return {"class_type": "WanVideoTeaCacheKJ", "inputs": {
        "rel_l1_thresh": 0.275, "start_percent": 0.1, "end_percent": 1.0, "cache_device": "main_device",
        "coefficients": "1.3B"}}


def easycache(verbose=True):
    return {"class_type": "EasyCache", "inputs": {
        "reuse_threshold": 2.0, "start_percent": 0.1, "end_percent": 0.95, "verbose": verbose}}


def report(g, model_node):
    g["report"] = {"class_type": "USVReport", "inputs": {"model": [model_node, 0], "latent": ["sample", 0]}}
    return g


@pytest.mark.parametrize("order", ORDERS)
def test_wan_teacache_kj_leaves_usv_steps_and_report_as_they_were(run_workflow, kj, tiny_wan, conds, order):
    steps = 6
    usv = {"keep": 0.25, "dense_steps": 1}
    alone = run_workflow(report(graph(tiny_wan, conds, usv=usv, steps=steps), "usv"),
                         outputs=("sample", "usv", "report"))
    g, last = stacked(tiny_wan, conds, teacache_kj(), order, usv, steps=steps)
    result = run_workflow(report(g, last), outputs=("sample", last, "report"))
    # At this commit the node is deprecated and hands the model back unpatched (KJ points users to
    # ComfyUI's EasyCache, tested below): stacking it must leave USV's run exactly as it was.
    assert torch.equal(sampled(result), sampled(alone))
    ran, before = run_of(result, last), run_of(alone, "usv")
    assert ran.steps == before.steps == steps
    assert ran.calls == before.calls
    # the heatmap holds entropy, keep and tokens of every block and step; the summary's counts
    # must match too (its wall-clock line differs from run to run)
    assert torch.equal(result.output("report", 0), alone.output("report", 0))
    counted = ("USV run:", "attended share:", "merged share:")
    lines = lambda text: [l for l in text.splitlines() if l.startswith(counted)]  # noqa: E731
    assert lines(result.output("report", 1)) == lines(alone.output("report", 1))
    assert len(lines(alone.output("report", 1))) == len(counted)


@pytest.mark.parametrize("order", ORDERS)
def test_skipped_cache_steps_keep_usv_step_count_and_report_right(run_workflow, kj, tiny_wan, conds, order, caplog):
    steps, dense_steps = 8, 1
    g, last = stacked(tiny_wan, conds, easycache(), order, {"keep": 0.25, "dense_steps": dense_steps}, steps=steps)
    with caplog.at_level(logging.INFO):
        result = run_workflow(report(g, last), outputs=("sample", last, "report"))
    said = [m for m in caplog.messages if "EasyCache - skipped" in m]
    assert said, "EasyCache did not report its skipped steps"
    skipped = int(re.search(r"skipped (\d+)/(\d+) steps", said[-1]).group(1))
    assert skipped >= 2, "the cache should skip steps on this model for the test to mean anything"

    run = run_of(result, last)
    ran_steps = sorted({s for (s, b, _p) in run.calls if b >= 0})
    assert run.steps == steps, "a skipped step must not shorten (or lengthen) USV's step count"
    assert len(ran_steps) == steps - skipped
    assert ran_steps[-1] < steps
    # the steps that ran are sparse after dense_steps, whatever the cache skipped in between
    for s in ran_steps:
        want = {"dense:step"} if s < dense_steps else {"sparse"}
        got = {p for (st, b, p) in run.calls if st == s and b >= 0} - {"declined"}
        assert got == want, (s, got)

    tables = runtime.pack_module("nodes.report").run_tables(run, LAYERS)
    not_measured = [s for s in range(steps) if all(tables["keep"][:, s] != tables["keep"][:, s])]
    assert sorted(set(range(steps)) - set(not_measured)) == ran_steps
    summary = result.output("report", 1)
    assert f"USV run: {steps} steps x {LAYERS} blocks" in summary


# torch.compile ------------------------------------------------------------------------------------

def compile_wan(backend="inductor"):
    return {"class_type": "TorchCompileModelWanVideoV2", "inputs": {
        "backend": backend, "fullgraph": False, "mode": "default", "dynamic": False,
        "compile_transformer_blocks_only": True, "dynamo_cache_size_limit": 64}}


def compiled_frames() -> Counter:
    """Frames dynamo compiled since the last reset, by (file, function, line)."""
    import torch._dynamo.utils as dynamo_utils

    return Counter((m.co_filename, m.co_name, m.co_firstlineno) for m in dynamo_utils.get_compilation_metrics())


def cold_compiled_run(run_workflow, g, steps, last):
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.set_compilation_metrics_limit(100000)
    dynamo_utils.clear_compilation_metrics()
    g["sample"]["inputs"]["steps"] = steps
    result = run_workflow(g, outputs=("sample", last))
    frames = compiled_frames()
    # ComfyUI's CPU attention (sub-quadratic) picks chunk sizes from the free RAM it reads on
    # every call, and dynamo guards on that number: it recompiles as memory moves, with or without
    # USV (a GPU runs PyTorch attention instead). Those frames say nothing about USV.
    return result, Counter({f: n for f, n in frames.items() if "attention_sub_quad" not in f[1]})


@pytest.mark.parametrize("order", ORDERS)
def test_torch_compile_matches_eager_and_does_not_recompile_every_step(run_workflow, kj, tiny_wan, conds, order):
    usv = {"keep": 0.25, "dense_steps": 1}
    eager = sampled(run_workflow(graph(tiny_wan, conds, usv=usv, steps=2)))
    g, last = stacked(tiny_wan, conds, compile_wan(), order, usv)

    short, frames_short = cold_compiled_run(run_workflow, g, 2, last)
    torch.testing.assert_close(sampled(short), eager, rtol=1e-4, atol=1e-4)
    assert run_of(short, last).paths()["sparse"] == LAYERS
    assert frames_short, "nothing was compiled"

    # step 0 is dense and step 1 sparse: every path is compiled in two steps, so two more steps of
    # the same kinds must not compile anything again
    long, frames_long = cold_compiled_run(run_workflow, g, 4, last)
    assert run_of(long, last).paths()["sparse"] == 3 * LAYERS
    assert torch.isfinite(sampled(long)).all()
    grown = {f"{f[1]} ({f[0]}:{f[2]})": (frames_short[f], n) for f, n in frames_long.items() if n > frames_short[f]}
    assert not grown, (
        f"compiled again for each further step (compiles in a 2-step run, in a 4-step run): {grown}; "
        "TORCH_LOGS=recompiles names the guards that fail")
