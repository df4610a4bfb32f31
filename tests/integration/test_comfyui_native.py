"""compute=comfyui_native: the loaders hand ComfyUI its own FP8 layout (nodes/native.py).

The same plan and report as the pack's own layers, the same FP8 bits, but the model is built from ComfyUI's
mixed-precision ops, as a stock loader builds it from a file Save FP8 Model wrote; on ComfyUI 0.8.0, also in
FP8-device mode. ComfyUI 0.3.75 refuses it, saying what to do."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import fp8_layers, host_quantized_layers
from prompts import dm_loader, encode, fp8_loader, ksampler, quantize_model, show

from tools import comfy_host

NATIVE = {"compute": "comfyui_native", "scaling": "per_tensor"}
on_0_8 = pytest.mark.skipif(comfy_host.host_version() == "0.3.75", reason="ComfyUI 0.8+ only (0.3.75: the error test)")


def error_of(runner, prompt: dict) -> str:
    with pytest.raises(comfy_host.PromptError) as caught:
        runner.run(prompt)
    return str(caught.value)


def _denoise(patcher) -> torch.Tensor:
    import comfy.model_management

    dm = patcher.model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(1, dm.x_embedder.proj.in_channels, 8, 8, generator=gen),
              "timesteps": torch.tensor([500.0]),
              "context": torch.randn(1, 7, dm.context_embedder.in_features, generator=gen),
              "y": torch.randn(1, dm.y_embedder.mlp[0].in_features, generator=gen)}
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        patcher.patch_model(torch.device("cpu"), lowvram_model_memory=0)
        try:
            return dm(**inputs).float()
        finally:
            patcher.unpatch_model(torch.device("cpu"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@on_0_8
@pytest.mark.parametrize("loader", ["checkpoint", "diffusion"])
def test_native_model_is_comfyuis_own_fp8_layers_with_our_plan(runner, fixture_files, pack, loader):
    if loader == "checkpoint":
        name = fixture_files["large_all_in_one"].name
        make, report_out = fp8_loader, 3
    else:
        name = fixture_files["large_transformer"].name
        make, report_out = dm_loader, 1
    prompt = {"ours": make(name, scaling="per_tensor", compute="weight_only"), "native": make(name, **NATIVE),
              "o1": show(["ours", report_out]), "o2": show(["native", report_out])}
    runner.run(prompt)
    ours, native = runner.node_outputs("ours")[0], runner.node_outputs("native")[0]
    assert runner.node_outputs("ours")[report_out] == runner.node_outputs("native")[report_out].replace(
        "comfyui_native", "weight_only")  # one plan, one report
    own_layers = sorted(fp8_layers(ours))
    assert own_layers and sorted(host_quantized_layers(native)) == own_layers
    linear = importlib.import_module("sd35_fp8.nodes.fp8_ops").FP8OpsLinear
    assert not any(isinstance(m, linear) for m in native.model.diffusion_model.modules())
    dm = native.model.diffusion_model
    assert dm.final_layer.linear.weight.dtype in (torch.float16, torch.bfloat16, torch.float32)  # protected: 16-bit
    assert dm.pos_embed.dtype == torch.float8_e4m3fn  # the table stays FP8, as with our layers
    fp8_weight = importlib.import_module("sd35_fp8.nodes.host_fp8").fp8_weight
    for layer in own_layers:  # the same bits and scale as our layer holds
        qdata, scale = fp8_weight(dm.get_submodule(layer), layer)
        mine = ours.model.diffusion_model.get_submodule(layer)
        assert torch.equal(qdata.view(torch.uint8).cpu(), mine.weight.view(torch.uint8).cpu()), layer
        assert torch.equal(scale.float().cpu().reshape(()), mine.weight_scale.cpu().reshape(())), layer
    difference = _rel(_denoise(native), _denoise(ours))
    print(f"native vs our layers, one call: {difference:.2e}")
    assert difference < 1e-3, difference  # one dequantize-then-matmul each (0.8 honours the 16-bit marking)


@on_0_8
def test_native_model_samples_takes_a_lora_and_saves(runner, comfy_base, fixture_files, tiny_lora):
    from safetensors import safe_open

    ckpt = fixture_files["large_all_in_one"].name
    save = {"model": ["ld", 0], "filename_prefix": "diffusion_models/native"}
    prompt = {"ld": fp8_loader(ckpt, **NATIVE), **encode("ld"),
              "lora": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["ld", 0], "lora_name": tiny_lora,
                                                                       "strength_model": 1.0}},
              "ks": ksampler(["lora", 0]), "o": show(["ks", 0]),
              "save": {"class_type": "SD35FP8SaveModel", "inputs": save}}
    runner.run(prompt)
    latent = runner.node_outputs("ks")[0]["samples"]
    assert latent.shape[-1] == 8 and bool(torch.isfinite(latent).all())
    (path,) = sorted((comfy_base / "output" / "diffusion_models").glob("native_*.safetensors"))
    with safe_open(str(path), "pt") as f:
        saved = {k.removesuffix(".weight_scale") for k in f.keys() if k.endswith(".weight_scale")}
    assert saved and saved == host_quantized_layers(runner.node_outputs("ld")[0])


@on_0_8
@pytest.mark.parametrize(("change", "message"), [
    ({"scaling": "per_channel"}, "scaling: compute=comfyui_native"),
    ({"fp8_format": "float8_e5m2"}, "fp8_format: compute=comfyui_native")])
def test_native_settings_it_cannot_hold_are_clear_errors(runner, fixture_files, change, message):
    text = error_of(runner, {"ld": dm_loader(fixture_files["large_transformer"].name, **{**NATIVE, **change}),
                             "out": show(["ld", 1])})
    assert message in text and ("set scaling to per_tensor" in text or "set fp8_format to float8_e4m3fn" in text)


def test_quantize_model_does_not_offer_native(runner, fixture_files):
    text = error_of(runner, {"ld": dm_loader(fixture_files["large_transformer"].name),
                             "q": quantize_model(["ld", 0], compute="comfyui_native"), "out": show(["q", 1])})
    assert "compute" in text and "comfyui_native" in text


@pytest.mark.skipif(comfy_host.host_version() != "0.3.75", reason="the refusal of a host older than 0.8")
def test_native_on_comfyui_0_3_75_is_a_clear_error(runner, fixture_files):
    text = error_of(runner, {"ld": dm_loader(fixture_files["large_transformer"].name, **NATIVE),
                             "out": show(["ld", 1])})
    assert "compute: comfyui_native needs ComfyUI 0.8 or newer" in text and "compute=auto" in text
