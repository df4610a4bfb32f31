"""Section 4, CPU step time: one denoiser forward of full-width SD3.5 Medium, the variants side by side.

fp32 reference, ours (weight_only: FP8 weights dequantized to float32 in forward), ComfyUI's fp8 cast
(manual_cast: FP8 weights cast to float32 in forward) and quanto qfloat8, all on the same `student_t`
weights and inputs, all held at once (the FP8 variants share every tensor they do not replace) and run
round-robin; each ratio is the median of the rounds' ratios, with its spread. Quick mode runs 2 blocks,
full mode all 24 (fewer if this machine lacks the memory to hold all four side by side, said in `depth`).
"""

from __future__ import annotations

import functools

import psutil

from . import models
from .common import GIB, interleaved, log, medians, rel_err, round_ratios

VARIANT = "sd35_medium"


def _fits(depth: int) -> bool:
    """fp32 reference + three FP8 copies (~1/4 each) + working memory, against what the machine has free."""
    n = sum(t.numel() for t in models.meta_model(VARIANT, depth).state_dict().values())
    return n * 4 * 2.0 + 2 * GIB < psutil.virtual_memory().available


def measure(depth: int, pixels: int, repeats: int) -> dict:
    ref = models.reference(VARIANT, depth, "student_t")
    inp = models.inputs(pixels)
    variants = {"fp32": ref, "fp8_weight_only": models.ours(ref), "comfy_cast": models.comfy_cast(ref, VARIANT, depth),
                "quanto": models.quanto(ref)}
    outputs = {name: models.forward(m, inp) for name, m in variants.items()}  # also the warm-up round
    times = interleaved({name: functools.partial(models.forward, m, inp) for name, m in variants.items()},
                        repeats, warmup=0)
    ratios = {name: round_ratios(ts, times["fp32"]) for name, ts in times.items() if name != "fp32"}
    return {
        "depth": depth, "pixels": pixels, "image_tokens": (pixels // 16) ** 2, "context_tokens": models.CONTEXT_TOKENS,
        "repeats": repeats, "seconds": medians(times),
        **{f"{name}_over_fp32": r["median"] for name, r in ratios.items()}, "spread": ratios,
        "rel_err": {name: rel_err(outputs["fp32"], out) for name, out in outputs.items() if name != "fp32"},
    }


def run(quick: bool) -> dict:
    depth = 2 if quick else models.depth_of(VARIANT)
    while depth > 2 and not _fits(depth):
        depth //= 2
    pixels = 256 if quick else 512
    log(f"step: {VARIANT} depth {depth} at {pixels}x{pixels}")
    out = {"variant": VARIANT, "weights": "student_t", **measure(depth, pixels, repeats=3 if quick else 5)}
    if not quick:
        log(f"step: {VARIANT} depth 2 at 1024x1024 (token-count dependence)")
        out["at_1024px_depth2"] = measure(2, 1024, repeats=3)
    return out
