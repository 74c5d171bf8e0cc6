"""What every Triton kernel launch of the pack needs on GPUs this machine does not have.

The attention and VAE wrappers run on CPU tensors with their launches intercepted: each launch is
bound by Triton's own binder (the signature, constexprs and alignment it would specialise on),
compiled for each target architecture with the ptxas that ships in the triton wheel, and not run.
For each compiled kernel: registers per thread, spill stack, and the shared memory it asks for
against the card's limit (a kernel over that limit fails at launch on that card). No GPU and no
CUDA driver are needed, so the consumer cards (RTX 30 / 40 / 50) get the same check as the H200.

    python3 bench/kernel_resources.py                      # every shape and target, a table
    python3 bench/kernel_resources.py --json bench/results/kernel_resources.json
    python3 bench/kernel_resources.py --shapes wan-480p --config '{"bwd": {"num_warps": 8, "num_stages": 2}}'

Registers and spills say nothing about speed on their own; bench/attention.py times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# compute capability -> (cards, largest shared memory one block may opt in to, bytes)
TARGETS = {
    80: ("A100", 166912),
    86: ("RTX 3090, A6000", 101376),
    89: ("RTX 4090, L40S, 16 GB Ada cards", 101376),
    90: ("H100, H200", 232448),
    120: ("RTX 5090", 101376),
}
# token grid and head dim of the videos the kernels serve; the head count changes no compiled
# kernel, so two heads keep the CPU tensors small. The largest grid takes selection to its widest
# row (4096 blocks), and LTX-Video brings head dim 64.
SHAPES = {
    "wan-480p": ((21, 30, 52), 128),
    "hunyuan-720p": ((33, 45, 80), 128),
    "ltx-768x512": ((16, 24, 32), 64),
}
HEADS = 2


@contextlib.contextmanager
def intercepted_launches():
    """Within: JITFunction launches are recorded as (kernel, args, kwargs) and not run."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 makes the kernels interpreted functions, which would run here: "
                           "unset it to compile them for GPUs")
    from triton.runtime.jit import JITFunction

    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))
        return None

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


@contextlib.contextmanager
def kernels_on_cpu_tensors():
    """The wrappers take CPU tensors down their Triton path (which they give only to CUDA tensors
    or the interpreter); with intercepted launches nothing runs, so the outputs are never read."""
    from usv_core.attention import api
    from usv_core.vae import norm

    saved = api._resolve_backend, norm._triton_ok
    api._resolve_backend = lambda backend, q, block: "triton"
    norm._triton_ok = lambda x: True
    try:
        yield
    finally:
        api._resolve_backend, norm._triton_ok = saved


def attention_launches(grid, head_dim: int = 128, keep: float = 0.125, heads: int = HEADS):
    """The launches of one USV Sparse Attention call in each mode a run takes: sampling with each
    key-tile source, with the coarse gate and the policy's statistics, and training (forward and
    backward)."""
    import torch

    from usv_core.attention import ops, vsa_attention

    n = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, heads, n, head_dim, dtype=torch.bfloat16) for _ in range(3))
    saved = ops._FWD_KV, ops._SCORE_PRECISION
    ops._SCORE_PRECISION = "tf32x3"  # what every target here (compute capability 8+) gets
    with intercepted_launches() as launches, kernels_on_cpu_tensors():
        try:
            for kv in ("table", "rows", "tma"):
                ops.set_kernel_config(kv=kv)
                with torch.no_grad():
                    vsa_attention(q, k, v, grid, keep)
            ops.set_kernel_config(kv="table")
            with torch.no_grad():
                vsa_attention(q, k, v, grid, keep, gate=torch.full((1, heads, 1, 1), 0.5), return_stats=True)
            qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
            vsa_attention(qg, kg, vg, grid, keep, pack_edges=False).float().sum().backward()
        finally:
            ops.set_kernel_config(kv=saved[0])
            ops._SCORE_PRECISION = saved[1]
    return launches


