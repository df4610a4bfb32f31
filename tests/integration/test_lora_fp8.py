"""A LoRA on an FP8 model: as close to FP16 + LoRA as the LoRA merged before quantizing, and undone exactly.

One denoiser call on fixed inputs, for each way ComfyUI applies a LoRA: merged into the weights (the layer
re-quantizes the patched weight, nodes/fp8_ops.py) and low-VRAM (patches applied at run time, per forward).
The reference for "as close as" is the LoRA merged into the 16-bit weights, then quantized like the loader does.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import fp8_layers, host_quantized_layers, same_bits, snapshot
from prompts import encode, fp8_loader, ksampler, quantize_model, show

from tools import comfy_host

CPU = torch.device("cpu")
MAX_RATIO = 1.5  # issue 25's goal: FP8 + LoRA errs at most 1.5x what LoRA-then-quantize errs (it was 5.4x)
# The fixture LoRAs at this strength change one denoiser call by ~19% (one) and ~24% (both): a strong LoRA,
# widening most patched rows' range, which re-quantizing with the old scale clipped (7x LoRA-then-quantize's
# error). At 1.0 their effect on one call (~1%) hides under FP8's own error (~2%).
STRENGTH = 12.0


def _lora(model: list, name: str, strength: float = STRENGTH) -> dict:
    return {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": name,
                                                             "strength_model": strength}}


def _inputs(model) -> dict:
    dm = model.model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    return {"x": torch.randn(1, dm.x_embedder.proj.in_channels, 8, 8, generator=gen),
            "timesteps": torch.tensor([500.0]),
            "context": torch.randn(1, 7, dm.context_embedder.in_features, generator=gen),
            "y": torch.randn(1, dm.y_embedder.mlp[0].in_features, generator=gen)}


def denoise(patcher, lowvram: bool = False) -> torch.Tensor:
    """One call of the diffusion model as `patcher` applies it: LoRA merged, or (lowvram) applied per forward."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        patcher.patch_model(CPU, lowvram_model_memory=1 if lowvram else 0)
        try:
            if lowvram:
                assert patcher.model.model_lowvram, "the low-VRAM load merged the patches"
            return patcher.model.diffusion_model(**_inputs(patcher)).float()
        finally:
            patcher.unpatch_model(CPU)


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def lora_then_quantize(pack, fp8_model, lora16_model, scaling: str | None = None):
    """`fp8_model` (the FP8 loader's) with each FP8 layer re-made from the LoRA-merged 16-bit weight, quantized
    with the same format and scaling (or `scaling`): what the loader would have built had the LoRA been in the file."""
    fp8_ops = importlib.import_module("sd35_fp8.nodes.fp8_ops")
    formats = importlib.import_module("sd35_fp8.quant.formats")
    import comfy.model_management

    layers = fp8_layers(fp8_model)
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        lora16_model.patch_model(CPU, lowvram_model_memory=0)
        merged = {name: lora16_model.get_model_object(f"diffusion_model.{name}").weight.detach().clone()
                  for name in layers}
        lora16_model.unpatch_model(CPU)
    clone = fp8_model.clone()
    ops = fp8_ops.make_fp8_ops("weight_only")
    for name, layer in layers.items():
        layer_scaling = scaling or ("per_channel" if layer.weight_scale.dim() else "per_tensor")
        qweight, scale = formats.quantize_weight(merged[name].float(), formats.format_name(layer.weight.dtype),
                                                 layer_scaling)
        clone.add_object_patch(f"diffusion_model.{name}", fp8_ops.ops_linear_holding(ops, qweight, scale, layer.bias))
    return clone


