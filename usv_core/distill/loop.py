"""The DMD2 loop: per student step, `fake_updates` flow-matching updates of the fake-score network
on fresh student samples (the faster time scale), then one distribution-matching update of the
student. Every random draw of step n comes from a generator seeded by (seed, n, rank, role), so a
resumed run takes exactly the steps an uninterrupted one would."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import threading
import time

import numpy as np
import torch

from .. import dmd
from ..ema import ema_update
from ..world.weights import load_vae
from . import checkpoint, export
from .config import Config
from .data import Embeddings, RealClips, WorldCaptions, to_device
from .dist import Dist, checkpoint_blocks, shard
from .gan import fake_update_losses, student_gan_loss
from .losses import StudentDraw, dmd_gradient, dmd_loss, fake_score_loss, student_sample
from .models import build, read_wan_state
from .pairs import TeacherPairs, regression_loss
from .student import DENSE, compile_dense_parts

FAKE, STUDENT, REAL, REAL_SET = 1, 2, 3, 4
NOISE = 5  # the stream of a draw's device-side noise
PAIR_SET, PAIRS = 6, 7
SHARED = 2**31  # the "rank" of draws every process makes alike
STUDENT_FILE = "student_dit.safetensors"
LORA_FILE = "student_lora.safetensors"
LOG_FILE = "log.jsonl"


def read_scalars(values: dict) -> dict[str, float]:
    """0-d tensors (sharded ones too) and numbers -> floats, with one device sync for all."""
    tensors = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().float()
               for k, v in values.items() if isinstance(v, torch.Tensor)}
    read = dict(zip(tensors, torch.stack(list(tensors.values())).tolist())) if tensors else {}
    return {k: read[k] if k in read else float(v) for k, v in values.items()}


class Trainer:
    def __init__(self, cfg: Config, d: Dist):
        # --stop-after counts the command's setup too (loading, real clips, teacher pairs: minutes
        # on a slow machine), so that a command sized to a time limit ends inside it
        self.created = time.time()
        self.cfg, self.d = cfg, d
        self.device = d.device
        self.sigmas = cfg.sigmas()
        if len(self.sigmas) < 2 or self.sigmas[-1] != 0.0:
            raise ValueError(f"schedule {cfg.schedule} must end at sigma 0, got {self.sigmas}")
        self.sparsity = cfg.sparsity()
        # a checkpoint of other settings is refused before the setup's one-off work is spent on it
        self._resume_info = self._check_resumable() if os.path.exists(cfg.ckpt) else None
        teacher_sd = None if cfg.tiny else read_wan_state(cfg.teacher_path())
        teacher, fake, student = build(teacher_sd, cfg.seed, cfg.tiny_layers, gan=cfg.gan > 0)
        ema = copy.deepcopy(student).requires_grad_(False) if cfg.ema else None
        # the LoRA's base, kept in host memory only where a LoRA will be written
        self.teacher_sd = {k: v.clone() for k, v in teacher.state_dict().items()} if cfg.export_rank and d.main else None
        if cfg.embeddings:
            self.data = Embeddings(cfg.embeddings)
        elif cfg.tiny:
            self.data = WorldCaptions.tiny(cfg.seed)
        else:
            self.data = WorldCaptions.from_file(cfg.text_path())
        self.real = self._real_clips() if cfg.gan else None
        if self.device.type == "cuda":
            teacher = teacher.to(torch.bfloat16)  # frozen: half the memory, and autocast computes in bf16 anyway
        if cfg.compile:
            for model in (teacher, fake, student):
                compile_dense_parts(model)
        if cfg.activation_checkpointing:
            fake, student = checkpoint_blocks(fake), checkpoint_blocks(student)
        self.teacher = shard(teacher.to(self.device), d)
        self.fake = shard(fake.to(self.device), d)
        self.student = shard(student.to(self.device), d)
        self.ema = shard(ema.to(self.device), d) if ema is not None else None
        self.pairs = self._teacher_pairs() if cfg.regress else None
        kw = dict(betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.opt_student = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, **kw)
        self.opt_fake = torch.optim.AdamW(self.fake.parameters(), lr=cfg.fake_lr, **kw)
        self.step, self.seconds = 0, 0.0
        if self._resume_info is not None:
            self._resume()

    def _progress(self, what: str):
        """A progress(done, n) for the setup's one-off work: a line every 30 s, from the main process."""
        last = [time.time()]

        def progress(done, n):
            if self.d.main and time.time() - last[0] > 30:
                last[0] = time.time()
                print(f"distill: {done}/{n} {what}", flush=True)

        return progress

    def _real_clips(self) -> RealClips:
        """The GAN term's real clips, encoded once, with a line every 30 s (minutes on a CPU)."""
        cfg, main = self.cfg, self.d.main
        t0 = time.time()
        if main:
            print(f"distill: encoding {cfg.gan_clips} real clips for the GAN term", flush=True)
        real = RealClips(load_vae(cfg.vae_path()), self.data, cfg.gan_clips, cfg.frames, cfg.size,
                         self.generator(0, REAL_SET), self.device, progress=self._progress("real clips encoded"))
        if main:
            print(f"distill: real clips encoded in {time.time() - t0:.1f} s", flush=True)
        return real

    def _teacher_pairs(self) -> TeacherPairs:
        """The regression term's pairs, sampled by the teacher with a line every 30 s, or read back
        from beside the checkpoint."""
        cfg, main = self.cfg, self.d.main
        t0 = time.time()
        if main:
            print(f"distill: {cfg.regress_pairs} teacher pairs ({cfg.regress_steps} steps, CFG {cfg.cfg:g}) "
                  "for the regression term", flush=True)
        at = self.sigmas[:1] if cfg.regress_at == "first" else self.sigmas[:-1]
        # each process its own pairs, so each keeps its own file
        cache = os.path.join(os.path.dirname(cfg.ckpt), f"pairs_rank{self.d.rank}.safetensors")
        named = lambda path: [os.path.basename(path), os.path.getsize(path)]  # noqa: E731
        key = {"seed": cfg.seed, "rank": self.d.rank, "world": self.d.world, "tiny": cfg.tiny,
               "teacher": None if cfg.tiny else named(cfg.teacher_path()),
               "captions": None if cfg.tiny and not cfg.embeddings else named(cfg.embeddings or cfg.text_path())}
        pairs = TeacherPairs(self.teacher, self.data, cfg.regress_pairs, cfg.latent_shape(), *self._generators(0, PAIR_SET),
                             self.device, sigmas_at=at, steps=cfg.regress_steps, cfg=cfg.cfg, autocast=self._autocast,
                             progress=self._progress("teacher pairs"), cache=cache, key=key)
        if main:
            read = f", {pairs.loaded} of them read from {cache}" if pairs.loaded else ""
            print(f"distill: teacher pairs ready in {time.time() - t0:.1f} s{read}", flush=True)
        return pairs

    # --- state ----------------------------------------------------------------------------

    def _modules(self):
        modules = {"student": self.student, "fake": self.fake}
        if self.ema is not None:
            modules["student_ema"] = self.ema
        return modules, {"student": self.opt_student, "fake": self.opt_fake}

    def _check_resumable(self) -> dict:
        info = checkpoint.read_info(self.cfg.ckpt)
        # runs from before the tiling setting attended over one block per cube, today's default,
        # and those from before the GAN term ran without it
        stored = {"tiling": "cubes", "gan": 0.0, **info.get("recipe", {})}
        recipe = self.cfg.recipe()
        if stored != recipe:
            changed = sorted(k for k in {**stored, **recipe} if stored.get(k) != recipe.get(k))
            raise SystemExit(f"{self.cfg.ckpt} was written with other settings ({', '.join(changed)}); "
                             "run with the same settings to resume, or give a fresh --out")
        return info

    def _resume(self) -> None:
        modules, opts = self._modules()
        checkpoint.load(self.cfg.ckpt, modules, opts)
        info = self._resume_info
        self.step, self.seconds = int(info["step"]), float(info["seconds"])

    def save(self) -> None:
        modules, opts = self._modules()
        info = {"step": self.step, "seconds": self.seconds, "recipe": self.cfg.recipe()}
        checkpoint.save(self.cfg.ckpt, self.d, modules, opts, info)

    def export(self) -> list[str]:
        sd = checkpoint.full_model_state(self.ema if self.ema is not None else self.student)
        paths = []
        if self.d.main:
            recipe = dict(self.cfg.recipe(), steps_trained=self.step)
            paths.append(os.path.join(self.cfg.out, STUDENT_FILE))
            export.save_full(sd, paths[-1], recipe)
            if self.cfg.export_rank:
                paths.append(os.path.join(self.cfg.out, LORA_FILE))
                export.save_lora(sd, self.teacher_sd, paths[-1], self.cfg.export_rank, recipe)
        self.d.barrier()
        return paths

    # --- one step -------------------------------------------------------------------------

    def generator(self, step: int, role: int, i: int = 0, rank: int | None = None, noise: bool = False) -> torch.Generator:
        """The host generator of a draw; with noise, the draw's generator on the training device,
        for its latent-sized noise: drawn on the host and copied, that noise would cost more host
        time than the step's kernel launches, and every copy would stall the GPU's queue."""
        rank = self.d.rank if rank is None else rank
        words = [self.cfg.seed, step, rank, role, i] + ([NOISE] if noise else [])
        seed = int(np.random.SeedSequence(words).generate_state(1)[0])
        return torch.Generator(self.device if noise else "cpu").manual_seed(seed)

    def _generators(self, step: int, role: int, i: int = 0) -> tuple[torch.Generator, torch.Generator]:
        """A draw's host generator and its device generator for noise."""
        return self.generator(step, role, i), self.generator(step, role, i, noise=True)

    def _noise(self, gen: torch.Generator, shape) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=self.device)

    def _draw(self, step: int, role: int, i: int = 0):
        """Conditioning, the student's draw, and the re-noising (noise, s) of its sample."""
        cfg, b = self.cfg, self.cfg.batch
        shape = (b, *cfg.latent_shape())
        # The schedule step is shared by all processes: it sets how many forwards the step runs,
        # and sharded models gather their weights once per forward on every process together.
        k = int(torch.randint(0, len(self.sigmas) - 1, (1,), generator=self.generator(step, role, i, rank=SHARED)))
        gen, ngen = self._generators(step, role, i)
        cond, uncond, _ = self.data.batch(gen, b, self.device)
        noise = [self._noise(ngen, shape) for _ in range(k + 1)]
        s, eps = self._renoise(gen, ngen, shape, cfg.dmd_shift)
        return cond, uncond, StudentDraw(noise, k), s, eps

    def _renoise(self, gen: torch.Generator, ngen: torch.Generator, shape, shift: float):
        """A noise level s = shift(u) per sample and the noise to take a clean latent there."""
        cfg = self.cfg
        u = cfg.min_t + (cfg.max_t - cfg.min_t) * torch.rand(shape[0], generator=gen, dtype=torch.float64)
        s = to_device(torch.tensor([dmd.shift_time(float(x), shift) for x in u], dtype=torch.float32), self.device)
        return s, self._noise(ngen, shape)

    def _gan_draw(self, step: int, i: int):
        """Fake update i's classifier inputs: real clips with their conditioning and re-noising,
        and the classifier's own re-noising of student samples (None: see _gan_levels)."""
        gen, ngen = self._generators(step, REAL, i)
        real, cond = self.real.batch(gen, self.cfg.batch)
        real_batch = (real, cond, *self._renoise(gen, ngen, real.shape, self.cfg.gan_shift or self.cfg.dmd_shift))
        return real_batch, self._gan_levels(gen, ngen, real.shape)

    def _gan_levels(self, gen: torch.Generator, ngen: torch.Generator, shape):
        """The classifier's own re-noising of student samples; None where it shares the
        distribution-matching loss's levels (--gan-shift 0)."""
        return self._renoise(gen, ngen, shape, self.cfg.gan_shift) if self.cfg.gan_shift else None

    def sparsity_at(self, i: int):
        return DENSE if i < self.sparsity.dense_steps else self.sparsity

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def fake_step(self, step: int, i: int) -> tuple[torch.Tensor, dict]:
        """One update of the fake network: (its flow-matching loss, the GAN classifier's stats), as
        0-d tensors that train_step reads once per step."""
        cond, _, draw, s, eps = self._draw(step, FAKE, i)
        stats = {}
        with self._autocast():
            x0 = student_sample(self.student, draw, self.sigmas, cond, self.sparsity_at, grad=False)
            if self.real is None:
                flow = loss = fake_score_loss(self.fake, x0, eps, s, cond)
            else:
                flow, d, stats = fake_update_losses(self.fake, x0, eps, s, cond, *self._gan_draw(step, i))
                loss = flow + self.cfg.gan_d_weight * d
        self.opt_fake.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.fake.parameters(), self.cfg.grad_clip)
        self.opt_fake.step()
        return flow.detach(), stats

    def student_loss(self, step: int):
        """(the student's loss with its graph: the DMD surrogate, plus the GAN and regression terms when on; the
        student's x0; the target DMD pulls it to; stats)."""
        cond, uncond, draw, s, eps = self._draw(step, STUDENT)
        with self._autocast():
            x0 = student_sample(self.student, draw, self.sigmas, cond, self.sparsity_at, grad=True)
            grad, stats = dmd_gradient(self.teacher, self.fake, x0, eps, s, cond, uncond, self.cfg.cfg)
            loss = dmd_loss(x0, grad)
            stats["dmd"] = loss.detach()
            if self.real is not None:
                levels = self._gan_levels(*self._generators(step, REAL, self.cfg.fake_updates), x0.shape)
                gan_s, gan_eps = levels or (s, eps)
                gan = student_gan_loss(self.fake, x0, gan_eps, gan_s, cond)
                stats["gan_g"] = gan.detach()
                loss = loss + self.cfg.gan * gan
            if self.pairs is not None:
                states, target, pcond = self.pairs.batch(self.generator(step, PAIRS), self.cfg.batch)
                reg = regression_loss(self.student, states, target, pcond, self.pairs.sigmas_at, self.sparsity_at)
                stats["regress"] = reg.detach()
                loss = loss + self.cfg.regress * reg
        stats.update(student_step=draw.step, sigma=s.mean())
        return loss, x0, (x0 - grad).detach(), stats

    def train_step(self) -> dict:
        t0 = time.time()
        fakes = [self.fake_step(self.step, i) for i in range(self.cfg.fake_updates)]
        loss, _, _, stats = self.student_loss(self.step)
        self.opt_student.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.opt_student.step()
        if self.ema is not None:
            self._update_ema()
        out = {"fake": torch.stack([f for f, _ in fakes]).mean() if fakes else 0.0, "grad_norm": gnorm,
               **{k: torch.stack([st[k] for _, st in fakes]).mean() for k in (fakes[0][1] if fakes else {})},
               **stats}
        out = self.d.mean(read_scalars(out))
        out["student_step"] = int(round(out["student_step"]))
        self.step += 1
        out["step"], out["step_seconds"] = self.step, time.time() - t0
        return out

    def _step(self) -> dict:
        """train_step; under --compile a compiler failure (the first step's, or a later recompile's)
        says what to change."""
        if not self.cfg.compile:
            return self.train_step()
        from torch._dynamo.exc import TorchDynamoException

        try:
            return self.train_step()
        except TorchDynamoException as e:
            raise SystemExit(f"--compile: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); "
                             "run the same command without --compile (it resumes from the last checkpoint)") from e

    def _update_ema(self) -> None:
        # each process averages its own shards
        local = lambda m: [p.to_local() if hasattr(p, "to_local") else p for p in m.parameters()]  # noqa: E731
        ema_update(local(self.ema), local(self.student), self.cfg.ema, self.step)

    # --- the run --------------------------------------------------------------------------

    def _log_file(self):
        """The JSON-lines log, cut back to the checkpoint's step: a killed run's steps after its
        last checkpoint are trained again and logged again, once."""
        path = os.path.join(self.cfg.out, LOG_FILE)
        if self.d.main:
            os.makedirs(self.cfg.out, exist_ok=True)
        if self.d.main and os.path.exists(path):
            with open(path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            with open(path + ".tmp", "w") as f:
                f.writelines(lines)
            os.replace(path + ".tmp", path)
        return open(path, "a") if self.d.main else None

    def run(self, say=print) -> dict:
        cfg = self.cfg
        start = time.time()
        spent0, last_save = self.seconds, time.time()
        log = self._log_file()
        if self.d.main:
            say(f"distill: {cfg.schedule} {self.sigmas}, student {'dense' if self.sparsity.is_dense else f'keep {self.sparsity.keep:g} merge {self.sparsity.merge:g}'}, "
                f"{self.d.world} process(es) on {self.device.type}, from step {self.step}/{cfg.steps}")
        stats: dict = {}
        stopped = None
        terminated = []
        previous = None
        if threading.current_thread() is threading.main_thread():
            # a session's time limit ends the run with SIGTERM: finish the step, save, stop
            previous = signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))
        try:
            while self.step < cfg.steps:
                if self.d.any(bool(terminated)):
                    stopped = "SIGTERM"
                    break
                if cfg.stop_at_step and self.step >= cfg.stop_at_step:
                    stopped = f"--stop-at-step {cfg.stop_at_step}"
                    break
                if self.d.any(bool(cfg.stop_after) and time.time() - self.created > cfg.stop_after):
                    stopped = f"--stop-after {cfg.stop_after:g}s"
                    break
                stats = self._step()
                self.seconds = spent0 + time.time() - start
                stats["seconds"] = self.seconds
                if log:
                    log.write(json.dumps(stats) + "\n")
                    log.flush()
                if self.d.main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    rate = self.seconds / max(1, self.step)
                    eta = (cfg.steps - self.step) * stats["step_seconds"]
                    gan = f"gan {stats['gan_g']:.3f}, real/fake called real {stats['d_real']:.2f}/{stats['d_fake']:.2f} | " if cfg.gan else ""
                    reg = f"regress {stats['regress']:.4f} | " if cfg.regress else ""
                    say(f"step {self.step}/{cfg.steps} | dmd {stats['dmd']:.4f} | fake {stats['fake']:.4f} | {gan}{reg}"
                        f"{stats['step_seconds']:.2f} s/step ({rate:.2f} mean) | eta {eta / 60:.1f} min")
                if self.d.any(self.step % cfg.save_every == 0 or time.time() - last_save > cfg.save_seconds):
                    self.save()
                    last_save = time.time()
        finally:
            if log:
                log.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        self.save()
        # A stopped run exports too: the student so far is usable (its file records the steps
        # trained), and the resumed run overwrites it.
        paths = self.export()
        if stopped:
            if self.d.main:
                say(f"stopped at step {self.step} ({stopped}); the student so far: {', '.join(paths)}; the state is in "
                    f"{cfg.ckpt}: run the same command to resume")
            return {"step": self.step, "stopped": stopped, "files": paths, **stats}
        if self.d.main:
            say(f"done: {self.step} steps in {self.seconds:.0f}s; student: {', '.join(paths)}")
        return {"step": self.step, "files": paths, **stats}


def main(cfg: Config) -> dict:
    from .dist import close, init

    d = init()
    try:
        if d.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(cfg.seed)  # only initialisations outside the per-step generators
        return Trainer(cfg, d).run()
    finally:
        close(d)
