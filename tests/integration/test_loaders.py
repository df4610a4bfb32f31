"""The FP8 loaders, through the real executor: what the model holds after loading."""

from __future__ import annotations

import pytest
import torch
from helpers import FP8, effective_linears, fp8_layers
from prompts import decode_and_preview, encode, fp8_loader, our_sampler
from safetensors import safe_open

PROTECTED_IN_SD35 = ("context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0",
                     "y_embedder.mlp.2", "final_layer.linear", "final_layer.adaLN_modulation.1")


def _txt2img_with(loader: dict) -> dict:
    prompt = {"ld": loader, **encode("ld")}
    prompt["s"] = our_sampler(["ld", 0])
    prompt.update(decode_and_preview(["s", 0], ["ld", 2], "img"))
    return prompt


def _file_tensor(path, key: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


@pytest.mark.parametrize("variant", ["large", "medium"])
def test_checkpoint_loader_quantizes_blocks_and_protects_embedders(runner, fixture_files, variant):
    runner.run(_txt2img_with(fp8_loader(fixture_files[f"{variant}_all_in_one"].name)))
    model, clip, vae, report = runner.node_outputs("ld")
    linears = effective_linears(model)
    fp8 = fp8_layers(model)
    depth = fixture_files["manifest"]["files"][variant]["mmdit"]["depth"]
    assert "joint_blocks.0.x_block.attn.qkv" in fp8 and f"joint_blocks.{depth - 1}.x_block.mlp.fc2" in fp8
    if variant == "medium":
        assert "joint_blocks.0.x_block.attn2.qkv" in fp8
    for name, layer in fp8.items():
        assert layer.weight.dtype == torch.float8_e4m3fn
        assert layer.weight_scale.dtype == torch.float32
        assert tuple(layer.weight_scale.shape) == (layer.weight.shape[0], 1), name
    for name in PROTECTED_IN_SD35:
        assert linears[name].weight.dtype not in FP8, f"{name} should stay 16-bit"
    assert f"auto: detected sd35_{variant}" in report
    # pos_embed (not a Linear) is FP8 with scale 1.0, loaded as the very tensor the stream produced
    pos_embed = model.model.diffusion_model.pos_embed
    assert pos_embed.dtype == torch.float8_e4m3fn
    stored = _file_tensor(fixture_files[f"{variant}_all_in_one"], "model.diffusion_model.pos_embed")
    assert torch.equal(pos_embed.float(), stored.to(torch.float8_e4m3fn).float())
    # the report's FP8 byte total is what the FP8 layers and pos_embed really hold
    fp8_bytes = sum(m.weight.numel() + m.weight_scale.numel() * 4 for m in fp8.values()) + pos_embed.numel()
    data = model.model_options["sd35_fp8"]["report"]  # the report as data; the STRING output is its text
    assert data["n_fp8"] == len(fp8) + 1 and f"{len(fp8) + 1} fp8" in report
    assert data["fp8_bytes"] == fp8_bytes and f"fp8 layers: {fp8_bytes} bytes" in report
    image = runner.node_outputs("dec_img")[0]
    assert torch.isfinite(image).all()


def test_fp8_format_e5m2_and_per_tensor(runner, fixture_files):
    loader = fp8_loader(fixture_files["large_all_in_one"].name, fp8_format="float8_e5m2", scaling="per_tensor")
    runner.run(_txt2img_with(loader))
    model = runner.node_outputs("ld")[0]
    fp8 = fp8_layers(model)
    assert fp8 and all(m.weight.dtype == torch.float8_e5m2 and m.weight_scale.dim() == 0 for m in fp8.values())


def test_protect_patterns_keep_layers_16bit(runner, fixture_files):
    loader = fp8_loader(fixture_files["large_all_in_one"].name,
                        protect_patterns="joint_blocks.0.*\nre:joint_blocks\\.1\\.x_block\\.mlp\\.fc[12]$")
    runner.run(_txt2img_with(loader))
    fp8 = fp8_layers(runner.node_outputs("ld")[0])
    assert not [n for n in fp8 if n.startswith("joint_blocks.0.")]
    assert "joint_blocks.1.x_block.mlp.fc1" not in fp8 and "joint_blocks.1.x_block.attn.qkv" in fp8


def test_disabled_loads_as_stored(runner, fixture_files):
    runner.run(_txt2img_with(fp8_loader(fixture_files["large_all_in_one"].name, fp8_format="disabled")))
    model, _, _, report = runner.node_outputs("ld")
    assert not fp8_layers(model) and "disabled" in report


def test_diffusion_model_loader_file_and_diffusers_folder(runner, fixture_files):
    for name in (fixture_files["medium_transformer"].name, fixture_files["medium_diffusers"].name):
        prompt = {
            "ld": {"class_type": "SD35FP8DiffusionModelLoader", "inputs": {
                "model_name": name, "fp8_format": "float8_e4m3fn", "scaling": "per_channel",
                "protect_preset": "auto", "compute": "auto"}},
            "ck": {"class_type": "CheckpointLoaderSimple",
                   "inputs": {"ckpt_name": fixture_files["medium_all_in_one"].name}},
            **encode("ck"),
        }
        prompt["s"] = our_sampler(["ld", 0])
        prompt.update(decode_and_preview(["s", 0], ["ck", 2], "img"))
        runner.run(prompt)
        model, report = runner.node_outputs("ld")
        fp8 = fp8_layers(model)
        assert "joint_blocks.0.x_block.attn2.qkv" in fp8, name
        assert "auto: detected sd35_medium" in report
        assert torch.isfinite(runner.node_outputs("dec_img")[0]).all()
