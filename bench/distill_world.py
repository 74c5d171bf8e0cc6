"""The paper-style ablation on USV World v2 (issue 14): distil students side by side on one GPU
(`python3 -m usv_core.distill`, one process each, sharing the card: they compare at equal
seconds, as a user would run them), then score every row on the same held-out prompts and
noise seeds: the dense teacher (50 Euler steps, CFG 5), the teacher sampled with the few-step
schedule untrained, the dense student dense and made sparse training-free, and the
sparse-distilled students at their own settings. Writes bench/results/distill_world_<card>.json
(--json to change), after every scored row too (marked "partial" until the last).

    python3 bench/distill_world.py --out runs/ablation --seconds 420      # GPU: trains, then scores
    python3 bench/distill_world.py --out runs/ema --students keep0.2,keep0.2+ema0.99 --seeds 0,1
                                                                          # each student twice, summarised over seeds
    python3 bench/distill_world.py --out runs/ablation --score-only       # score what OUT holds
    python3 bench/distill_world.py --out /tmp/a --tiny                    # CPU smoke test of the code path

Beside each row: its DiT work per step and against the teacher's 100 forwards (50 steps x CFG),
from the cost model USV Report uses, for Wan 1.3B at 480p x 81 (30 blocks, first and last never
merge), and the measured seconds per video of that setting from bench/results/e2e_<card>.json
where bench/e2e.py timed it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (distillation options, the sparsity it is trained at and scored with)
STUDENTS = {
    "dense": (["--dense-student"], (1.0, 0.0)),
    "keep0.2": (["--keep", "0.2", "--merge", "0"], (0.2, 0.0)),
    "keep0.05": (["--keep", "0.05", "--merge", "0"], (0.05, 0.0)),
    "keep0.2+merge0.5": (["--keep", "0.2", "--merge", "0.5"], (0.2, 0.5)),
    "keep0.05+merge0.5": (["--keep", "0.05", "--merge", "0.5"], (0.05, 0.5)),
}
GAN_WEIGHT = 3e-3  # DMD2's ImageNet weight of the generator's GAN term; "keep0.2+gan0.01" sets another
# training-free sparsity applied to the dense student
TRAINING_FREE = [(0.2, 0.0), (0.1, 0.0), (0.05, 0.0), (0.2, 0.5), (0.05, 0.5)]
TEACHER_FORWARDS = 100  # 50 steps, cond and uncond
WAN_LAYERS = 30


def student_options(name: str) -> tuple[list[str], tuple[float, float]]:
    """A STUDENTS name, optionally with DMD2's GAN term on real clips: "+gan" (weight GAN_WEIGHT) or
    "+gan<weight>", and "+ganshift<shift>" for the classifier's own noise levels, and with an
    average of the student's weights, "+ema<decay>", and with DMD's regression term, "+reg<weight>",
    then "+regall" for its every step (e.g. "keep0.2+gan0.01+ganshift1", "keep0.2+reg4+regall+ema0.99")
    -> (distillation options, the sparsity it is trained at and scored with)."""
    refusal = SystemExit(f"--students: unknown {name!r}; choose from {', '.join(STUDENTS)}, each optionally "
                         f"with +gan (weight {GAN_WEIGHT:g}) or +gan<weight>, and then +ganshift<shift>, "
                         "+ema<decay> and +reg<weight> (then +regall)")
    parts = name.split("+")
    extra = lambda p: p.startswith(("gan", "ema", "reg"))  # noqa: E731
    base = "+".join(p for p in parts if not extra(p))
    options = []
    for p in filter(extra, parts):
        if p == "regall":
            options += ["--regress-at", "all"]
            continue
        m = re.fullmatch(r"(ganshift|gan|ema|reg)([0-9.]+(?:e-?[0-9]+)?)?", p)
        if not m or (m.group(1) != "gan" and not m.group(2)):
            raise refusal
        flag = {"gan": "--gan", "ganshift": "--gan-shift", "ema": "--ema", "reg": "--regress"}[m.group(1)]
        options += [flag, m.group(2) or str(GAN_WEIGHT)]
    if (base not in STUDENTS or ("--gan-shift" in options and "--gan" not in options)
            or ("--regress-at" in options and "--regress" not in options)):
        raise refusal
    return STUDENTS[base][0] + options, STUDENTS[base][1]


def setting_name(keep: float, merge: float) -> str:
    parts = ([f"keep{keep:g}"] if keep < 1 else []) + ([f"merge{merge:g}"] if merge > 0 else [])
    return "+".join(parts) or "dense"


def wan_work(keep: float, merge: float) -> float:
    from usv_core.policy import work_share

    merges = [0.0] + [merge] * (WAN_LAYERS - 2) + [0.0]
    return work_share([keep] * WAN_LAYERS, merges)


def wan_seconds(card: str) -> dict[str, float]:
    """e2e.py's few-step rows by setting name (keep/merge) and its dense 50-step CFG row as
    "teacher": seconds of DiT denoising."""
    path = os.path.join(ROOT, "bench", "results", f"e2e_{card.replace(' ', '_')}.json")
    if not os.path.exists(path):
        return {}
    out = {}
    for row in json.load(open(path))["rows"]:
        s = row["setting"]
        if s.startswith("dense, 50 steps"):
            out["teacher"] = row["denoise_s"]
        if "DMD Sampler" not in s or "Accelerate" in s:
            continue
        keep = re.search(r"keep ([0-9.]+)", s)
        merge = re.search(r"Token Merge ([0-9.]+)", s)
        out[setting_name(float(keep.group(1)) if keep else 1.0, float(merge.group(1)) if merge else 0.0)] = row["denoise_s"]
    return out


def run_id(name: str, seed: int) -> str:
    """A student's folder and key: its name, with @<seed> for training seeds other than 0."""
    return name if seed == 0 else f"{name}@{seed}"