@pytest.fixture(scope="module")
def models(runner, fixture_files, tiny_lora, second_lora, pack) -> dict:
    ckpt = fixture_files["large_all_in_one"].name
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, "ld": fp8_loader(ckpt),
              "l16": _lora(["ck", 0], tiny_lora), "l8": _lora(["ld", 0], tiny_lora),
              "l16b": _lora(["l16", 0], second_lora), "l8b": _lora(["l8", 0], second_lora),
              # model strength 0 with a clip strength: ComfyUI adds the model's patches at strength 0
              "l8z": {"class_type": "LoraLoader", "inputs": {"model": ["ld", 0], "clip": ["ld", 1],
                                                              "lora_name": tiny_lora, "strength_model": 0.0,
                                                              "strength_clip": 1.0}}}
    nodes = list(prompt)
    prompt.update({f"o_{node}": show([node, 0]) for node in nodes})
    runner.run(prompt)
    out = {node: runner.node_outputs(node)[0] for node in nodes}
    out["ltq"] = lora_then_quantize(pack, out["ld"], out["l16"])
    out["ltq_b"] = lora_then_quantize(pack, out["ld"], out["l16b"])
    return out


@pytest.mark.parametrize("lowvram", [False, True], ids=["merged", "lowvram"])
@pytest.mark.parametrize("stack", ["one", "two"])
def test_fp8_lora_is_as_close_to_fp16_lora_as_lora_then_quantize(models, lowvram, stack):
    suffix = "" if stack == "one" else "b"
    ref = denoise(models[f"l16{suffix}"])
    without = denoise(models["ck"])
    assert _error(without, ref) > 0.15, _error(without, ref)  # else the LoRA hides under FP8's error
    ltq = _error(denoise(models[f"ltq{'' if stack == 'one' else '_b'}"]), ref)
    ours = _error(denoise(models[f"l8{suffix}"], lowvram=lowvram), ref)
    print(f"{comfy_host.host_label()} {stack} lowvram={lowvram}: LoRA effect {_error(without, ref):.4f}, "
          f"LoRA-then-quantize {ltq:.4f}, FP8 + LoRA {ours:.4f} ({ours / ltq:.2f}x)")
    assert ours <= MAX_RATIO * ltq, (ours, ltq)


def test_sampled_latent_with_lora_is_as_close_to_fp16_lora_as_lora_then_quantize(runner, fixture_files, tiny_lora,
                                                                                 pack):
    """The usual graph, FP8 loader -> LoRA -> KSampler (3 steps), and LoRA -> Quantize Model -> KSampler: their
    latents vs FP16 + LoRA's, against LoRA-then-quantize's (sampled through ComfyUI's own KSampler function)."""
    import nodes

    ckpt = fixture_files["large_all_in_one"].name
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **encode("ck"),
              "ld": fp8_loader(ckpt), "l16": _lora(["ck", 0], tiny_lora), "l8": _lora(["ld", 0], tiny_lora)}
    prompt["qa"] = quantize_model(["l16", 0])
    for node in ("ck", "l16", "l8", "qa"):
        prompt[f"ks_{node}"] = ksampler([node, 0])
        prompt[f"o_{node}"] = show([f"ks_{node}", 0])
    runner.run(prompt)
    latent = {node: runner.node_outputs(f"ks_{node}")[0]["samples"] for node in ("ck", "l16", "l8", "qa")}
    ltq_model = lora_then_quantize(pack, runner.node_outputs("ld")[0], runner.node_outputs("l16")[0])
    inputs = [runner.node_outputs(node)[0] for node in ("p", "n", "lat")]
    with torch.inference_mode():
        ltq_latent = nodes.common_ksampler(ltq_model, 7, 3, 4.5, "euler", "sgm_uniform", *inputs)[0]["samples"]
    ref = latent["l16"]
    ltq = _error(ltq_latent, ref)
    errors = {node: _error(latent[node], ref) for node in ("l8", "qa")}
    print(f"{comfy_host.host_label()} latents: LoRA effect {_error(latent['ck'], ref):.4f}, LoRA-then-quantize "
          f"{ltq:.4f}, FP8 + LoRA {errors['l8']:.4f}, LoRA + Quantize Model {errors['qa']:.4f}")
    assert _error(latent["ck"], ref) > 0.15
    assert errors["l8"] <= MAX_RATIO * ltq and errors["qa"] <= MAX_RATIO * ltq, (errors, ltq)


