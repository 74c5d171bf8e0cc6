"""The training state (student, fake-score network, both optimizers, counters) as one safetensors
file, gathered to full tensors so that a run resumes on any number of processes. Written by rank
0 under a temporary name and renamed: a run killed at any moment leaves the previous state whole
and loses at most the steps since it."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .dist import Dist

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FULL = StateDictOptions(full_state_dict=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors on the CPU (on rank 0; other ranks of a sharded model get an empty dict).
    Every process must call it: gathering is collective."""
    return get_model_state_dict(model, options=_GATHER)


def save(path: str, d: Dist, models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer],
         info: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    groups = {}
    for name, model in models.items():
        for k, v in full_model_state(model).items():
            tensors[f"module.{name}.{k}"] = v.detach().to("cpu").contiguous()
        if name in optimizers:
            osd = get_optimizer_state_dict(model, optimizers[name], options=_GATHER)
            for fqn, state in osd.get("state", {}).items():
                for k, v in state.items():
                    v = v if torch.is_tensor(v) else torch.tensor(v)
                    tensors[f"opt.{name}.{fqn}.{k}"] = v.detach().to("cpu").contiguous()
            groups[name] = osd.get("param_groups", [])
    if d.main:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata={"info": json.dumps(info), "param_groups": json.dumps(groups)})
        os.replace(tmp, path)
    d.barrier()


def read_info(path: str) -> dict:
    with safe_open(path, framework="pt") as f:
        return json.loads((f.metadata() or {}).get("info", "{}"))


def load(path: str, models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Every process reads the file and keeps its own shards."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    groups = json.loads(meta.get("param_groups", "{}"))
    for name, model in models.items():
        prefix = f"module.{name}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        expected = set(model.state_dict())
        if set(sd) != expected:
            raise ValueError(f"{path}: the {name} weights do not fit this model (another teacher or size?); "
                             "resume with the command that wrote it or give a fresh --out")
        set_model_state_dict(model, sd, options=_FULL)
        if name in optimizers:
            prefix = f"opt.{name}."
            state: dict[str, dict] = {}
            for key, v in tensors.items():
                if key.startswith(prefix):
                    fqn, k = key[len(prefix):].rsplit(".", 1)
                    state.setdefault(fqn, {})[k] = v
            set_optimizer_state_dict(model, optimizers[name], {"state": state, "param_groups": groups[name]}, options=_FULL)
    return json.loads(meta.get("info", "{}"))
