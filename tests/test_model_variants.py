"""What USV says about the model families and Wan variants of newer ComfyUI releases: each is named,
Model Info says whether USV serves it, and the patch nodes refuse the ones it does not with the
reason, instead of a generic message."""

import pytest
import torch

WAN_TINY = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "dim": 256, "ffn_dim": 512,
            "freq_dim": 256, "in_dim": 16, "num_heads": 2, "num_layers": 2, "out_dim": 16, "text_dim": 4096,
            "eps": 1e-6}


def patcher(model):
    import comfy.model_patcher

    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def wan_of(config_name, **extra):
    import comfy.supported_models

    config_class = getattr(comfy.supported_models, config_name, None)
    if config_class is None:
        pytest.skip(f"this ComfyUI has no {config_name}")
    return patcher(config_class({**WAN_TINY, **extra}).get_model({}, device=torch.device("cpu")))


def info(comfy_nodes, model) -> str:
    return comfy_nodes.NODE_CLASS_MAPPINGS["USVModelInfo"].execute(model).result[0]


def refuse(comfy_nodes, model) -> str:
    with pytest.raises(ValueError) as e:
        comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"].execute(model, 0.25, 1, "", "4x4x4")
    return str(e.value)


@pytest.mark.parametrize("config_name,variant", [("WAN21_FlowRVS", "flowrvs"), ("WAN22_WanDancer", "wandancer")])
def test_newer_wan_variants_on_the_plain_grid_are_served(comfy_nodes, config_name, variant):
    extra = {"model_type": "wandancer", "in_dim": 36} if variant == "wandancer" else {}
    model = wan_of(config_name, **extra)
    text = info(comfy_nodes, model)
    assert f"({variant})" in text and "USV can patch it" in text, text
    comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"].execute(model, 0.25, 1, "", "4x4x4")


def test_causal_ar_wan_is_named_and_refused_with_the_reason(comfy_nodes):
    model = wan_of("WAN21_CausalAR_T2V")
    text = info(comfy_nodes, model)
    assert "(causal AR)" in text and "USV cannot patch it" in text and "cache" in text, text
    assert "causal AR variant is not served" in refuse(comfy_nodes, model)


def test_an_unknown_wan_config_is_named_by_its_class(comfy_nodes):
    import comfy.supported_models

    class WAN99_Future(comfy.supported_models.WAN21_T2V):
        pass

    model = patcher(WAN99_Future(dict(WAN_TINY)).get_model({}, device=torch.device("cpu")))
    text = info(comfy_nodes, model)
    assert "WAN99_Future, WanModel" in text and "USV can patch it" in text, text


def test_kandinsky5_is_named_as_not_supported(comfy_nodes):
    import comfy.supported_models

    if not hasattr(comfy.supported_models, "Kandinsky5"):
        pytest.skip("this ComfyUI has no Kandinsky 5")
    config = comfy.supported_models.Kandinsky5({"image_model": "kandinsky5", "model_dim": 128, "ff_dim": 256,
                                                "time_dim": 64, "num_text_blocks": 1, "num_visual_blocks": 1,
                                                "in_text_dim": 64, "in_text_dim2": 32, "axes_dims": (16, 24, 24)})
    model = patcher(config.get_model({}, device=torch.device("cpu")))
    text = info(comfy_nodes, model)
    assert "Kandinsky 5" in text and "not supported" in text and "USV cannot patch it" in text, text
    assert "Kandinsky 5 video is not supported yet" in refuse(comfy_nodes, model)