def test_hook_lora_never_copies_a_cached_real_weight_into_fp8(runner, fixture_files, tiny_lora, monkeypatch):
    """A hook LoRA (Create Hook LoRA -> Cond Set Props) on the positive prompt only: two hook groups, so ComfyUI
    applies the hook at every step. In its default MaxSpeed mode it would, from the second step on, copy the
    patched weight it cached (real float32 values) straight into the FP8 weight, bypassing set_weight; our models
    recompute it through set_weight instead (fp8_ops.recompute_hook_patches), and the FP8 model is the same after."""
    import comfy.model_patcher

    ckpt = fixture_files["large_all_in_one"].name
    hook = {"class_type": "CreateHookLora", "inputs": {"lora_name": tiny_lora, "strength_model": STRENGTH,
                                                       "strength_clip": 0.0}}
    hooked = {"class_type": "ConditioningSetProperties", "inputs": {"cond_NEW": ["p", 0], "strength": 1.0,
                                                                     "set_cond_area": "default", "hooks": ["hk", 0]}}
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **encode("ck"),
              "ld": fp8_loader(ckpt), "qa": quantize_model(["ck", 0]), "hk": hook, "ph": hooked}
    for node in ("ck", "ld", "qa"):
        sampler = ksampler([node, 0])
        sampler["inputs"]["positive"] = ["ph", 0]
        prompt[f"ks_{node}"], prompt[f"o_{node}"] = sampler, show([f"ks_{node}", 0])
    cached = []
    original = comfy.model_patcher.ModelPatcher.patch_cached_hook_weights

    def spy(self, cached_weights, key, memory_counter):
        cached.append((self.model_options.get("sd35_fp8", {}).get("source"), key))
        return original(self, cached_weights, key, memory_counter)

    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "patch_cached_hook_weights", spy)
    runner.run({k: v for k, v in prompt.items() if k in ("ck", "ld", "qa")} | {"o": show(["ld", 1]),
                                                                              "oq": show(["qa", 1])})
    fp8_models = [runner.node_outputs(node)[0] for node in ("ld", "qa")]
    before = [snapshot(m) for m in fp8_models]
    runner.run(prompt)
    assert [m.hook_mode.name for m in fp8_models] == ["MinVram", "MinVram"]
    assert cached and all(source is None for source, _ in cached), cached[:3]  # the stock model's only
    assert all(same_bits(b, snapshot(m)) for b, m in zip(before, fp8_models, strict=True))


def test_unpatching_restores_the_fp8_model_bit_for_bit(models):
    """Every tensor of the FP8 model, scales included, is the same after its LoRA branches ran in both modes;
    no layer is left holding a LoRA-patched weight's own scale; strength 0 is no LoRA at all."""
    plain = models["ld"]
    before, out_before = snapshot(plain), denoise(plain)
    for node in ("l8", "l8b"):
        for lowvram in (False, True):
            denoise(models[node], lowvram=lowvram)
    assert same_bits(before, snapshot(plain))
    layers = fp8_layers(plain)
    assert layers and all(getattr(m.weight, "fp8_scale", None) is None for m in layers.values())
    assert torch.equal(denoise(plain), out_before)
    for lowvram in (False, True):
        assert torch.equal(denoise(models["l8z"], lowvram=lowvram), out_before), f"strength 0, lowvram={lowvram}"


