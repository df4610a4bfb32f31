"""What only an FP8 GPU or a small card shows, with the host deciding as on one.

`make test` runs the integration suite on each host twice: as it is (the CPU's decisions) and in
FP8-device mode (--supports-fp8-compute: `supports_fp8_compute()` is True, so `unet_dtype()` picks
float8 for a mostly-FP8 state dict). The small-card route (free memory under 2 bytes a parameter)
is taken here by giving the host a device with almost no memory for weights.
"""

from __future__ import annotations

import pytest
import torch
from helpers import FP8, effective_linears, fp8_layers
from prompts import dm_loader, encode, fp8_loader, ksampler

from tools import comfy_host


def _wide_everywhere_but_fp8_layers(model) -> None:
    """Protected layers, biases, norms, embedders stay 16/32-bit; float8 only in FP8 layers and pos_embed."""
    fp8 = fp8_layers(model)
    assert fp8, "no FP8 layer"
    for name, module in effective_linears(model).items():
        if name not in fp8:
            assert module.weight.dtype not in FP8, f"protected layer {name} is {module.weight.dtype}"
        if module.bias is not None:
            assert module.bias.dtype not in FP8, f"bias of {name} is {module.bias.dtype}"
    for name, tensor in model.model.diffusion_model.state_dict().items():
        layer = name.rsplit(".", 1)[0]
        if layer not in fp8 and name != "pos_embed":
            assert tensor.dtype not in FP8, f"{name} is {tensor.dtype}"
    for name in ("context_embedder", "final_layer.linear", "x_embedder.proj"):
        assert name not in fp8


def test_host_mode_is_what_the_run_asked_for(comfy_nodes):
    import comfy.model_management

    assert comfy.model_management.supports_fp8_compute() is comfy_host.fp8_device_mode()
    # the decision the loaders must not inherit: a mostly-FP8 model would be built in float8 on this device
    fp8_pick = comfy.model_management.unet_dtype(model_params=1000, weight_dtype=torch.float8_e4m3fn)
    assert (fp8_pick == torch.float8_e4m3fn) is comfy_host.fp8_device_mode()


@pytest.mark.parametrize("loader", ["checkpoint", "diffusion_model"])
def test_protected_layers_and_biases_stay_16bit_and_sampling_matches(runner, fixture_files, loader):
    ckpt = fixture_files["large_all_in_one"].name
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **encode("ck"),
              "ld": fp8_loader(ckpt) if loader == "checkpoint" else dm_loader(fixture_files["large_transformer"].name)}
    prompt["ks8"], prompt["ks16"] = ksampler(["ld", 0]), ksampler(["ck", 0])
    prompt["o8"] = {"class_type": "PreviewAny", "inputs": {"source": ["ks8", 0]}}
    prompt["o16"] = {"class_type": "PreviewAny", "inputs": {"source": ["ks16", 0]}}
    runner.run(prompt)
    _wide_everywhere_but_fp8_layers(runner.node_outputs("ld")[0])
    ours, ref = runner.node_outputs("ks8")[0]["samples"], runner.node_outputs("ks16")[0]["samples"]
    assert torch.isfinite(ours).all() and float((ours - ref).norm() / ref.norm()) < 0.05


def test_small_card_route_keeps_protected_layers_16bit(runner, fixture_files, monkeypatch):
    """A card with less free memory than 2 bytes a parameter: `unet_dtype()` picks float8 there too."""
    import comfy.model_management

    monkeypatch.setattr(comfy.model_management, "maximum_vram_for_weights", lambda device=None: 1)
    assert comfy.model_management.unet_dtype(model_params=1000, weight_dtype=torch.float8_e4m3fn) in FP8
    ckpt = fixture_files["large_all_in_one"].name
    prompt = {"ld": fp8_loader(ckpt, protect_patterns="# small card"),  # new inputs: not the cached load
              "o": {"class_type": "PreviewAny", "inputs": {"source": ["ld", 3]}}}
    runner.run(prompt)
    _wide_everywhere_but_fp8_layers(runner.node_outputs("ld")[0])


