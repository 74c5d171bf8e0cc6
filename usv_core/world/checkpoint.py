"""Training state as one safetensors file, so that a run cut short by a time limit can resume:
modules and optimizers by name, plus a small JSON of counters (step, seconds spent). Written to a
temporary name first and renamed, so a run killed while saving leaves the previous state intact."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def save_state(path: str, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer], info: dict,
               dtype: torch.dtype | None = None) -> None:
    """dtype: store floating tensors in this type (a smaller file that still resumes; the moments
    lose precision), or None for their own."""
    tensors: dict[str, torch.Tensor] = {}

    def put(key, t):
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.to("cpu").contiguous()

    for name, m in modules.items():
        for k, v in m.state_dict().items():
            put(f"module.{name}.{k}", v)
    groups = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        for idx, st in sd["state"].items():
            for k, v in st.items():
                put(f"opt.{name}.{idx}.{k}", v if torch.is_tensor(v) else torch.tensor(v))
        groups[name] = sd["param_groups"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"info": json.dumps(info), "param_groups": json.dumps(groups)})
    os.replace(tmp, path)


def load_state(path: str, modules: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    """Loads what save_state wrote into the given modules and optimizers (which must have the same
    shapes); returns the info dict."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, m in modules.items():
        prefix = f"module.{name}."
        own = m.state_dict()
        missing = [k for k in own if prefix + k not in tensors]
        if missing:
            raise ValueError(f"checkpoint {path} has no {name} weights {missing[:3]}: it was written by another configuration; "
                             "start with a fresh --ckpt folder or the same sizes as before")
        m.load_state_dict({k: tensors[prefix + k].to(own[k].dtype) for k in own})
    groups = json.loads(meta.get("param_groups", "{}"))
    for name, opt in optimizers.items():
        prefix = f"opt.{name}."
        state: dict[int, dict] = {}
        for key, v in tensors.items():
            if key.startswith(prefix):
                idx, k = key[len(prefix):].split(".", 1)
                state.setdefault(int(idx), {})[k] = v.float() if k != "step" else v
        if name in groups:
            opt.load_state_dict({"state": state, "param_groups": groups[name]})
    return json.loads(meta.get("info", "{}"))