def distil(out: str, runs: list[tuple[str, int]], seconds: float, extra: list[str]) -> dict[str, dict]:
    procs = {}
    for name, seed in runs:
        folder = os.path.join(out, run_id(name, seed))
        os.makedirs(folder, exist_ok=True)
        cmd = [sys.executable, "-m", "usv_core.distill", "--out", folder, "--stop-after", str(seconds),
               *student_options(name)[0], "--seed", str(seed), *extra]
        log = open(os.path.join(folder, "train.txt"), "a")
        procs[run_id(name, seed)] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log)
        print(f"[{run_id(name, seed)}] {' '.join(cmd[1:])}", flush=True)
    result = {}
    for name, (p, log) in procs.items():
        rc = p.wait()
        log.close()
        tail = open(os.path.join(out, name, "train.txt")).read().strip().splitlines()[-1:]
        print(f"[{name}] exit {rc}: {tail[0] if tail else ''}", flush=True)
        steps = [json.loads(ln) for ln in open(os.path.join(out, name, "log.jsonl"))] if rc == 0 else []
        result[name] = {"exit": rc, "steps": steps[-1]["step"] if steps else 0,
                        "seconds": steps[-1]["seconds"] if steps else 0.0}
    return result


def over_seeds(rows: list[dict]) -> dict[str, dict]:
    """Each distilled student's world score summarised over its training seeds: the mean, and the
    standard error of that mean from the spread between seeds (not the prompts' own)."""
    import numpy as np

    by: dict[str, list[float]] = {}
    for r in rows:
        if r["student"] != "teacher" and r["row"].startswith(("student distilled", "DMD student")):
            by.setdefault(r["student"], []).append(r["world_score"])
    out = {}
    for name, scores in by.items():
        x = np.asarray(scores)
        se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
        out[name] = {"seeds": len(x), "world_score_mean": float(x.mean()), "world_score_se_over_seeds": se,
                     "world_scores": scores}
        print(f"{name:40s} over {len(x)} seeds: {x.mean():.3f} +- {se:.3f} ({', '.join(f'{v:.3f}' for v in x)})")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the students (one subfolder each)")
    p.add_argument("--students", default=",".join(STUDENTS),
                   help=f"which to distil and score, of {', '.join(STUDENTS)}, each optionally with +gan or "
                        "+gan<weight> (DMD2's GAN term) and +ganshift<shift>, +ema<decay>, and +reg<weight> (DMD's regression "
                        "term; +regall for every step)")
    p.add_argument("--seconds", type=float, default=420, help="--stop-after of every distillation (they run at once)")
    p.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1: each student is distilled once per seed "
                                                "(two runs of one recipe can end 0.1 apart), and summarised over them")
    p.add_argument("--distill-args", default="", help="more options for every distillation, e.g. '--lr 1e-4'")
    p.add_argument("--score-only", action="store_true")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny students, 2 prompts, 5 frames at 64 x 64")
    p.add_argument("--json", default="")
    a = p.parse_args()
    import torch

    from usv_core.distill import evaluate

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    names = [n for n in a.students.split(",") if n]
    for n in names:
        student_options(n)  # refuses an unknown name before anything trains
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()] or [0]
    except ValueError:
        raise SystemExit(f"--seeds takes whole numbers separated by commas, e.g. 0,1,2; got {a.seeds!r}") from None
    if "--seed" in a.distill_args.split():
        raise SystemExit("give training seeds with --seeds, not --seed in --distill-args")
    runs = [(n, seed) for n in names for seed in seeds]
    extra = a.distill_args.split()
    sample = ["--prompts", str(a.prompts)]
    if a.tiny:
        extra += ["--tiny", "--steps", "2"]
        sample = ["--prompts", "2", "--frames", "5", "--size", "64", "--batch", "2"]
    t0 = time.time()
    training = {} if a.score_only else distil(a.out, runs, a.seconds, extra)
    student = {run_id(n, seed): os.path.join(a.out, run_id(n, seed), "student_dit.safetensors") for n, seed in runs}
    student = {n: f for n, f in student.items() if os.path.exists(f)}
    seconds = wan_seconds(card)
    teacher = os.path.join(ROOT, "models", "diffusion_models", "usv_world_dit.safetensors")
    rows = []
    path = a.json or os.path.join(a.out if a.tiny else os.path.join(ROOT, "bench", "results"),
                                  f"distill_world_{card.replace(' ', '_')}.json")

    def write(**more):
        # after every row too: a run cut short by a time limit keeps the rows it scored
        result = {"card": card, "torch": torch.__version__, "seconds": time.time() - t0, "training": training,
                  "distill_args": extra, "seeds": seeds, "rows": rows, **more}
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    def row(name, kind, path, keep=1.0, merge=0.0, teacher_steps=0, seed=0):
        args = ["--student", path, "--keep", str(keep), "--merge", str(merge), *sample]
        if teacher_steps:
            args += ["--teacher-steps", str(teacher_steps)]
        r = evaluate.score(args)
        forwards = TEACHER_FORWARDS if teacher_steps else 3
        work = wan_work(keep, merge)
        setting = setting_name(keep, merge)  # e2e.py's teacher row is 50 steps, as the teacher rows here
        out = {"row": name, "student": kind, "steps": teacher_steps or 3, "cfg": 5.0 if teacher_steps else 1.0,
               "keep": keep, "merge": merge, "work_per_step": work, "work_vs_teacher": work * forwards / TEACHER_FORWARDS,
               "wan_1.3b_480p_denoise_s": seconds.get("teacher" if teacher_steps else setting),
               **{k: r[k] for k in ("world_score", "world_score_se", "world_score_std", "presence", "shape_ok", "smooth",
                                    "moving", "colour_presence", "per_prompt", "seconds")}}
        if kind != "teacher":
            out["train_seed"] = seed
        if run_id(kind, seed) in training:
            t = training[run_id(kind, seed)]
            out["distill_steps"], out["distill_seconds"] = t["steps"], t["seconds"]
        rows.append(out)
        write(partial=True)
        print(f"{name:58s} {r['world_score']:.3f} +- {r['world_score_se']:.3f}  work/step {work:.3f}", flush=True)

    if not a.tiny:
        row("dense teacher, 50 Euler steps, CFG 5", "teacher", teacher, teacher_steps=50)
        row("teacher, fastwan-3step, no CFG, not distilled", "teacher", teacher)
    for seed in seeds:
        rid, of_seed = run_id("dense", seed), f" (seed {seed})" if len(seeds) > 1 else ""
        if rid in student:
            row(f"DMD student (dense), 3 steps{of_seed}", "dense", student[rid], seed=seed)
            for keep, merge in TRAINING_FREE:
                row(f"dense student + {setting_name(keep, merge)} training-free{of_seed}", "dense", student[rid], keep,
                    merge, seed=seed)
    for n, seed in runs:
        if n != "dense" and run_id(n, seed) in student:
            keep, merge = student_options(n)[1]
            of_seed = f" (seed {seed})" if len(seeds) > 1 else ""
            row(f"student distilled at {n}{of_seed}", n, student[run_id(n, seed)], keep, merge, seed=seed)
    # the paired comparison (same prompts and noise): each row's score against the teacher's
    base = next((r for r in rows if r["row"].startswith("dense teacher")), None)
    if base:
        import numpy as np

        for r in rows:
            d = np.asarray([x["score"] for x in r["per_prompt"]]) - np.asarray([x["score"] for x in base["per_prompt"]])
            r["vs_teacher"], r["vs_teacher_se"] = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
    write(over_seeds=over_seeds(rows) if len(seeds) > 1 else {})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