def test_lora_on_a_low_vram_offloaded_fp8_layer_is_applied(runner, fixture_files, tiny_lora):
    """Low-VRAM mode: layers that do not fit get their LoRA at run time (LowVramPatch in weight_function)."""
    import comfy.model_management

    ckpt = fixture_files["large_all_in_one"].name
    prompt = {"ld": fp8_loader(ckpt),
              "lora": {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": ["ld", 0], "lora_name": tiny_lora, "strength_model": 1.0}},
              "o": {"class_type": "PreviewAny", "inputs": {"source": ["lora", 0]}}}
    runner.run(prompt)
    plain, patched = runner.node_outputs("ld")[0], runner.node_outputs("lora")[0]
    layer = "joint_blocks.0.x_block.mlp.fc1"
    assert layer in fp8_layers(patched)
    x = torch.randn(2, 5, effective_linears(patched)[layer].in_features)

    def run(model, lowvram: bool) -> tuple[torch.Tensor, bool]:
        with torch.inference_mode():
            comfy.model_management.unload_all_models()
            device = torch.device("cpu")
            model.load(device, lowvram_model_memory=1 if lowvram else 0, force_patch_weights=False,
                       full_load=not lowvram)
            module = comfy_host_module(model, layer)
            out = module(x.to(module.weight.device, torch.float32))
            offloaded = len(module.weight_function) > 0
            model.detach()
            return out, offloaded

    merged, offloaded_full = run(patched, lowvram=False)
    runtime, offloaded_low = run(patched, lowvram=True)
    without, _ = run(plain, lowvram=True)
    assert not offloaded_full and offloaded_low, "low-VRAM load did not leave the LoRA to run time"
    # merged: the LoRA re-quantized into the layer with a fresh scale; run time: on the dequantized weight
    to_merged, lora_effect = float((runtime - merged).norm()), float((without - merged).norm())
    print(f"run-time vs merged {to_merged / merged.norm():.4f}, LoRA effect {lora_effect / merged.norm():.4f}")
    assert to_merged < 0.25 * lora_effect, (to_merged, lora_effect)  # the same LoRA, not dropped


def comfy_host_module(model, name: str) -> torch.nn.Module:
    module = model.model.diffusion_model
    for part in name.split("."):
        module = getattr(module, part)
    return module


def test_lora_requantization_multiplies_small_scales_in_float32(pack):
    """ComfyUI hands convert_weight a copy in its LoRA compute dtype (float16 on many GPUs): the scale must not
    be cast to it (a weight whose largest value is ~1e-6 has a scale of ~2e-9, zero in float16)."""
    import importlib

    fp8_ops = importlib.import_module("sd35_fp8.nodes.fp8_ops")
    real = torch.randn(32, 16, dtype=torch.float64) * 1e-6
    scale = (real.abs().amax(dim=1, keepdim=True) / 448).float()
    qweight = (real / scale.double()).to(torch.float8_e4m3fn)
    layer = fp8_ops.ops_linear_holding(fp8_ops.make_fp8_ops("weight_only"), qweight, scale, None)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        temp = layer.convert_weight(layer.weight.to(dtype), inplace=True)
        expected = qweight.double() * scale.double()
        assert float((temp.double() - expected).norm() / expected.norm()) < 1e-2, dtype
        assert torch.equal(layer.set_weight(temp.float(), return_weight=True), qweight)  # exact round trip


def test_lora_protocol_gives_the_patched_weight_its_own_scale_and_round_trips(pack):
    """ModelPatcher on an FP8 layer: temp = convert_weight(weight.float()); temp += delta; set_weight(temp). The
    patched weight is re-quantized with a fresh scale that travels with it (nothing clipped); `weight_scale`, the
    unpatched weight's, never changes, so the patcher's restore of the weight alone brings the exact layer back."""
    import importlib

    fp8_ops = importlib.import_module("sd35_fp8.nodes.fp8_ops")
    formats = importlib.import_module("sd35_fp8.quant.formats")
    torch.manual_seed(0)
    qweight, scale = formats.quantize_weight(torch.randn(96, 64) * 0.1)
    layer = fp8_ops.ops_linear_holding(fp8_ops.make_fp8_ops("weight_only"), qweight, scale, torch.zeros(96))
    original = layer.weight
    temp = layer.convert_weight(layer.weight.to(torch.float32), inplace=True)
    torch.testing.assert_close(temp, formats.dequantize_weight(qweight, scale))
    delta = torch.zeros_like(temp)
    delta[48:] = torch.randn(48, 64) * 0.01
    delta[48:, 0] += 3 * temp.abs().amax()  # far past the rows' old range
    layer.set_weight(temp + delta)
    own = layer.weight.fp8_scale
    assert torch.equal(layer.weight_scale, scale) and layer.weight is not original
    assert torch.equal(own[:48], scale[:48]) and torch.equal(layer.weight[:48], original[:48])  # untouched rows
    assert bool((own[48:] > 2 * scale[48:]).all())
    patched = formats.dequantize_weight(layer.weight, layer.current_scale())
    assert float((patched - (temp + delta)).norm() / (temp + delta).norm()) < 0.04  # not clipped
    assert torch.equal(layer.state_dict()["weight_scale"], own)
    restored = layer.weight = torch.nn.Parameter(original.data, requires_grad=False)  # the restore (set_attr_param)
    assert torch.equal(layer.current_scale(), scale) and torch.equal(layer.state_dict()["weight_scale"], scale)
    again = layer.set_weight(temp, return_weight=True)  # re-quantizing the unpatched weight is exact
    assert torch.equal(again, original.data) and torch.equal(again.fp8_scale, scale)
    # in place (ComfyUI's hook patches, restored by copying the bits back): the scale stays the weight's
    layer.set_weight(temp + delta * 0.01, inplace_update=True)
    assert layer.weight is restored and torch.equal(layer.current_scale(), scale)
