"""USV Model Info through the real ComfyUI: in process and through the server."""

import shutil

import pytest

from harness import runtime, tiny_models


def info_prompt(unet_name):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "2": {"class_type": "USVModelInfo", "inputs": {"model": ["1", 0]}},
    }


def test_describes_tiny_wan_in_process(run_workflow, tiny_wan):
    result = run_workflow(info_prompt(tiny_wan))
    text = result.output("2")
    assert "Wan 2.1 (t2v)" in text
    assert "patch size: 1x2x2" in text
    assert "layers: 2" in text
    assert "heads: 2, head dim: 128" in text
    assert "USV can patch it" in text
    assert result.outputs["2"]["text"] == [text]


def test_describes_deeper_wan_with_its_own_numbers(run_workflow, comfy):
    name = tiny_models.tiny_wan_t2v(1, dim=384, layers=3)
    text = run_workflow(info_prompt(name)).output("2")
    assert "layers: 3" in text and "heads: 3, head dim: 128" in text


def test_sd15_unet_is_reported_not_raised(comfy_nodes):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVModelInfo"]
    text = node.execute(tiny_models.tiny_sd15()).result[0]
    assert "architecture: unknown" in text
    assert "USV cannot patch it" in text
    assert "UNetModel" in text and "Wan 2.1" in text  # names what it got and what is supported


@pytest.mark.server
def test_server_lists_and_runs_model_info(comfy_server, tiny_wan):
    info = comfy_server.object_info()
    assert "USVModelInfo" in info
    node = info["USVModelInfo"]
    assert node["display_name"] == "USV Model Info"
    assert node["output"] == ["STRING"]
    assert "model" in node["input"]["required"]

    shutil.copy(runtime.model_path("diffusion_models", tiny_wan), comfy_server.models_dir("diffusion_models"))
    entry = comfy_server.wait(comfy_server.queue(info_prompt(tiny_wan)))
    text = entry["outputs"]["2"]["text"][0]
    assert "Wan 2.1 (t2v)" in text and "USV can patch it" in text
