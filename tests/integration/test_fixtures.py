"""The tiny fixtures are SD3.5 as far as ComfyUI's own model detection can tell."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file


@pytest.mark.parametrize("variant", ["large", "medium", "large_turbo", "large_t5xxl"])
def test_all_in_one_detected_as_sd3(comfy_nodes, fixture_files, variant):
    import comfy.model_detection
    import comfy.supported_models

    sd = load_file(str(fixture_files[f"{variant}_all_in_one"]))
    config = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    expected = fixture_files["manifest"]["files"][variant]["mmdit"]
    assert type(config) is comfy.supported_models.SD3
    assert config.unet_config["depth"] == expected["depth"]
    assert config.unet_config["qk_norm"] == "rms"
    assert config.unet_config["x_block_self_attn_layers"] == expected["x_block_self_attn_layers"]
    assert config.unet_config["pos_embed_max_size"] == expected["pos_embed_max_size"]
    clip_target = config.clip_target(sd)
    assert clip_target is not None
    assert all(torch.isfinite(t.float()).all() for t in sd.values() if t.is_floating_point())


def test_t5xxl_fixture_is_what_comfyui_detects_and_builds_as_t5xxl(comfy_nodes, fixture_files):
    """The T5 in text_encoders/ and in the all-in-one: ComfyUI's CLIP loaders call it T5-XXL; its keys and shapes
    are those of ComfyUI's own T5-XXL with the fixture's override (real width and vocabulary)."""
    import comfy.sd

    from tools import tiny_sd35

    sd = load_file(str(fixture_files["t5xxl_text_encoder"]))
    assert comfy.sd.detect_te_model(sd) == comfy.sd.TEModel.T5_XXL
    built = tiny_sd35.build_t5xxl(tiny_sd35.TINY_T5XXL).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in built.items()}
    assert sd["shared.weight"].shape == (32128, 4096) and "encoder.block.23.layer.1.DenseReluDense.wi_1.weight" in sd
    assert sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape == (32, 2)
    with safe_open(str(fixture_files["large_t5xxl_all_in_one"]), "pt") as f:
        prefix = "text_encoders.t5xxl.transformer."
        assert {k[len(prefix):] for k in f.keys() if k.startswith(prefix)} == set(sd)
        assert torch.equal(f.get_tensor(prefix + "shared.weight"), sd["shared.weight"])


@pytest.mark.parametrize("variant", ["large", "medium"])
def test_transformer_only_detected_as_sd3(comfy_nodes, fixture_files, variant):
    import comfy.model_detection
    import comfy.supported_models

    sd = load_file(str(fixture_files[f"{variant}_transformer"]))
    config = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(config) is comfy.supported_models.SD3
    assert config.unet_config["depth"] == fixture_files["manifest"]["files"][variant]["mmdit"]["depth"]


def test_diffusers_folder_converts_to_comfy_sd3(comfy_nodes, fixture_files):
    import comfy.model_detection
    import comfy.supported_models

    folder = fixture_files["medium_diffusers"] / "transformer"
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1, "fixture should exercise sharded weights"
    raw = {}
    for shard in shards:
        raw.update(load_file(str(shard)))
    sd = comfy.model_detection.convert_diffusers_mmdit(raw, "")
    config = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(config) is comfy.supported_models.SD3
    assert config.unet_config["x_block_self_attn_layers"] == [0, 1]
    assert config.unet_config["qk_norm"] == "rms"
