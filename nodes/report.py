"""USV Report: what the last sampling run of a USV-patched model did, layer by layer and step by
step, as a heatmap and a summary. It reads the statistics the patch moved to `last_run` when
sampling ended; its LATENT input only makes it run after the sampler."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..usv_core import telemetry
from ..usv_core.policy import WAN_1_3B_480P_ATTENTION_SHARE, attention_share
from .policy import model_dims
from .usv_patch import RunStats, get_patch


def run_tables(run, layers: int) -> dict:
    """The finished run's (layers, steps) tables: entropy, keep, tokens kept."""
    ran = {(s, b) for (s, b, _path) in run.calls if b >= 0}
    return telemetry.tables(run.steps, layers, ran, run.entropy, run.keep, run.merged)


def run_attention_share(dm, grid) -> tuple[float, str]:
    """(attention's share of a block's FLOPs, what it was computed for): this model at the run's
    token grid when its widths are known, else Wan 1.3B at 480p."""
    dim, ffn = model_dims(dm) if dm is not None else (None, None)
    if grid is None or not dim or not ffn:
        return WAN_1_3B_480P_ATTENTION_SHARE, "Wan 1.3B at 480p"
    tokens = grid[0] * grid[1] * grid[2]
    return attention_share(dim, ffn, tokens), f"this model at {tokens} tokens"


def device_name(model) -> str:
    import torch

    device = getattr(model, "load_device", None)
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU" if device is None or device.type == "cpu" else device.type


def timing_line(run, device: str) -> str | None:
    """Measured seconds per step of the run, dense and sparse apart, and their ratio."""
    seconds = run.step_seconds()
    if not seconds:
        return None
    sparse = run.sparse_steps()
    groups = {"dense": [t for s, t in seconds.items() if s not in sparse],
              "sparse": [t for s, t in seconds.items() if s in sparse]}
    mean = {k: sum(v) / len(v) for k, v in groups.items() if v}
    parts = [f"{len(groups[k])} {k} step{'s' if len(groups[k]) != 1 else ''} at {mean[k]:.3g} s each" for k in mean]
    line = f"measured on {device}: {sum(seconds.values()):.3g} s of sampling; " + ", ".join(parts)
    if len(mean) == 2:
        line += f"; a sparse step took {mean['sparse'] / mean['dense']:.2f} of a dense step here"
    return line


def _combine(values: list):
    """One value for a (step, block) cell seen on several devices: entropies (B, heads) of
    different batch rows are concatenated, keep ratios and token shares averaged."""
    if len(values) == 1:
        return values[0]
    if all(isinstance(v, torch.Tensor) for v in values):
        if len({tuple(v.shape[1:]) for v in values}) == 1 and values[0].dim() == 2:
            return torch.cat([v.detach().float().cpu() for v in values], 0)
        return sum(float(v.detach().float().mean()) for v in values) / len(values)
    return sum(float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v) for v in values) / len(values)


def merged_run(patch) -> tuple[RunStats | None, list]:
    """(the last run of this clone and of its per-device clones as one, the devices that ran).

    Under ComfyUI's MultiGPU each device's clone runs part of every step (cond on one, uncond on
    another) and keeps its own statistics; merged, they read as one run on one device would."""
    runs = [(None, patch.last_run)] + [(device, p.last_run) for device, p in patch.devices.items()]
    runs = [(device, r) for device, r in runs if r is not None and (r.calls or r.steps)]
    if len(runs) <= 1:
        return (runs[0][1] if runs else None), [d for d, _ in runs]
    out = RunStats()
    for _, r in runs:
        out.calls.update(r.calls)
        out.steps = max(out.steps, r.steps)
        out.grid = out.grid or r.grid
        out.policy = out.policy or r.policy
        # the devices run each step side by side: it starts with the first and ends with the last
        for step, t in getattr(r, "started", {}).items():
            out.started[step] = min(t, out.started.get(step, t))
        if getattr(r, "ended", None) is not None:
            out.ended = max(r.ended, out.ended or r.ended)
    for name in ("entropy", "keep", "merged"):
        cells: dict = {}
        for _, r in runs:
            for key, value in getattr(r, name).items():
                cells.setdefault(key, []).append(value)
        setattr(out, name, {key: _combine(values) for key, values in cells.items()})
    return out, [d for d, _ in runs]


