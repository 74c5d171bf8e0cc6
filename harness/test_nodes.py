"""Nodes that exist only in the harness's in-process ComfyUI, never in the pack: they carry tensors
into API-format workflows, which hold only JSON."""

from __future__ import annotations

import os
import uuid

import torch
from safetensors.torch import load_file, save_file


def _input_dir() -> str:
    import folder_paths

    return folder_paths.get_input_directory()


def put_tensor(tensor: torch.Tensor) -> str:
    """Store a tensor in ComfyUI's input folder; returns the name the loaders below take."""
    name = f"usv-test-{uuid.uuid4().hex}.safetensors"
    save_file({"t": tensor.detach().cpu().contiguous()}, os.path.join(_input_dir(), name))
    return name


def _get_tensor(name: str) -> torch.Tensor:
    return load_file(os.path.join(_input_dir(), name))["t"]


class USVTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self, name):
        return ([[_get_tensor(name), {}]],)


class USVTestLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "load"
    CATEGORY = "_for_testing"

    def load(self, name):
        return ({"samples": _get_tensor(name)},)


class _AnyType(str):
    """ComfyUI's validation compares types with !=; this one matches every type."""

    def __ne__(self, other):
        return False


class USVTestSink:
    """An output node that takes anything, so that a workflow runs up to the node it consumes."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": (_AnyType("*"),)}}

    RETURN_TYPES = ()
    FUNCTION = "take"
    OUTPUT_NODE = True
    CATEGORY = "_for_testing"

    def take(self, value):
        return ()


def register(nodes_module) -> None:
    for cls in (USVTestConditioning, USVTestLatent, USVTestSink):
        nodes_module.NODE_CLASS_MAPPINGS.setdefault(cls.__name__, cls)
