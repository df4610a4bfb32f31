"""Section 2, quantize throughput (million parameters per second) on the Linear layers of full-size blocks.

Weights are float16 (as stored in a checkpoint), drawn as `student_t` (bench.weights). Compared:
- ours: quant.formats.quantize_weight (absmax per channel, scale, saturate, cast) on every layer;
- ours + report: quantize_weight_with_error, the loaders' per-tensor step, which also sums each layer's
  error for the report in the same pass;
- quanto: optimum.quanto quantize(qfloat8) + freeze on a module holding the same layers;
- cast: a plain `.to(torch.float8_e4m3fn)`, the least work any FP8 conversion can do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quant.formats import quantize_weight, quantize_weight_with_error

from . import models
from .common import interleaved_medians, log
from .weights import fill_


def block_linears(variant: str) -> torch.nn.Module:
    """Joint block 0 of the full-size architecture, float16, with drawn weights."""
    block = models.meta_model(variant, depth=2, dtype=torch.float32).joint_blocks[0].to_empty(device="cpu")
    return fill_(block, "student_t").half()


def _each(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor]) -> None:
    for w in weights:
        fn(w)


def _quanto(block: torch.nn.Module) -> None:
    from optimum.quanto import freeze, qfloat8_e4m3fn
    from optimum.quanto import quantize as quanto_quantize

    target = models.sharing_copy(block)
    quanto_quantize(target, weights=qfloat8_e4m3fn)
    freeze(target)


def _measure(variant: str, repeats: int) -> dict:
    log(f"quantize throughput: {variant} block 0")
    block = block_linears(variant)
    weights = [m.weight.detach() for m in block.modules() if isinstance(m, torch.nn.Linear)]
    n = sum(w.numel() for w in weights)
    seconds = interleaved_medians({"ours": lambda: _each(quantize_weight, weights),
                                   "ours_with_report": lambda: _each(quantize_weight_with_error, weights),
                                   "quanto": lambda: _quanto(block),
                                   "cast": lambda: _each(lambda w: w.to(torch.float8_e4m3fn), weights)}, repeats)
    return {"params": n, "layers": len(weights), "seconds": seconds,
            "mparams_s": {k: n / s / 1e6 for k, s in seconds.items()}}


def run(quick: bool) -> dict:
    repeats = 3 if quick else 5
    per_variant = {variant: _measure(variant, repeats) for variant in ("sd35_large", "sd35_medium")}
    params = sum(v["params"] for v in per_variant.values())
    totals = {k: sum(v["seconds"][k] for v in per_variant.values()) for k in per_variant["sd35_large"]["seconds"]}
    return {**{f"{k}_mparams_s": params / s / 1e6 for k, s in totals.items()},
            "ours_over_quanto": totals["quanto"] / totals["ours"], "ours_over_cast": totals["cast"] / totals["ours"],
            "params": params, "source_dtype": "float16", "repeats": repeats, "per_variant": per_variant}
