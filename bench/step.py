"""Section 4, CPU step time: one denoiser forward of full-width SD3.5 Medium, the variants side by side.

fp32 reference, ours (weight_only: FP8 weights dequantized to float32 in forward), ComfyUI's fp8 cast
(manual_cast: FP8 weights cast to float32 in forward) and quanto qfloat8, all on the same `student_t`
weights and inputs, all held at once (the FP8 variants share every tensor they do not replace) and run
round-robin; the median of the repeats is kept. Quick mode runs 2 blocks, full mode all 24 (fewer
if this machine lacks the memory to hold all four side by side, said in `depth`).
"""

from __future__ import annotations

import os

from quant.config import QuantConfig

from . import models
from .common import GIB, interleaved_medians, log, rel_err

VARIANT = "sd35_medium"


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _fits(depth: int) -> bool:
    """fp32 reference + three FP8 copies (~1/4 each) + working memory, against what the machine has free."""
    params = models.meta_model(VARIANT, depth).state_dict()
    n = sum(t.numel() for t in params.values())
    return n * 4 * 2.0 + 2 * GIB < _available_bytes()


def measure(depth: int, pixels: int, repeats: int) -> dict:
    ref = models.reference(VARIANT, depth, "student_t")
    inp = models.inputs(pixels)
    variants = {
        "fp32": ref,
        "fp8_weight_only": models.ours(ref, QuantConfig(compute="weight_only")),
        "comfy_cast": models.comfy_cast(ref, VARIANT, depth),
        "quanto": models.quanto(ref),
    }
    outputs = {}

    def runner(name):
        def run():
            outputs[name] = models.forward(variants[name], inp)
        return run

    seconds = interleaved_medians({name: runner(name) for name in variants}, repeats)
    base = seconds["fp32"]
    return {
        "depth": depth, "pixels": pixels, "image_tokens": (pixels // 16) ** 2, "context_tokens": models.CONTEXT_TOKENS,
        "repeats": repeats, "seconds": seconds,
        **{f"{name}_over_fp32": s / base for name, s in seconds.items() if name != "fp32"},
        "rel_err": {name: rel_err(outputs["fp32"], out) for name, out in outputs.items() if name != "fp32"},
    }


def run(quick: bool) -> dict:
    depth = 2 if quick else models.depth_of(VARIANT)
    while depth > 2 and not _fits(depth):
        depth //= 2
    pixels = 512
    log(f"step: {VARIANT} depth {depth} at {pixels}x{pixels}")
    main = measure(depth, pixels, repeats=2 if quick else 3)
    out = {"variant": VARIANT, "weights": "student_t", **main}
    if not quick:
        log(f"step: {VARIANT} depth 2 at 1024x1024 (token-count dependence)")
        out["at_1024px_depth2"] = measure(2, 1024, repeats=3)
    return out
