"""Quantize Model to FP8: input untouched, FP16 branch bit-identical, FP8 branch close, LoRA either order."""

from __future__ import annotations

import numpy as np
import torch
from helpers import FP8, fp8_layers, same_bits, snapshot
from prompts import decode_and_preview, encode, ksampler, quantize_model
from skimage.metrics import structural_similarity

from tools import comfy_host

# Decoded-image SSIM the FP8 branch must reach against FP16. Measured on these random-weight fixtures
# at 3 steps: ~0.99 (this test measures it). Random weights have no smooth structure to hide error
# in, so real models score higher; 0.95 leaves margin for platform rounding differences while still
# failing for a broken scale (a plain cast or a wrong scale axis scores below 0.9 here).
MIN_SSIM = 0.95


def _ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(structural_similarity(a[0].numpy(), b[0].numpy(), channel_axis=-1, data_range=1.0))


def _fp16_graph(ckpt: str) -> dict:
    prompt = {"ck": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, **encode("ck")}
    prompt["ks16"] = ksampler(["ck", 0])
    prompt.update(decode_and_preview(["ks16", 0], ["ck", 2], "16"))
    return prompt


def _side_by_side(ckpt: str, **quant) -> dict:
    prompt = _fp16_graph(ckpt)
    prompt["q"] = quantize_model(["ck", 0], **quant)
    prompt["ks8"] = ksampler(["q", 0])
    prompt.update(decode_and_preview(["ks8", 0], ["ck", 2], "8"))
    return prompt


def test_fp16_branch_unchanged_by_fp8_copy(comfy_nodes, fixture_files):
    ckpt = fixture_files["large_all_in_one"].name
    alone = comfy_host.PromptRunner()
    alone.run(_fp16_graph(ckpt))
    latent_alone = alone.node_outputs("ks16")[0]["samples"].clone()
    fp16_model = alone.node_outputs("ck")[0]
    before = snapshot(fp16_model)

    both = comfy_host.PromptRunner()
    both.run(_side_by_side(ckpt))
    assert torch.equal(both.node_outputs("ks16")[0]["samples"], latent_alone), "FP16 branch changed"
    latent_fp8 = both.node_outputs("ks8")[0]["samples"]
    assert not torch.equal(latent_fp8, latent_alone), "FP8 branch is not quantized"
    ssim = _ssim(both.node_outputs("dec_16")[0], both.node_outputs("dec_8")[0])
    assert ssim > MIN_SSIM, ssim

    q_model, report = both.node_outputs("q")
    assert len(fp8_layers(q_model)) > 0 and fp8_layers(both.node_outputs("ck")[0]) == {}
    assert same_bits(before, snapshot(both.node_outputs("ck")[0])), "input model's tensors were modified"
    assert "auto: detected sd35_large" in report
    # pos_embed: an FP8 (scale 1.0) object patch on the clone; the input keeps its own 16/32-bit table
    pos_embed = q_model.object_patches["diffusion_model.pos_embed"]
    assert pos_embed.dtype == torch.float8_e4m3fn and before["pos_embed"].dtype not in FP8
    assert torch.equal(pos_embed.float(), before["pos_embed"].to(torch.float8_e4m3fn).float())
    # byte totals are the tensors': everything the input holds before, FP8 weights + scales after
    before_bytes = sum(t.numel() * t.element_size() for t in before.values())
    fp8 = fp8_layers(q_model)
    fp8_bytes = sum(m.weight.numel() + m.weight_scale.numel() * 4 for m in fp8.values()) + pos_embed.numel()
    fp8_source = sum(before[f"{name}.weight"].numel() * before[f"{name}.weight"].element_size() for name in fp8)
    fp8_source += before["pos_embed"].numel() * before["pos_embed"].element_size()
    assert f"bytes: {before_bytes} -> {before_bytes - fp8_source + fp8_bytes}" in report
    assert f"fp8 layers: {fp8_bytes} bytes" in report and f"{len(fp8) + 1} fp8" in report


def test_quantizing_fp8_model_again_is_a_noop(runner, fixture_files):
    prompt = _side_by_side(fixture_files["large_all_in_one"].name)
    prompt["q2"] = quantize_model(["q", 0])
    prompt["ks8"] = ksampler(["q2", 0])
    runner.run(prompt)
    q1, q2 = runner.node_outputs("q")[0], runner.node_outputs("q2")[0]
    assert fp8_layers(q1).keys() == fp8_layers(q2).keys()
    assert "already" in runner.node_outputs("q2")[1]


def _lora(model: list, name: str) -> dict:
    return {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": name, "strength_model": 1.0}}


def test_lora_before_and_after_quantize_stays_close_to_fp16_lora(runner, fixture_files, tiny_lora):
    prompt = _fp16_graph(fixture_files["large_all_in_one"].name)
    prompt["lora16"] = _lora(["ck", 0], tiny_lora)
    prompt["ksl16"] = ksampler(["lora16", 0])
    prompt["q_after"] = quantize_model(["lora16", 0])  # LoRA first, then FP8
    prompt["ks_a"] = ksampler(["q_after", 0])
    prompt["q"] = quantize_model(["ck", 0])
    prompt["ks8"] = ksampler(["q", 0])
    prompt["lora_b"] = _lora(["q", 0], tiny_lora)  # FP8 first, then LoRA
    prompt["ks_b"] = ksampler(["lora_b", 0])
    for tag, node in (("l16", "ksl16"), ("8", "ks8"), ("a", "ks_a"), ("b", "ks_b")):
        prompt.update(decode_and_preview([node, 0], ["ck", 2], tag))
    runner.run(prompt)
    img = {tag: runner.node_outputs(f"dec_{tag}")[0] for tag in ("16", "l16", "8", "a", "b")}
    lora_effect = img["l16"] - img["16"]
    assert float(lora_effect.abs().mean()) > 1e-3, "the LoRA has no visible effect; the test would prove nothing"
    assert not torch.equal(img["b"], img["l16"]) and not torch.equal(img["a"], img["l16"]), "not quantized"
    for tag in ("a", "b"):
        # the LoRA does to the FP8 model what it does to the FP16 one (the FP8 error itself is not the LoRA's)
        fp8_lora_effect = img[tag] - img["8"]
        assert float((fp8_lora_effect - lora_effect).abs().mean()) < 0.5 * float(lora_effect.abs().mean()), tag
        assert _ssim(img[tag], img["l16"]) > MIN_SSIM, tag
    assert np.isfinite(img["a"].numpy()).all() and np.isfinite(img["b"].numpy()).all()
