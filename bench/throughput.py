"""Section 2, quantize throughput (million parameters per second) on the Linear layers of full-size blocks.

Weights are float16 (as stored in a checkpoint), drawn as `student_t` (bench.weights). Compared:
- ours: quant.formats.quantize_weight (absmax per channel, scale, saturate, cast) on every layer;
- ours + report: quantize_weight_with_error, the loaders' per-tensor step, which also sums each layer's
  error for the report in the same pass;
- quanto: optimum.quanto quantize(qfloat8) + freeze on a module holding the same layers;
- cast: a plain `.to(torch.float8_e4m3fn)`, the least work any FP8 conversion can do.
Methods run round-robin and the median of the repeats is kept.
"""

from __future__ import annotations

import torch

from quant.formats import quantize_weight, quantize_weight_with_error

from . import models
from .common import interleaved_medians, log
from .weights import fill_


def block_linears(variant: str, index: int = 0) -> torch.nn.Module:
    """Joint block `index` of the full-size architecture, float16, with drawn weights."""
    meta = models.meta_model(variant, depth=max(2, index + 2))
    block = meta.joint_blocks[index].to_empty(device="cpu")
    for tensor in block.state_dict(keep_vars=True).values():
        tensor.data = tensor.data.float()
    fill_(block, "student_t", seed=index)
    return block.half()


def _linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def _ours(weights: list[torch.Tensor]) -> None:
    for w in weights:
        quantize_weight(w)


def _ours_with_report(weights: list[torch.Tensor]) -> None:
    for w in weights:
        quantize_weight_with_error(w)


def _cast(weights: list[torch.Tensor]) -> None:
    for w in weights:
        w.to(torch.float8_e4m3fn)


def _quanto(block: torch.nn.Module) -> None:
    from optimum.quanto import freeze, qfloat8_e4m3fn
    from optimum.quanto import quantize as quanto_quantize

    target = models.sharing_copy(block)
    quanto_quantize(target, weights=qfloat8_e4m3fn)
    freeze(target)


def _measure(variant: str, repeats: int) -> dict:
    block = block_linears(variant)
    weights = [m.weight.detach() for m in _linears(block)]
    n = sum(w.numel() for w in weights)
    seconds = interleaved_medians({
        "ours": lambda: _ours(weights),
        "ours_with_report": lambda: _ours_with_report(weights),
        "quanto": lambda: _quanto(block),
        "cast": lambda: _cast(weights),
    }, repeats)
    return {"params": n, "layers": len(weights), "seconds": seconds,
            "mparams_s": {k: n / s / 1e6 for k, s in seconds.items()}}


def run(quick: bool) -> dict:
    repeats = 3 if quick else 5
    per_variant = {}
    for variant in ("sd35_large", "sd35_medium"):
        log(f"quantize throughput: {variant} block 0")
        per_variant[variant] = _measure(variant, repeats)
    params = sum(v["params"] for v in per_variant.values())
    totals = {k: sum(v["seconds"][k] for v in per_variant.values()) for k in per_variant["sd35_large"]["seconds"]}
    out = {f"{k}_mparams_s": params / s / 1e6 for k, s in totals.items()}
    out["ours_over_quanto"] = totals["quanto"] / totals["ours"]
    out["ours_over_cast"] = totals["cast"] / totals["ours"]
    out["params"] = params
    out["source_dtype"] = "float16"
    out["repeats"] = repeats
    out["per_variant"] = per_variant
    return out
