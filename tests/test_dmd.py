"""DMD few-step sampling in the real ComfyUI: the presets, each step against a hand computation,
seeds, split schedules, a non-flow model, and the shipped workflow through the executor."""

import json
import os

import pytest
import torch
from torch.testing import assert_close

from harness import runtime, test_nodes, tiny_models
from harness.ui_workflow import ui_to_api
from usv_core import dmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW = os.path.join(ROOT, "workflows", "fastwan_t2v_1.3b_dmd.json")

FASTWAN = [1.0, 0.757, 0.522, 0.0]
LIGHTX2V = [1.0, 0.9375, 0.8333333, 0.625, 0.0]
LATENT = (1, 16, 2, 8, 8)  # Wan latent: batch, channels, frames, height, width


def node(comfy, name):
    return comfy.NODE_CLASS_MAPPINGS[name]


@pytest.fixture(scope="module")
def wan(comfy, tiny_wan):
    return node(comfy, "UNETLoader")().load_unet(tiny_wan, "default")[0]


@pytest.fixture(scope="module")
def cond():
    return [[tiny_models.text_conditioning(0), {}]]


def dmd_sigmas(comfy, model, preset, timesteps="1000, 750, 500, 250", shift=5.0):
    return node(comfy, "USVDMDSigmas").execute(model, preset, timesteps, shift).result[0]


def dmd_sampler(comfy, mode="stochastic", seed=0):
    return node(comfy, "USVDMDSampler").execute(mode, seed).result[0]