def test_merged_lora_carries_its_scale_into_state_dict_and_back(models):
    """While a LoRA is merged, a patched layer's state dict (what Save FP8 Model and ComfyUI's save read) pairs its
    weight with the scale it was quantized with; the unpatched scale is back once the patch is undone."""
    import comfy.model_management

    patched = models["l8"]
    name = "joint_blocks.0.x_block.mlp.fc1"
    before = snapshot(models["ld"])
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        patched.patch_model(CPU, lowvram_model_memory=0)
        try:
            layer = patched.get_model_object(f"diffusion_model.{name}")
            sd = layer.state_dict()
            real = sd["weight"].float() * sd["weight_scale"]
        finally:
            patched.unpatch_model(CPU)
    assert not torch.equal(sd["weight_scale"], before[f"{name}.weight_scale"]), "the scale did not follow the LoRA"
    original = before[f"{name}.weight"].float() * before[f"{name}.weight_scale"]
    # the merged weight is the original plus the LoRA's update, not clipped at the old range
    rows = real.abs().amax(dim=1) > 1.05 * original.abs().amax(dim=1)  # rows whose range the LoRA widened
    assert float(rows.float().mean()) > 0.5
    assert same_bits(before, snapshot(models["ld"]))


def test_convert_weight_scales_the_bits_it_is_given_while_a_lora_is_merged(models):
    """ModelPatcher hands convert_weight either a copy of the layer's current (patched) bits or its backup of the
    unpatched ones (get_key_patches, used by the model-merge nodes): each is scaled with its own scale."""
    import comfy.model_management

    patched = models["l8"]
    name = "joint_blocks.0.x_block.mlp.fc1"
    before = snapshot(models["ld"])
    original_bits = before[f"{name}.weight"].float()
    with torch.inference_mode():
        comfy.model_management.unload_all_models()
        patched.patch_model(CPU, lowvram_model_memory=0)
        try:
            layer = patched.get_model_object(f"diffusion_model.{name}")
            current = layer.convert_weight(layer.weight.float())
            patched_scale = layer.current_scale().clone()
            expected_current = layer.weight.float() * patched_scale
            backup = layer.convert_weight(original_bits.clone())
        finally:
            patched.unpatch_model(CPU)
    assert torch.equal(current, expected_current)
    assert torch.equal(backup, original_bits * before[f"{name}.weight_scale"])
    assert not torch.equal(patched_scale, before[f"{name}.weight_scale"])  # so the two scales differ


def test_lora_on_our_saved_file_through_the_stock_loader(runner, comfy_base, fixture_files, models, tiny_lora, pack):
    """Our saved file (stock_compatible: one scale per layer) in the host's own FP8 layers: ComfyUI re-quantizes a
    LoRA-patched weight itself (a fresh per-tensor scale on both hosts); our layers are not involved."""
    save = {"model": ["ld", 0], "filename_prefix": "diffusion_models/lora_stock"}
    runner.run({"save": {"class_type": "SD35FP8SaveModel", "inputs": save},
                "ld": fp8_loader(fixture_files["large_all_in_one"].name)})
    (path,) = sorted((comfy_base / "output" / "diffusion_models").glob("lora_stock_*.safetensors"))
    name = comfy_host.link_model(comfy_base, "diffusion_models", path)
    import folder_paths

    folder_paths.filename_list_cache.clear()
    runner.run({"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}},
                "lora": _lora(["unet", 0], tiny_lora), "o": show(["lora", 0])})
    stock, stock_lora = runner.node_outputs("unet")[0], runner.node_outputs("lora")[0]
    ours = importlib.import_module("sd35_fp8.nodes.fp8_ops").FP8OpsLinear
    assert host_quantized_layers(stock), "the stock loader did not build its own FP8 layers"
    assert not any(isinstance(m, ours) for m in stock.model.diffusion_model.modules()), "our layers are involved"
    ref = denoise(models["l16"])
    ltq = _error(denoise(lora_then_quantize(pack, models["ld"], models["l16"], "per_tensor")), ref)
    before = snapshot(stock)
    out_before = denoise(stock)
    # the host's own FP8 error without a LoRA: 0.3.75 in FP8-device mode multiplies FP8 x FP8 (it ignores the
    # file's full-precision marking), which errs more than LoRA-then-quantize's dequantized weights
    own = _error(out_before, denoise(models["ck"]))
    for lowvram in (False, True):
        err = _error(denoise(stock_lora, lowvram=lowvram), ref)
        print(f"{comfy_host.host_label()} stock loader lowvram={lowvram}: LoRA-then-quantize (per tensor) {ltq:.4f}, "
              f"stock without LoRA {own:.4f}, stock FP8 + LoRA {err:.4f} ({err / max(ltq, own):.2f}x)")
        assert err <= MAX_RATIO * max(ltq, own), (lowvram, err, ltq, own)
    assert same_bits(before, snapshot(stock)) and torch.equal(denoise(stock), out_before)


