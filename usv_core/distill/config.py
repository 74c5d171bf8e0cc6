"""The recipe's settings: one dataclass, read from the command line. Defaults are the recipe's
starting point (fastwan-3step, keep 0.2, merge 0.5, teacher CFG 5, 5 fake-score updates per student
update); the shipped USV World student's own options are in docs/distill.md and in its file's
metadata. --tiny shrinks everything for a CPU smoke test."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

from .. import dmd
from ..world import weights
from .student import Sparsity

CUBES = {"4x4x4": (4, 4, 4), "1x8x8": (1, 8, 8), "2x4x8": (2, 4, 8)}  # as USV Sparse Attention offers them


@dataclass
class Config:
    out: str = ""
    teacher: str = ""  # Wan 2.1 t2v safetensors; "" = the shipped USV World DiT
    text: str = ""  # USV World caption encoder; "" = the shipped one
    embeddings: str = ""  # instead of --text: safetensors with "cond" (P, L, 4096) and "uncond" (1, L, 4096)
    # schedule the student is trained on and will be sampled with (USV DMD Sigmas)
    schedule: str = "fastwan-3step"
    timesteps: str = ""  # schedule "custom" only
    shift: float = 1.0  # schedule "custom" only
    # sparsity of the student's forward (USV Sparse Attention / USV Token Merge at inference)
    keep: float = 0.2
    merge: float = 0.5
    cube: str = "4x4x4"
    # USV Sparse Attention's blocks: "cubes" (one block each) or "packed" edge cubes; on USV World a
    # student distilled on packed blocks scored 0.29 against 0.42 on cubes (README)
    tiling: str = "cubes"
    dense_steps: int = 0
    dense_student: bool = False  # distil dense; sparsify only at inference (the comparison)
    backend: str = "auto"
    # DMD2
    cfg: float = 5.0
    fake_updates: int = 5
    dmd_shift: float = 8.0  # the re-noising level s = shift(u), u ~ U(min_t, max_t); 8 is the teacher's
    min_t: float = 0.02
    max_t: float = 0.98
    lr: float = 5e-5
    fake_lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # DMD2's GAN term (0: off): the fake network's classifier tells real USV World clips from the
    # student's samples; gan weighs its pull on the student, gan_d_weight the classifier's loss
    gan: float = 0.0
    gan_d_weight: float = 1e-2
    gan_clips: int = 1024  # real clips rendered and encoded once at the start
    gan_shift: float = 0.0  # time shift of the classifier's noise levels; 0: --dmd-shift's (DMD2's choice)
    vae: str = ""  # the VAE that encodes them; "" = the shipped USV World VAE
    # DMD's regression term (0: off): the student's first step from a noise is pulled towards the
    # teacher's sample from it, over regress_pairs pairs made at the start with regress_steps Euler
    # steps of the teacher at --cfg; regress_at "all": every step, from the teacher's state there
    regress: float = 0.0
    regress_pairs: int = 2048
    regress_steps: int = 50
    regress_at: str = "first"
    # an exponential moving average of the student's weights, exported instead of its last
    # weights (0: off); two runs of one recipe ended 0.1 apart on USV World (not yet measured with it)
    ema: float = 0.0
    batch: int = 16  # per process
    frames: int = 17
    size: int = 256  # height in pixels (and width unless --width)
    width: int = 0  # 0: square; Wan 480p is --size 480 --width 832
    steps: int = 2000  # student updates
    seed: int = 0
    # running
    stop_after: float = 0.0  # seconds of this command, then save and stop (the same command resumes)
    stop_at_step: int = 0  # stop (after saving) at this student step; 0: never
    save_every: int = 100  # student steps between checkpoints
    save_seconds: float = 120.0  # and at most this many seconds between them
    log_every: int = 10
    compile: bool = False  # torch.compile the blocks' dense work: the step is ~24,000 small kernel launches
    activation_checkpointing: bool = False  # recompute block activations in backward: a Wan 1.3B at 480p x 81 needs it on 80 GB
    tiny: bool = False
    tiny_layers: int = 3  # three, so that the middle block merges (first and last never do)
    export_rank: int = 0  # also write a LoRA of this rank beside the full model; 0: full model only

    @property
    def ckpt(self) -> str:
        return os.path.join(self.out, "ckpt", "state.safetensors")

    def sigmas(self) -> list[float]:
        return dmd.preset_sigmas(self.schedule, self.timesteps, self.shift)

    def sparsity(self) -> Sparsity:
        if self.dense_student:
            return Sparsity(backend=self.backend)
        return Sparsity(keep=self.keep, merge=self.merge, cube=CUBES[self.cube], dense_steps=self.dense_steps,
                        backend=self.backend, pack_edges=self.tiling == "packed")

    def latent_shape(self) -> tuple[int, int, int, int]:
        width = self.width or self.size
        if (self.frames - 1) % 4 or self.size % 16 or width % 16:
            raise ValueError(f"--frames must be 1 + 4k and --size / --width multiples of 16 (Wan's VAE and patch), "
                             f"got {self.frames} frames at {self.size} x {width}")
        return (16, (self.frames - 1) // 4 + 1, self.size // 8, width // 8)

    def teacher_path(self) -> str:
        return self.teacher or weights.default_path(weights.DIT_FILE)

    def text_path(self) -> str:
        return self.text or weights.default_path(weights.TEXT_FILE)

    def vae_path(self) -> str:
        return self.vae or weights.default_path(weights.VAE_FILE)

    def recipe(self) -> dict:
        """What must not change between a run and its resumption."""
        keys = ("schedule", "timesteps", "shift", "keep", "merge", "cube", "tiling", "dense_steps", "dense_student", "cfg",
                "fake_updates", "dmd_shift", "min_t", "max_t", "gan", "gan_d_weight", "gan_clips", "gan_shift", "regress", "regress_pairs", "regress_steps", "regress_at", "ema", "batch", "frames", "size", "width", "seed", "tiny", "tiny_layers")
        recipe = {k: getattr(self, k) for k in keys}
        if not self.gan:  # settings of a term that is off do not bind a resumption
            del recipe["gan_d_weight"], recipe["gan_clips"], recipe["gan_shift"]
        if not self.regress:
            del recipe["regress"], recipe["regress_pairs"], recipe["regress_steps"], recipe["regress_at"]
        if not self.ema:  # and runs from before the average resume without it
            del recipe["ema"]
        return recipe


HELP = {
    "out": "folder for the student, log.jsonl and ckpt/ (the same --out resumes)",
    "teacher": "Wan 2.1 t2v safetensors (default: the shipped USV World DiT)",
    "text": "USV World caption encoder (default: the shipped one)",
    "embeddings": "precomputed text conditioning for a real Wan teacher: safetensors with cond (P, L, 4096), uncond (1, L, 4096)",
    "schedule": "few-step schedule trained and sampled with (a USV DMD Sigmas preset, or custom)",
    "keep": "VSA keep ratio of the student's forward (USV Sparse Attention's keep)",
    "merge": "token-merging ratio of the student's forward (USV Token Merge's ratio)",
    "tiling": "blocks sparse attention selects among: packed (edge cubes joined into full blocks) or cubes",
    "dense_steps": "schedule steps that run dense (set the nodes' dense_steps to the same)",
    "dense_student": "distil a dense student (sparsify it only at inference): the comparison",
    "backend": "vsa_attention backend: auto (Triton on CUDA), triton, reference",
    "cfg": "teacher's classifier-free guidance scale in the real score",
    "fake_updates": "fake-score updates per student update (the two time scales)",
    "dmd_shift": "time shift of the re-noising level of the distribution-matching loss",
    "gan": "weight of DMD2's GAN term on the student (0: off); its classifier learns real USV World clips from the student's samples",
    "gan_d_weight": "weight of the classifier's loss in the fake network's update",
    "gan_clips": "real clips rendered and encoded at the start for the GAN term",
    "gan_shift": "time shift of the noise levels the GAN classifier sees (0: those of --dmd-shift; 1: uniform)",
    "vae": "VAE that encodes the GAN term's real clips (default: the shipped USV World VAE)",
    "regress": "weight of DMD's regression term (0: off): the student's first step is pulled towards the teacher's sample from the same noise",
    "regress_pairs": "noise / teacher-sample pairs made at the start for --regress",
    "regress_steps": "teacher's Euler steps (with --cfg) per pair",
    "regress_at": "schedule steps the regression term trains: first (from the noise) or all (each from the teacher's state at its sigma)",
    "ema": "decay of a moving average of the student's weights, exported instead of its last weights (0: off; e.g. 0.99)",
    "batch": "samples per process per update",
    "steps": "student updates in all (over every resumed command)",
    "stop_after": "seconds for this command; then save and stop (run it again to resume)",
    "stop_at_step": "save and stop at this student step",
    "save_every": "student steps between checkpoints",
    "save_seconds": "most seconds between checkpoints",
    "compile": "torch.compile the networks' dense work into fewer, fused kernels (the first steps compile)",
    "activation_checkpointing": "recompute block activations in backward (Wan 1.3B at 480p needs it)",
    "tiny": "CPU smoke test: a random 3-block teacher, 5 frames at 128 x 128",
    "export_rank": "also write a LoRA of this rank against the teacher (0: full model only)",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m usv_core.distill",
                                description="Sparse DMD2: distil a Wan-layout flow-matching DiT into a few-step "
                                            "student that runs VSA and token merging. Run the same command again "
                                            "to resume from OUT/ckpt.")
    defaults = Config()
    for f in dataclasses.fields(Config):
        name = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            p.add_argument(name, action="store_true", help=HELP.get(f.name))
        elif isinstance(value, tuple):
            p.add_argument(name, type=float, nargs=len(value), default=value, help=HELP.get(f.name))
        else:
            p.add_argument(name, type=type(value), default=value, required=f.name == "out",
                           help=HELP.get(f.name, "") + (f" (default {value})" if value != "" else ""))
    return p


def from_args(argv=None) -> Config:
    a = parser().parse_args(argv)
    cfg = Config(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in vars(a).items()})
    if cfg.cube not in CUBES:
        raise SystemExit(f"--cube must be one of {', '.join(CUBES)}, got {cfg.cube!r}")
    if cfg.tiling not in ("packed", "cubes"):
        raise SystemExit(f"--tiling must be packed or cubes, got {cfg.tiling!r}")
    if cfg.schedule not in dmd.PRESET_NAMES:
        raise SystemExit(f"--schedule must be one of {', '.join(dmd.PRESET_NAMES)}, got {cfg.schedule!r}")
    if cfg.gan < 0 or cfg.gan_d_weight < 0 or cfg.gan_shift < 0 or (cfg.gan and cfg.gan_clips < 1):
        raise SystemExit("--gan, --gan-d-weight and --gan-shift must be >= 0, and --gan-clips >= 1 when --gan is on")
    if cfg.regress < 0 or (cfg.regress and (cfg.regress_pairs < 1 or cfg.regress_steps < 1)):
        raise SystemExit("--regress must be >= 0, and --regress-pairs and --regress-steps >= 1 when it is on")
    if cfg.regress_at not in ("first", "all"):
        raise SystemExit(f"--regress-at must be first or all, got {cfg.regress_at!r}")
    if not 0.0 <= cfg.ema < 1.0:
        raise SystemExit(f"--ema is a decay in [0, 1) (0: off; 0.99 averages over about 100 steps), got {cfg.ema:g}")
    if cfg.gan and cfg.fake_updates < 1:
        raise SystemExit("--gan trains its classifier in the fake-score updates: give --fake-updates 1 or more")
    if cfg.gan and (cfg.embeddings or cfg.width not in (0, cfg.size)):
        raise SystemExit("--gan learns from real USV World clips, which are square and captioned by its caption "
                         "encoder: drop --embeddings and --width, or run without --gan")
    if cfg.tiny:
        cfg.frames, cfg.size, cfg.width, cfg.batch = min(cfg.frames, 5), min(cfg.size, 128), 0, min(cfg.batch, 2)
        cfg.fake_updates = min(cfg.fake_updates, 2)
        cfg.gan_clips = min(cfg.gan_clips, 8)
        cfg.regress_pairs, cfg.regress_steps = min(cfg.regress_pairs, 8), min(cfg.regress_steps, 4)
    cfg.sparsity()  # fails early on a bad keep or merge ratio
    return cfg