def vae_launches(channels=(96, 192, 384)):
    """The Wan VAE decoder's fused bias + RMS norm + SiLU at its channel widths."""
    import torch

    from usv_core.vae.norm import rms_norm

    with intercepted_launches() as launches, kernels_on_cpu_tensors():
        for c in channels:
            x = torch.empty(4096, c, dtype=torch.bfloat16)
            rms_norm(x, torch.ones(c), torch.zeros(c, dtype=torch.bfloat16), silu=True, backend="triton")
    return launches


def unique(launches, cc: int):
    """Launches bound for target cc, one per distinct (kernel, signature, constexprs, attrs, options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    seen = {}
    for fn, args, kwargs in launches:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        if cc < 90 and any("tensordesc" in str(t) for t in signature.values()):
            continue  # the wrappers give tensor descriptors (TMA) to Hopper and newer only
        key = (fn.__name__, str(signature), str(sorted(constexprs.items())), str(attrs), str(options))
        seen.setdefault(key, (fn, signature, constexprs, attrs, options, target))
    return list(seen.values())


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return {"registers": int(m.group(1)), "spill_stack_bytes": int(m.group(2))}


def compile_one(fn, signature, constexprs, attrs, options, target) -> dict:
    from triton.compiler import ASTSource, compile

    kernel = compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    limit = TARGETS[target.arch][1]
    named = {fn.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    return {"kernel": fn.__name__, "constexprs": {k: v for k, v in named.items() if v is not None},
            "num_warps": options.num_warps, "num_stages": options.num_stages,
            "shared_bytes": int(kernel.metadata.shared), "shared_limit": limit,
            "fits": int(kernel.metadata.shared) <= limit, **resources(kernel.asm["cubin"])}


def report(launches, archs) -> list[dict]:
    rows = []
    for cc in archs:
        for item in unique(launches, cc):
            rows.append({"cc": cc, "cards": TARGETS[cc][0], **compile_one(*item)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--cc", default=",".join(str(c) for c in TARGETS), help="compute capabilities to compile for")
    p.add_argument("--config", default="", help="launch configs as JSON for ops.set_kernel_config, as in "
                   "bench/attention.py, e.g. '{\"bwd\": {\"num_warps\": 8, \"num_stages\": 2}}'")
    p.add_argument("--json", default="")
    a = p.parse_args()
    if a.config:
        from usv_core.attention import ops

        ops.set_kernel_config(**json.loads(a.config))
    archs = [int(c) for c in a.cc.split(",")]
    unknown = [c for c in archs if c not in TARGETS]
    if unknown:
        raise SystemExit(f"--cc: {unknown} unknown; choose from {', '.join(map(str, TARGETS))}")
    shapes = [x for x in a.shapes.split(",") if x]
    if any(x not in SHAPES for x in shapes):
        raise SystemExit(f"--shapes: choose from {', '.join(SHAPES)}")
    launches = [launch for x in shapes for launch in attention_launches(*SHAPES[x])]
    rows = report(launches + vae_launches(), archs)
    print(f"{'cc':>4} {'kernel':18} {'warps':>5} {'stages':>6} {'regs':>4} {'spill B':>7} {'shared KB':>9}  constexprs")
    for r in rows:
        const = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items() if k not in ("DOT_F32",))
        flag = "" if r["fits"] else f"  OVER the {r['shared_limit'] // 1024} KB limit"
        print(f"{r['cc']:>4} {r['kernel']:18} {r['num_warps']:>5} {r['num_stages']:>6} {r['registers']:>4} "
              f"{r['spill_stack_bytes']:>7} {r['shared_bytes'] / 1024:>9.1f}  {const}{flag}")
    if a.json:
        import triton

        with open(a.json, "w") as f:
            json.dump({"shapes": {x: SHAPES[x] for x in shapes}, "triton": triton.__version__, "rows": rows}, f, indent=1)
        print(f"wrote {a.json}")
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