def report(model) -> tuple[object, str]:
    """(IMAGE, summary) of the model's last run (on all its devices, under MultiGPU)."""
    patch = get_patch(model)
    run, devices = merged_run(patch) if patch is not None else (None, [])
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    blocks = getattr(dm, "blocks", None) or getattr(dm, "transformer_blocks", None)
    layers = len(blocks) if blocks is not None else None
    if run is None or not run.steps or not layers:
        why = "this model has no USV patch" if patch is None else "no sampling run has finished with this model yet"
        return telemetry.heatmap([telemetry.tables(1, max(1, layers or 1), [], {}, {}, {})["keep"]]), f"USV report: {why}."
    t = run_tables(run, layers)
    share, where = run_attention_share(dm, run.grid)
    n = telemetry.summary_numbers(t, share)
    grid = "x".join(str(g) for g in run.grid) if run.grid else "?"
    lines = [
        f"USV run: {run.steps} steps x {layers} blocks, token grid {grid}",
        f"attended share: {n['attended']:.1%} (mean keep of key cubes; dense calls count 1)",
        f"merged share: {n['tokens']:.1%} of tokens kept ({1 - n['tokens']:.1%} merged away)",
        (f"estimated work: {n['work']:.1%} of dense DiT work, an estimated speedup of {n['speedup']:.2f}x by FLOPs "
         f"(attention {share:.0%} of a block's FLOPs for {where}); wall-clock gains are smaller (on an H200, "
         f"Wan 1.3B steps at 1/3 of the work took 0.64 of the time)"),
    ]
    timing = timing_line(run, device_name(model))
    if timing:
        lines.append(timing)
    split = sorted({p.split(":")[1] for p in run.paths() if p.startswith("sequence-parallel:")})
    if split:
        lines.append(f"sequence parallel: {', '.join(split)} ranks, every block on its share of the tokens "
                     f"(statistics of this rank's heads)")
    if len(devices) > 1:
        names = ", ".join(str(getattr(model, "load_device", "?") if d is None else d) for d in devices)
        lines.append(f"devices: {len(devices)} (MultiGPU; statistics of {names} merged)")
    if n["entropy"] == n["entropy"]:
        lines.append(f"mean coarse entropy: {n['entropy']:.3f}")
    pr = run.policy
    if pr is not None:
        c = pr.config
        lines.append(f"policy: {c.mode}, budget {c.budget:.2f}, gamma {c.gamma:g}, refresh {c.refresh}, "
                     f"{len(pr.refreshed_at)} decisions (steps {', '.join(map(str, pr.refreshed_at))}), "
                     f"{pr.seconds * 1e3:.1f} ms")
        if pr.decisions:
            reached = sum(a.work for a in pr.decisions.values()) / len(pr.decisions)
            target = sum(a.target for a in pr.decisions.values()) / len(pr.decisions)
            note = "" if reached <= target + 0.02 else "; the caps (keep floor, merge cap, blocks) stop it there"
            lines.append(f"policy reached {reached:.1%} of dense work per controlled step (target {target:.1%}, "
                         f"attention {c.attention_share:.0%} of FLOPs){note}")
    lines.append("heatmap: layers (rows, top = first) by steps (columns); panels: entropy | keep | tokens kept; "
                 "dark = low, bright = high, grey = not measured")
    image = telemetry.heatmap([t["entropy"], t["keep"], t["tokens"]])
    return image, "\n".join(lines)


class USVReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USVReport",
            display_name="USV Report",
            category="USV",
            description="What USV did in the last sampling run of this model: entropy, keep and kept tokens of every "
                        "block at every step as a heatmap (layers x steps), and a summary with the attended share, "
                        "merged share and estimated speedup. Connect the model the sampler used and its output latent.",
            inputs=[
                io.Model.Input("model", tooltip="The USV-patched model the sampler used."),
                io.Latent.Input("latent", tooltip="The sampler's output: only makes this node run after sampling."),
            ],
            outputs=[io.Image.Output(display_name="heatmap"), io.String.Output(display_name="summary")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latent) -> io.NodeOutput:
        image, text = report(model)
        return io.NodeOutput(image, text, ui={"text": (text,)})
