"""The `quanto` backend: optimum-quanto qfloat8 weights with the same protection policy (as `exclude`).

Kept for comparison (the benchmark measures it side by side) and for users already on quanto.
quanto stores per-output-channel float8_e4m3fn weights with its own scales; forward dequantizes.
"""

from __future__ import annotations

import copy

import torch

from .config import QuantConfig
from .policy import ProtectionPolicy
from .report import LayerReport, Report


def quanto_weight_dtype(config: QuantConfig):
    from optimum.quanto import qfloat8_e4m3fn, qfloat8_e5m2

    return {"float8_e4m3fn": qfloat8_e4m3fn, "float8_e5m2": qfloat8_e5m2}[config.fp8_format]


def dequantized_quanto_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The float weight a quanto QLinear actually multiplies with."""
    weight = layer.qweight if hasattr(layer, "qweight") else layer.weight
    return weight.dequantize() if hasattr(weight, "dequantize") else weight


def _tensor_bytes(t) -> int:
    if hasattr(t, "_data") and hasattr(t, "_scale"):
        return t._data.numel() * t._data.element_size() + t._scale.numel() * t._scale.element_size()
    return t.numel() * t.element_size()


def quantize_quanto(module: torch.nn.Module, config: QuantConfig, policy: ProtectionPolicy,
                    inplace: bool = False) -> tuple[torch.nn.Module, Report]:
    from optimum.quanto import freeze
    from optimum.quanto import quantize as quanto_quantize

    if config.scaling != "per_channel":
        raise ValueError("scaling: the quanto backend only does per_channel scales; use backend=native for per_tensor")
    target = module if inplace else copy.deepcopy(module)
    linears = {n: m for n, m in target.named_modules() if isinstance(m, torch.nn.Linear)}
    exclude = [n for n, m in linears.items() if not policy.should_quantize(n, tuple(m.weight.shape))]
    before = {n: (m.weight.detach().clone(), tuple(m.weight.shape), str(m.weight.dtype)) for n, m in linears.items()}
    quanto_quantize(target, weights=quanto_weight_dtype(config), exclude=exclude or None)
    freeze(target)
    report = Report(rule=policy.rule, warnings=list(policy.warnings), fp8_format=config.fp8_format,
                    scaling=config.scaling, backend="quanto")
    from .formats import relative_error

    for name, (weight, shape, dtype) in before.items():
        nbytes = weight.numel() * weight.element_size()
        if name in exclude:
            report.add(LayerReport(name, shape, dtype, dtype, nbytes, nbytes, None, "protected"))
            continue
        layer = target.get_submodule(name)
        q = layer.weight
        report.add(LayerReport(name, shape, dtype, str(getattr(q, "_data", q).dtype), nbytes, _tensor_bytes(q),
                               relative_error(weight, dequantized_quanto_weight(layer)), "fp8"))
    return target, report
