"""The tiny fixtures are SD3.5 as far as ComfyUI's own model detection can tell."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.parametrize("variant", ["large", "medium", "large_turbo"])
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
