"""The `quanto` backend: optimum-quanto qfloat8 weights on the layers the plan marks FP8.

The reference implementation: the benchmark and tests measure it side by side with ours, and
`python -m sd35_fp8.quant convert --backend quanto` offers it to people on the seed's stack (optional extra `[quanto]`;
the nodes never import it). quanto stores per-output-channel float8 weights with absmax scales: on a module
they become quanto's QLinear (forward dequantizes), in a file our layout (FP8 weight + float32 scale).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import QuantConfig
from .decision import FP8
from .formats import relative_error
from .report import LayerReport, Report


def quanto_weight_dtype(fp8_format: str):
    try:
        from optimum.quanto import qfloat8_e4m3fn, qfloat8_e5m2
    except ImportError:
        raise ValueError("backend quanto needs optimum-quanto: pip install optimum-quanto (the pack's [quanto] "
                         "extra), or use backend native") from None

    return {"float8_e4m3fn": qfloat8_e4m3fn, "float8_e5m2": qfloat8_e5m2}[fp8_format]


def _check_scaling(scaling: str) -> None:
    if scaling != "per_channel":
        raise ValueError("scaling: the quanto backend only does per_channel scales; use backend=native for per_tensor")


def quanto_quantize_weight(weight: torch.Tensor, fp8_format: str, scaling: str,
                           name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, float]:
    """quanto's qfloat8 of one 2-D weight, as (FP8 data, float32 [out, 1] scale, relative error)."""
    from optimum.quanto import quantize_weight
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer

    _check_scaling(scaling)
    qtype = quanto_weight_dtype(fp8_format)
    qweight = quantize_weight(weight, qtype, axis=0, scale=AbsmaxOptimizer()(weight, qtype, axis=0))
    return qweight._data, qweight._scale.float(), relative_error(weight, qweight.dequantize())


def quantize_quanto(target: torch.nn.Module, chosen: Mapping[str, str], config: QuantConfig,
                    report: Report) -> set[str]:
    """In place: quanto's qfloat8 on the Linear layers `chosen` ({layer: weight key}: those the plan marks FP8);
    their rows go into `report`. Returns the keys handled (the FP8 layers' weights)."""
    from optimum.quanto import freeze
    from optimum.quanto import quantize as quanto_quantize

    _check_scaling(config.scaling)
    before = {name: target.get_submodule(name).weight.detach().clone() for name in chosen}
    # quanto converts every Linear and Conv it is not told to leave alone
    exclude = [n for n, m in target.named_modules() if n and n not in chosen and not list(m.children())]
    quanto_quantize(target, weights=quanto_weight_dtype(config.fp8_format), exclude=exclude or None)
    freeze(target)
    for name, weight in before.items():
        layer = target.get_submodule(name)
        stored = getattr(layer.weight, "_data", layer.weight)
        multiplied = layer.qweight if hasattr(layer, "qweight") else layer.weight  # what the QLinear multiplies with
        multiplied = multiplied.dequantize() if hasattr(multiplied, "dequantize") else multiplied
        report.add(LayerReport.of(name, weight, stored, getattr(layer.weight, "_scale", None),
                                  relative_error(weight, multiplied), FP8))
    return set(chosen.values())
