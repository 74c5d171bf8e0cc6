"""Does moving kept key blocks between query blocks or heads, by what the coarse attention shows,
lower the error of the fine stage at equal cost? Measured on the USV World teacher's own
self-attention inputs, on the CPU.

For a few held-out prompts the teacher samples as the GPU protocol does (Euler, CFG 5, here 20
steps at 17 frames), and every self-attention call of steps 2, 6, 10, 14 and 18 is kept (the
conditional half). On those q, k, v (cube tiling, 32 blocks), each rule below keeps the same
total number of key blocks as top-k at the given keep, and the error is the relative L2 of the
block-sparse output against dense attention (no coarse branch), averaged over calls:

- top-k: the same count for every query block (what USV Sparse Attention does, and the static policy);
- top-p: each query block keeps the fewest blocks covering a share p of its coarse attention mass,
  one p for all calls, solved so that the total matches;
- perplexity^alpha: counts proportional to the coarse attention's perplexity (exp of its entropy)
  to the power alpha, per query block or per head; alpha > 0 gives spread attention more blocks
  (the entropy policy's direction), alpha < 0 gives concentrated attention more.

    .venv/bin/python bench/allocation_probe.py [--prompts 4] [--keeps 0.1 0.2 0.35]

Writes bench/results/allocation_probe_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from usv_core.attention.reference import block_sparse_reference, coarse_scores  # noqa: E402
from usv_core.tiling import cube_tiling  # noqa: E402
from usv_core.world import evaluate as ev  # noqa: E402
from usv_core.world import weights  # noqa: E402
from usv_core.world.dit import SelfAttention, apply_rope  # noqa: E402
from usv_core.world.sampling import sample  # noqa: E402

STEPS, KEPT_STEPS, FRAMES, SIZE = 20, (2, 6, 10, 14, 18), 17, 256


def capture(prompts):
    """(q, k, v) of every self-attention call of the kept steps, conditional half, in float32."""
    dit, text = weights.load_dit(), weights.load_text()
    layers = [m for m in dit.modules() if type(m) is SelfAttention]
    calls, out = [0], []

    def hook(mod, inp, _):
        step = calls[0] // len(layers)
        calls[0] += 1
        if step % STEPS not in KEPT_STEPS:
            return
        x, rope = inp
        b, n, _ = x.shape
        q = apply_rope(mod.norm_q(mod.q(x)).view(b, n, mod.heads, -1), *rope)
        k = apply_rope(mod.norm_k(mod.k(x)).view(b, n, mod.heads, -1), *rope)
        v = mod.v(x).view(b, n, mod.heads, -1)
        out.append(tuple(t[:1].transpose(1, 2).float().clone() for t in (q, k, v)))

    for m in layers:
        m.register_forward_hook(hook)
    g = torch.Generator().manual_seed(0)
    lt, lh = (FRAMES - 1) // 4 + 1, SIZE // 8
    with torch.no_grad():
        for p in prompts:
            noise = torch.randn(1, 16, lt, lh, lh, generator=g)
            sample(dit, text.encode([p], warn=False), text.encode([""]), noise, steps=STEPS, cfg=5.0)
    return out, (lt, lh // 2, lh // 2)


def attend(q, k, v, scores, counts, layout):
    """Block-sparse attention keeping counts[b, h, row] top-scoring key blocks of every row."""
    C = layout.num_blocks
    kmax = int(counts.max())
    order = scores.sort(dim=-1, descending=True, stable=True).indices[..., :kmax]
    keep = torch.arange(kmax) < counts[..., None]
    idx = torch.where(keep, order, C).sort(-1).values  # ascending, unused slots last
    idx = torch.where(idx == C, -1, idx)
    return block_sparse_reference(q, k, v, idx.to(torch.int32), counts.to(torch.int32), layout, q.shape[-1] ** -0.5)


def proportional_counts(weight, total_per_row, C):
    """Integer counts in [1, C] proportional to weight, summing to total_per_row x rows."""
    w = weight / weight.mean()
    cnt = (total_per_row * w).round().clamp(1, C).long().view(-1)
    diff = total_per_row * cnt.numel() - int(cnt.sum())
    order = torch.argsort(w.view(-1), descending=diff > 0).tolist()
    i = 0
    while diff:  # hand the rounding remainder to the heaviest (or take it from the lightest) rows
        r = order[i % len(order)]
        if diff > 0 and cnt[r] < C:
            cnt[r] += 1
            diff -= 1
        elif diff < 0 and cnt[r] > 1:
            cnt[r] -= 1
            diff += 1
        i += 1
    return cnt.view(weight.shape)


def mean_se(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1) / len(xs))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--keeps", type=float, nargs="*", default=[0.1, 0.2, 0.35])
    p.add_argument("--alphas", type=float, nargs="*", default=[-1.0, -0.5, 0.5, 1.0])
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "allocation_probe_cpu.json"))
    a = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    calls, grid = capture(ev.held_out_prompts(a.prompts))
    layout = cube_tiling(grid).layout
    C = layout.num_blocks
    prepared = []
    for q, k, v in calls:
        s = coarse_scores(q, k, layout, q.shape[-1] ** -0.5)
        prob = torch.softmax(s, -1)
        perplexity = torch.exp(-(prob * prob.clamp_min(1e-30).log()).sum(-1))
        prepared.append((q, k, v, s, prob, perplexity, F.scaled_dot_product_attention(q, k, v)))
    rows = []
    for keep in a.keeps:
        kk = max(1, math.ceil(keep * C - 1e-6))
        rules = {"top-k": lambda s, prob, ppl: torch.full(ppl.shape, kk)}
        # top-p: one mass share for every call, bisected until the total matches top-k's
        cum = [prob.sort(-1, descending=True).values.cumsum(-1) for _, _, _, _, prob, _, _ in prepared]
        rows_total = sum(c[..., 0].numel() for c in cum)
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            got = sum(int(((c < mid).sum(-1) + 1).clamp(max=C).sum()) for c in cum)
            lo, hi = (mid, hi) if got < kk * rows_total else (lo, mid)
        mass = lo
        rules[f"top-p (p={mass:.3f})"] = lambda s, prob, ppl: (
            (prob.sort(-1, descending=True).values.cumsum(-1) < mass).sum(-1) + 1).clamp(max=C)
        for alpha in a.alphas:
            rules[f"perplexity^{alpha:+g} per query block"] = (
                lambda s, prob, ppl, alpha=alpha: proportional_counts(ppl ** alpha, kk, C))
            rules[f"perplexity^{alpha:+g} per head"] = (
                lambda s, prob, ppl, alpha=alpha: proportional_counts(
                    ppl.mean(-1, keepdim=True).expand_as(ppl) ** alpha, kk, C))
        errors = {}
        for name, rule in rules.items():
            errs, blocks = [], 0
            for q, k, v, s, prob, ppl, dense in prepared:
                cnt = rule(s, prob, ppl)
                blocks += int(cnt.sum())
                errs.append(float((attend(q, k, v, s, cnt, layout) - dense).norm() / dense.norm()))
            errors[name] = errs
            m, se = mean_se(errs)
            d, dse = mean_se([x - y for x, y in zip(errs, errors["top-k"])])
            rows.append(dict(keep=keep, kept_blocks=kk, rule=name, rel_l2_mean=m, rel_l2_se=se,
                             minus_topk_mean=d, minus_topk_se=dse, mean_blocks_per_row=blocks / rows_total))
            print(f"keep {keep} ({kk} of {C}) {name:34s} rel L2 {m:.4f} +- {se:.4f}   vs top-k {d:+.4f} +- {dse:.4f}",
                  flush=True)
    doc = dict(device="cpu", torch=torch.__version__, model="USV World v2 teacher (models/)",
               settings=dict(prompts=a.prompts, steps=STEPS, kept_steps=KEPT_STEPS, cfg=5.0, frames=FRAMES,
                             size=SIZE, grid=grid, blocks=C, calls=len(calls)),
               rows=rows)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
