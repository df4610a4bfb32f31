"""Section 2, quantize throughput (million parameters per second) on the Linear layers of full-size blocks.

Weights are float16 (as stored in a checkpoint), drawn as `student_t` (bench.weights). Compared:
- ours: quant.formats.quantize_weight (absmax per channel, scale, saturate, cast) on every layer;
- ours + report: quantize_weight_with_error, the loaders' per-tensor step, which also sums each layer's
  error for the report in the same pass;
- quanto: optimum.quanto quantize(qfloat8) + freeze on a module holding the same layers;
- cast: a plain `.to(torch.float8_e4m3fn)`;
- copy bound: the memory traffic of quantizing and nothing else: a new FP8-sized tensor written from the 16-bit
  source (each output byte is the sum of two of the source's bytes: 2 bytes read and 1 written per parameter,
  as quantizing must; the scales add 4 bytes a row, under 0.3%).
All run round-robin over the rounds; the goals are judged on the median of the per-round ratios.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sd35_fp8.quant.formats import quantize_weight, quantize_weight_with_error

from . import models
from .common import interleaved, log, medians, round_ratios
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


def _copy_bound(w: torch.Tensor) -> torch.Tensor:
    raw = w.view(torch.uint8).reshape(-1)
    return torch.add(raw[:w.numel()], raw[w.numel():])


def _measure(variant: str, repeats: int) -> dict:
    log(f"quantize throughput: {variant} block 0")
    block = block_linears(variant)
    weights = [m.weight.detach() for m in block.modules() if isinstance(m, torch.nn.Linear)]
    n = sum(w.numel() for w in weights)
    times = interleaved({"ours": lambda: _each(quantize_weight, weights),
                         "ours_with_report": lambda: _each(quantize_weight_with_error, weights),
                         "quanto": lambda: _quanto(block),
                         "cast": lambda: _each(lambda w: w.to(torch.float8_e4m3fn), weights),
                         "copy_bound": lambda: _each(_copy_bound, weights)}, repeats)
    return {"params": n, "layers": len(weights), "times": times,
            "mparams_s": {k: n / s / 1e6 for k, s in medians(times).items()}}


def run(quick: bool) -> dict:
    repeats = 3 if quick else 9
    per_variant = {variant: _measure(variant, repeats) for variant in (("sd35_medium",) if quick else
                                                                       ("sd35_large", "sd35_medium"))}
    params = sum(v["params"] for v in per_variant.values())
    # round i of the whole run: both variants' layers
    rounds = {k: [sum(ts) for ts in zip(*(v["times"][k] for v in per_variant.values()))]
              for k in per_variant["sd35_medium"]["times"]}
    totals = medians(rounds)
    copy_bound = round_ratios(rounds["copy_bound"], rounds["ours"])  # throughput ratio: time of the bound / ours
    report = round_ratios(rounds["ours_with_report"], rounds["ours"], minus=1.0)
    return {**{f"{k}_mparams_s": params / s / 1e6 for k, s in totals.items()},
            "ours_over_copy_bound": copy_bound["median"], "report_overhead": report["median"],
            "spread": {"ours_over_copy_bound": copy_bound, "report_overhead": report},
            "ours_over_quanto": totals["quanto"] / totals["ours"], "ours_over_cast": totals["cast"] / totals["ours"],
            "params": params, "source_dtype": "float16", "repeats": repeats, "per_variant": per_variant}
