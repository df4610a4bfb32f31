"""Quantize a torch module: replace each selected nn.Linear by an FP8Linear (native) or a quanto qfloat8 layer.

Both backends also store the policy's unit-scale tables (an SD3 MMDiT's `pos_embed`) in FP8; the
model's own forward casts them (ComfyUI's MMDiT does: `cast_to_input`). The input module is left untouched
unless `inplace=True` (a deep copy is quantized).
"""

from __future__ import annotations

import copy

import torch

from .config import QuantConfig
from .formats import quantize_unit_scale, quantize_weight_with_error
from .linear import FP8Linear
from .policy import ProtectionPolicy, resolve_policy
from .report import LayerReport, Report


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def module_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape for every parameter and buffer (works on meta-device modules)."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return {name: tuple(t.shape) for name, t in named}


def selected_linears(module: torch.nn.Module, policy: ProtectionPolicy) -> tuple[list[str], list[str]]:
    """(names to quantize, names protected) among the module's nn.Linear layers."""
    chosen, protected = [], []
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.Linear):
            (chosen if policy.should_quantize(name, tuple(child.weight.shape)) else protected).append(name)
    return chosen, protected


def _set_child(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def quantize(module: torch.nn.Module, config: QuantConfig | None = None, policy: ProtectionPolicy | None = None,
             inplace: bool = False, hint: str = "") -> tuple[torch.nn.Module, Report]:
    """FP8 copy of `module` (or `module` itself with inplace=True) and the report of what was done."""
    config = config or QuantConfig()
    policy = policy or resolve_policy(config, module_shapes(module), hint)
    if config.backend == "quanto":
        from .quanto_backend import quantize_quanto

        target, report = quantize_quanto(module, config, policy, inplace=inplace)
        quantize_tables(target, policy, config.fp8_format, report)
        return target, report
    target = module if inplace else copy.deepcopy(module)
    chosen, protected = selected_linears(target, policy)
    report = Report(rule=policy.rule, warnings=list(policy.warnings), fp8_format=config.fp8_format,
                    scaling=config.scaling, backend="native")
    for name in chosen:
        linear = target.get_submodule(name)
        qweight, scale, err = quantize_weight_with_error(linear.weight.detach(), config.fp8_format, config.scaling,
                                                         name=name)
        bias = None if linear.bias is None else linear.bias.detach()
        layer = FP8Linear(qweight, scale, bias, config.compute)
        report.add(LayerReport(name, tuple(linear.weight.shape), str(linear.weight.dtype), str(layer.weight.dtype),
                               _nbytes(linear.weight), _nbytes(layer.weight) + _nbytes(layer.weight_scale), err, "fp8"))
        _set_child(target, name, layer)
    for name in protected:
        weight = target.get_submodule(name).weight
        report.add(LayerReport(name, tuple(weight.shape), str(weight.dtype), str(weight.dtype), _nbytes(weight),
                               _nbytes(weight), None, "protected"))
    quantize_tables(target, policy, config.fp8_format, report)
    _report_rest(target, report)
    return target, report


def quantize_table(name: str, tensor: torch.Tensor, fp8_format: str, report: Report) -> torch.Tensor:
    """A policy's unit-scale table (pos_embed): the tensor to use, its row (and any warning) added to `report`.

    Already-FP8 tables are kept; `quantize_unit_scale` decides whether FP8 with scale 1.0 is good enough."""
    shape, before, size = tuple(tensor.shape), str(tensor.dtype), _nbytes(tensor)
    fp8, error, why = (None, None, "") if tensor.dtype.itemsize == 1 else \
        quantize_unit_scale(tensor.detach(), fp8_format, name=name)
    if why:
        report.warnings.append(why)
    if fp8 is None:
        report.add(LayerReport(name, shape, before, before, size, size, None, "kept"))
        return tensor
    report.add(LayerReport(name, shape, before, str(fp8.dtype), size, _nbytes(fp8), error, "fp8"))
    return fp8


def quantize_tables(module: torch.nn.Module, policy: ProtectionPolicy, fp8_format: str, report: Report) -> None:
    """In place: each root tensor of the policy's unit-scale tables (pos_embed; a buffer or a parameter) becomes
    its FP8 copy with scale 1.0, where `quantize_table` says so; the report gets a row (and any warning)."""
    for name in sorted(policy.unit_scale):
        tensor = getattr(module, name, None)
        if not isinstance(tensor, torch.Tensor):
            continue
        table = quantize_table(name, tensor, fp8_format, report)
        if table is tensor:
            continue
        if name in module._parameters:
            setattr(module, name, torch.nn.Parameter(table, requires_grad=False))
        else:
            setattr(module, name, table)


def _report_rest(module: torch.nn.Module, report: Report) -> None:
    """Every tensor not in a reported layer (norms, biases, pos_embed, convs) as `kept`, so totals are the model's."""
    covered = {f"{layer.name}{suffix}" for layer in report.layers for suffix in ("", ".weight", ".weight_scale")}
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if name not in covered and not name.endswith("_scale") and "._" not in name:
            report.add(LayerReport(name, tuple(tensor.shape), str(tensor.dtype), str(tensor.dtype), _nbytes(tensor),
                                   _nbytes(tensor), None, "kept"))
