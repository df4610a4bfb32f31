"""Section 11, LoRA cost: what a LoRA applied at run time (nodes/runtime_patches.py) costs the FP8 model.

SD3.5 Medium at full size (`--quick`: the tests' tiny Medium; random weights, `bench.gpu.random_state_dict`),
quantized by the pack's default plan and built by ComfyUI with the pack's FP8 ops, as the loader node does
(ComfyUI 0.3.75, --cpu, weight_only). A rank-32 LoRA on every Linear of every joint block (all FP8 in the default
plan), made by ComfyUI's own `load_lora` from a generated file's keys, is added to a clone as a LoRA loader does.
In one child process, side by side:
- step: one denoiser call with and without the LoRA, interleaved over rounds in alternating order (each call loads
  the patcher it times, as sampling does; the load is not timed); goal: with / without <= 1.10;
- memory: the peak RSS of the same calls (VmHWM reset after each load through /proc/self/clear_refs), the LoRA
  resident in both; goal: the median round's call with the LoRA peaks no higher than the one without by more than
  one patched layer in 16-bit plus the LoRA's bytes (what ComfyUI's own run-time patching may cast), i.e. no 16-bit
  copy of a patched layer is held between forwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from .common import boot_host, log, process_status, reset_peak_rss, round_ratios, run_child, setup_torch

VARIANT = "sd35_medium"
RANK = 32
ROUNDS = 5


def run(quick: bool) -> dict:
    return run_child("bench.lora", "--child", *(["--quick"] if quick else []))


def _build(variant: str):
    """The FP8 model as the diffusion model loader builds it, on our patcher."""
    import comfy.sd

    from sd35_fp8.nodes.fp8_ops import make_fp8_ops
    from sd35_fp8.nodes.fp8_tables import fp8_tables_in_place
    from sd35_fp8.nodes.runtime_patches import use_fp8_patcher
    from sd35_fp8.quant.config import QuantConfig
    from sd35_fp8.quant.streaming import quantize_state_dict

    from .gpu import random_state_dict

    sd16 = random_state_dict(variant, None, torch.device("cpu"))
    sd, _, _ = quantize_state_dict(sd16, QuantConfig(compute="weight_only"), model_prefix="")
    del sd16
    with fp8_tables_in_place(sd, ""):
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={
            "custom_operations": make_fp8_ops("weight_only"), "dtype": torch.bfloat16})
    del sd
    use_fp8_patcher(model)
    return model


def _lora_file(model, seed: int = 1) -> dict[str, torch.Tensor]:
    """A rank-RANK LoRA (float16, kohya-style keys) on every Linear of every joint block."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.model.diffusion_model.named_modules():
        if name.startswith("joint_blocks.") and isinstance(module, torch.nn.Linear):
            key = f"diffusion_model.{name}"
            tensors[f"{key}.lora_down.weight"] = (torch.randn(RANK, module.in_features, generator=gen) * 0.02).half()
            tensors[f"{key}.lora_up.weight"] = (torch.randn(module.out_features, RANK, generator=gen) * 0.02).half()
            tensors[f"{key}.alpha"] = torch.tensor(float(RANK))
    return tensors


def _with_lora(model, lora: dict[str, torch.Tensor]):
    import comfy.lora

    patched = model.clone()
    patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model.model, {}))
    added = patched.add_patches(patches, 1.0)
    return patched, len(added)


def _inputs(model, pixels: int) -> dict[str, torch.Tensor]:
    """One noisy latent at timestep 750 with a 154-token context, shaped for `model`'s embedders."""
    from . import models

    dm = model.model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    return {"x": torch.randn(1, dm.x_embedder.proj.in_channels, pixels // 8, pixels // 8, generator=gen),
            "timesteps": torch.full((1,), 750.0),
            "context": torch.randn(1, models.CONTEXT_TOKENS, dm.context_embedder.in_features, generator=gen),
            "y": torch.randn(1, dm.y_embedder.mlp[0].in_features, generator=gen)}


def _call(patcher, inp: dict) -> tuple[float, int]:
    """Load `patcher` (as sampling does), time one denoiser call, unload: its seconds and the peak RSS of the call
    (VmHWM reset after the load)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    patcher.patch_model(torch.device("cpu"), lowvram_model_memory=0)
    try:
        reset_peak_rss()
        with torch.inference_mode():
            start = time.perf_counter()
            patcher.model.diffusion_model(**inp)
            return time.perf_counter() - start, process_status("VmHWM")
    finally:
        patcher.unpatch_model(torch.device("cpu"))


def child(quick: bool) -> dict:
    setup_torch()
    boot_host()
    variant, pixels = ("medium", 128) if quick else (VARIANT, 256)  # quick: the tests' tiny Medium architecture
    log(f"lora: {variant} at {pixels}x{pixels}, rank {RANK} on every joint block")
    model = _build(variant)
    inp = _inputs(model, pixels)
    lora = _lora_file(model)
    lora_bytes = sum(t.numel() * t.element_size() for t in lora.values())
    patched, n_keys = _with_lora(model, lora)  # resident from here on: both calls' peaks hold the LoRA's bytes
    layers = [m for n, m in model.model.diffusion_model.named_modules()
              if n.startswith("joint_blocks.") and isinstance(m, torch.nn.Linear)]
    largest_16bit = max(m.weight.numel() for m in layers) * 2
    _call(model, inp)  # warm-ups
    _call(patched, inp)

    times: dict[str, list[float]] = {"plain": [], "lora": []}
    peaks: dict[str, list[int]] = {"plain": [], "lora": []}
    pair = (("plain", model), ("lora", patched))
    for round_ in range(ROUNDS if not quick else 2):
        for name, patcher in pair if round_ % 2 == 0 else pair[::-1]:  # alternating: neither goes first every time
            seconds, peak = _call(patcher, inp)
            times[name].append(seconds)
            peaks[name].append(peak)
    ratio = round_ratios(times["lora"], times["plain"])
    added = statistics.median(lo - pl for lo, pl in zip(peaks["lora"], peaks["plain"], strict=True))
    fp8_layers = sum(1 for m in layers if getattr(m, "is_fp8", False))
    return {
        "variant": variant, "depth": len(model.model.diffusion_model.joint_blocks), "pixels": pixels, "rank": RANK,
        "patched_keys": n_keys,
        "joint_block_linears": len(layers), "fp8_linears": fp8_layers, "rounds": ratio["rounds"],
        "seconds": {name: statistics.median(ts) for name, ts in times.items()},
        "lora_over_plain": ratio["median"], "spread": ratio,
        "peak_rss_plain": statistics.median(peaks["plain"]), "peak_rss_lora": statistics.median(peaks["lora"]),
        "peak_rss_added": added, "lora_bytes": lora_bytes, "largest_layer_16bit_bytes": largest_16bit,
        "extra_peak_over_allowance": added / (lora_bytes + largest_16bit),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not args.child:
        sys.exit("run through `python -m bench.run --only lora`")
    print(json.dumps(child(args.quick)), flush=True)
