"""Few-step DMD sampling in ComfyUI: a SIGMAS node with the distilled models' schedules and a
SAMPLER for SamplerCustomAdvanced. The schedule math and the step rules live in usv_core.dmd."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..usv_core import dmd


def is_flow(model_sampling) -> bool:
    """Flow matching the way Wan, HunyuanVideo, LTX-Video and Flux are wired in ComfyUI: CONST
    noise scaling, x = sigma * noise + (1 - sigma) * x0, so a flow sigma is the model's sigma."""
    import comfy.model_sampling

    return isinstance(model_sampling, comfy.model_sampling.CONST)


def to_model_sigmas(model_sampling, flow: list[float]) -> list[float]:
    """Flow sigmas -> the model's own sigma space.

    Flow models take them as they are: the preset already carries its shift, so the model's own
    shift (ModelSamplingSD3 and friends) does not apply a second time. Other models (eps, v, EDM)
    get ComfyUI's own cross-model mapping, the denoising percent: flow time s is percent 1 - s,
    i.e. discrete timestep s * 999 on SD-style schedules (DMD2's 999, 749, 499, 249 for 1000,
    750, 500, 250), and s = 1 is the model's sigma_max."""
    if is_flow(model_sampling):
        return list(flow)
    out = []
    for s in flow:
        if s >= 1.0:
            out.append(float(model_sampling.sigma_max))  # percent 0 means "infinite" to percent_to_sigma
        elif s <= 0.0:
            out.append(0.0)
        else:
            out.append(float(model_sampling.percent_to_sigma(1.0 - s)))
    return out


class USVDMDSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        presets = "; ".join(f"{name}: {p.about}" for name, p in dmd.PRESETS.items())
        return io.Schema(
            node_id="USVDMDSigmas",
            display_name="USV DMD Sigmas",
            category="USV",
            description="The exact few-step schedule a DMD-distilled video model was trained on, in the model's "
                        "own sigma space. Pair with USV DMD Sampler (or any sampler) in SamplerCustomAdvanced, CFG 1.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("preset", options=list(dmd.PRESET_NAMES), default="fastwan-3step",
                               tooltip=f"{presets}; custom: the timesteps and shift below."),
                io.String.Input("timesteps", default="1000, 750, 500, 250",
                                tooltip="custom only: comma-separated timesteps from 1000 (noise) down, each in (0, 1000]; "
                                        "the final 0 is added."),
                io.Float.Input("shift", default=5.0, min=0.0, max=100.0, step=0.01,
                               tooltip="custom only: sigma = shift*t / (1 + (shift-1)*t) with t = timestep/1000; "
                                       "1 keeps the timesteps as they are. The model's own shift is not applied."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, preset, timesteps, shift) -> io.NodeOutput:
        flow = dmd.preset_sigmas(preset, timesteps, shift)
        sigmas = to_model_sigmas(model.get_model_object("model_sampling"), flow)
        return io.NodeOutput(torch.tensor(sigmas, dtype=torch.float32))


@torch.no_grad()  # as k-diffusion samplers: sampling never needs autograd
def sample_usv_dmd(model, x, sigmas, extra_args=None, callback=None, disable=None, mode="stochastic", noise_seed=0):
    """k-diffusion sampler signature, so that comfy.samplers.KSAMPLER can drive it."""
    from tqdm.auto import tqdm

    extra_args = {} if extra_args is None else extra_args
    model_sampling = model.inner_model.inner_model.model_sampling
    if is_flow(model_sampling):
        renoise = dmd.flow_renoise
    else:
        # eps/v models keep x = x0 + sigma * noise; let the model say how it noises.
        def renoise(x0, noise, sigma_next):
            return model_sampling.noise_scaling(sigma_next, noise, x0)

    s_in = x.new_ones([x.shape[0]])
    with tqdm(total=len(sigmas) - 1, disable=disable) as bar:  # the console bar; the UI's comes from callback
        def denoise(x_t, sigma):
            x0 = model(x_t, sigma * s_in, **extra_args)
            bar.update(1)
            return x0

        return dmd.sample(denoise, x, sigmas, mode=mode, noise_seed=noise_seed, renoise=renoise, callback=callback)


class USVDMDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USVDMDSampler",
            display_name="USV DMD Sampler",
            category="USV",
            description="Few-step sampler for DMD-distilled models: each step predicts x0, then moves to the next "
                        "sigma. Use with USV DMD Sigmas, BasicGuider (no CFG) and SamplerCustomAdvanced.",
            inputs=[
                io.Combo.Input("mode", options=list(dmd.MODES), default="stochastic",
                               tooltip="stochastic: re-noise x0 with fresh noise, as DMD models are trained; "
                                       "deterministic: keep the noise the model implied (ODE step)."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the fresh noise between steps (drawn on the CPU: same seed, same video "
                                     "on any device)."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, mode, noise_seed) -> io.NodeOutput:
        import comfy.samplers

        dmd.check_mode(mode)
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_usv_dmd, {"mode": mode, "noise_seed": noise_seed}))
