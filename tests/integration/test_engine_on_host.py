"""Engine facts that need ComfyUI's own classes: full-size architectures, legacy and re-loaded FP8 files."""

from __future__ import annotations

import pytest
import torch
from helpers import fp8_layers, host_quantized_layers, write_legacy_scaled_fp8
from prompts import decode_and_preview, encode, ksampler

import tools
from tools import comfy_host
from tools.tiny_sd35 import build_mmdit


def _quant(pack):
    import importlib

    return importlib.import_module("sd35_fp8.quant")


@pytest.mark.parametrize(("variant", "depth", "hidden", "attn2"), [
    ("sd35_large", 38, 2432, ()), ("sd35_medium", 24, 1536, tuple(range(13)))])
def test_auto_detects_full_size_architectures_on_meta(comfy_nodes, pack, variant, depth, hidden, attn2):
    quant = _quant(pack)
    model = build_mmdit(variant)  # meta device: no memory
    shapes = {k: tuple(t.shape) for k, t in [*model.named_parameters(), *model.named_buffers()]}
    policy = quant.resolve_policy(quant.QuantConfig(), shapes)
    v = policy.variant
    assert (v.name, v.depth, v.hidden, v.qk_norm, v.attn2_blocks) == (variant, depth, hidden, True, attn2)
    assert policy.rule.startswith(f"auto: detected {variant}")
    params = sum(torch.Size(s).numel() for s in shapes.values())
    assert (8.0e9 if variant == "sd35_large" else 2.4e9) < params < (8.3e9 if variant == "sd35_large" else 2.6e9)


def test_legacy_scaled_fp8_file_loads_through_our_loader(runner, comfy_base, fixture_files, tmp_path):
    """An older-ComfyUI scaled_fp8 diffusion model: marker tensor, per-tensor scale_weight, fp8 biases."""
    path = tmp_path / "tiny_sd35_large_scaled_fp8.safetensors"
    legacy = write_legacy_scaled_fp8(fixture_files["large_transformer"], path)
    name = comfy_host.link_model(comfy_base, "diffusion_models", path)
    import folder_paths

    folder_paths.filename_list_cache.clear()
    ckpt = fixture_files["large_all_in_one"].name
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **encode("ck"),
              "ld": {"class_type": "SD35FP8DiffusionModelLoader", "inputs": {
                  "model_name": name, "fp8_format": "float8_e4m3fn", "scaling": "per_channel",
                  "protect_preset": "auto", "compute": "auto"}}}
    prompt["ks"] = ksampler(["ld", 0])
    prompt["ks16"] = ksampler(["ck", 0])
    prompt.update(decode_and_preview(["ks", 0], ["ck", 2], "legacy"))
    prompt.update(decode_and_preview(["ks16", 0], ["ck", 2], "fp16"))
    runner.run(prompt)
    model, report = runner.node_outputs("ld")
    held = sum(k.endswith(".scale_weight") for k in legacy)
    assert f"already holds {held} FP8 layer(s)" in report and len(fp8_layers(model)) == held
    ours, ref = runner.node_outputs("ks")[0]["samples"], runner.node_outputs("ks16")[0]["samples"]
    assert torch.isfinite(ours).all() and float((ours - ref).norm() / ref.norm()) < 0.1


def test_cli_converted_checkpoint_loads_with_stock_checkpoint_loader(runner, comfy_base, fixture_files, tmp_path):
    """`sd35-fp8 convert` on an all-in-one file: stock CheckpointLoaderSimple reads its FP8 layers."""
    import subprocess

    import folder_paths

    out = tmp_path / "tiny_sd35_large_cli_fp8.safetensors"
    done = subprocess.run(tools.engine_cli("convert", str(fixture_files["large_all_in_one"]), str(out)),
                          cwd=tools.REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    name = comfy_host.link_model(comfy_base, "checkpoints", out)
    folder_paths.filename_list_cache.clear()
    ckpt = fixture_files["large_all_in_one"].name
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **encode("ck"),
              "stock8": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
              "ours": {"class_type": "SD35FP8CheckpointLoader", "inputs": {
                  "ckpt_name": ckpt, "fp8_format": "float8_e4m3fn", "scaling": "per_channel",
                  "protect_preset": "auto", "compute": "auto", "text_encoder_fp8": "none"}}}
    prompt["ks_stock"] = ksampler(["stock8", 0])
    prompt["ks_ours"] = ksampler(["ours", 0])
    prompt.update(decode_and_preview(["ks_stock", 0], ["ck", 2], "stock"))
    prompt.update(decode_and_preview(["ks_ours", 0], ["ck", 2], "ours"))
    runner.run(prompt)
    stock_model = runner.node_outputs("stock8")[0]
    # the host's own mixed-precision ops read the layers (0.3.75 by their relative names, 0.8.0 by the prefixed)
    assert "joint_blocks.0.x_block.attn.qkv" in host_quantized_layers(stock_model)
    stock, ours = runner.node_outputs("ks_stock")[0]["samples"], runner.node_outputs("ks_ours")[0]["samples"]
    assert float((stock - ours).norm() / ours.norm()) < 1e-2
