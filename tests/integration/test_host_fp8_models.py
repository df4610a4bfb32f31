"""Models a stock loader made from an FP8 file: the host's own FP8 layers (ComfyUI 0.3.75: scaled_fp8 ops,
0.8.0: QuantizedTensor weights) are recognised by Quantize Model, Save FP8 Model and the reports."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import host_quantized_layers, write_legacy_scaled_fp8
from prompts import decode_and_preview, encode, ksampler, quantize_model
from safetensors import safe_open

from tools import comfy_host


@pytest.fixture(scope="module")
def legacy_file(comfy_base, fixture_files, tmp_path_factory):
    path = tmp_path_factory.mktemp("legacy") / "tiny_sd35_large_scaled_fp8.safetensors"
    tensors = write_legacy_scaled_fp8(fixture_files["large_transformer"], path)
    name = comfy_host.link_model(comfy_base, "diffusion_models", path)
    import folder_paths

    folder_paths.filename_list_cache.clear()
    return name, tensors


def _saved(comfy_base, prefix: str):
    (path,) = sorted((comfy_base / "output").glob(f"{prefix}_*.safetensors"))
    return path


@pytest.mark.parametrize("through_quantize", [True, False], ids=["quantize_then_save", "save"])
def test_stock_loaded_scaled_fp8_model_is_reported_and_saved_as_fp8(runner, comfy_base, fixture_files, legacy_file,
                                                                     through_quantize):
    name, legacy = legacy_file
    fp8_keys = [k[: -len(".scale_weight")] for k in legacy if k.endswith(".scale_weight")]
    prefix = f"host_fp8_{'q' if through_quantize else 's'}"
    prompt = {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
              "q": quantize_model(["unet", 0]),
              "save": {"class_type": "SD35FP8SaveModel", "inputs": {
                  "model": ["q" if through_quantize else "unet", 0], "filename_prefix": prefix, "layout": "auto"}}}
    if not through_quantize:
        del prompt["q"]
    runner.run(prompt)
    # 0.8.0 converts legacy files into its mixed-precision ops (QuantizedTensor weights, the rest 16-bit);
    # 0.3.75's legacy ops cast every Linear to float8, the ones without a scale_weight with a scale of 1.0
    if comfy_host.host_version() == "0.8.0":
        assert set(fp8_keys) == host_quantized_layers(runner.node_outputs("unet")[0])
    held = len(fp8_keys) if comfy_host.host_version() == "0.8.0" else len(fp8_keys) + 7  # + embedders, final
    if through_quantize:
        report = runner.node_outputs("q")[1]
        assert f"already holds {held} FP8 layer(s)" in report and f"{held} already fp8" in report
        line = next(line for line in report.splitlines() if "joint_blocks.0.x_block.attn.qkv " in line)
        assert "float8_e4m3fn" in line and "kept" in line
    with safe_open(str(_saved(comfy_base, prefix)), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        for key in fp8_keys:  # passed through: the same bits and the same scale, in our layout
            assert layers[key]["format"] == "float8_e4m3fn"
            saved, source = f.get_tensor(f"{key}.weight"), legacy[f"{key}.weight"]
            assert torch.equal(saved.view(torch.uint8), source.view(torch.uint8))
            assert torch.equal(f.get_tensor(f"{key}.weight_scale"), legacy[f"{key}.scale_weight"])
        assert not [k for k in f.keys() if k.endswith((".scale_weight", ".comfy_quant", "scaled_fp8"))]
        assert len(layers) == held


def test_saved_host_fp8_model_samples_like_the_source(runner, comfy_base, fixture_files, legacy_file):
    """Save FP8 Model on the stock-loaded legacy model (stock layout) -> stock UNETLoader samples as the source."""
    name, _ = legacy_file
    runner.run({"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
                "save": {"class_type": "SD35FP8SaveModel", "inputs": {"model": ["unet", 0],
                                                                      "filename_prefix": "host_fp8_stock"}}})
    saved = comfy_host.link_model(comfy_base, "diffusion_models", _saved(comfy_base, "host_fp8_stock"))
    import folder_paths

    folder_paths.filename_list_cache.clear()
    ckpt = fixture_files["large_all_in_one"].name
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **encode("ck"),
              "src": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
              "out": {"class_type": "UNETLoader", "inputs": {"unet_name": saved, "weight_dtype": "default"}}}
    prompt["ks_src"], prompt["ks_out"] = ksampler(["src", 0]), ksampler(["out", 0])
    prompt.update(decode_and_preview(["ks_out", 0], ["ck", 2], "saved"))
    prompt.update(decode_and_preview(["ks_src", 0], ["ck", 2], "source"))
    runner.run(prompt)
    src, out = runner.node_outputs("ks_src")[0]["samples"], runner.node_outputs("ks_out")[0]["samples"]
    # The same weights, computed alike: within 1%. Except where the source runs FP8 x FP8 and the saved file does
    # not: 0.3.75's legacy scaled_fp8 ops on an FP8 device round every activation to e4m3 (scale 1.0), while its
    # mixed-precision ops multiply our file's layers in 16-bit (they take the FP8 route only with an input_scale).
    fp8_activations = comfy_host.host_version() == "0.3.75" and comfy_host.fp8_device_mode()
    assert torch.isfinite(out).all() and float((out - src).norm() / src.norm()) < (0.06 if fp8_activations else 1e-2)
