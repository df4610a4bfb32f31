"""Section 5, fidelity vs the fp32 reference: denoiser output error per method, and a 20-step sampling run.

Output error: ||out - ref|| / ||ref|| of one forward (reduced depth, full width SD3.5 Medium) for ours
(e4m3 per-channel, default preset), ours per-tensor, ours e5m2, ComfyUI's fp8 cast and quanto, on both
weight kinds. Sampling: 20 Euler steps of SD3's flow matching (shift 3.0, no CFG) from the same noise with
the fp32 model and each FP8 variant; latent SSIM and latent PSNR. No real SD3 VAE can be had here (a
random one would be meaningless), so PSNR is measured on the latent, mapped to 0..1 by the reference's
range (`latent_psnr_db`), not on decoded pixels.
"""

from __future__ import annotations

import torch

from quant.config import QuantConfig
from quant.metrics import psnr_per_image, ssim_per_image

from . import models
from .common import log, rel_err
from .weights import KINDS

VARIANT = "sd35_medium"
STEPS = 20
BATCH = 4  # output error averaged over 4 samples at timesteps 900..100
SHIFT = 3.0


def variants(ref: torch.nn.Module, depth: int, all_configs: bool = True) -> dict[str, torch.nn.Module]:
    out = {
        "ours": models.ours(ref),
        "comfy_cast": models.comfy_cast(ref, VARIANT, depth),
        "quanto": models.quanto(ref),
    }
    if all_configs:
        out["ours_per_tensor"] = models.ours(ref, QuantConfig(scaling="per_tensor", compute="weight_only"))
        out["ours_e5m2"] = models.ours(ref, QuantConfig(fp8_format="float8_e5m2", compute="weight_only"))
    return out


def output_errors(depth: int, pixels: int) -> dict:
    """Relative output error of every method, for each weight kind."""
    out = {}
    for kind in KINDS:
        log(f"fidelity: output error, {kind} weights, depth {depth}, {pixels}px")
        ref = models.reference(VARIANT, depth, kind)
        inp = models.inputs(pixels, batch=BATCH)
        reference = models.forward(ref, inp)
        out[kind] = {name: rel_err(reference, models.forward(m, inp)) for name, m in variants(ref, depth).items()}
        del ref
    return out


def sigmas(steps: int = STEPS, shift: float = SHIFT) -> torch.Tensor:
    """SD3's shifted flow-matching schedule from 1 to 0 (ComfyUI's ModelSamplingDiscreteFlow, shift 3)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def sample(model: torch.nn.Module, inp: dict[str, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
    """Euler: x <- x + (sigma_next - sigma) * v(x, sigma), the model called with timestep sigma * 1000."""
    x = noise.clone()
    s = sigmas()
    for i in range(STEPS):
        v = models.forward(model, inp, x=x, t=torch.full((x.shape[0],), float(s[i]) * 1000))
        x = x + (s[i + 1] - s[i]) * v
    return x


def _as_image(latent: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((latent - lo) / (hi - lo)).clamp(0, 1).permute(0, 2, 3, 1)


def sampling(depth: int, pixels: int, methods: tuple[str, ...]) -> dict:
    log(f"fidelity: {STEPS}-step sampling, depth {depth}, {pixels}px, {', '.join(methods)}")
    ref = models.reference(VARIANT, depth, "student_t")
    inp = models.inputs(pixels, seed=1)
    noise = torch.randn(inp["x"].shape, generator=torch.Generator().manual_seed(2))
    reference = sample(ref, inp, noise)
    lo, hi = float(reference.min()), float(reference.max())
    ref_img = _as_image(reference, lo, hi)
    out = {"depth": depth, "pixels": pixels, "steps": STEPS, "shift": SHIFT, "cfg": None, "weights": "student_t"}
    fp8 = {k: m for k, m in variants(ref, depth, all_configs=False).items() if k in methods}
    for name, model in fp8.items():
        latent = sample(model, inp, noise)
        img = _as_image(latent, lo, hi)
        out[name] = {
            "latent_ssim": float(ssim_per_image(ref_img, img).mean()),
            "latent_psnr_db": float(psnr_per_image(ref_img, img).mean()),
            "latent_rel_err": rel_err(reference, latent),
        }
    return out


def run(quick: bool) -> dict:
    depth, pixels = (2, 256) if quick else (6, 512)
    errors = output_errors(depth, pixels)
    head = errors["student_t"]
    sampling_result = sampling(2 if quick else 4, 256 if quick else 512,
                               ("ours",) if quick else ("ours", "comfy_cast", "quanto"))
    return {
        "variant": VARIANT, "depth": depth, "pixels": pixels, "headline_weights": "student_t",
        "ours_rel_err": head["ours"], "comfy_cast_rel_err": head["comfy_cast"], "quanto_rel_err": head["quanto"],
        "ours_per_tensor_rel_err": head["ours_per_tensor"], "ours_e5m2_rel_err": head["ours_e5m2"],
        "ours_over_comfy_cast": head["ours"] / head["comfy_cast"],
        "by_weights": errors,
        "latent_ssim": sampling_result["ours"]["latent_ssim"],
        "latent_psnr_db": sampling_result["ours"]["latent_psnr_db"],
        "decoded_psnr_db": None,
        "decoded_psnr_note": "not measured: no real SD3 VAE available (a random VAE is meaningless); "
                             "latent_psnr_db is PSNR on the latent mapped to 0..1 by the reference's range",
        "sampling": sampling_result,
    }