def test_requantization_variants_table(models, pack, monkeypatch):
    """The README's table: FP8 + LoRA (merged) vs FP16 + LoRA, as a multiple of LoRA-then-quantize's error, with
    the old scale (before), a fresh scale (now), and a fresh scale with seeded stochastic rounding."""
    fp8_ops = importlib.import_module("sd35_fp8.nodes.fp8_ops")
    formats = importlib.import_module("sd35_fp8.quant.formats")
    fresh = fp8_ops.requantized_weight

    def old(weight, old_scale, dtype):
        return torch.nn.Parameter(formats.quantize_with_scale(weight, old_scale, formats.format_name(dtype)),
                                  requires_grad=False)

    def stochastic(weight, old_scale, dtype):
        scale = formats.fresh_scale(weight, old_scale, formats.format_name(dtype))
        gen = torch.Generator(device=weight.device).manual_seed(int(weight.numel()) + weight.shape[0])
        new = torch.nn.Parameter(stochastic_fp8(weight.float() / scale, dtype, gen), requires_grad=False)
        new.fp8_scale = scale
        return new

    rows = {}
    for stack, suffix in (("one LoRA", ""), ("two LoRAs", "b")):
        ref = denoise(models[f"l16{suffix}"])
        ltq = _error(denoise(models[f"ltq{'_b' if suffix else ''}"]), ref)
        for variant, function in (("old scale", old), ("fresh scale", fresh), ("fresh + stochastic", stochastic)):
            monkeypatch.setattr(fp8_ops, "requantized_weight", function)
            rows[stack, variant] = _error(denoise(models[f"l8{suffix}"]), ref) / ltq
        rows[stack, "ltq"] = ltq
    monkeypatch.setattr(fp8_ops, "requantized_weight", fresh)
    print(f"\n{comfy_host.host_label()}: FP8 + LoRA merged, error vs FP16 + LoRA / LoRA-then-quantize's")
    for key, value in rows.items():
        print(f"| {key[0]} | {key[1]} | {value:.4f} |")
    for stack in ("one LoRA", "two LoRAs"):
        assert rows[stack, "old scale"] > MAX_RATIO, "the old scale did not clip: the goal would prove nothing"
        assert rows[stack, "fresh scale"] <= MAX_RATIO
        assert rows[stack, "fresh scale"] <= rows[stack, "fresh + stochastic"], "stochastic rounding helps: keep it"


def stochastic_fp8(scaled: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """`scaled` (within the format's range) to FP8 with stochastic rounding: up or down to the two nearest FP8
    values with probabilities by distance (unbiased), from `gen`."""
    finfo = torch.finfo(dtype)
    mantissa = 3 if dtype == torch.float8_e4m3fn else 2
    min_exponent = -6 if dtype == torch.float8_e4m3fn else -14
    exponent = torch.floor(torch.log2(scaled.abs().clamp(min=finfo.tiny))).clamp(min=min_exponent)
    step = torch.exp2(exponent - mantissa)  # the spacing of FP8 values around each element
    noise = torch.rand(scaled.shape, generator=gen, device=scaled.device)
    return (torch.floor(scaled / step + noise) * step).clamp(-finfo.max, finfo.max).to(dtype)
