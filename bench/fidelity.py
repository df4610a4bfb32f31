"""Section 5, fidelity vs the fp32 reference: denoiser output error per method, and a 20-step sampling run.

Output error: relative, of one forward (reduced depth, full width SD3.5 Medium), every method, both weight kinds.
Sampling: 20 Euler steps of SD3's flow matching (shift 3.0, no CFG) from the same noise with the fp32 model and each
FP8 variant; latent SSIM and latent PSNR. No real SD3 VAE can be had here (a random one would be meaningless), so
PSNR is measured on the latent, mapped to 0..1 by the reference's range (`latent_psnr_db`), not on decoded pixels.
"""

from __future__ import annotations

import torch

from sd35_fp8.quant.config import QuantConfig
from sd35_fp8.quant.metrics import psnr_per_image, ssim_per_image

from . import models
from .common import log, rel_err
from .weights import KINDS

VARIANT = "sd35_medium"
STEPS = 20
SHIFT = 3.0


def variants(ref: torch.nn.Module, depth: int, all_configs: bool = True) -> dict[str, torch.nn.Module]:
    out = {"ours": models.ours(ref), "comfy_cast": models.comfy_cast(ref, VARIANT, depth), "quanto": models.quanto(ref)}
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
        inp = models.inputs(pixels, batch=4)  # the error averages over 4 samples at timesteps 900..100
        reference = models.forward(ref, inp)
        out[kind] = {name: rel_err(reference, models.forward(m, inp)) for name, m in variants(ref, depth).items()}
        del ref
    return out


def sample(model: torch.nn.Module, inp: dict[str, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
    """Euler on SD3's shifted flow-matching schedule from 1 to 0 (ComfyUI's ModelSamplingDiscreteFlow, shift 3):
    x <- x + (sigma_next - sigma) * v(x, sigma), the model called with timestep sigma * 1000."""
    t = torch.linspace(1.0, 0.0, STEPS + 1)
    s = SHIFT * t / (1 + (SHIFT - 1) * t)
    x = noise.clone()
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
        out[name] = {"latent_ssim": float(ssim_per_image(ref_img, img).mean()),
                     "latent_psnr_db": float(psnr_per_image(ref_img, img).mean()),
                     "latent_rel_err": rel_err(reference, latent)}
    return out


def run(quick: bool) -> dict:
    depth, pixels = (1, 128) if quick else (6, 512)
    errors = output_errors(depth, pixels)
    head = errors["student_t"]
    sampling_result = sampling(1 if quick else 4, 128 if quick else 512,
                               ("ours",) if quick else ("ours", "comfy_cast", "quanto"))
    return {
        "variant": VARIANT, "depth": depth, "pixels": pixels, "headline_weights": "student_t",
        **{f"{name}_rel_err": err for name, err in head.items()},
        "ours_over_comfy_cast": head["ours"] / head["comfy_cast"], "by_weights": errors,
        **{k: sampling_result["ours"][k] for k in ("latent_ssim", "latent_psnr_db")},
        "decoded_psnr_db": None,
        "decoded_psnr_note": "not measured: no real SD3 VAE available (a random VAE is meaningless); "
                             "latent_psnr_db is PSNR on the latent mapped to 0..1 by the reference's range",
        "sampling": sampling_result,
    }
