"""Shared pytest setup. Kernel logic runs on the CPU through Triton's interpreter when no GPU
exists; the environment variable must be set before anything imports triton."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    """Which ComfyUI release this run tests: the runtime's venv picks it (scripts/setup_runtime.sh)."""
    from harness import runtime

    try:
        return f"ComfyUI {'.'.join(map(str, runtime.comfyui_version()))} at {runtime.comfyui_dir()}"
    except (RuntimeError, OSError) as e:
        return f"ComfyUI: not found ({e})"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with: scripts/test.sh -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ComfyUI harness. Booting ComfyUI costs seconds, so it happens once per session and only for
# tests that ask for it.

@pytest.fixture(scope="session")
def comfy():
    """The real ComfyUI, booted in this process with the pack loaded; returns its `nodes` module."""
    from harness import runtime

    return runtime.boot()


@pytest.fixture(scope="session")
def comfy_nodes(comfy):
    """The same as `comfy`, for tests that also import comfy's modules by name."""
    return comfy


@pytest.fixture(scope="session")
def tiny_wan(comfy):
    """File name of a tiny random Wan 2.1 T2V in ComfyUI's diffusion_models folder."""
    from harness import tiny_models

    return tiny_models.tiny_wan_t2v(0)


@pytest.fixture(scope="session")
def tiny_vae(comfy):
    """File name of a tiny random Wan 2.1 VAE in ComfyUI's vae folder."""
    from harness import tiny_models

    return tiny_models.tiny_wan_vae(0)


@pytest.fixture(scope="session")
def wan4(comfy):
    """File name of a tiny random Wan 2.1 T2V with 4 blocks: token merging's default blocks (all but
    the first and the last) are then not empty."""
    from harness import tiny_models

    return tiny_models.tiny_wan_t2v(3, layers=4)


@pytest.fixture(scope="session")
def conds(comfy):
    """Positive and negative conditioning tensors, stored for USVTestConditioning."""
    from harness import test_nodes, tiny_models

    return (test_nodes.put_tensor(tiny_models.text_conditioning(1)),
            test_nodes.put_tensor(tiny_models.text_conditioning(2)))


@pytest.fixture(scope="session")
def run_workflow(comfy):
    """Validate and execute an API-format prompt through ComfyUI's executor."""
    from harness import runtime

    return runtime.run_workflow


@pytest.fixture(scope="session")
def comfy_server():
    """A real ComfyUI server on a loopback port with the pack in custom_nodes; stopped afterwards."""
    from harness.server import ComfyServer

    server = ComfyServer().start()
    yield server
    server.stop()
