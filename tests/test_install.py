"""Installing the pack never touches the user's torch: neither requirements.txt nor pyproject's
dependencies name torch or triton. On a CUDA machine without triton the pack says at load, once,
what runs instead."""

import logging
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = {"torch", "triton", "triton-windows", "torchvision", "torchaudio"}


def requirement_names(lines):
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[\s;<>=!~\[]", line, maxsplit=1)[0].lower())
    return names


def test_requirements_leave_torch_and_triton_to_comfyui():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        names = requirement_names(f)
    assert names and not names & FORBIDDEN, names


def test_pyproject_dependencies_leave_torch_and_triton_to_comfyui():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = requirement_names(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        names |= requirement_names(extra)
    assert names and not names & FORBIDDEN, names


def test_a_cuda_machine_without_triton_is_told_once_at_load(comfy, monkeypatch, caplog):
    import asyncio

    import torch

    from harness import runtime

    pack = runtime.pack_module("nodes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    with caplog.at_level(logging.WARNING, logger="usv"):
        nodes = asyncio.run(pack.USVExtension().get_node_list())
    notes = [r.getMessage() for r in caplog.records if "triton" in r.getMessage()]
    assert len(notes) == 1 and "sparse attention runs dense on the GPU" in notes[0] and "pip install triton" in notes[0]
    assert {n.__name__ for n in nodes} >= {"USVSparseAttention", "USVTokenMerge"}


def test_nothing_is_said_where_triton_is_not_needed(comfy, monkeypatch, caplog):
    import asyncio

    import torch

    from harness import runtime

    pack = runtime.pack_module("nodes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "triton", None)
    with caplog.at_level(logging.WARNING, logger="usv"):
        asyncio.run(pack.USVExtension().get_node_list())
    assert not [r for r in caplog.records if "triton" in r.getMessage()]
