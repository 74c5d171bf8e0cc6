"""The real ComfyUI frontend, headless in Chromium: the USV nodes are registered, and every shipped
workflow loads with its widgets where the nodes expect them."""

import glob
import json
import os
import re
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
USV_NODES = {"USVModelInfo", "USVSparseAttention", "USVTokenMerge", "USVDMDSigmas", "USVDMDSampler",
             "USVWorldPrompt", "USVPolicy", "USVAccelerate", "USVReport"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [pytest.mark.server, pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")]


@pytest.fixture(scope="module")
def page(comfy_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(comfy_server.url, wait_until="networkidle", timeout=120_000)
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
        yield page
        browser.close()


def test_the_page_runs_the_frontend_this_release_requires(page):
    from harness.runtime import comfyui_dir

    with open(os.path.join(comfyui_dir(), "requirements.txt")) as f:
        pinned = re.search(r"^comfyui-frontend-package==(\S+)", f.read(), re.M)
    served = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
    assert pinned is not None, "the release's requirements.txt pins no frontend package"
    assert served == pinned.group(1)


def test_usv_nodes_are_in_the_node_library(page):
    registered = set(page.evaluate("() => Object.keys(LiteGraph.registered_node_types)"))
    assert USV_NODES <= registered
    assert page.errors == []


def test_workflows_are_offered_as_templates_of_the_pack(comfy_server):
    templates = comfy_server.get("/api/workflow_templates")
    offered = next(v for k, v in templates.items() if "usv" in k.lower())
    assert {os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS} <= set(offered)


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_loads_with_widgets_in_place(page, path):
    with open(path) as f:
        wf = json.load(f)
    loaded = page.evaluate("""async (wf) => {
        await window.app.loadGraphData(wf);
        return window.app.graph.nodes.map(n => ({
            id: n.id, type: n.type,
            widgets: (n.widgets || []).map(w => [w.name, w.value])}));
    }""", wf)
    assert sorted(n["id"] for n in loaded) == sorted(n["id"] for n in wf["nodes"])
    by_id = {n["id"]: n for n in loaded}
    for node in wf["nodes"]:
        if not node["type"].startswith("USV"):
            continue
        values = [v for _, v in by_id[node["id"]]["widgets"]]
        # the frontend put every stored value into a widget of the node, in order
        assert values[: len(node["widgets_values"])] == node["widgets_values"], node["type"]
    assert page.errors == []