def recording(model):
    """A clone of `model` whose every call is recorded as (input x, sigma, denoised x0)."""
    calls = []

    def wrapper(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        calls.append((args["input"].clone(), args["timestep"].clone(), out.clone()))
        return out

    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    return m, calls


def sample(comfy, model, cond, sampler, sigmas, noise_seed=1, latent=None, noise=None):
    guider = node(comfy, "BasicGuider").execute(model, cond).result[0]
    noise = noise if noise is not None else node(comfy, "RandomNoise").execute(noise_seed).result[0]
    latent = {"samples": torch.zeros(LATENT) if latent is None else latent}
    return node(comfy, "SamplerCustomAdvanced").execute(noise, guider, sampler, sigmas, latent).result[0]["samples"]


def fresh_noise(shape, seed, sigma_next):
    """What the sampler must have drawn, computed here from the documented rule."""
    gen = torch.Generator().manual_seed(dmd.step_seed(seed, sigma_next))
    return torch.randn(shape, generator=gen)


# --- schedules --------------------------------------------------------------------------------

def test_presets_in_core():
    assert dmd.preset_sigmas("fastwan-3step") == pytest.approx(FASTWAN)
    assert dmd.preset_sigmas("lightx2v-4step") == pytest.approx(LIGHTX2V, abs=1e-6)
    assert dmd.preset_sigmas("custom", "1000, 500", 3.0) == pytest.approx([1.0, 0.75, 0.0])  # 3*.5/(1+2*.5)
    assert dmd.preset_sigmas("custom", "[1000, 757, 522,]", 1.0) == pytest.approx(FASTWAN)


def test_sigmas_node_on_wan_uses_flow_sigmas_as_is(comfy, wan):
    assert_close(dmd_sigmas(comfy, wan, "fastwan-3step"), torch.tensor(FASTWAN))
    assert_close(dmd_sigmas(comfy, wan, "lightx2v-4step"), torch.tensor(LIGHTX2V))
    assert_close(dmd_sigmas(comfy, wan, "custom", "800, 400", 1.0), torch.tensor([0.8, 0.4, 0.0]))
    # The preset carries its own shift: a ModelSamplingSD3 shift upstream must not apply twice.
    shifted = node(comfy, "ModelSamplingSD3")().patch(wan, 8.0)[0]
    assert_close(dmd_sigmas(comfy, shifted, "lightx2v-4step"), torch.tensor(LIGHTX2V))
    assert dmd_sigmas(comfy, wan, "fastwan-3step").dtype == torch.float32


@pytest.mark.parametrize("timesteps, shift, words", [
    ("", 5.0, "empty"),
    ("1000, abc", 5.0, "'abc' is not a number"),
    ("1200, 500", 5.0, "outside 0..1000"),
    ("1000, -5", 5.0, "outside 0..1000"),
    ("500, 750", 5.0, "decrease"),
    ("750, 750", 5.0, "decrease"),
    ("1000, 500, 0", 5.0, "remove the 0"),
    ("1000, nan", 5.0, "finite"),
    ("1000, 500", 0.0, "shift must be a positive"),
    ("1000, 500", -1.0, "shift must be a positive"),
])
def test_custom_errors_say_what_to_change(comfy, wan, timesteps, shift, words):
    with pytest.raises(ValueError, match=words):
        dmd_sigmas(comfy, wan, "custom", timesteps, shift)


def test_presets_ignore_custom_fields(comfy, wan):
    assert_close(dmd_sigmas(comfy, wan, "fastwan-3step", "not used", 0.0), torch.tensor(FASTWAN))
    with pytest.raises(ValueError, match="unknown mode"):
        dmd_sampler(comfy, "ancestral")


# --- the step rules, by hand ------------------------------------------------------------------

def test_stochastic_steps_match_hand_computation(comfy, wan, cond):
    model, calls = recording(wan)
    sigmas = dmd_sigmas(comfy, wan, "fastwan-3step")
    seed = 7
    out = sample(comfy, model, cond, dmd_sampler(comfy, "stochastic", seed), sigmas, noise_seed=3)

    assert [float(c[1]) for c in calls] == pytest.approx(FASTWAN[:-1])
    initial = torch.randn(LATENT, generator=torch.manual_seed(3))  # RandomNoise's noise; sigma 1 is pure noise
    assert_close(calls[0][0], initial)
    for i in range(len(calls) - 1):
        x0, s_next = calls[i][2], sigmas[i + 1]
        expected = (1 - s_next) * x0 + s_next * fresh_noise(LATENT, seed, s_next)
        assert_close(calls[i + 1][0], expected)
    # The last step (to sigma 0) returns x0 itself; the latent leaves in the user's latent space.
    assert_close(out, wan.model.process_latent_out(calls[-1][2]))


def test_deterministic_steps_match_hand_computation(comfy, wan, cond):
    model, calls = recording(wan)
    sigmas = dmd_sigmas(comfy, wan, "lightx2v-4step")
    out = sample(comfy, model, cond, dmd_sampler(comfy, "deterministic", 0), sigmas)
    assert len(calls) == 4
    for i in range(len(calls) - 1):
        x, x0 = calls[i][0], calls[i][2]
        s, s_next = sigmas[i], sigmas[i + 1]
        assert_close(calls[i + 1][0], x0 + s_next * (x - x0) / s)
    assert_close(out, wan.model.process_latent_out(calls[-1][2]))


def test_callback_reports_every_step(comfy, wan, cond):
    model, calls = recording(wan)
    guider = node(comfy, "BasicGuider").execute(model, cond).result[0]
    seen = []
    noise = torch.randn(LATENT, generator=torch.manual_seed(0))
    guider.sample(noise, torch.zeros(LATENT), dmd_sampler(comfy), dmd_sigmas(comfy, wan, "fastwan-3step"),
                  callback=lambda step, x0, x, total: seen.append((step, x0.clone(), x.clone(), total)), seed=0)
    assert [(s[0], s[3]) for s in seen] == [(0, 3), (1, 3), (2, 3)]
    for (_, x0, x, _), (x_in, _, denoised) in zip(seen, calls):
        assert_close(x0, denoised)
        assert_close(x, x_in)


def test_step_noise_is_cpu_noise_from_the_seed_and_never_the_initial_noise():
    n = dmd.step_noise(LATENT, 5, torch.tensor(0.757))
    assert_close(n, fresh_noise(LATENT, 5, 0.757))
    assert not torch.equal(n, dmd.step_noise(LATENT, 5, torch.tensor(0.522)))
    assert not torch.equal(n, torch.randn(LATENT, generator=torch.manual_seed(5)))  # RandomNoise(5)


# --- seeds ------------------------------------------------------------------------------------

def test_same_seed_same_video_and_different_seeds_differ(comfy, wan, cond):
    sigmas = dmd_sigmas(comfy, wan, "fastwan-3step")
    a = sample(comfy, wan, cond, dmd_sampler(comfy, seed=11), sigmas, noise_seed=1)
    b = sample(comfy, wan, cond, dmd_sampler(comfy, seed=11), sigmas, noise_seed=1)
    c = sample(comfy, wan, cond, dmd_sampler(comfy, seed=12), sigmas, noise_seed=1)
    d = sample(comfy, wan, cond, dmd_sampler(comfy, seed=11), sigmas, noise_seed=2)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert (a - d).abs().max() > 1e-3


def test_split_schedule_draws_the_same_noise_as_the_whole(comfy, wan, cond):
    """Wan 2.2's two experts split one schedule over two samplers; the result must not change."""
    sigmas = dmd_sigmas(comfy, wan, "lightx2v-4step")
    whole = sample(comfy, wan, cond, dmd_sampler(comfy, seed=4), sigmas, noise_seed=1)
    high, low = node(comfy, "SplitSigmas").execute(sigmas, 2).result
    first = sample(comfy, wan, cond, dmd_sampler(comfy, seed=4), high, noise_seed=1)
    no_noise = node(comfy, "DisableNoise").execute().result[0]
    second = sample(comfy, wan, cond, dmd_sampler(comfy, seed=4), low, latent=first, noise=no_noise)
    assert_close(second, whole, atol=1e-4, rtol=1e-4)


# --- where KSampler users are -----------------------------------------------------------------

def test_usv_dmd_is_not_patched_into_ksampler_and_lcm_covers_lightx2v(comfy, wan):
    """No API registers a KSampler sampler (it would mean patching comfy.k_diffusion.sampling);
    the README points KSampler users at lcm + simple + shift 5, which is lightx2v-4step exactly."""
    import comfy.samplers as samplers

    assert "usv_dmd" not in samplers.KSampler.SAMPLERS
    assert "lcm" in samplers.KSampler.SAMPLERS
    shifted = node(comfy, "ModelSamplingSD3")().patch(wan, 5.0)[0]
    simple = samplers.calculate_sigmas(shifted.get_model_object("model_sampling"), "simple", 4)
    assert_close(simple.float(), torch.tensor(LIGHTX2V))


# --- a model that is not flow matching --------------------------------------------------------

def test_eps_model_gets_its_own_sigmas_and_noising(comfy):
    sd15 = tiny_models.tiny_sd15()
    ms = sd15.get_model_object("model_sampling")
    sigmas = dmd_sigmas(comfy, sd15, "custom", "1000, 750, 500, 250", 1.0)
    # Flow time t is ComfyUI's denoising percent 1 - t: discrete timestep t * 999.
    expected = [float(ms.sigma_max)] + [float(ms.sigma(torch.tensor(t * 999.0))) for t in (0.75, 0.5, 0.25)] + [0.0]
    assert_close(sigmas, torch.tensor(expected))
    assert float(sigmas[0]) > 10  # SD1.5's sigma_max is about 14.6, not the flow model's 1.0

    model, calls = recording(sd15)
    cond = [[torch.randn(1, 77, 768, generator=torch.manual_seed(0)), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    out = sample(comfy, model, cond, dmd_sampler(comfy, "stochastic", 9), sigmas, latent=latent)
    assert len(calls) == 4
    for i in range(len(calls) - 1):
        s_next = sigmas[i + 1]
        # eps models keep x = x0 + sigma * noise: no (1 - sigma) factor on x0
        assert_close(calls[i + 1][0], calls[i][2] + s_next * fresh_noise(latent.shape, 9, s_next))
    assert_close(out, sd15.model.process_latent_out(calls[-1][2]))


# --- the shipped workflow ---------------------------------------------------------------------

def load_workflow():
    with open(WORKFLOW) as f:
        return json.load(f)


def test_workflow_file_matches_the_nodes(comfy):
    wf = load_workflow()
    assert wf["version"] == 0.4 and wf["last_node_id"] == max(n["id"] for n in wf["nodes"])
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    prompt = ui_to_api(comfy, wf)
    by_type = {v["class_type"]: v["inputs"] for v in prompt.values()}
    assert by_type["USVDMDSigmas"]["preset"] == "fastwan-3step"
    assert by_type["EmptyHunyuanLatentVideo"] == {"width": 832, "height": 480, "length": 81, "batch_size": 1}
    assert by_type["UNETLoader"]["unet_name"].startswith("FastWan2.1-T2V-1.3B")
    assert by_type["CLIPLoader"]["type"] == "wan"
    for v in prompt.values():  # every combo value is one the node offers (model files aside)
        spec = node(comfy, v["class_type"]).INPUT_TYPES()
        for name, value in v["inputs"].items():
            entry = spec.get("required", {}).get(name) or spec.get("optional", {}).get(name)
            options = entry[0] if isinstance(entry[0], list) else (entry[1].get("options") if len(entry) > 1 else None)
            if options and not name.endswith("_name"):
                assert value in options, f"{v['class_type']}.{name} = {value!r}"


def test_workflow_runs_through_the_executor_on_tiny_models(comfy, tiny_wan, tiny_vae):
    prompt = ui_to_api(comfy, load_workflow())
    for key, v in list(prompt.items()):
        t = v["class_type"]
        if t == "UNETLoader":
            v["inputs"]["unet_name"] = tiny_wan
        elif t == "VAELoader":
            v["inputs"]["vae_name"] = tiny_vae
        elif t == "CLIPLoader":
            del prompt[key]
        elif t == "CLIPTextEncode":  # no text encoder here: a conditioning tensor stands in
            prompt[key] = {"class_type": "USVTestConditioning",
                           "inputs": {"name": test_nodes.put_tensor(tiny_models.text_conditioning(0))}}
        elif t == "EmptyHunyuanLatentVideo":
            v["inputs"].update(width=32, height=32, length=5)
    result = runtime.run_workflow(prompt)
    sampler_id = next(k for k, v in prompt.items() if v["class_type"] == "SamplerCustomAdvanced")
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveVideo")
    latent = result.output(sampler_id)["samples"]
    assert latent.shape == (1, 16, 2, 4, 4) and torch.isfinite(latent).all()
    saved = result.outputs[save_id]["images"][0]
    assert saved["filename"].endswith(".mp4")


@pytest.mark.server
def test_server_lists_dmd_nodes_with_their_widget_order(comfy_server):
    info = comfy_server.object_info()
    sigmas, sampler = info["USVDMDSigmas"], info["USVDMDSampler"]
    assert sigmas["display_name"] == "USV DMD Sigmas" and sigmas["output"] == ["SIGMAS"]
    assert sigmas["input_order"]["required"] == ["model", "preset", "timesteps", "shift"]
    assert sampler["display_name"] == "USV DMD Sampler" and sampler["output"] == ["SAMPLER"]
    assert sampler["input_order"]["required"] == ["mode", "noise_seed"]
    assert sampler["input"]["required"]["noise_seed"][1]["control_after_generate"] is True
    assert "usv_dmd" not in info["KSampler"]["input"]["required"]["sampler_name"][0]
